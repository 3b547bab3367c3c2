"""The README's install command installs what its Python blocks import.

A reader runs the first command of *Install and run* and then copies blocks: every
third-party package a block imports must come with that command, from the runtime
dependencies or from the extras it names (flax from ``nnx``, matplotlib from ``study``).
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib

from markdown_blocks import ROOT, code_blocks, python_blocks

README = ROOT / "README.md"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# import name -> distribution name, where they differ
DISTRIBUTION = {"sklearn": "scikit-learn"}


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9_.-]+", requirement)[0].lower()


def _install_command() -> str:
    setup = next(b for b in code_blocks(README.read_text()) if "[test]" in b.code)
    commands = [c for c in setup.code.splitlines() if c.strip() and not c.startswith("#")]
    return commands[0]


def _installed_by(command: str) -> set[str]:
    """The distributions ``pip install -e ".[a,b]"`` brings, following ``agsopt[x]`` extras."""
    extras = PROJECT["optional-dependencies"]
    todo = re.search(r'"\.\[([^\]]*)\]"', command)[1].split(",")
    names = {_name(r) for r in PROJECT["dependencies"]}
    seen = set()
    while todo:
        extra = todo.pop().strip()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in extras[extra]:
            nested = re.fullmatch(r"agsopt\[([^\]]*)\]", requirement)
            if nested:
                todo.extend(nested[1].split(","))
            else:
                names.add(_name(requirement))
    return names


def _imports(code: str) -> set[str]:
    tops = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            tops |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            tops.add(node.module.split(".")[0])
    return tops - set(sys.stdlib_module_names) - {"__future__", "agsopt"}


def test_install_command_brings_every_package_the_blocks_import():
    command = _install_command()
    assert command.startswith("python3 -m pip install -e")
    installed = _installed_by(command)
    missing = {}
    for block in python_blocks(README):
        needed = {DISTRIBUTION.get(top, top) for top in _imports(block.code)}
        if needed - installed:
            missing[block.id] = sorted(needed - installed)
    assert not missing, f"{command!r} does not install {missing}"


def test_the_check_sees_flax():
    assert "flax" in _imports("from flax import nnx\nimport jax")
    assert "flax" not in _installed_by('python3 -m pip install -e ".[study]"')
    assert "flax" in _installed_by('python3 -m pip install -e ".[study,nnx]"')
