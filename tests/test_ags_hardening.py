"""AGS under hostile input (issue #10): no silent stalls, no silent wrong numbers.

Each test names the failure it guards against. Closed forms used:

- linear ``f(x) = aᵀx`` with ``Σ = σI``: the antithetic and forward estimates are exactly
  ``(1/N) Σ_n (aᵀu_n) u_n`` for the drawn directions ``u_n`` (σ cancels), the plain one adds
  ``f(x)/σ · (1/N) Σ_n u_n``, the first-order one is ``a``; the antithetic value is ``f(x)``.
- ``f(x) = cos(aᵀx)``: ``∇f_Σ(x) = −sin(aᵀx) exp(−‖Σᵀa‖²/2) a``; for σ‖a‖ ≪ 1 the
  antithetic estimate is ``(1/N) Σ_n (gᵀu_n) u_n`` with ``g = −sin(aᵀx) a`` up to a relative
  O(σ²‖a‖²).

The directions are recomputed with :func:`agsopt.smoothing.directions.sample_directions`
(direction n is ``normal(fold_in(key, n), (d,))``), in float64 on the host.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from markdown_blocks import device_env

import agsopt
from agsopt.smoothing._ags import COUNTER_MAX
from agsopt.smoothing.covariance_rules import RULES
from agsopt.smoothing.directions import sample_directions
from agsopt.tree_utils import as_key, key_for_state, split_state_key


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(jax.tree.map(lambda x: x.astype(jnp.float32), tree))[0])


def directions(key, dim: int, num: int) -> np.ndarray:
    return np.asarray(sample_directions(key, dim, 0, num), np.float64)


def linear_estimate(a: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``(1/N) Σ_n (aᵀu_n) u_n``."""
    return (u @ a) @ u / len(u)


def step_key(state):
    """The typed key :func:`agsopt.ags` uses at this step (the state's key, split)."""
    return split_state_key(state.key, jax.random.key_impl(as_key(0)))[1]


PARAMS = {"v": jnp.asarray([0.3, -0.2, 0.5], jnp.float32), "w": jnp.asarray([0.1, -0.4])}
ZEROS = jax.tree.map(jnp.zeros_like, PARAMS)


def half_square(p):
    return 0.5 * jnp.sum(ravel_pytree(p)[0] ** 2)


# ------------------------------------------------------- item 1: non-finite estimates
@pytest.mark.parametrize("covariance", sorted(RULES))
def test_schedule_starting_at_zero_skips_the_step_and_keeps_going(covariance):
    """σ_0 = 0 from ``linear_schedule(0, .5, 5)`` used to give a NaN update with
    num_nonfinite = 0 and a NaN rule state for good. Now step 0 is skipped (zero update,
    nothing evaluated, rule state as initialized, one skipped step), and the later steps are
    finite and non-zero, under ``jit`` with the state carried by ``lax.scan``."""
    n = 8
    opt = optax.chain(
        agsopt.ags(optax.linear_schedule(0.0, 0.5, 5), n, covariance=covariance, key=3),
        optax.sgd(0.1),
    )

    def body(carry, _):
        params, state = carry
        updates, state = opt.update(ZEROS, state, params, value_fn=half_square)
        return (optax.apply_updates(params, updates), state), (updates, state[0])

    init = opt.init(PARAMS)
    (params, state), (updates, history) = jax.jit(lambda c: jax.lax.scan(body, c, None, length=6))(
        (PARAMS, init)
    )
    steps = np.stack([flat(jax.tree.map(lambda x, k=k: x[k], updates)) for k in range(6)])
    np.testing.assert_array_equal(steps[0], 0.0)
    assert np.all(np.isfinite(steps)) and np.all(np.any(steps[1:] != 0, axis=1))
    np.testing.assert_array_equal(history.num_skipped, [1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(history.num_evaluations, 2 * n * np.arange(6))
    np.testing.assert_array_equal(history.num_nonfinite, 0)
    first_rule_state = jax.tree.map(lambda x: x[0], history.rule_state)
    jax.tree.map(np.testing.assert_array_equal, first_rule_state, init[0].rule_state)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state[0].rule_state))
    assert half_square(params) < half_square(PARAMS)


