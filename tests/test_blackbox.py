"""The black-box protocol (agsopt.study.blackbox): criterion, counting, starts, records, CLI.

Fake methods with known trajectories pin the counting: on the sphere, x ← x/2 makes
f(x_k) = f(x_0) 4^{−k}, so the criterion f(x_k) < 10⁻⁴ (f(x_0) − f(x_k)) first holds when
4^k > 10⁴ + 1, i.e. at step k = 7, from every start.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agsopt import functions as fns
from agsopt.__main__ import main
from agsopt.study import blackbox as bb
from agsopt.study import blackbox_methods as bm
from agsopt.study.blackbox_output import success_curve

HAS_CMA = importlib.util.find_spec("cma") is not None
HAS_EVOSAX = importlib.util.find_spec("evosax") is not None
SUCCESS_STEP = 7  # the first k with 4^k > 1e4 + 1
REQUIRED = {
    "function",
    "dim",
    "method",
    "library",
    "starts",
    "budget",
    "success_rate",
    "mean_evaluations",
    "median_evaluations",
    "median_final",
}


# --------------------------------------------------------------------------- fake methods


class CountState(NamedTuple):
    num_evaluations: jax.Array
    stop: jax.Array


def halving(per_step: int, stop_after: int | None = None) -> bm.TransformationFactory:
    """x ← x/2 per step, calling f ``per_step`` times (all counted); ``stop`` after
    ``stop_after`` steps if given."""

    def factory(lower, upper, dim, key):
        def init(x):
            return CountState(jnp.zeros((), jnp.int32), jnp.asarray(False))

        def update(updates, state, x, *, value_fn, **extra):
            total = sum(value_fn(x * (i + 1)) for i in range(per_step))  # per_step real calls
            count = state.num_evaluations + per_step
            stop = jnp.asarray(False) if stop_after is None else count >= per_step * stop_after
            return -x / 2 + 0 * total, CountState(count, stop)

        return optax.GradientTransformationExtraArgs(init, update)

    return factory


class BestState(NamedTuple):
    num_evaluations: jax.Array
    best_value: jax.Array
    best_params: jax.Array


def jump_to_zero(lower, upper, dim, key):
    """Never moves its iterate, but evaluates f at 0 on its first step (2 calls: x and 0)
    and keeps the best point in its state."""

    def init(x):
        return BestState(jnp.zeros((), jnp.int32), jnp.asarray(jnp.inf, x.dtype), x)

    def update(updates, state, x, *, value_fn, **extra):
        fx, f0 = value_fn(x), value_fn(jnp.zeros_like(x))
        better = f0 < fx
        value = jnp.where(better, f0, fx)
        point = jnp.where(better, jnp.zeros_like(x), x)
        return jnp.zeros_like(x), BestState(state.num_evaluations + 2, value, point)

    return optax.GradientTransformationExtraArgs(init, update)


def no_count(lower, upper, dim, key):
    return optax.GradientTransformationExtraArgs(
        lambda x: optax.EmptyState(), lambda u, s, x, **kw: (jnp.zeros_like(x), s)
    )


def frozen_count(lower, upper, dim, key):
    return optax.GradientTransformationExtraArgs(
        lambda x: CountState(jnp.zeros((), jnp.int32), jnp.asarray(False)),
        lambda u, s, x, **kw: (jnp.zeros_like(x), s),
    )


def fake(name, factory=None, runner=None, gradient=False):
    return bm.Method(name, "test", library=False, factory=factory, runner=runner, gradient=gradient)


# --------------------------------------------------------------------------- criterion


def test_relative_gap_and_criterion_by_hand():
    # f0 = 10, f* = 0: best = 1e-3 gives 1e-3 / 9.999 > 1e-4, best = 9e-4 gives 9.0008e-5
    np.testing.assert_allclose(bb.relative_gap(1e-3, 10.0, 0.0), 1e-3 / 9.999)
    assert not bb.succeeded(1e-3, 10.0, 0.0)
    assert bb.succeeded(9e-4, 10.0, 0.0)
    # f* ≠ 0 (styblinski_tang style): |best − f*| / |f0 − best|
    assert bb.succeeded(-39.0 + 1e-3, 100.0, -39.0)
    assert not bb.succeeded(-39.0 + 1e-1, 100.0, -39.0)
    # a start that never moved (0/0) or a NaN best never succeeds
    assert not bb.succeeded(0.0, 0.0, 0.0)
    assert not bb.succeeded(math.nan, 1.0, 0.0)


def test_evaluations_to_success_is_the_count_at_the_first_success_within_budget():
    evaluations = np.array([[10, 10], [20, 20], [30, 30], [40, 40]])
    best = np.array([[5.0, 5.0], [1e-5, 5.0], [1e-6, 5.0], [1e-7, 1e-9]])
    f0 = np.array([10.0, 10.0])
    np.testing.assert_array_equal(
        bb.evaluations_to_success(evaluations, best, f0, 0.0, budget=100), [20, 40]
    )
    # a success past the budget does not count
    np.testing.assert_array_equal(
        bb.evaluations_to_success(evaluations, best, f0, 0.0, budget=39), [20, -1]
    )


# --------------------------------------------------------------------------- counting


def test_counted_transformation_succeeds_at_the_hand_computed_step():
    run = bb.run_method(fake("halve3", halving(3)), "sphere", 4, starts=5, budget=1000)
    assert run.monitored  # no best_value in its state: the protocol tracks it
    np.testing.assert_array_equal(run.evaluations_to_success, [3 * SUCCESS_STEP] * 5)
    np.testing.assert_array_equal(run.final_evaluations, [3 * SUCCESS_STEP] * 5)  # frozen
    x0s, _ = bb.blackbox_starts(fns.get("sphere"), 4, 5, seed=0)
    np.testing.assert_allclose(run.best_params, np.asarray(x0s) / 2**SUCCESS_STEP, rtol=1e-6)


def test_budget_cuts_success_and_counts_are_kept():
    method = fake("halve3", halving(3))
    at = bb.run_method(method, "sphere", 2, starts=3, budget=3 * SUCCESS_STEP)
    below = bb.run_method(method, "sphere", 2, starts=3, budget=3 * SUCCESS_STEP - 1)
    assert (at.evaluations_to_success == 3 * SUCCESS_STEP).all()
    assert (below.evaluations_to_success == -1).all()
    # the step that crosses the budget is taken, then the start ends
    np.testing.assert_array_equal(below.final_evaluations, [3 * SUCCESS_STEP] * 3)


def test_stop_field_ends_the_start():
    run = bb.run_method(fake("stop", halving(2, stop_after=3)), "sphere", 3, 4, budget=10_000)
    assert run.stopped.all() and (run.evaluations_to_success == -1).all()
    np.testing.assert_array_equal(run.final_evaluations, [6] * 4)


def test_best_value_is_read_from_the_state_not_monitored():
    run = bb.run_method(fake("jump", jump_to_zero), "sphere", 3, starts=4, budget=100)
    assert not run.monitored
    np.testing.assert_array_equal(run.evaluations_to_success, [2] * 4)
    np.testing.assert_array_equal(run.best_params, np.zeros((4, 3)))


def test_gradient_method_is_charged_one_evaluation_per_gradient():
    # GD with η = 1/4 on the sphere: x ← x − (1/4)(2x) = x/2
    gd = fake("gd-quarter", lambda lo, up, d, k: optax.sgd(0.25), gradient=True)
    run = bb.run_method(gd, "sphere", 3, starts=3, budget=1000)
    assert run.monitored
    np.testing.assert_array_equal(run.evaluations_to_success, [SUCCESS_STEP] * 3)


def test_a_method_that_cannot_be_counted_is_refused():
    with pytest.raises(ValueError, match="num_evaluations"):
        bb.run_method(fake("nocount", no_count), "sphere", 2, starts=2, budget=10)
    with pytest.raises(RuntimeError, match="never grew"):
        bb.run_method(fake("frozen", frozen_count), "sphere", 2, starts=2, budget=10)


def test_a_method_that_stops_spending_evaluations_ends_as_stopped():
    # counts 2 per step for 3 steps, then skips its steps (no evaluation, e.g. σ underflowed)
    def skipping(lower, upper, dim, key):
        def update(updates, state, x, *, value_fn, **extra):
            spend = jnp.where(state.num_evaluations < 6, 2, 0)
            return jnp.zeros_like(x), CountState(state.num_evaluations + spend, state.stop)

        return optax.GradientTransformationExtraArgs(
            lambda x: CountState(jnp.zeros((), jnp.int32), jnp.asarray(False)), update
        )

    with pytest.warns(RuntimeWarning, match="spent no evaluation"):
        run = bb.run_method(fake("skip", skipping), "sphere", 2, starts=2, budget=10**6)
    assert run.stopped.all()
    np.testing.assert_array_equal(run.final_evaluations, [6, 6])


# --------------------------------------------------------------------------- starts


def test_every_method_gets_the_same_starts_peers_included():
    seen = []

    def echo(function, x0, seed, budget, succeeded):
        seen.append((np.array(x0), seed))
        return bm.PeerTrace(np.array([1]), np.array([float(function(x0))]), x0, False)

    peer = bb.run_method(fake("echo", runner=echo), "ackley", 3, starts=4, budget=5, seed=7)
    counted = bb.run_method(fake("halve", halving(1)), "ackley", 3, starts=4, budget=5, seed=7)
    x0s, keys = bb.blackbox_starts("ackley", 3, 4, seed=7)
    np.testing.assert_array_equal(np.stack([x for x, _ in seen]), np.asarray(x0s))
    np.testing.assert_array_equal(peer.best_params, np.asarray(x0s))
    np.testing.assert_array_equal(peer.f0, counted.f0)
    assert len({s for _, s in seen}) == 4  # one seed per start
    lower, upper = fns.get("ackley").domain
    assert (np.asarray(x0s) >= lower).all() and (np.asarray(x0s) <= upper).all()
    other, _ = bb.blackbox_starts("ackley", 3, 4, seed=8)
    assert not np.array_equal(np.asarray(other), np.asarray(x0s))
    assert keys.shape == (4,)


class KeyState(NamedTuple):
    key: jax.Array
    num_evaluations: jax.Array


def test_each_start_builds_its_transformation_with_its_own_key():
    keys_seen = []

    def keyed(lower, upper, dim, key):
        keys_seen.append(np.asarray(jax.random.key_data(key)))

        def update(updates, state, x, *, value_fn, **extra):  # a typed key, split per step
            next_key, step_key = jax.random.split(state.key)
            noise = 1e-3 * jax.random.normal(step_key, x.shape)
            return -x / 2 + noise, KeyState(next_key, state.num_evaluations + 1)

        return optax.GradientTransformationExtraArgs(
            lambda x: KeyState(key, jnp.zeros((), jnp.int32)), update
        )

    run = bb.run_method(fake("keyed", keyed), "sphere", 2, starts=3, budget=4)
    _, keys = bb.blackbox_starts("sphere", 2, 3, seed=0)
    np.testing.assert_array_equal(np.stack(keys_seen), np.asarray(jax.random.key_data(keys)))
    np.testing.assert_array_equal(run.final_evaluations, [4] * 3)


# --------------------------------------------------------------------------- records


def test_record_schema_and_statistics():
    method = fake("halve3", halving(3))
    run = bb.run_method(method, "sphere", 2, starts=3, budget=100)
    record = bb.summarize(run, method, fns.get("sphere"), 2, 100, 0)
    assert REQUIRED <= set(record)
    assert record["success_rate"] == 1.0 and record["library"] is False
    assert record["mean_evaluations"] == record["median_evaluations"] == 3 * SUCCESS_STEP
    json.dumps(record, allow_nan=False)
    failed = bb.summarize(
        bb.run_method(method, "sphere", 2, starts=3, budget=5), method, fns.get("sphere"), 2, 5, 0
    )
    assert failed["success_rate"] == 0 and failed["mean_evaluations"] is None
    assert failed["median_evaluations"] is None
    evaluations, rates = success_curve(record)
    assert rates[-1] == 1.0 and evaluations[-1] == 100


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="budget"):
        bb.run_blackbox(["sphere"], 2, 2, 0, methods=["gd"])
    with pytest.raises(ValueError, match="starts"):
        bb.run_blackbox(["sphere"], 2, 0, 10, methods=["gd"])
    with pytest.raises(ValueError, match="unknown method"):
        bb.run_blackbox(["sphere"], 2, 2, 10, methods=["nope"])
    with pytest.raises(ValueError, match="no known minimum"):
        bb.run_blackbox(["michalewicz"], 11, 2, 10, methods=["gd"])
    with pytest.raises(ValueError, match="exactly one"):
        bm.Method("x", "", library=True)


# --------------------------------------------------------------------------- peers


@pytest.mark.skipif(not HAS_CMA, reason="pycma not installed (pip install 'agsopt[blackbox]')")
def test_pycma_counts_whole_generations_and_solves_the_sphere():
    record = bb.run_blackbox(["sphere"], 2, 3, 3000, methods=["cma-es"])[0]
    population = bm.cma_population_size(2)
    assert record["success_rate"] == 1.0 and record["library"] is False
    assert all(e % population == 0 for e in record["evaluations_to_success"])
    assert record["final_evaluations"] == record["evaluations_to_success"]
    assert bm.cma_sigma0(fns.get("ackley")) == 5.0
    assert bm.cma_sigma0(fns.get("griewank")) == 0.25 * 1200


@pytest.mark.slow
@pytest.mark.skipif(not HAS_EVOSAX, reason="evosax not installed")
def test_evosax_cma_es_counts_its_population():
    record = bb.run_blackbox(["sphere"], 2, 3, 3000, methods=["cma-es-evosax"])[0]
    population = bm.cma_population_size(2)
    assert record["success_rate"] == 1.0 and not record["best_monitored"]
    assert all(e % population == 0 for e in record["evaluations_to_success"])
    # with a tolerance no float32 run reaches, it stops by tolx before the budget
    run = bb.run_method("cma-es-evosax", "sphere", 2, 2, 10**6, tolerance=1e-30)
    assert run.stopped.all() and (run.final_evaluations < 10**6).all()


def without(module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # import raises ModuleNotFoundError


def test_a_peer_that_fails_to_import_is_skipped_up_front(monkeypatch):
    """Installed but broken (find_spec succeeds, import fails): skipped with the reason,
    before any method runs (it used to end the run after the others, writing nothing)."""
    real = importlib.import_module

    def broken(name, *args):
        if name == "cma":
            raise ImportError("numpy ABI mismatch")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    reason = bm.METHODS["cma-es"].unavailable()
    assert "fails to import (ImportError: numpy ABI mismatch)" in reason
    assert bb.skipped_methods(["gd", "cma-es"]).keys() == {"cma-es"}


def test_missing_peer_is_skipped_with_a_note(monkeypatch, tmp_path, capsys):
    without("cma", monkeypatch)
    assert "not installed" in bm.METHODS["cma-es"].unavailable()
    assert bb.skipped_methods(["gd", "cma-es"]).keys() == {"cma-es"}
    with pytest.warns(UserWarning, match="cma"):
        records = bb.run_blackbox(["sphere"], 2, 2, 20, methods=["gd", "cma-es"])
    assert [r["method"] for r in records] == ["gd"]
    with pytest.raises(SystemExit) as exit_info:
        main(["blackbox", "--functions", "sphere", "--dim", "2", "--methods", "cma-es"])
    assert exit_info.value.code == 2
    assert "cma" in capsys.readouterr().err


# --------------------------------------------------------------------------- CLI


def test_cli_end_to_end(tmp_path, monkeypatch, capsys):
    without("cma", monkeypatch)  # the note path, whether or not pycma is installed here
    out = tmp_path / "bb"
    argv = ["blackbox", "--functions", "sphere,ackley", "--dim", "2", "--starts", "3"]
    argv += ["--budget", "60", "--methods", "igs-gd,gd,cma-es", "--out", str(out)]
    assert main(argv) == 0
    records = json.loads((out / "blackbox.json").read_text())
    assert [(r["function"], r["method"]) for r in records] == [
        ("sphere", "igs-gd"),
        ("sphere", "gd"),
        ("ackley", "igs-gd"),
        ("ackley", "gd"),
    ]
    for r in records:
        assert REQUIRED <= set(r) and r["dim"] == 2 and r["starts"] == 3 and r["budget"] == 60
        assert 0 <= r["success_rate"] <= 1
        assert r["library"] == (r["method"] == "igs-gd")
        assert all(e <= 60 for e in r["evaluations_to_success"] if e is not None)
    assert (out / "blackbox.csv").read_text().startswith("function,dim,method,library")
    markdown = (out / "blackbox.md").read_text()
    assert "| sphere | 2 | igs-gd | yes |" in markdown and "Skipped: cma-es" in markdown
    assert (out / "blackbox.png").stat().st_size > 0
    assert "note: cma-es needs" in capsys.readouterr().err


def test_cli_without_methods_runs_the_default_presets(tmp_path, monkeypatch):
    monkeypatch.setattr(bm, "DEFAULT_METHODS", ("gd",))
    out = tmp_path / "default"
    argv = ["blackbox", "--functions", "sphere", "--dim", "2", "--starts", "2", "--budget", "10"]
    assert main([*argv, "--out", str(out), "--no-plots"]) == 0
    records = json.loads((out / "blackbox.json").read_text())
    assert [r["method"] for r in records] == ["gd"]
    assert not (out / "blackbox.png").exists()
    assert main(["blackbox", "--list"]) == 0


def test_registry_defaults_are_library_presets():
    assert bm.DEFAULT_METHODS and all(bm.METHODS[m].library for m in bm.DEFAULT_METHODS)
    assert not any(bm.METHODS[m].library for m in ("gd", "adam", "cma-es", "cma-es-evosax"))
    assert bm.METHODS["gd"].gradient and bm.METHODS["adam"].gradient


def test_cli_takes_your_own_function_as_module_attribute(tmp_path, monkeypatch, capsys):
    """As ``study`` does: ``--functions module:attribute`` names a TestFunction (it was
    "unknown test function"); an unknown name fails before anything runs."""
    (tmp_path / "my_functions.py").write_text(
        "import jax.numpy as jnp\n"
        "from agsopt.functions import TestFunction\n"
        "shifted = TestFunction('shifted', lambda x: jnp.sum((x - 1.0) ** 2), (-5.0, 5.0),\n"
        "                       lambda d: jnp.ones(d), lambda d: 0.0, 'a shifted sphere')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "bb"
    argv = ["blackbox", "--functions", "my_functions:shifted", "--dim", "2", "--starts", "2"]
    assert (
        main([*argv, "--budget", "500", "--methods", "dgs", "--out", str(out), "--no-plots"]) == 0
    )
    (record,) = json.loads((out / "blackbox.json").read_text())
    assert record["function"] == "shifted" and record["success_rate"] == 1.0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["blackbox", "--functions", "nosuch", "--out", str(tmp_path / "x"), "--no-plots"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert "unknown test function 'nosuch'" in captured.err and "protocol" not in captured.out
