"""A study on the user's own function (issue #20.3): the Python API takes a TestFunction,
the command line ``--functions module:attribute``, the settings are derived from the stated
box (and say so), and the printed ``--resume`` command works."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from agsopt import functions as fns
from agsopt import study
from agsopt.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODULE = '''
import jax.numpy as jnp
import numpy as np
from agsopt.functions import TestFunction

def _valley(x):
    """f(x) = 1.5 |x - 1|^2: curvature 3 in every direction."""
    return 1.5 * jnp.sum((x - 1.0) ** 2)

valley = TestFunction(
    "valley", _valley, (-4.0, 4.0), lambda d: np.ones(d), lambda d: 0.0, "1.5 |x - 1|^2"
)
not_a_test_function = _valley
'''


def _valley() -> fns.TestFunction:
    return fns.TestFunction(
        "valley",
        lambda x: 1.5 * jnp.sum((x - 1.0) ** 2),
        (-4.0, 4.0),
        lambda d: np.ones(d),
        lambda d: 0.0,
        "1.5 |x - 1|^2",
    )


def test_python_api_takes_a_test_function_with_derived_settings():
    valley = _valley()
    # the curvature estimate is exact for a quadratic (up to float32): L = 3, GD's 1/L
    assert study.curvature_estimate(valley, 4) == pytest.approx(3.0, rel=1e-2)
    assert study.gd_learning_rate(valley, 4) == pytest.approx(1 / 3, rel=1e-2)
    assert not study.is_tuned(valley) and study.is_tuned(fns.get("sphere"))
    assert study.is_tuned(fns.get("rotated_rastrigin", dim=4))
    result = study.run_study([valley, "sphere"], ["gd", "adam"], dim=4, starts=3, iterations=40)
    assert result.config.functions == ("valley", "sphere")
    gd = result.run("valley", "gd")
    assert gd.final()[0] < 1e-10  # 1/L on a quadratic: (1 − ηL)^k = 0 after one step
    np.testing.assert_allclose(gd.distances[:, -1], 0.0, atol=1e-5)  # x* = 1 from minimizer
    described = {r["optimizer"]: r["description"] for r in result.metadata["runs"][:2]}
    assert all("not tuned" in d for d in described.values()), described
    assert "lr=0.333" in described["gd"] and "lr=0.008" in described["adam"]  # 1e-3 w
    assert "not tuned" not in result.metadata["runs"][2]["description"]  # sphere's own
    igs = study.build_optimizer("igs-gd", 4, valley).description
    assert "lr=0.333" in igs and "σ=0.4" in igs and "not tuned" in igs  # σ = 0.05 w


def test_python_api_refuses_confusable_functions():
    impostor = fns.TestFunction("sphere", jnp.sum, (-1.0, 1.0), np.zeros, lambda d: 0.0, "")
    with pytest.raises(ValueError, match="name of a library function"):
        study.run_study([impostor], ["gd"], dim=2, progress=False)
    with pytest.raises(TypeError, match="TestFunction objects, got function"):
        study.run_study([jnp.sum], ["gd"], dim=2, progress=False)


def test_command_line_module_attribute_and_resume(tmp_path, monkeypatch, capsys):
    from agsopt.study import runner

    (tmp_path / "myfunctions.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    argv = ["study", "--functions", "myfunctions:valley,rastrigin", "--optimizers", "gd,adam"]
    argv += ["--dim", "3", "--starts", "2", "--iterations", "20", "--no-progress", "--no-plots"]
    original, calls = runner.run_starts, []

    def interrupt_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "run_starts", interrupt_third)
    assert main([*argv, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "note: myfunctions:valley: no tuned settings" in err and "rastrigin" not in err[:60]
    resume = shlex.split(err.strip().splitlines()[-1])
    assert resume[:3] == ["python", "-m", "agsopt"] and "--resume" in resume
    monkeypatch.setattr(runner, "run_starts", original)
    assert main(resume[3:]) == 0
    assert "2 of 4 runs already finished" in capsys.readouterr().out
    result = study.read_results(out)
    assert result.config.functions == ("myfunctions:valley", "rastrigin")
    assert result.run("myfunctions:valley", "gd").final()[0] < 1e-10
    for bad, message in (
        ("myfunctions:nothing", "has no attribute 'nothing'"),
        ("no_such_module_here:f", "cannot import 'no_such_module_here'"),
        ("myfunctions:not_a_test_function", "not an agsopt.functions.TestFunction"),
    ):
        with pytest.raises(SystemExit) as info:
            main(["study", "--functions", bad, "--out", str(tmp_path / "bad")])
        assert info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_command_line_imports_from_the_current_folder(tmp_path):
    """``python -m agsopt study --functions module:attribute`` run where the module is."""
    (tmp_path / "myfunctions.py").write_text(MODULE)
    command = [sys.executable, "-m", "agsopt", "study", "--functions", "myfunctions:valley"]
    command += ["--optimizers", "gd,adam", "--dim", "2", "--starts", "2", "--iterations", "10"]
    command += ["--no-progress", "--no-plots", "--out", "out"]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| myfunctions:valley |" in proc.stdout
    assert (tmp_path / "out" / "runs" / "myfunctions%3Avalley__gd.json").exists()