def test_injected_nonfinite_sigma_is_skipped():
    """σ injected through ``optax.inject_hyperparams`` is checked at run time too (under
    ``jit``; an eager update with a concrete bad σ fails with the construction error)."""
    opt = optax.inject_hyperparams(agsopt.ags, static_args=("num_samples",))(
        sigma=0.3, num_samples=4
    )
    update = jax.jit(lambda s: opt.update(ZEROS, s, PARAMS, value_fn=half_square))
    state = opt.init(PARAMS)
    for bad in (jnp.nan, -0.3, jnp.inf):
        state.hyperparams["sigma"] = jnp.asarray(bad, jnp.float32)
        before = state.inner_state
        updates, state = update(state)
        np.testing.assert_array_equal(flat(updates), 0.0)
        assert int(state.inner_state.num_skipped) == int(before.num_skipped) + 1
        assert int(state.inner_state.num_evaluations) == 0
    with pytest.raises(ValueError, match="sigma"):
        opt.update(ZEROS, state, PARAMS, value_fn=half_square)
    state.hyperparams["sigma"] = jnp.asarray(0.3, jnp.float32)
    updates, state = update(state)
    assert np.all(np.isfinite(flat(updates))) and np.any(flat(updates) != 0)
    assert int(state.inner_state.num_skipped) == 3


A_BIG = np.asarray([1e37, 0.0, 0.0, 0.0])


def big_linear(x):
    return jnp.dot(jnp.asarray(A_BIG, jnp.float32), x)


@pytest.mark.parametrize("method", ["antithetic", "forward", "plain", "first_order"])
@pytest.mark.parametrize("chunk_size", [None, 7])
def test_finite_losses_whose_sums_overflow_float32(method, chunk_size):
    """f = 1e37·x₀ over N = 256 samples: every value is finite, their float32 sums are not
    (256 · 1e37 > 3.4e38). The estimate must still be the closed form, not inf/NaN."""
    n, sigma = 256, 0.1
    x = jnp.asarray([1.0, -0.5, 0.25, 2.0], jnp.float32)
    key = jax.random.key(5)
    est = agsopt.smoothed_value_and_grad(
        big_linear,
        x,
        key,
        agsopt.covariance.isotropic(sigma),
        num_samples=n,
        method=method,
        chunk_size=chunk_size,
    )
    u = directions(key, 4, n)
    f_x = float(A_BIG @ np.asarray(x, np.float64))
    expected = {
        "antithetic": linear_estimate(A_BIG, u),
        "forward": linear_estimate(A_BIG, u),
        "plain": linear_estimate(A_BIG, u) + f_x / sigma * u.mean(0),
        "first_order": A_BIG,
    }[method]
    expected_value = f_x + (0.0 if method == "antithetic" else sigma * A_BIG @ u.mean(0))
    grad = np.asarray(est.grad, np.float64)
    assert np.all(np.isfinite(grad)) and int(est.num_nonfinite) == 0
    # float32 rounding of the values ~1e37 · 6e-8, relative to weights ~1e37 · σ
    np.testing.assert_allclose(grad, expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
    np.testing.assert_allclose(float(est.value), expected_value, rtol=1e-5)


def test_antithetic_difference_of_huge_values_does_not_overflow():
    """f(x ± σu) = ±3e38: the difference 6e38 overflows float32, (f₊ − f₋)/2 does not.
    f = 3e38·sign(x₀) at x₀ = 0, so every weight is 3e38·sign(u₀) and the estimate is
    ``3e38/σ · (1/N) Σ_n sign(u_n0) u_n``."""
    n, sigma = 64, 4.0
    key = jax.random.key(2)
    fun = lambda x: 3e38 * jnp.sign(x[0])
    est = agsopt.smoothed_value_and_grad(
        fun, jnp.zeros(3), key, agsopt.covariance.isotropic(sigma), num_samples=n
    )
    u = directions(key, 3, n)
    expected = 3e38 / sigma * (np.sign(u[:, 0]) @ u) / n
    np.testing.assert_allclose(np.asarray(est.grad, np.float64), expected, rtol=1e-5)
    assert float(est.value) == 0.0


def test_ags_keeps_working_on_losses_of_order_1e37():
    """The issue's case through the default optimizer: four steps of f = 1e37·x₀, N = 256.
    Before, the first update was NaN, the rule state NaN for good, and every later sample
    counted as non-finite. Now each update is the closed form at the step's key, nothing is
    non-finite or skipped, and the rule state stays finite: from the second step on the
    rule's ‖ĝ‖² ≈ 1e74 overflows float32, so its updates are dropped and counted, and Σ stays
    σI (the rule's κ needs two accepted updates; its direction m/‖m‖ is 0 while ‖m‖²
    overflows)."""
    n = 256
    opt = agsopt.ags(0.1, n, key=11)
    x = jnp.asarray([1.0, -0.5, 0.25, 2.0], jnp.float32)
    state = opt.init(x)
    for step in range(4):
        key = step_key(state)
        updates, state = opt.update(x, state, x, value_fn=big_linear)
        grad = np.asarray(updates, np.float64)
        assert np.all(np.isfinite(grad)), step
        expected = linear_estimate(A_BIG, directions(key, 4, n))
        np.testing.assert_allclose(grad, expected, rtol=2e-4, atol=2e-4 * 1e37)
    assert int(state.num_nonfinite) == 0 and int(state.num_skipped) == 0
    assert int(state.num_rule_skipped) == 3
    assert int(state.num_evaluations) == 4 * 2 * n
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state.rule_state))
    assert float(state.value) == pytest.approx(1e37, rel=1e-5)


