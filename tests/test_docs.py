"""The documentation site: pages whose code runs, and an API reference that builds strictly.

- Every ```python block of docs/*.md runs as written (fresh namespace), and the fences
  balance (``markdown_blocks.py``). The migration page's block asserts that ``agsopt.sam``
  and ``optax.contrib.sam`` take the same steps; the training loops assert they train.
- ``mkdocs build --strict`` succeeds (any warning fails it: a docstring the parser cannot
  read, a broken link) and the API reference lists every public name of every public module.
- The griffe extension that reads the docstrings' Sphinx markup as Markdown.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from markdown_blocks import ROOT, fence_problems, python_blocks, run_block

DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))
BLOCKS = [b for page in PAGES for b in python_blocks(page)]

# The public modules whose every public name (``__all__``) the reference must list.
PUBLIC_MODULES = (
    "agsopt",
    "agsopt.smoothing",
    "agsopt.smoothing.estimator",
    "agsopt.smoothing.directions",
    "agsopt.smoothing.covariance",
    "agsopt.smoothing.covariance_rules",
    "agsopt.sharpness",
    "agsopt.functions",
    "agsopt.study",
    "agsopt.tree_utils",
)


def test_pages_fences_balance():
    assert PAGES
    problems = [p for page in PAGES for p in fence_problems(page.read_text(), str(page))]
    assert problems == []


def test_every_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text()
    for page in PAGES:
        assert str(page.relative_to(DOCS)) in nav, page


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_python_block_runs(block, tmp_path):
    run_block(block, tmp_path)


def _rst_to_markdown():
    sys.path.insert(0, str(DOCS))
    try:
        return importlib.import_module("griffe_rst_roles").rst_to_markdown
    finally:
        sys.path.remove(str(DOCS))


def test_rst_markup_is_read_as_markdown():
    pytest.importorskip("griffe")
    convert = _rst_to_markdown()
    assert convert("see :func:`sam_perturbation` and :class:`~agsopt.covariance.Dense`") == (
        "see `sam_perturbation` and `Dense`"
    )
    assert convert(":mod:`agsopt.estimator`") == "`agsopt.estimator`"
    assert convert("Example::\n\n    x = 1\n") == "Example:\n\n    x = 1"
    assert convert("a ``literal``") == "a ``literal``"
    text = "Args:\n  decay: β.\n  lo, hi: bounds on r,\n    kept positive.\n  key: a key.\n"
    assert convert(text) == (
        "Args:\n  decay: β.\n  lo: bounds on r,\n    kept positive.\n"
        "  hi: bounds on r,\n    kept positive.\n  key: a key."
    )


def _inventory(site: Path) -> set[str]:
    """The object names of mkdocstrings' Sphinx-style inventory ``objects.inv``."""
    raw = (site / "objects.inv").read_bytes()
    body = zlib.decompress(raw.split(b"\n", 4)[4]).decode()
    return {line.split()[0] for line in body.splitlines() if line.strip()}


def test_mkdocs_build_strict_lists_every_public_name(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    site = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    documented = {name.rsplit(".", 1)[-1] for name in _inventory(site)}
    missing = {
        module: [n for n in importlib.import_module(module).__all__ if n not in documented]
        for module in PUBLIC_MODULES
        if hasattr(importlib.import_module(module), "__all__")
    }
    missing["agsopt"].remove("__version__")
    assert all(not names for names in missing.values()), missing
    for page in ("api/smoothing", "api/sharpness", "training-loops", "migrating", "convention"):
        assert (site / page / "index.html").is_file(), page
