"""Fenced code blocks of Markdown files, and running the Python ones as the reader would.

Used by ``test_readme.py`` (README.md) and ``test_docs.py`` (docs/*.md).

Fences follow CommonMark: an opening fence is three or more backticks (or tildes) indented
by at most three spaces, followed by an info string (the language); the block ends at a line
of at least as many of the same character and nothing else. A block that never closes, or an
opening fence without a language, is reported: the first is a broken page, the second is the
usual symptom of a fence that closed too early (the next bare fence then *opens* a block and
the prose after it renders as code).

Python blocks are run as written, each in a fresh namespace. Two markers change that:

- a block that mentions ``xla_force_host_platform_device_count`` (the multi-device recipes)
  runs in a subprocess with eight virtual CPU devices, since the device count is fixed when
  JAX starts;
- a block whose first line is ``# illustrative`` is only compiled, never run.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MULTI_DEVICE_MARKER = "xla_force_host_platform_device_count"
ILLUSTRATIVE_MARKER = "# illustrative"
NUM_DEVICES = 8

_OPEN = re.compile(r"^ {0,3}(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


@dataclasses.dataclass(frozen=True)
class Block:
    path: str
    line: int  # 1-based line of the opening fence
    info: str
    code: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def id(self) -> str:
        return f"{Path(self.path).name}:{self.line}"


def fence_problems(text: str, path: str = "<text>") -> list[str]:
    """Unclosed fences and fences that open without a language, as readable messages."""
    problems = []
    for block in _scan(text, path, problems):
        if not block.language:
            problems.append(
                f"{path}:{block.line}: a fence opens a block without a language "
                "(did the previous block close early?)"
            )
    return problems


def code_blocks(text: str, path: str = "<text>") -> list[Block]:
    """Every fenced block in order; raises ``ValueError`` if a fence is left open."""
    problems: list[str] = []
    blocks = _scan(text, path, problems)
    if problems:
        raise ValueError("; ".join(problems))
    return blocks


def python_blocks(path: Path) -> list[Block]:
    return [b for b in code_blocks(path.read_text(), str(path)) if b.language == "python"]


def _scan(text: str, path: str, problems: list[str]) -> list[Block]:
    blocks = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = _OPEN.match(lines[i])
        if match is None or (match["fence"][0] == "`" and "`" in match["info"]):
            i += 1
            continue
        fence, start = match["fence"], i
        close = re.compile(rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$")
        i += 1
        while i < len(lines) and not close.match(lines[i]):
            i += 1
        if i == len(lines):
            problems.append(f"{path}:{start + 1}: the fence {fence}{match['info']} never closes")
            break
        body = "\n".join(lines[start + 1 : i]) + "\n"
        blocks.append(Block(path, start + 1, match["info"].strip(), body))
        i += 1
    return blocks


def device_env(num_devices: int = NUM_DEVICES) -> dict[str, str]:
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={num_devices}")
    # the checkout under test, whatever an editable install elsewhere points to
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}


def run_block(block: Block, tmp_path: Path) -> str:
    """Run one Python block as the reader would; returns what it printed (subprocess only)."""
    code = compile(block.code, block.id, "exec")
    if block.code.startswith(ILLUSTRATIVE_MARKER):
        return ""
    if MULTI_DEVICE_MARKER in block.code:
        script = tmp_path / "block.py"
        script.write_text(block.code)
        done = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,
            env=device_env(),
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, f"{block.id} failed:\n{done.stderr[-4000:]}"
        return done.stdout
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a block that writes files writes them here
    try:
        exec(code, {"__name__": "__main__"})
    finally:
        os.chdir(cwd)
    return ""