def test_rule_update_with_nonfinite_state_is_dropped_and_counted():
    """A custom rule whose update produces NaN: the gradient step is still applied, the rule
    keeps its state, and ``num_rule_skipped`` says so."""
    base = RULES["gradient_aligned"]()
    nan_rule = agsopt.CovarianceRule(
        base.init, base.matrix, lambda s, g: jax.tree.map(lambda m: m * jnp.nan, s)
    )
    opt = agsopt.ags(0.3, 4, covariance=nan_rule)
    state = opt.init(PARAMS)
    updates, new = opt.update(ZEROS, state, PARAMS, value_fn=half_square)
    assert np.all(np.isfinite(flat(updates))) and np.any(flat(updates) != 0)
    jax.tree.map(np.testing.assert_array_equal, new.rule_state, state.rule_state)
    assert (int(new.num_rule_skipped), int(new.num_skipped)) == (1, 0)


# ------------------------------------------------------------- item 2: bf16 / f16
def test_bf16_perturbation_below_the_dtype_spacing_linear():
    """σ = 1e-3 at x = 1 in bfloat16 (spacing 2⁻⁷ above 1, 2⁻⁸ below): the estimate of
    ∇f_Σ = a for linear f must be the closed form (1/N) Σ (aᵀu)u, not 4–5× too small."""
    n, a = 4096, np.asarray([1.0, 2.0, 3.0, 4.0])
    key = jax.random.key(0)
    fun = lambda x: jnp.dot(jnp.asarray(a, jnp.float32), x.astype(jnp.float32))
    est = agsopt.smoothed_value_and_grad(
        fun, jnp.ones(4, jnp.bfloat16), key, agsopt.covariance.isotropic(1e-3), num_samples=n
    )
    assert est.grad.dtype == jnp.bfloat16
    expected = linear_estimate(a, directions(key, 4, n))
    # bf16 output rounding (2⁻⁹ relative) plus float32 cancellation in f(x ± σu) ≈ 10
    np.testing.assert_allclose(np.asarray(est.grad, np.float64), expected, rtol=1e-2)
    # and the closed form itself is within 5 standard errors of a: MSE (d + 1)‖a‖²/N
    assert np.linalg.norm(expected - a) <= 5 * np.sqrt(5 / n) * np.linalg.norm(a)


