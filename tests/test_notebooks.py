"""The notebooks in notebooks/: committed executed (small size, outputs included, no errors,
small files), and executed again at the small size, so that a broken notebook fails CI."""

from __future__ import annotations

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((pathlib.Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
MAX_BYTES = 1_000_000


def _errors(notebook) -> list:
    return [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found in notebooks/"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_executed_and_small(path):
    assert path.stat().st_size < MAX_BYTES, f"{path.name}: {path.stat().st_size} bytes"
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: run it top to bottom"
    assert all(cell.outputs for cell in code), f"{path.name}: a code cell has no output"
    assert not _errors(notebook)
    images = [o for cell in code for o in cell.outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name}: no plots"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_small(path, monkeypatch, tmp_path):
    notebook = nbformat.read(path, as_version=4)
    monkeypatch.setenv("AGSOPT_NOTEBOOK_SIZE", "small")
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="python3",
        timeout=240,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    assert not _errors(notebook)
