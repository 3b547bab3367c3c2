"""The study command line as a careless or hostile user meets it: Ctrl-C, a second study in
the same folder, a study from another configuration, broken files and disks (issue #18)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import jax
import pytest

from agsopt import study
from agsopt.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")


AS_FROM_A_TERMINAL = """
import runpy, signal, sys
# a child of a non-interactive shell may inherit SIGINT ignored: handle it as a terminal does
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = ["agsopt", *sys.argv[1:]]
runpy.run_module("agsopt", run_name="__main__", alter_sys=True)  # python -m agsopt ...
"""


def test_ctrl_c_exits_130_with_the_resume_command(tmp_path):
    """Issue #18.11: Ctrl-C printed the resume command and then segfaulted (exit 139).

    The crash needs the interrupt to land while XLA compiles (Python leaves the compile call,
    XLA's threads go on, interpreter finalization pulls the runtime from under them). JAX's
    compile log says when that starts: SIGINT goes out just after the AGS run's step function
    has been lowered, during its XLA compilation (seconds long).
    """
    out = tmp_path / "out"
    command = [sys.executable, "-c", AS_FROM_A_TERMINAL, "study", "--out", str(out)]
    command += ["--no-plots", "--no-progress", "--functions", "rastrigin"]
    command += ["--optimizers", "gd,ags-gd", "--dim", "10", "--starts", "2"]
    command += ["--iterations", "2000"]
    proc = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=dict(_env(), JAX_LOG_COMPILES="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
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


# --------------------------------------------------------------------------------------
# In-process: resume checks every run file, unusable files, unwritable disks, the lock
# --------------------------------------------------------------------------------------

SMALL = ["study", "--dim", "2", "--starts", "2", "--iterations", "10", "--record-every", "2"]
SMALL += ["--functions", "sphere", "--optimizers", "gd,adam", "--no-progress", "--no-plots"]


def _with(argv: list[str], flag: str, value: str) -> list[str]:
    """``argv`` with ``flag``'s value replaced."""
    out = list(argv)
    out[out.index(flag) + 1] = value
    return out


def _interrupted(tmp_path, monkeypatch, name: str = "out", argv=SMALL):
    """A folder with study.json and the first of the two runs (Ctrl-C at the second)."""
    from agsopt.study import runner

    original, calls = runner.run_starts, []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "run_starts", interrupt_second)
    out = tmp_path / name
    assert main([*argv, "--out", str(out)]) == 130
    monkeypatch.setattr(runner, "run_starts", original)
    assert [p.name for p in (out / "runs").iterdir()] == ["sphere__gd.json"]
    return out