def test_f16_perturbation_below_the_dtype_spacing_cos():
    """f = cos(aᵀx) in float16 at σ = 1e-4 (spacing 2⁻¹⁰ ≈ 1e-3 at 1): the antithetic
    estimate is (1/N) Σ (gᵀu)u, g = −sin(aᵀx) a (σ‖a‖ ≪ 1: exp(−‖σa‖²/2) ≈ 1 − 7e-8)."""
    n, a = 2048, np.asarray([0.5, -1.0, 1.5])
    x = np.asarray([1.0, 0.75, -1.25])
    key = jax.random.key(9)
    fun = lambda p: jnp.cos(jnp.dot(jnp.asarray(a, jnp.float32), p.astype(jnp.float32)))
    est = agsopt.smoothed_value_and_grad(
        fun,
        jnp.asarray(x, jnp.float16),
        key,
        agsopt.covariance.isotropic(1e-4),
        num_samples=n,
    )
    g = -np.sin(a @ x) * a
    expected = linear_estimate(g, directions(key, 3, n))
    np.testing.assert_allclose(
        np.asarray(est.grad, np.float64), expected, rtol=1e-2, atol=2e-3 * np.abs(g).max()
    )


def test_bf16_ags_update_matches_float32_at_tiny_sigma():
    """The README's claim at σ below the bf16 spacing: three AGS steps (default rule) on the
    bf16 parameters agree with the float32 run on the same values within 2 bf16 ulps."""
    a = jnp.asarray([1.0, -2.0, 3.0, 0.5, -1.5, 2.5], jnp.float32)
    loss = lambda p: jnp.dot(a, p.astype(jnp.float32)) + 0.5 * jnp.sum(p.astype(jnp.float32) ** 2)
    x32 = jnp.asarray([1.0, 0.5, -1.0, 2.0, -0.25, 0.75], jnp.float32)
    x16 = x32.astype(jnp.bfloat16)
    assert np.array_equal(np.asarray(x16, np.float32), np.asarray(x32))
    outputs = {}
    for x in (x16, x32):
        opt = agsopt.ags(1e-3, 64, key=4)
        state, out = opt.init(x), []
        for _ in range(3):
            updates, state = opt.update(x, state, x, value_fn=loss)
            out.append(np.asarray(updates, np.float64))
        outputs[x.dtype] = out
    eps = float(jnp.finfo(jnp.bfloat16).eps)
    for low, ref in zip(
        outputs[jnp.dtype(jnp.bfloat16)], outputs[jnp.dtype(jnp.float32)], strict=True
    ):
        assert np.max(np.abs(low - ref)) <= 2 * eps * np.max(np.abs(ref))


# ----------------------------------------------------- item 3: non-float parameters
@pytest.mark.parametrize("bad", [jnp.arange(3), jnp.ones(2, jnp.complex64), jnp.ones(2, bool)])
def test_non_float_leaves_are_rejected_naming_the_leaf(bad):
    params = {"good": jnp.ones(2), "layer": {"bad": bad}}
    fun = lambda p: jnp.sum(p["good"]).real
    with pytest.raises(TypeError, match=r"\['layer'\]\['bad'\]"):
        agsopt.ags(0.1, 4).init(params)
    with pytest.raises(TypeError, match=r"\['layer'\]\['bad'\]"):
        agsopt.smoothed_value_and_grad(
            fun, params, jax.random.key(0), agsopt.covariance.isotropic(0.1)
        )
    opt = agsopt.ags(0.1, 4)
    state = opt.init({"good": jnp.ones(2), "layer": {"bad": jnp.ones(bad.shape)}})
    with pytest.raises(TypeError, match=r"params\['layer'\]\['bad'\]"):
        opt.update(params, state, params, value_fn=fun)


