"""Tests of the convergence-study package (agsopt.study), its plots and its command line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import agsopt
from agsopt import functions as fns
from agsopt import study
from agsopt.__main__ import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny study (d = 3, 3 starts, 40 steps), written once, shared by the tests."""
    result = study.run_study(
        ["sphere", "rastrigin"],
        ["gd", "igs-gd"],
        dim=3,
        starts=3,
        iterations=40,
        record_every=4,
        progress=False,
    )
    out = tmp_path_factory.mktemp("study")
    return result, study.write_results(result, out)


def _igs(num_samples: int = 4) -> study.OptimizerSpec:
    return study.ags_spec(
        "gd",
        0.01,
        "IGS-GD test",
        key=jax.random.key(0),
        sigma=0.5,
        num_samples=num_samples,
        covariance="isotropic",
    )


def test_files_and_columns(tiny):
    result, paths = tiny
    for kind in ("csv", "summary", "json", "table", "plot_iterations", "plot_evaluations"):
        assert os.path.getsize(paths[kind]) > 0, kind
    with open(paths["csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == study.CSV_COLUMNS
    assert len(rows) == 2 * 2 * 3 * 11  # functions × optimizers × starts × records
    assert {r["function"] for r in rows} == {"sphere", "rastrigin"}
    assert {int(r["iteration"]) for r in rows} == set(range(0, 41, 4))
    igs = next(r for r in rows if r["optimizer"] == "igs-gd" and r["iteration"] == "8")
    assert int(igs["evaluations"]) == 8 * 2 * study.NUM_SAMPLES
    with open(paths["summary"], newline="") as f:
        assert tuple(next(csv.reader(f))) == study.SUMMARY_COLUMNS
    with open(paths["json"]) as f:
        meta = json.load(f)
    assert meta["config"]["dim"] == 3 and meta["seeds"]["study_seed"] == 0
    assert meta["environment"]["jax"] == jax.__version__
    assert len(meta["runs"]) == 4 and all(r["seconds"] > 0 for r in meta["runs"])
    for kind in ("plot_iterations", "plot_evaluations"):
        with open(paths[kind], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "| sphere |" in result.final_table()


def test_gd_medians_decrease_on_sphere(tiny):
    result, _ = tiny
    run = result.run("sphere", "gd")
    median = run.quantiles()[1]
    assert np.all(np.diff(median) < 0)
    assert run.final()[0] < 0.5 * median[0]
    # the distance to the minimizer is recorded and shrinks too
    assert run.distances is not None and np.all(run.distances[:, -1] < run.distances[:, 0])


def test_bad_arguments_list_valid_names():
    with pytest.raises(ValueError, match="rastrigin") as info:
        study.run_study(["nope"], ["gd"], dim=2, progress=False)
    assert "rotated_ellipsoid" in str(info.value)
    with pytest.raises(ValueError, match="ags-gd, igs-gd, gd"):
        study.run_study(["sphere"], ["nope"], dim=2, progress=False)
    with pytest.raises(ValueError, match="dim must be an integer >= 1"):
        study.run_study(["sphere"], ["gd"], dim=0, progress=False)
    with pytest.raises(ValueError, match="record_every"):
        study.run_study(["sphere"], ["gd"], dim=2, iterations=10, record_every=3, progress=False)


def test_cli_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["study", "--functions", "nope", "--no-progress"])
    assert info.value.code == 2
    assert "valid names" in capsys.readouterr().err


def test_each_start_has_its_own_noise():
    fn = fns.get("sphere")
    x0s = jnp.tile(jnp.array([[1.0, -2.0, 0.5]]), (4, 1))  # one start point, four times
    keys = jax.random.split(jax.random.key(3), 3)
    keys = jnp.concatenate([keys, keys[:1]])  # the fourth start reuses the first key
    values, _ = study.run_starts(fn, _igs(), x0s, keys, 6)
    assert not np.allclose(values[0, 1:], values[1, 1:])
    assert not np.allclose(values[1, 1:], values[2, 1:])
    np.testing.assert_array_equal(values[0], values[3])


def test_vmapped_starts_equal_single_runs():
    fn = fns.get("rastrigin")
    x0s = fns.sample_starts(fn, jax.random.key(0), 3, 4)
    keys = jax.random.split(jax.random.key(1), 3)
    batch, batch_dist = study.run_starts(fn, _igs(), x0s, keys, 10, minimizer=np.zeros(4))
    single, single_dist = study.run_starts(
        fn, _igs(), x0s[1:2], keys[1:2], 10, minimizer=np.zeros(4)
    )
    np.testing.assert_allclose(batch[1], single[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(batch_dist[1], single_dist[0], rtol=1e-5, atol=1e-6)


def test_evaluation_count_matches_the_optimizer_state():
    spec = _igs()
    state = spec.transformation.init(jnp.ones(3))
    _, state = spec.transformation.update(
        jnp.zeros(3), state, jnp.ones(3), value_fn=fns.get("sphere")
    )
    assert int(state[0].num_evaluations) == spec.evaluations_per_step == 8


def test_registry_specs_and_key_impls():
    fn = fns.get("ackley")
    for name in study.OPTIMIZERS:
        spec = study.build_optimizer(name, 5, fn)
        assert spec.evaluations_per_step >= 1 and spec.description
    spec = study.build_optimizer("igs-gd", 5, fn, key=jax.random.key(0, impl="rbg"))
    state = spec.transformation.init(jnp.zeros(5))
    assert state[0].key.shape == jax.random.key_data(jax.random.key(0, impl="rbg")).shape
    # a one-line registry entry is enough to add an optimizer
    registry = dict(study.OPTIMIZERS)
    registry["sam"] = lambda d, f, key: study.gradient_spec(
        optax.chain(agsopt.sam(0.05), optax.sgd(study.gd_learning_rate(f))), 2, "SAM"
    )
    result = study.run_study(
        ["sphere"], ["sam"], dim=2, starts=2, iterations=4, registry=registry, progress=False
    )
    assert result.run("sphere", "sam").evaluations[-1] == 8


def test_cli_study_subprocess(tmp_path):
    out = tmp_path / "tmp"
    command = [sys.executable, "-m", "agsopt", "study", "--dim", "3", "--starts", "2"]
    command += ["--iterations", "20", "--out", str(out), "--no-progress"]
    command += ["--functions", "rastrigin", "--optimizers", "igs-gd,gd"]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "| rastrigin |" in proc.stdout and str(out) in proc.stdout
    for name in ("results.csv", "summary.csv", "results.json", "final.md", "study_iterations.png"):
        assert (out / name).stat().st_size > 0, name


def test_adaptive_gradient_aligned_rule():
    from agsopt import covariance_rules as rules

    rule = rules.get_rule("adaptive_gradient_aligned")
    params = jnp.zeros(50)
    state = rule.init(params)
    u = jax.random.normal(jax.random.key(0), (50,))
    np.testing.assert_allclose(rule.matrix(state, 0.5).apply(u), 0.5 * u, rtol=1e-6)
    grad = jnp.arange(50.0) / 50.0
    aligned = state
    for _ in range(10):  # the same gradient every step: c = 1, κ = min_ratio along it
        aligned = rule.update(aligned, grad)
    direction = grad / jnp.linalg.norm(grad)
    along = rule.matrix(aligned, 1.0).apply(direction)
    np.testing.assert_allclose(along, 0.1 * direction, rtol=1e-4, atol=1e-6)
    noisy = state
    for k in jax.random.split(jax.random.key(1), 10):  # unrelated gradients: c ≈ 0, κ = 1
        noisy = rule.update(noisy, jax.random.normal(k, (50,)))
    np.testing.assert_allclose(rule.matrix(noisy, 1.0).apply(u), u, rtol=1e-5)
    with pytest.raises(ValueError, match="min_ratio"):
        rules.adaptive_gradient_aligned(min_ratio=2.0, max_ratio=1.0)


# --------------------------------------------------------------------------------------
# Layout: one concept per module, no plotting <-> study cycle, defaults not copied
# --------------------------------------------------------------------------------------


def test_layout_and_public_names(capsys):
    import agsopt.plotting
    import agsopt.study.plotting
    import agsopt.study.results
    from agsopt.smoothing import DEFAULT_COVARIANCE

    assert agsopt.plotting.plot_study is agsopt.study.plotting.plot_study
    for name in ("run_study", "write_results", "read_results", "StudyResult", "OPTIMIZERS"):
        assert name in study.__all__ and hasattr(study, name), name
    # results do not know about plots: the dependency runs one way only
    source = open(agsopt.study.results.__file__, encoding="utf-8").read()
    assert "plotting" not in source.split('"""', 2)[2]
    # the study's AGS rule is the transformation's default, not a copy of its name
    assert study.AGS_COVARIANCE is DEFAULT_COVARIANCE
    assert "d100" in study.PRESETS and "paper" not in study.PRESETS
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"agsopt {agsopt.__version__}"


def test_ags_spec_counts_with_the_transformations_own_defaults():
    # num_samples and method left out: the count must follow agsopt.ags's defaults, as the
    # state's own evaluation counter reports them
    spec = study.ags_spec("gd", 0.01, "defaults", key=jax.random.key(0), sigma=0.5)
    state = spec.transformation.init(jnp.ones(3))
    _, state = spec.transformation.update(
        jnp.zeros(3), state, jnp.ones(3), value_fn=fns.get("sphere")
    )
    assert int(state[0].num_evaluations) == spec.evaluations_per_step


def test_importing_the_study_does_not_import_matplotlib():
    code = "import sys, agsopt.study, agsopt.plotting; print('matplotlib' in sys.modules)"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# --------------------------------------------------------------------------------------
# The command line keeps work: interrupt, resume, refuse to overwrite, dependencies, seeds
# --------------------------------------------------------------------------------------

SMALL = ["study", "--dim", "2", "--starts", "2", "--iterations", "10", "--record-every", "2"]
SMALL += ["--functions", "sphere,michalewicz", "--optimizers", "gd,adam", "--no-progress"]
SMALL += ["--no-plots"]
# with a stochastic optimizer, so that its noise keys must resume as well
RESUMED = [a if a != "gd,adam" else "gd,igs-gd" for a in SMALL]


def _count_runs(monkeypatch, interrupt_at: int | None = None) -> list[int]:
    """Count the runner's calls of run_starts; raise KeyboardInterrupt at call interrupt_at."""
    from agsopt.study import runner

    calls: list[int] = []
    original = runner.run_starts

    def counting(*args, **kwargs):
        calls.append(1)
        if len(calls) == interrupt_at:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(runner, "run_starts", counting)
    return calls


def _same_json_but_timings(a: str, b: str) -> None:
    with open(a) as f, open(b) as g:
        left, right = json.load(f), json.load(g)
    for meta in (left, right):
        for key in ("wall_seconds", "environment", "resumed_runs"):
            meta.pop(key)
        for run in meta["runs"]:
            run.pop("seconds")
    assert left == right


def test_interrupt_keeps_finished_runs_and_resume_completes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "interrupted"
    calls = _count_runs(monkeypatch, interrupt_at=3)
    assert main([*RESUMED, "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "2 of 4 runs finished" in err
    assert "--resume" in err and str(out) in err
    assert len(list((out / "runs").iterdir())) == 2
    assert not (out / "results.csv").exists()

    calls = _count_runs(monkeypatch)
    assert main([*RESUMED, "--out", str(out), "--resume"]) == 0
    assert len(calls) == 2  # only the two unfinished runs ran again
    assert "2 of 4 runs already finished" in capsys.readouterr().out

    reference = tmp_path / "uninterrupted"
    assert main([*RESUMED, "--out", str(reference)]) == 0
    for name in ("results.csv", "summary.csv", "final.md"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    _same_json_but_timings(out / "results.json", reference / "results.json")
    resumed = study.read_results(out)
    assert [(r.function, r.optimizer) for r in resumed.runs] == [
        ("sphere", "gd"),
        ("sphere", "igs-gd"),
        ("michalewicz", "gd"),
        ("michalewicz", "igs-gd"),
    ]

    # resuming with other settings is refused, naming the difference
    with pytest.raises(SystemExit) as info:
        main([*RESUMED, "--out", str(out), "--resume", "--seed", "1"])
    assert info.value.code == 2
    assert "seed" in capsys.readouterr().err


def test_existing_outputs_are_refused_unless_overwrite(tmp_path, monkeypatch, capsys):
    out = tmp_path / "old"
    out.mkdir()
    (out / "results.csv").write_text("old table\n")
    (out / "study_iterations.png").write_bytes(b"old plot")
    (out / "notes.txt").write_text("mine")
    calls = _count_runs(monkeypatch)
    with pytest.raises(SystemExit) as info:
        main([*SMALL, "--out", str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "already holds study outputs" in err and "--overwrite" in err
    assert not calls and (out / "results.csv").read_text() == "old table\n"
    assert main([*SMALL, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "study_iterations.png").exists()  # a --no-plots rerun leaves no old plot
    assert (out / "notes.txt").read_text() == "mine"  # files the study does not own stay
    assert (out / "results.csv").read_text().startswith(",".join(study.CSV_COLUMNS))
    # the Python API: writing without plots removes plots an earlier study left
    (out / "study_evaluations.png").write_bytes(b"old plot")
    study.write_results(study.read_results(out), out, plots=False)
    assert not (out / "study_evaluations.png").exists()


def test_missing_matplotlib_fails_before_running(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    calls = _count_runs(monkeypatch)
    out = tmp_path / "out"
    argv = [a for a in SMALL if a != "--no-plots"]
    with pytest.raises(SystemExit) as info:
        main([*argv, "--out", str(out)])
    assert info.value.code == 2
    assert 'pip install "agsopt[study]"' in capsys.readouterr().err
    assert not calls and not out.exists()
    result = study.run_study(["sphere"], ["gd"], dim=2, starts=1, iterations=2, progress=False)
    with pytest.raises(ImportError, match="agsopt\\[study\\]"):
        study.write_results(result, tmp_path / "api")
    assert not (tmp_path / "api").exists()
    assert main([*SMALL, "--out", str(out)]) == 0  # --no-plots needs no matplotlib


def test_missing_tqdm_runs_without_a_bar(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    result = study.run_study(["sphere"], ["gd"], dim=2, starts=1, iterations=2, progress=True)
    assert result.run("sphere", "gd").values.shape == (1, 3)
    assert 'pip install "agsopt[study]"' in capsys.readouterr().err


@pytest.mark.parametrize("seed", [2**32, 2**32 + 7, -1])
def test_seeds_that_would_alias_are_refused(seed, capsys):
    with pytest.raises(SystemExit) as info:
        main([*SMALL, "--seed", str(seed)])
    assert info.value.code == 2
    assert "argument --seed" in capsys.readouterr().err
    with pytest.raises(ValueError, match="seed must be an integer in"):
        study.run_study(["sphere"], ["gd"], dim=2, seed=seed, progress=False)
    study.StudyConfig(seed=2**32 - 1).validate()  # the largest 32-bit seed is fine


X64_SCRIPT = """
import os, sys
import jax, jax.numpy as jnp, numpy as np
from agsopt import functions as fns, study
from agsopt.study.cli import main
assert jax.config.jax_enable_x64
# the runner's own scan carry (x and the records) stays float64
fn = fns.get("rastrigin", dim=2)
x0s = fns.sample_starts(fn, jax.random.key(0), 1, 2)
values, distances = study.run_starts(fn, study.build_optimizer("gd", 2, fn), x0s, None, 5)
assert x0s.dtype == values.dtype == distances.dtype == np.float64, values.dtype
# a tiny study with the ags optimizers (each crashed in lax.scan before the rule fix)
out = sys.argv[1]
argv = ["study", "--dim", "2", "--starts", "1", "--iterations", "5", "--functions", "rastrigin"]
argv += ["--optimizers", "ags-gd,ags-adam,igs-gd", "--no-plots", "--no-progress", "--out", out]
assert main(argv) == 0
result = study.read_results(out)
assert result.metadata["environment"]["x64"] is True
for run in result.runs:
    assert run.values.shape == (1, 6) and np.isfinite(run.values).all(), run.optimizer
print("ok")
"""


def test_study_runs_under_x64(tmp_path):
    """Issue #10: with JAX_ENABLE_X64=1, python -m agsopt study crashed for every ags
    optimizer (a state changed dtype inside lax.scan). A tiny study in a subprocess."""
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    command = [sys.executable, "-c", X64_SCRIPT, str(tmp_path / "x64")]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("ok")


def test_default_rule_comparison_includes_scale_rules_and_direction_dependent_functions():
    from agsopt.smoothing import covariance_rules

    assert study.DEFAULT_RULES[0] == "isotropic"
    assert set(study.DEFAULT_RULES) <= set(covariance_rules.RULES)
    assert {"scaled_isotropic", "scaled_adaptive_gradient_aligned"} <= set(study.DEFAULT_RULES)
    valid = set(study.function_names())
    assert set(study.RULE_FUNCTIONS) <= valid
    for name in ("rastrigin_multifrequency", "mixed_asymmetric"):
        assert name in study.RULE_FUNCTIONS and f"rotated_{name}" in study.RULE_FUNCTIONS
    # a tiny comparison: the scaled rule runs in both forms, its runs are finite and they
    # differ from IGS's (same starts and noise keys: only σ's scale differs)
    for form in ("gd", "adam"):
        result = study.compare_rules(
            ["rastrigin_multifrequency"],
            ["isotropic", "scaled_isotropic"],
            form=form,
            dim=4,
            starts=2,
            iterations=20,
            progress=False,
        )
        base = result.run("rastrigin_multifrequency", f"{form}:isotropic")
        scaled = result.run("rastrigin_multifrequency", f"{form}:scaled_isotropic")
        assert np.isfinite(scaled.values).all()
        np.testing.assert_array_equal(base.values[:, 0], scaled.values[:, 0])  # same starts
        assert not np.array_equal(base.values[:, -1], scaled.values[:, -1])
        assert "scaled_isotropic / isotropic" in study.rule_table(result)


def test_rule_table_with_gradient_methods_at_equal_evaluations():
    result = study.compare_rules(
        ["sphere"],
        ["isotropic", "scaled_isotropic"],
        form="gd",
        dim=3,
        starts=2,
        iterations=4,
        progress=False,
    )
    per_step = 2 * study.NUM_SAMPLES  # antithetic: 2N evaluations per AGS step
    baselines = study.equal_evaluation_baselines(result)
    assert baselines.config.optimizers == ("gd", "adam")
    assert baselines.config.iterations == 4 * per_step
    assert (baselines.config.dim, baselines.config.starts) == (3, 2)
    gd = baselines.run("sphere", "gd")
    assert int(gd.evaluations[-1]) == int(result.run("sphere", "gd:isotropic").evaluations[-1])
    # plain GD with the documented rate, written out: x ← (1 − 2η)^k x0 on the sphere
    # the starts as the study's module doc states: fold_in(fold_in(key(seed), 0), crc32(name))
    start_key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), zlib.crc32(b"sphere"))
    x0 = np.asarray(fns.sample_starts("sphere", start_key, 2, 3))
    eta = study.gd_learning_rate(fns.get("sphere"))
    expected = np.sum(x0**2, axis=1) * (1 - 2 * eta) ** (2 * baselines.config.iterations)
    np.testing.assert_allclose(gd.values[:, -1], expected, rtol=1e-3)
    table = study.rule_table(result, baselines=baselines)
    header = table.splitlines()[0]
    assert "gd (equal evaluations)" in header and "adam (equal evaluations)" in header
    row = table.splitlines()[2]
    from agsopt.study.results import format_value

    assert format_value(gd.final()[0]) in row
    shorter = study.compare_rules(
        ["sphere"], ["isotropic"], form="gd", dim=3, starts=2, iterations=2, progress=False
    )
    with pytest.raises(ValueError, match="evaluations"):
        study.rule_table(shorter, baselines=baselines)
