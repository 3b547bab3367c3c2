"""Ask/tell (agsopt.ask_tell): a function evaluated outside JAX gives the updates and states
of the jitted ``value_fn`` path bit for bit, failed evaluations are handled as a non-finite
loss is, and values of the wrong shape or type are refused with a clear error.

The black box is a NumPy function whose every operation is one correctly rounded IEEE
operation (subtraction, absolute value, product, maximum: no sum whose order could differ),
so it returns, bit for bit, what its JAX twin returns at the same float32 point: any
difference in the loop is then a difference in the points or in the arithmetic.

Bit for bit is checked with XLA's fusion pass off, in a subprocess (``CASES``, run once per
module). With fusion on, XLA on CPU contracts ``a·b + c`` into one FMA depending on which
operations share a fused kernel, and the two programs (one evaluates f, the other reads a
table) are fused differently: the last bit of a covariance-rule statistic can then differ
(seen: 1 ulp after three steps with ``chunk_size=3``). Without fusion every operation is
rounded as written, so an identical result shows that both paths do the same arithmetic on
the same numbers; the in-process tests check the same loops to float32 rounding.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import agsopt
from agsopt.smoothing import estimator
from agsopt.smoothing.directions import minimum_table_size

NO_FUSION = "--xla_disable_hlo_passes=fusion"
CENTRE = np.array([0.3, -0.7, 1.1, 0.05, -0.4, 0.9, -1.3, 0.6], np.float32)
WEIGHT = np.array([1.0, 2.0, 0.5, 3.0, 1.5, 0.25, 4.0, 1.25], np.float32)
PARAMS = {"a": jnp.full((2, 3), 0.5, jnp.float32), "b": jnp.array([-1.0, 2.0], jnp.float32)}


def _flat_jax(params):
    return jnp.concatenate([params["a"].ravel(), params["b"]])


def f_jax(params):
    """max_i w_i |x_i − c_i|: a non-smooth function of the 8 entries."""
    return jnp.max(WEIGHT * jnp.abs(_flat_jax(params) - CENTRE))


def f_numpy(points):
    """The same function, row by row, in NumPy: the black box."""
    flat = np.concatenate([points["a"].reshape(len(points["a"]), 6), points["b"]], axis=1)
    return np.max(WEIGHT * np.abs(flat - CENTRE), axis=1)


def f_jax_failing(params):
    """f, not finite where the first entry is above 0.6 (a failed simulation)."""
    return jnp.where(_flat_jax(params)[0] > 0.6, jnp.nan, f_jax(params))


def f_numpy_failing(points):
    values = f_numpy(points)
    values[points["a"][:, 0, 0] > 0.6] = np.nan
    return values


def _jitted_steps(opt, params, num_steps, value_fn=f_jax):
    state = opt.init(params)
    update = jax.jit(lambda u, s, p: opt.update(u, s, p, value_fn=value_fn))
    history = []
    for _ in range(num_steps):
        updates, state = update(jax.tree.map(jnp.zeros_like, params), state, params)
        params = optax.apply_updates(params, updates)
        history.append((updates, state))
    return history


def _ask_tell_steps(opt, params, num_steps, black_box=f_numpy):
    state = opt.init(params)
    history = []
    for _ in range(num_steps):
        points, ticket = opt.ask(state, params)
        assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(points))
        updates, state = opt.tell(ticket, black_box(points))
        params = optax.apply_updates(params, updates)
        history.append((updates, state))
    return history


def _differences(a, b) -> list[str]:
    """The leaves of ``a`` and ``b`` that are not the same bits (paths), [] if none."""
    leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    if tree_a != tree_b:
        return [f"tree {tree_a} != {tree_b}"]
    return [
        f"{jax.tree_util.keystr(path)}: {np.asarray(x)!r} != {np.asarray(y)!r}"
        for (path, x), y in zip(leaves_a, leaves_b, strict=True)
        if np.asarray(x).dtype != np.asarray(y).dtype
        or np.asarray(x).tobytes() != np.asarray(y).tobytes()
    ]


def _assert_close(a, b):
    """The same tree; integer and key leaves equal, float leaves to float32 rounding."""
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(x, y)


def _pair(jitted_opt, asked_opt, steps, value_fn=f_jax, black_box=f_numpy):
    return (
        _jitted_steps(jitted_opt, PARAMS, steps, value_fn),
        _ask_tell_steps(asked_opt, PARAMS, steps, black_box),
    )


def _main_case(method, chunk_size):
    kwargs = dict(sigma=0.4, num_samples=7, key=5, method=method, chunk_size=chunk_size)
    return _pair(agsopt.ags_adam(0.05, **kwargs), agsopt.ask_tell(optax.adam(0.05), **kwargs), 4)


def _sgd_case(**kwargs):
    kwargs = dict(sigma=0.4, num_samples=7, key=1) | kwargs
    smoothed = optax.chain(agsopt.ags(**kwargs), optax.sgd(0.1))
    return _pair(smoothed, agsopt.ask_tell(optax.sgd(0.1), **kwargs), 3)


def _tabulated_estimates():
    """The estimator alone: f, against its values at ``points`` as a TabulatedValues."""
    matrix = agsopt.covariance.isotropic(0.3)
    key = jax.random.key(8)

    @functools.partial(jax.jit, static_argnames="method")
    def both(params, method):
        kwargs = dict(num_samples=6, method=method, chunk_size=4)
        batch = estimator.points(params, key, matrix, **kwargs)
        shape = jax.ShapeDtypeStruct((len(batch["b"]),), jnp.float32)
        table = estimator.TabulatedValues(jax.pure_callback(f_numpy, shape, batch))
        return tuple(
            agsopt.smoothed_value_and_grad(fun, params, key, matrix, curvature=True, **kwargs)
            for fun in (f_jax, table)
        )

    methods = ("antithetic", "forward", "plain")
    return [both(PARAMS, method=m)[0] for m in methods], [
        both(PARAMS, method=m)[1] for m in methods
    ]


# the brief's loop: every zero-order method, chunked (with a remainder chunk) and not, with
# Adam and the default adaptive rule over four steps; failed evaluations; the estimator alone.
# By default the antithetic loop with a remainder chunk (the case the in-process test also
# follows), the failing black box and the estimator alone, every method (its table against
# its function); the other five loops under -m slow (issue 20.6: the suite's time).
_LOOPS = {
    f"{method}-{'chunk3' if chunk else 'unchunked'}": functools.partial(_main_case, method, chunk)
    for method in ("antithetic", "forward", "plain")
    for chunk in (None, 3)
}
CASES = {
    "antithetic-chunk3": _LOOPS["antithetic-chunk3"],
    "nonfinite": lambda: _pair(
        agsopt.ags_sgd(0.05, sigma=0.4, num_samples=9, key=7),
        agsopt.ask_tell(optax.sgd(0.05, 0.9), sigma=0.4, num_samples=9, key=7),
        3,
        f_jax_failing,
        f_numpy_failing,
    ),
    "estimator": _tabulated_estimates,
}
# the other settings (-m slow): IGS and its alias, orthogonal blocks, a noise table, the
# curvature rule, ags without a base optimizer, a σ schedule that starts invalid
SLOW_CASES = {
    **{name: case for name, case in _LOOPS.items() if name != "antithetic-chunk3"},
    "igs": functools.partial(_sgd_case, covariance="isotropic"),
    "igs-alias": lambda: (
        _jitted_steps(agsopt.igs_gd(0.1, sigma=0.4, num_samples=7, key=1), PARAMS, 3),
        _sgd_case(covariance="isotropic")[1],
    ),
    "orthogonal-chunk3": functools.partial(_sgd_case, orthogonal=True, chunk_size=3),
    "orthogonal": functools.partial(_sgd_case, orthogonal=True),
    "noise-table": lambda: _sgd_case(
        noise_table=agsopt.smoothing.make_noise_table(
            jax.random.key(2), minimum_table_size(agsopt.tree_utils.tree_size(PARAMS))
        )
    ),
    "curvature-rule": functools.partial(
        _sgd_case, covariance="curvature_diagonal", method="forward"
    ),
    "no-base": lambda: _pair(
        agsopt.ags(sigma=0.3, num_samples=5, key=3),
        agsopt.ask_tell(sigma=0.3, num_samples=5, key=3),
        3,
    ),
    "invalid-sigma": functools.partial(
        _sgd_case, sigma=optax.linear_schedule(0.0, 0.5, 4), num_samples=3, key=2
    ),
}


def _run_without_fusion(which: str) -> dict[str, list[str]]:
    """``{case: differing leaves}`` for ``CASES`` or ``SLOW_CASES``, from a subprocess with
    XLA's fusion pass off (and LLVM at -O0, which only shortens the compiles)."""
    tests = Path(__file__).resolve().parent
    path = os.pathsep.join([str(tests.parent), str(tests), os.environ.get("PYTHONPATH", "")])
    flags = f"{os.environ.get('XLA_FLAGS', '')} {NO_FUSION} --xla_backend_optimization_level=0"
    env = {**os.environ, "XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, __file__, which], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bitwise():
    return _run_without_fusion("default")


@pytest.fixture(scope="module")
def bitwise_slow():
    return _run_without_fusion("slow")


@pytest.mark.parametrize("case", list(CASES))
def test_ask_tell_reproduces_the_jitted_path_bit_for_bit(bitwise, case):
    assert bitwise[case] == []


@pytest.mark.slow
@pytest.mark.parametrize("case", list(SLOW_CASES))
def test_ask_tell_reproduces_the_other_settings_bit_for_bit(bitwise_slow, case):
    assert bitwise_slow[case] == []


def test_ask_tell_follows_the_jitted_path_with_default_flags():
    jitted, asked = _main_case("antithetic", 3)
    _assert_close(jitted, asked)
    final_state = asked[-1][1][0]
    assert int(final_state.num_evaluations) == 4 * 14
    # the default rule adapts Σ to the gradients: the loop tested a changing Σ, not only σI
    momentum = jax.tree.leaves(final_state.rule_state.momentum)
    assert any(np.any(m != 0) for m in momentum) and float(final_state.rule_state.power) > 0


def test_nonfinite_values_are_left_out_and_counted():
    jitted, asked = CASES["nonfinite"]()
    _assert_close(jitted, asked)  # bit for bit without fusion: CASES
    state = asked[-1][1][0]
    assert 0 < int(state.num_nonfinite) < 3 * 9 and int(state.num_skipped) == 0


def test_a_step_with_no_finite_value_is_skipped():
    kwargs = dict(sigma=0.4, num_samples=4, key=7)
    inf_jax = lambda params: f_jax(params) + jnp.inf
    inf_numpy = lambda points: f_numpy(points) + np.inf
    jitted, asked = _pair(
        agsopt.ags_adam(0.05, **kwargs),
        agsopt.ask_tell(optax.adam(0.05), **kwargs),
        2,
        inf_jax,
        inf_numpy,
    )
    assert _differences(jitted, asked) == []  # nothing computed from a value: exact
    updates, state = asked[-1]
    assert all(not np.any(u) for u in jax.tree.leaves(updates))
    assert int(state[0].num_skipped) == 2 and int(state[0].num_nonfinite) == 8
    initial = agsopt.ask_tell(optax.adam(0.05), **kwargs).init(PARAMS)[0].rule_state
    assert _differences(state[0].rule_state, initial) == []


def test_an_invalid_sigma_asks_for_nothing_and_skips_the_step():
    opt = agsopt.ask_tell(optax.sgd(0.1), sigma=optax.linear_schedule(0.0, 0.5, 4), num_samples=3)
    state = opt.init(PARAMS)
    points, ticket = opt.ask(state, PARAMS)  # σ = 0 at step 0
    assert ticket.num_points == 0
    assert all(x.shape[0] == 0 for x in jax.tree.leaves(points))
    with pytest.raises(ValueError, match=r"shape \(0,\)"):
        opt.tell(ticket, np.zeros(6))
    updates, state = opt.tell(ticket, np.zeros(0))
    assert all(not np.any(u) for u in jax.tree.leaves(updates))
    assert int(state[0].num_skipped) == 1 and int(state[0].num_evaluations) == 0
    points, ticket = opt.ask(state, PARAMS)  # σ = 0.125 at step 1
    assert ticket.num_points == 6 and points["a"].shape == (6, 2, 3)


@pytest.mark.parametrize(
    "values, error, match",
    [
        (np.zeros(13), ValueError, r"shape \(14,\).*got shape \(13,\)"),
        (np.zeros((14, 1)), ValueError, r"shape \(14,\).*got shape \(14, 1\)"),
        (np.zeros(()), ValueError, r"got shape \(\)"),
        (np.zeros(14, np.complex64), TypeError, "real numbers"),
        (np.array(["1.0"] * 14), TypeError, "real numbers"),
        (np.ones(14, bool), TypeError, "real numbers"),
    ],
    ids=["short", "column", "scalar", "complex", "strings", "bool"],
)
def test_wrong_values_give_a_clear_error(values, error, match):
    opt = agsopt.ask_tell(optax.sgd(0.1), sigma=0.3, num_samples=7)
    state = opt.init(PARAMS)
    _, ticket = opt.ask(state, PARAMS)
    assert ticket.num_points == 14
    with pytest.raises(error, match=match):
        opt.tell(ticket, values)


def test_wrong_arguments_are_refused_at_construction_or_call():
    with pytest.raises(ValueError, match="first_order"):
        agsopt.ask_tell(optax.sgd(0.1), method="first_order")
    with pytest.raises(ValueError, match="num_samples"):
        agsopt.ask_tell(optax.sgd(0.1), num_samples=0)
    opt = agsopt.ask_tell(optax.sgd(0.1))
    with pytest.raises(TypeError, match="Ticket"):
        opt.tell((None, None, 3), np.zeros(3))
    with pytest.raises(TypeError, match="init"):
        opt.ask(optax.sgd(0.1).init(PARAMS), PARAMS)


def test_points_are_in_the_documented_order():
    matrix = agsopt.covariance.isotropic(0.25)
    key = jax.random.key(4)
    x = PARAMS
    plus = estimator.points(x, key, matrix, num_samples=5, method="plain")
    assert plus["a"].shape == (5, 2, 3) and plus["b"].shape == (5, 2)
    both = estimator.points(x, key, matrix, num_samples=5, method="antithetic")
    forward = estimator.points(x, key, matrix, num_samples=5, method="forward")
    for name in x:
        np.testing.assert_array_equal(both[name][:5], plus[name])
        np.testing.assert_array_equal(forward[name][0], x[name])
        np.testing.assert_array_equal(forward[name][1:], plus[name])
        # x − Σu_n mirrors x + Σu_n about x (up to one rounding each)
        mirrored = both[name][5:] + plus[name]
        np.testing.assert_allclose(
            mirrored, np.broadcast_to(2 * x[name], mirrored.shape), atol=1e-6
        )
    # Σu_n is σ times the estimator's direction n
    directions = agsopt.smoothing.sample_directions(key, 8, 0, 5)
    flat = np.concatenate([plus["a"].reshape(5, -1), plus["b"]], axis=1)
    np.testing.assert_allclose(flat - np.asarray(_flat_jax(x)), 0.25 * directions, atol=1e-6)
    with pytest.raises(ValueError, match="first_order"):
        estimator.points(x, key, matrix, method="first_order")


def test_tabulated_values_are_checked():
    matrix = agsopt.covariance.isotropic(0.3)
    key = jax.random.key(8)
    with pytest.raises(ValueError, match=r"shape \(12,\)"):
        agsopt.smoothed_value_and_grad(
            estimator.TabulatedValues(jnp.zeros(11)), PARAMS, key, matrix, num_samples=6
        )
    with pytest.raises(ValueError, match="first_order"):
        agsopt.smoothed_value_and_grad(
            estimator.TabulatedValues(jnp.zeros(6)),
            PARAMS,
            key,
            matrix,
            num_samples=6,
            method="first_order",
        )
    with pytest.raises(TypeError, match="real numbers"):
        agsopt.smoothed_value_and_grad(
            estimator.TabulatedValues(jnp.zeros(12, jnp.complex64)),
            PARAMS,
            key,
            matrix,
            num_samples=6,
        )
    with pytest.raises(TypeError, match="cannot evaluate"):
        estimator.TabulatedValues(jnp.zeros(3))(PARAMS)


if __name__ == "__main__":  # the bitwise comparisons, run by _run_without_fusion
    cases = SLOW_CASES if sys.argv[1:] == ["slow"] else CASES
    print(json.dumps({name: _differences(*case()) for name, case in cases.items()}))


@pytest.mark.parametrize(
    "make",
    [
        lambda: agsopt.ask_tell(optax.sgd(0.01), sigma=0.6, num_samples=4, key=0),
        lambda: agsopt.dgs_ask_tell(0.5, key=0),
    ],
    ids=["ask_tell", "dgs_ask_tell"],
)
def test_asked_points_are_writable_copies(make):
    """A simulator may edit its input in place (it got read-only views of JAX buffers)."""
    opt = make()
    x = np.full(3, 3.3, np.float32)
    state = opt.init(x)
    points, ticket = opt.ask(state, x)
    again, _ = opt.ask(state, x)
    assert points.flags.writeable
    points -= 1.0  # edits the copy only: the next ask gives the same points as before
    np.testing.assert_array_equal(again, points + 1.0)
    values = np.sum((again - 1.0) ** 2, axis=-1)
    updates, _ = opt.tell(ticket, values)
    assert np.all(np.isfinite(np.asarray(updates)))


def test_numpy_float64_params_give_no_truncation_warning():
    """NumPy's default float64 params (x64 off) ran as float32 but warned from inside
    agsopt, in init and in tell; optax's own init does not warn."""
    import warnings

    if jax.config.jax_enable_x64:
        pytest.skip("x64 mode keeps float64")
    opt = agsopt.ask_tell(optax.sgd(0.01), sigma=0.6, num_samples=4, key=0)
    x = np.full(5, 3.3)  # float64
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = opt.init(x)
        points, ticket = opt.ask(state, x)
        updates, _ = opt.tell(ticket, np.sum(points**2, axis=-1))
    assert updates.dtype == jnp.float32


def test_none_for_a_failed_evaluation_points_to_nan():
    opt = agsopt.ask_tell(optax.sgd(0.01), sigma=0.6, num_samples=2, key=0)
    x = np.full(3, 3.3, np.float32)
    points, ticket = opt.ask(opt.init(x), x)
    values = [float(np.sum(p**2)) for p in points]
    values[0] = None
    with pytest.raises(TypeError, match="a failed evaluation is NaN, not None"):
        opt.tell(ticket, values)
