"""README.md: its code fences balance and every ```python block runs as written.

Each block runs in a fresh namespace, so a block that forgets an import or uses a name
defined in another block fails here. The multi-device recipes (marked by the
``xla_force_host_platform_device_count`` comment they carry) run in a subprocess with eight
virtual CPU devices and must report eight devices. See ``markdown_blocks.py``.
"""

from __future__ import annotations

import re

import pytest
from markdown_blocks import (
    MULTI_DEVICE_MARKER,
    NUM_DEVICES,
    ROOT,
    code_blocks,
    fence_problems,
    python_blocks,
    run_block,
)

README = ROOT / "README.md"
BLOCKS = python_blocks(README)


def test_fences_balance_and_name_their_language():
    assert fence_problems(README.read_text(), "README.md") == []


def test_fence_check_catches_a_block_that_closes_early():
    # the README's old SAM section: a stray closing fence turned the next prose into code
    broken = "```python\nopt = 1\n```\nlr = 2\n```\n\n- a bullet\n\n```python\nx = 3\n```\n"
    problems = fence_problems(broken)
    assert len(problems) == 1
    assert "<text>:5: a fence opens a block without a language" in problems[0]
    assert fence_problems("text\n```python\nx = 1\n") == [
        "<text>:2: the fence ```python never closes"
    ]
    assert fence_problems("```python\nx = 1\n```\n\n~~~bash\nls\n~~~\n") == []


def test_readme_has_the_expected_python_blocks():
    # the set-up, AGS, SAM family, BatchNorm, two multi-device recipes and checkpoint blocks
    assert len(BLOCKS) >= 7
    assert sum(MULTI_DEVICE_MARKER in b.code for b in BLOCKS) == 2
    assert all(b.language in {"python", "bash", "text"} for b in code_blocks(README.read_text()))


def test_setup_is_two_commands_and_ci_runs_the_test_command():
    """The set-up block is two commands; .ci/run runs the second one as written."""
    setup = next(b for b in code_blocks(README.read_text()) if "[test]" in b.code)
    commands = [line for line in setup.code.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 2
    test_command = next(c for c in commands if "[test]" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_python_block_runs(block, tmp_path):
    printed = run_block(block, tmp_path)
    if MULTI_DEVICE_MARKER in block.code:
        assert re.search(rf"^{NUM_DEVICES} devices", printed, re.M), printed
