"""The study command line as a careless or hostile user meets it: Ctrl-C, a second study in
the same folder, a study from another configuration, broken files and disks (issue #18)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")


def test_ctrl_c_exits_130_with_the_resume_command(tmp_path):
    """Issue #18.11: Ctrl-C printed the resume command and then segfaulted (exit 139).

    The crash needs the interrupt to land while XLA compiles (Python leaves the compile call,
    XLA's threads go on, interpreter finalization pulls the runtime from under them). JAX's
    compile log says when that starts: SIGINT goes out just after the AGS run's step function
    has been lowered, during its XLA compilation (seconds long).
    """
    out = tmp_path / "out"
    command = [sys.executable, "-m", "agsopt", "study", "--out", str(out), "--no-plots"]
    command += ["--no-progress", "--functions", "rastrigin", "--optimizers", "gd,ags-gd"]
    command += ["--dim", "10", "--starts", "2", "--iterations", "2000"]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=dict(_env(), JAX_LOG_COMPILES="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # a child of a non-interactive shell may inherit SIGINT ignored: restore the default
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lowered = 0
    for line in proc.stderr:  # the second run's (AGS-GD's) step function goes to XLA
        lowered += "MLIR module conversion jit(run_chunk)" in line
        if lowered == 2:
            break
    assert lowered == 2, proc.communicate()
    time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "interrupted: 1 of 2 runs finished" in err
    assert "--resume" in err and "Segmentation" not in err and "Traceback" not in err
    assert [p.name for p in (out / "runs").iterdir()] == ["rastrigin__gd.json"]