def _exit_code(argv) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_resume_refuses_a_run_file_of_another_study(tmp_path, monkeypatch, capsys):
    """Issue #18.4: run files of a study with more starts were merged into the tables."""
    out = _interrupted(tmp_path, monkeypatch)
    more = _with(SMALL, "--starts", "3")
    other = tmp_path / "other"
    assert main([*more, "--out", str(other)]) == 0
    foreign = other / "runs" / "sphere__gd.json"
    (out / "runs" / "sphere__gd.json").write_bytes(foreign.read_bytes())
    capsys.readouterr()
    assert _exit_code([*SMALL, "--out", str(out), "--resume"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(out / "runs" / "sphere__gd.json") in line
    assert "starts: file has 3, asked for 2" in line and "--overwrite" in line
    assert not (out / "results.csv").exists()
    # the study's own file carries its settings, x64 included, and resumes
    (out / "runs" / "sphere__gd.json").unlink()
    assert main([*SMALL, "--out", str(out), "--resume"]) == 0
    saved = json.loads((out / "runs" / "sphere__adam.json").read_text())["settings"]
    assert saved["starts"] == 2 and saved["x64"] is False
    assert json.loads((out / "study.json").read_text())["x64"] is False


def test_resume_refuses_a_switch_to_x64(tmp_path, monkeypatch):
    """Issue #18.4: resuming under JAX_ENABLE_X64 mixed float64 runs into a float32 study."""
    out = _interrupted(tmp_path, monkeypatch)
    config = study.StudyConfig(
        functions=("sphere",), optimizers=("gd", "adam"), dim=2, starts=2, iterations=10
    ).override(record_every=2)
    jax.config.update("jax_enable_x64", True)
    try:
        with pytest.raises(ValueError, match="x64: folder has False, asked for True"):
            study.prepare_folder(out, config, resume=True)
    finally:
        jax.config.update("jax_enable_x64", False)
    assert study.prepare_folder(out, config, resume=True).keys() == {("sphere", "gd")}


def test_unusable_files_are_named_in_one_line(tmp_path, monkeypatch, capsys):
    """Issue #18.10: a corrupt run file or study.json gave a bare JSON error, a study.json
    without its settings a KeyError."""
    out = _interrupted(tmp_path, monkeypatch)
    run_file = out / "runs" / "sphere__gd.json"
    run_file.write_text(run_file.read_text()[:40])  # truncated
    manifest = (out / "study.json").read_text()
    capsys.readouterr()
    assert _exit_code([*SMALL, "--out", str(out), "--resume"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert str(run_file) in line and "not a readable run file" in line and "delete it" in line
    run_file.unlink()
    for broken, what in (("{not json", "not readable JSON"), ('{"x64": false}', "no study")):
        (out / "study.json").write_text(broken)
        assert _exit_code([*SMALL, "--out", str(out), "--resume"]) == 2
        line = _one_line(capsys.readouterr().err)
        assert str(out / "study.json") in line and what in line and "--overwrite" in line
    (out / "study.json").write_text(manifest)
    assert main([*SMALL, "--out", str(out), "--resume"]) == 0


def test_read_only_folder_one_line(tmp_path, monkeypatch, capsys):
    """Issue #18.10: an unwritable --out printed a traceback."""
    target = tmp_path / "readonly" / "out"
    real = os.makedirs

    def refuse(path, *args, **kwargs):
        if str(path).startswith(str(tmp_path / "readonly")):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "makedirs", refuse)
    assert _exit_code([*SMALL, "--out", str(target)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert f"cannot write {target}: Permission denied" in line and "writable --out" in line


def test_out_that_is_a_file_says_so(tmp_path, capsys):
    """An existing file as --out was reported as a full disk."""
    target = tmp_path / "afile"
    target.write_text("not a folder")
    assert _exit_code([*SMALL, "--out", str(target)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert f"--out {target} is a file, not a folder" in line and "room on the disk" not in line


@pytest.mark.parametrize(
    ("rules", "match"),
    [("isotropic,isotropic", "isotropic given more than once"), ("", "no rules given")],
)
def test_rules_refuses_repeated_or_no_rules(tmp_path, capsys, rules, match):
    argv = ["rules", "--rules", rules, "--dim", "2", "--starts", "1", "--iterations", "2"]
    assert _exit_code([*argv, "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert match in capsys.readouterr().err


FULL_DISK = """
import resource, signal, sys
from agsopt.study.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500))
sys.exit(main(sys.argv[1:]))
"""


def test_full_disk_leaves_no_tmp_and_says_what_to_do(tmp_path):
    """Issue #18.10: a full disk printed a traceback and left a .tmp run file. A file-size
    limit makes every write past 1500 bytes fail as a full disk does: study.json fits, the
    run files (20 starts) do not."""
    out = tmp_path / "out"
    argv = [*_with(SMALL, "--starts", "20"), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    line = _one_line(proc.stderr)
    assert f"cannot write {out / 'runs' / 'sphere__gd.json'}: " in line
    assert "File too large" in line and "make room" in line
    leftovers = [str(p) for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
    assert (out / "study.json").exists() and not (out / study.LOCK).exists()


def test_a_second_study_cannot_write_the_same_folder(tmp_path, capsys):
    """Issue #18.6: two --overwrite studies in one --out both exited 0, mixing their files."""
    out = tmp_path / "out"
    first = [sys.executable, "-m", "agsopt", "study", "--out", str(out), "--no-plots"]
    first += ["--no-progress", "--functions", "sphere", "--optimizers", "gd,igs-gd"]
    first += ["--dim", "10", "--starts", "4", "--iterations", "2000", "--overwrite"]
    proc = subprocess.Popen(
        first, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 240
    while not (out / "study.json").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _exit_code([*SMALL, "--out", str(out), "--overwrite"]) == 2
    line = _one_line(capsys.readouterr().err)
    assert f"{out} is being written by another study" in line
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    result = study.read_results(out)  # the first study's files, whole
    assert result.config.dim == 10 and result.config.optimizers == ("gd", "igs-gd")
    assert not (out / study.LOCK).exists()
    assert main([*SMALL, "--out", str(out), "--overwrite"]) == 0  # free again
    # the lock is the process's: held here, refused; released, granted
    with study.lock_folder(out):
        with pytest.raises(study.FolderLockedError, match="another study"):
            with study.lock_folder(out):
                pass
    with study.lock_folder(out):
        pass


def test_rule_table_ratios_keep_significant_digits():
    """Issue #20.8: ratios were printed with two decimals, 0.00 for 3e-5 and 127699.70."""
    import numpy as np

    config = study.StudyConfig(
        functions=("sphere",), optimizers=("gd:isotropic", "gd:a", "gd:b", "gd:c"), iterations=1
    )
    runs = [
        study.RunResult("sphere", name, "", 1, np.arange(2), v, v, None, 0.0)
        for name, v in zip(
            config.optimizers,
            (np.full((1, 2), f) for f in (2.0, 6e-5, 255399.4, 1.0)),
            strict=True,
        )
    ]
    row = study.rule_table(study.StudyResult(config, runs, {}), iqr=False).splitlines()[2]
    assert row.split(" | ")[-3:] == ["3.00e-05", "1.28e+05", "0.5 |"]


def test_readme_study_commands_run_in_order():
    """Issue #20.5: the README's study block stopped at a command whose folder an earlier
    one (or the set-up command) had filled. Replay the folders each command writes."""
    import shlex

    from markdown_blocks import ROOT as DOCS_ROOT
    from markdown_blocks import code_blocks

    from agsopt.study.cli import _parser, output_folder

    text = (DOCS_ROOT / "README.md").read_text()
    setup = next(
        b for b in code_blocks(text) if "pip install" in b.code and "agsopt study" in b.code
    )
    block = next(b for b in code_blocks(text) if "agsopt study --preset d100" in b.code)
    written = {"results/study"} if "python3 -m agsopt study" in setup.code else set()
    checked = 0
    for line in block.code.splitlines():
        words = shlex.split(line, comments=True)
        if words[:3] != ["python", "-m", "agsopt"] or words[3] not in ("study", "rules"):
            continue
        args = _parser().parse_args(words[3:])
        out = os.path.normpath(output_folder(args))
        if out in written:
            assert args.overwrite or args.resume, f"{line!r} would find {out} filled"
        elif args.resume:
            raise AssertionError(f"{line!r} resumes {out}, which no earlier command wrote")
        written.add(out)
        checked += 1
    assert checked >= 4


def test_default_plot_tells_every_optimizer_apart(tmp_path):
    """Issue #20.5: the default plot hid gd under adam (equal values, same dotted line)."""
    import numpy as np

    config = study.PRESETS["default"]
    runs = [  # every optimizer with the same values: only the styles can tell them apart
        study.RunResult(function, name, "", 1, np.arange(3), v, v, None, 0.0)
        for function in config.functions
        for name, v in ((name, np.ones((2, 3))) for name in config.optimizers)
    ]
    from agsopt.study.plotting import plot_study

    figure = plot_study(study.StudyResult(config, runs, {}), None)
    for ax in figure.axes[: len(config.functions)]:
        lines = ax.get_lines()
        assert [line.get_label() for line in lines] == list(config.optimizers)
        styles = {(line.get_linestyle(), line.get_marker()) for line in lines}
        markers = {line.get_marker() for line in lines}
        assert len(styles) == len(markers) == len(config.optimizers)
    import matplotlib.pyplot as plt

    plt.close(figure)
    # the default study shows what smoothing is for: multimodal functions only
    assert set(config.functions) == {"rastrigin", "ackley", "levy"}