# ------------------------------------------------------ item 4: non-scalar value_fn
@pytest.mark.parametrize("num_samples, chunk_size", [(1, None), (8, 1), (8, None)])
def test_vector_valued_loss_is_rejected(num_samples, chunk_size):
    """A vector loss used to run with chunk_size = 1 / num_samples = 1 (num_nonfinite < 0)."""
    opt = agsopt.ags(0.1, num_samples, chunk_size=chunk_size)
    state = opt.init(PARAMS)
    vector = lambda p: p["v"] ** 2
    with pytest.raises(TypeError, match="value_fn must return a scalar"):
        opt.update(ZEROS, state, PARAMS, value_fn=vector)
    with pytest.raises(TypeError, match="value_fn must return a scalar"):
        jax.jit(lambda s: opt.update(ZEROS, s, PARAMS, value_fn=vector))(state)
    with pytest.raises(TypeError, match="fun must return a scalar"):
        agsopt.smoothed_value_and_grad(
            vector,
            PARAMS,
            jax.random.key(0),
            agsopt.covariance.isotropic(0.1),
            num_samples=num_samples,
            chunk_size=chunk_size,
        )
    with pytest.raises(TypeError, match="value_fn must return a scalar"):
        opt.update(ZEROS, state, PARAMS, value_fn=lambda p: (half_square(p), 1.0))


# ------------------------------------------------- item 5: counters and large seeds
def test_counters_saturate_instead_of_wrapping():
    """int32 counters near 2³¹ − 1: one more step used to wrap them negative."""
    n = 16
    opt = agsopt.ags(0.3, n)
    near = jnp.int32(COUNTER_MAX - 5)
    state = opt.init(PARAMS)._replace(
        num_evaluations=near, num_nonfinite=near, num_skipped=near, count=near
    )
    nan_loss = lambda p: half_square(p) * jnp.nan
    for fn in (half_square, nan_loss, nan_loss):
        _, state = opt.update(ZEROS, state, PARAMS, value_fn=fn)
    assert int(state.num_evaluations) == COUNTER_MAX
    assert int(state.num_nonfinite) == COUNTER_MAX
    assert int(state.num_skipped) == COUNTER_MAX - 3
    assert int(state.count) == COUNTER_MAX - 2
    for leaf in (state.num_evaluations, state.num_nonfinite, state.num_skipped, state.count):
        assert leaf.dtype == jnp.int32


def test_large_seeds_do_not_alias_smaller_ones():
    keys = {seed: key_for_state(seed)[0] for seed in (0, 2**32, 2**40, 2**40 + 7, 2**64 - 1)}
    assert len({tuple(np.asarray(k)) for k in keys.values()}) == len(keys)
    # threefry key data is [seed >> 32, seed & 0xffffffff], as jax.random.key in x64 mode
    np.testing.assert_array_equal(keys[2**40 + 7], [256, 7])
    np.testing.assert_array_equal(key_for_state(np.uint64(2**40 + 7))[0], [256, 7])
    np.testing.assert_array_equal(key_for_state(5)[0], jax.random.key_data(jax.random.key(5)))
    state = agsopt.ags(0.1, 4, key=2**40).init(PARAMS)
    assert not np.array_equal(state.key, agsopt.ags(0.1, 4, key=0).init(PARAMS).key)
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="key"):
            agsopt.ags(0.1, 4, key=bad)


