"""Packaging: the declared dependencies are what the library imports, and the wheel ships
what a user needs (LICENSE, py.typed); the minimum versions CI tests are the declared ones.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import tomllib
import zipfile

from markdown_blocks import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
CONSTRAINTS = ROOT / ".ci" / "constraints-min.txt"


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower()


def _lower_bound(requirement: str) -> str | None:
    match = re.search(r">=\s*([0-9][0-9.]*)", requirement)
    return match[1] if match else None


def _third_party_imports() -> tuple[set[str], set[str]]:
    """Top-level names imported by agsopt/: (at module level, inside functions only)."""
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    eager, lazy = set(), set()
    for path in (ROOT / "agsopt").rglob("*.py"):
        tree = ast.parse(path.read_text())
        module_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {n.split(".")[0] for n in names} - stdlib - {"agsopt"}:
                # imports inside functions (and `if TYPE_CHECKING:`) are not module level
                (eager if id(node) in module_level else lazy).add(top)
    return eager, lazy - eager


def test_runtime_dependencies_are_what_the_library_imports():
    eager, _ = _third_party_imports()
    declared = {_name(r) for r in PROJECT["dependencies"]}
    assert declared == eager == {"jax", "optax", "numpy"}


def test_lazily_imported_packages_come_from_an_extra():
    _, lazy = _third_party_imports()
    extras = {_name(r) for reqs in PROJECT["optional-dependencies"].values() for r in reqs}
    assert lazy <= extras, lazy - extras  # matplotlib, tqdm (study), flax (nnx)


def test_minimum_versions_are_the_declared_lower_bounds():
    pins = dict(
        line.split("==")
        for line in (raw.split("#")[0].strip() for raw in CONSTRAINTS.read_text().splitlines())
        if line
    )
    bounds = {
        _name(r): _lower_bound(r)
        for reqs in [PROJECT["dependencies"], *PROJECT["optional-dependencies"].values()]
        for r in reqs
        if _name(r) in pins
    }
    assert set(pins) - {"jaxlib"} == set(bounds)
    assert all(pins[name] == bound for name, bound in bounds.items()), (pins, bounds)
    assert pins["jaxlib"] == pins["jax"]
    assert PROJECT["requires-python"] == ">=3.11"
    script = (ROOT / ".ci" / "min-versions").read_text()
    assert "3.11" in script and "constraints-min.txt" in script
    listed = re.findall(r"tests/test_\w+\.py", script)
    assert listed and all((ROOT / name).is_file() for name in listed), listed


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert PROJECT["license"] == {"text": "Apache-2.0"}
    assert "License :: OSI Approved :: Apache Software License" in PROJECT["classifiers"]


def test_wheel_ships_license_and_py_typed(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = tmp_path.glob("agsopt-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "agsopt/py.typed" in names
    assert any(n.endswith("LICENSE") for n in names)
    metadata = (
        zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    )
    assert "Requires-Python: >=3.11" in metadata
    assert "Requires-Dist: flax" in metadata and 'extra == "nnx"' in metadata
