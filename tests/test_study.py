"""Tests of the convergence-study runner (agsopt.study), its plots and its command line."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

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
        "gd", 0.01, "IGS-GD test", sigma=0.5, num_samples=num_samples, covariance="isotropic"
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
    spec = study.build_optimizer("igs-gd", 5, fn, key_impl="rbg")
    state = spec.transformation.init(jnp.zeros(5))
    assert state[0].key.shape == jax.random.key_data(jax.random.key(0, impl="rbg")).shape
    # a one-line registry entry is enough to add an optimizer
    registry = dict(study.OPTIMIZERS)
    registry["sam"] = lambda d, f: study.gradient_spec(
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