# ------------------------------------------------------ item 6: argument checks
@pytest.mark.parametrize(
    "kwargs, error, name",
    [
        ({"sigma": None}, TypeError, "sigma"),
        ({"sigma": {}}, TypeError, "sigma"),
        ({"sigma": "0.1"}, TypeError, "sigma"),
        ({"orthogonal": "yes"}, TypeError, "orthogonal"),
        ({"orthogonal": 1}, TypeError, "orthogonal"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, error, name):
    with pytest.raises(error, match=name):
        agsopt.ags(**kwargs)


def test_empty_parameters_are_rejected():
    with pytest.raises(ValueError, match="params"):
        agsopt.ags(0.1, 4).init({})
    with pytest.raises(ValueError, match="params"):
        agsopt.ags(0.1, 4).init({"w": jnp.zeros((0,))})
    with pytest.raises(ValueError, match="params"):
        agsopt.smoothed_value_and_grad(
            lambda p: 0.0, {}, jax.random.key(0), agsopt.covariance.isotropic(0.1)
        )
    with pytest.raises(TypeError, match="orthogonal"):
        agsopt.smoothed_value_and_grad(
            half_square,
            PARAMS,
            jax.random.key(0),
            agsopt.covariance.isotropic(0.1),
            orthogonal="yes",
        )


# --------------------------------------------------------- item 7: precision modes
# Every rule, under lax.scan (which needs the carry's dtypes and shapes to stay put), with a
# σ schedule (so the run-time check's lax.cond is in the step too). Float32 here, x64 in a
# subprocess (a fresh interpreter: x64 must be set before JAX starts).
DTYPES_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, optax
    import agsopt
    from agsopt.smoothing.covariance_rules import RULES, fixed_diagonal

    def check(float64):
        leaves = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones((2, 2), jnp.bfloat16)}
        if float64:
            leaves["c"] = jnp.ones(2, jnp.float64)
        loss = lambda p: sum(jnp.sum(jnp.cos(x.astype(jnp.float32))) for x in p.values())
        rules = {name: RULES[name]() for name in RULES}
        rules["fixed_diagonal"] = fixed_diagonal(jax.tree.map(lambda x: 2.0, leaves))
        checked = []
        for name, rule in sorted(rules.items()):
            opt = agsopt.ags(optax.exponential_decay(0.3, 2, 0.5), 4, covariance=rule)
            state = opt.init(leaves)
            shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)

            def body(s, _):
                updates, s = opt.update(leaves, s, leaves, value_fn=loss)
                return s, updates

            final, updates = jax.jit(lambda s: jax.lax.scan(body, s, None, length=3))(state)
            after = jax.tree.map(lambda x: (x.shape, x.dtype), final)
            assert after == shapes, (name, shapes, after)
            # the smoothed loss is kept to the parameters' precision (float64 leaves: f64)
            assert final.value.dtype == (jnp.float64 if float64 else jnp.float32), name
            for u, x in zip(jax.tree.leaves(updates), jax.tree.leaves(leaves)):
                assert u.dtype == x.dtype and u.shape == (3,) + x.shape, name
            checked.append(name)
        return checked

    print(len(check(jax.config.jax_enable_x64)))
    """
)


def test_state_dtypes_are_stable_in_float32_mode():
    namespace: dict = {}
    exec(compile(DTYPES_SCRIPT.replace("print(", "RESULT = ("), "dtypes", "exec"), namespace)
    assert namespace["RESULT"] == len(RULES) + 1


def test_state_dtypes_are_stable_in_x64_mode():
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", DTYPES_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(len(RULES) + 1)


@pytest.mark.parametrize("name", sorted(RULES))
def test_state_for_other_parameters_is_refused(name):
    """A state (a checkpoint) restored into parameters of another size failed with an
    unrelated ``dot_general``/broadcasting error; it is a ``ValueError`` naming the state
    whenever the rule's state depends on the parameters' shapes. A rule whose state does not
    (isotropic) takes the step."""
    opt = agsopt.ags(sigma=0.3, num_samples=4, covariance=name)
    state = opt.init(jnp.zeros(5))
    other = jnp.full(4, 0.5)
    step = lambda: opt.update(other, state, other, value_fn=lambda x: jnp.sum(jnp.cos(x)))
    if not jax.tree.leaves(state.rule_state) or all(
        jnp.ndim(x) == 0 for x in jax.tree.leaves(state.rule_state)
    ):
        updates, _ = step()
        assert updates.shape == (4,) and np.all(np.isfinite(np.asarray(updates)))
        return
    with pytest.raises(ValueError, match="state.rule_state does not match these params"):
        step()
    with pytest.raises(ValueError, match="state.rule_state does not match"):
        jax.jit(lambda s: opt.update(other, s, other, value_fn=lambda x: jnp.sum(x)))(state)


def test_state_with_another_key_shape_is_refused():
    """A state whose key has another shape (another PRNG implementation's checkpoint)."""
    opt = agsopt.ags(sigma=0.3, num_samples=4, key=0)
    state = opt.init(PARAMS)._replace(key=jnp.zeros(4, jnp.uint32))
    with pytest.raises(ValueError, match="state.key has shape"):
        opt.update(ZEROS, state, PARAMS, value_fn=half_square)


SHARDED_EAGER_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec
    import agsopt

    sharding = NamedSharding(Mesh(jax.devices(), ("s",)), PartitionSpec("s"))
    fun = lambda x: jnp.sum(jnp.cos(x))
    x = jnp.full(3, 0.5)
    for num in (8, 7):
        opt = agsopt.ags(sigma=0.3, num_samples=num, sample_sharding=sharding, key=1)
        state = opt.init(x)
        step = lambda s: opt.update(x, s, x, value_fn=fun)[0]
        jitted = jax.jit(step)(state)
        try:
            eager = step(state)
            print(num, "eager", float(jnp.max(jnp.abs(eager - jitted))))
        except ValueError as err:
            print(num, "error", str(err).splitlines()[0][:200])
    """
)


def test_sharded_eager_call_with_indivisible_samples_names_num_samples():
    """Sharded AGS called outside ``jit`` with N not divisible by the device count raised
    JAX's ``IndivisibleError`` about an internal ``(7, 3)`` array; it is a ``ValueError``
    naming ``num_samples`` (under ``jit`` XLA pads, and the step runs). Two virtual CPU
    devices, in a subprocess (the device count is fixed when JAX starts)."""
    result = subprocess.run(
        [sys.executable, "-c", SHARDED_EAGER_SCRIPT],
        env=device_env(2),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    divisible, indivisible = lines[-2].split(), lines[-1]
    assert divisible[:2] == ["8", "eager"] and float(divisible[2]) < 1e-5
    assert indivisible.startswith("7 error agsopt.ags: sample_sharding")
    assert "num_samples=7" in indivisible


def test_eager_update_with_a_sigma_schedule_compiles_no_cond(monkeypatch):
    """Outside jit a σ schedule's validity is concrete: the step picks its branch in Python
    (an eager lax.cond recompiled the estimator at every call, ≈ 1.5 s a step), with the
    jitted trajectory's results, the skipped step at σ = 0 included."""
    schedule = optax.linear_schedule(0.0, 0.5, 3)  # σ = 0 at count 0: that step is skipped
    opt = agsopt.ags(schedule, 4, key=2)
    params = {"a": jnp.asarray([1.0, -2.0, 0.5]), "b": jnp.asarray(0.3)}

    def loss(p):
        return jnp.sum(jnp.cos(p["a"]) * p["a"] ** 2) + p["b"] ** 2

    def run(update):
        state, out = opt.init(params), []
        for _ in range(4):
            updates, state = update(state)
            out.append(updates)
        return out, state

    jitted = run(jax.jit(lambda s: opt.update(params, s, params, value_fn=loss)))

    def refuse(*args, **kwargs):
        raise AssertionError("lax.cond called eagerly")

    monkeypatch.setattr(jax.lax, "cond", refuse)
    eager = run(lambda s: opt.update(params, s, params, value_fn=loss))
    for x, y in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        assert jnp.result_type(x) == jnp.result_type(y)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-6)
    assert int(eager[1].num_skipped) == 1
