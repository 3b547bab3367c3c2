"""examples/: each script runs at its small size (``--small``) and shows what it claims.

The scripts run in subprocesses, as a user would run them, and their printed results are
checked against what each one sets out to show:

- ``sam_nnx.py``: all five SAM-family methods train the NNX classifier well above chance
  (10 classes: 0.1) on the noisy-label data; vSAM takes fewer SAM steps than steps.
- ``blackbox_ags.py``: ``jax.grad`` of the staircase is exactly zero at the start, yet
  ``ags_adam`` reaches its minimum 0, and the NumPy black box follows the same path.
- ``ags_checkpoint.py``: the run resumed from the on-disk checkpoint is bit-for-bit the
  uninterrupted one, and the loss went down.
"""

from __future__ import annotations

import re
import subprocess
import sys

from markdown_blocks import ROOT

EXAMPLES = ROOT / "examples"


def run_example(name: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--small", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def test_every_example_is_tested():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == [
        "ags_checkpoint.py",
        "blackbox_ags.py",
        "sam_nnx.py",
    ]


def test_sam_nnx():
    out = run_example("sam_nnx.py")
    found = dict(re.findall(r"^(\w+)\s+test accuracy ([0-9.]+)", out, re.M))
    assert set(found) == {"sam", "asam", "bsam", "vsam", "ausam"}, out
    for method, accuracy in found.items():
        assert float(accuracy) > 0.3, (method, out)  # chance is 0.1
    steps = dict(re.findall(r"^(\w+)\s+test accuracy [0-9.]+\s+\((\d+) sharpness", out, re.M))
    assert 0 < int(steps["vsam"]) < int(steps["sam"]), out


def test_blackbox_ags():
    out = run_example("blackbox_ags.py")
    assert "max |∂f/∂x_i| = 0.0" in out, out
    start = float(re.search(r"f\(x0\) = ([0-9.]+)", out)[1])
    final = float(re.search(r"on the jnp function:\s+f = ([0-9.]+)", out)[1])
    black_box = float(re.search(r"NumPy black box: f = ([0-9.]+)", out)[1])
    gap = float(re.search(r"max \|Δx\| ([0-9.e+-]+)", out)[1])
    assert start >= 5.0 and final == 0.0 and black_box == 0.0, out
    assert gap <= 1e-5, out


def test_ags_checkpoint(tmp_path):
    out = run_example("ags_checkpoint.py", "--dir", str(tmp_path))
    assert "identical to the uninterrupted one (params and every loss): True" in out, out
    assert (tmp_path / "checkpoint.msgpack").stat().st_size > 0
    start, end = map(float, re.search(r"f ([0-9.]+) -> ([0-9.]+)", out).groups())
    assert end < start, out
    assert "final sigma 0.5" in out, out  # the injected σ, halved mid-run, was checkpointed
