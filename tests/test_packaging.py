"""Packaging: the declared dependencies are what the library imports, and the wheel ships
what a user needs (LICENSE, py.typed); the minimum versions CI tests are the declared ones;
CI runs the README blocks against the built wheel in a fresh venv (.ci/wheel-readme, whose
driver refuses an agsopt imported from anywhere but that venv); the docs build output is
git-ignored; the GPU check says why it stops on a machine without an accelerator.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib
import zipfile

import pytest
from markdown_blocks import ROOT, python_blocks

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


def _readme_blocks_driver():
    """``.ci/readme_blocks.py`` as a module (it is a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "readme_blocks", ROOT / ".ci" / "readme_blocks.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_runs_the_readme_blocks_against_the_built_wheel():
    """.ci/run ends with .ci/wheel-readme: build the wheel, install it with the extra the
    README's blocks import into a fresh venv, run the blocks with that venv's Python."""
    run = (ROOT / ".ci" / "run").read_text()
    assert "bash .ci/wheel-readme" in run.splitlines()
    script = (ROOT / ".ci" / "wheel-readme").read_text()
    assert "pip wheel --no-deps" in script and "-m venv" in script
    assert '[nnx]"' in script and '"$work/venv/bin/python" .ci/readme_blocks.py' in script
    # the extra installed is every third-party package the README's blocks import
    blocks = "\n".join(b.code for b in python_blocks(ROOT / "README.md"))
    imported = {m for m in re.findall(r"^\s*(?:from|import) (\w+)", blocks, re.M)}
    assert imported - {"agsopt", "jax", "optax", "numpy", "flax"} <= set(sys.stdlib_module_names)
    assert "flax" in {_name(r) for r in PROJECT["optional-dependencies"]["nnx"]}


def test_readme_driver_refuses_an_agsopt_outside_the_environment(tmp_path):
    driver = _readme_blocks_driver()
    prefix = tmp_path / "venv"
    installed = prefix / "lib" / "python3.11" / "site-packages" / "agsopt" / "__init__.py"
    driver.check_location(installed, prefix, ROOT)  # the wheel's copy: accepted
    with pytest.raises(RuntimeError, match="editable install or the checkout"):
        driver.check_location(ROOT / "agsopt" / "__init__.py", prefix, ROOT)
    with pytest.raises(RuntimeError, match="not from the environment under test"):
        driver.check_location(tmp_path / "elsewhere" / "agsopt" / "__init__.py", prefix, ROOT)
    # this interpreter's agsopt is the editable checkout (or the tree on PYTHONPATH): refused
    with pytest.raises(RuntimeError, match="editable install or the checkout"):
        driver.installed_agsopt(sys.executable, tmp_path)


def test_the_docs_build_output_is_ignored_by_git():
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("site/index.html", "site/api/smoothing/index.html"):
        done = subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT, timeout=60)
        assert done.returncode == 0, f"{path} is not git-ignored"
    done = subprocess.run(["git", "check-ignore", "-q", "docs/index.md"], cwd=ROOT, timeout=60)
    assert done.returncode == 1


def test_gpu_check_says_why_it_exits_without_a_gpu():
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 3, done.stderr[-2000:]
    assert "JAX sees no GPU or TPU, only the CPU" in done.stderr
    assert "JAX_PLATFORMS=cpu is set" in done.stderr
    assert "benchmarks" not in done.stdout  # nothing ran
