"""Property-based tests over random pytrees, and losses that fail at some samples or steps.

Hypothesis draws nested dicts/lists/tuples of float32, bfloat16 and float16 arrays of
assorted shapes (scalars included, mixed dtypes within one tree). For every transformation,
two updates must keep each leaf's shape and dtype, be finite, leave a finite state, and agree
with and without ``jax.jit`` (to a few units in the last place of each leaf's dtype). Every
example is a new tree structure, hence new compilations; the example counts are small.

Faults: a loss that returns NaN or ±inf at some samples or on whole steps leaves the state
finite; AGS leaves those samples out and counts them in ``num_nonfinite`` (a step with no
finite sample gives a zero update and keeps the covariance rule's state).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import agsopt
from agsopt.sharpness import ausam

DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
SHAPES = ((), (1,), (3,), (2, 3), (2, 1, 2))
KEYS = ("a", "b", "c", "w")

leaf_specs = st.tuples(st.sampled_from(SHAPES), st.sampled_from(range(len(DTYPES))))
tree_specs = st.recursive(
    leaf_specs,
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3).map(tuple),
        st.dictionaries(st.sampled_from(KEYS), children, min_size=1, max_size=3),
    ),
    max_leaves=5,
)


def is_spec(x):
    return isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], int)


def build(spec, seed):
    """Arrays for a spec tree: values in [-2, 2], each leaf in its dtype."""
    rng = np.random.default_rng(seed)

    def leaf(s):
        shape, dtype_index = s
        return jnp.asarray(rng.uniform(-2.0, 2.0, size=shape), DTYPES[dtype_index])

    return jax.tree.map(leaf, spec, is_leaf=is_spec)


def loss(params):
    """A smooth scalar of every leaf, in float32."""
    total = jnp.zeros((), jnp.float32)
    for i, x in enumerate(jax.tree.leaves(params)):
        x = x.astype(jnp.float32)
        total = total + jnp.sum(jnp.sin(x + i) + 0.25 * x**2)
    return total


def per_example_loss_fn(params, positions):
    return (1.0 + 0.1 * positions.astype(jnp.float32)) * loss(params)


TRANSFORMS = {
    "ags": lambda cov, method: agsopt.ags(0.3, 4, covariance=cov, method=method, key=1),
    "sam": lambda adaptive: agsopt.sam(0.1, adaptive=adaptive),
    "bsam": lambda: agsopt.bsam(0.1, 0.05),
    "vsam": lambda: agsopt.vsam(0.1, window=2, var_blocks=1, warmup_steps=1, reuse_steps=1),
    "ausam": lambda: ausam(4, 0.1, steps_per_epoch=1, alpha=0.5),
}


def two_steps(opt, params, use_ausam):
    state, outputs = opt.init(params), []
    for _ in range(2):
        if use_ausam:
            kwargs = {"per_example_loss_fn": per_example_loss_fn, "ids": jnp.arange(4)}
            updates, state = opt.update(None, state, params, **kwargs)
        else:
            updates, state = opt.update(jax.grad(loss)(params), state, params, value_fn=loss)
        outputs.append(updates)
    return outputs, state


def check_properties(opt, params, use_ausam=False):
    eager = two_steps(opt, params, use_ausam)
    jitted = jax.jit(lambda p: two_steps(opt, p, use_ausam))(params)
    for outputs, state in (eager, jitted):
        for updates in outputs:
            assert jax.tree.structure(updates) == jax.tree.structure(params)
            for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
                assert u.shape == p.shape and u.dtype == p.dtype
                assert np.all(np.isfinite(np.asarray(u, np.float32)))
        for leaf in jax.tree.leaves(state):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    assert jax.tree.structure(eager[1]) == jax.tree.structure(jitted[1])
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if jnp.issubdtype(a.dtype, jnp.floating):
            a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
            scale = max(1.0, float(np.max(np.abs(b64), initial=0.0)))
            assert float(np.max(np.abs(a64 - b64), initial=0.0)) <= jit_tolerance(a.dtype) * scale
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def jit_tolerance(dtype):
    """jit fuses and reorders float32 sums: a few ulps, amplified by the zero-order
    differences f(x + Σu) − f(x); a low-precision result may round to the next ulp."""
    return max(1e-4, 8 * float(jnp.finfo(dtype).eps))


SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}


def _ags_case(spec, seed, cov, method):
    check_properties(TRANSFORMS["ags"](cov, method), build(spec, seed))


def _sam_case(spec, seed, adaptive):
    check_properties(TRANSFORMS["sam"](adaptive), build(spec, seed))


def _bsam_case(spec, seed):
    check_properties(TRANSFORMS["bsam"](), build(spec, seed))


def _vsam_case(spec, seed):
    check_properties(TRANSFORMS["vsam"](), build(spec, seed))


def _ausam_case(spec, seed):
    check_properties(TRANSFORMS["ausam"](), build(spec, seed), use_ausam=True)


CASES = {  # name: (test body, its strategies, examples by default, examples when slow)
    "ags": (
        _ags_case,
        {
            "cov": st.sampled_from(["isotropic", "gradient_aligned", "adaptive_diagonal"]),
            "method": st.sampled_from(["antithetic", "forward", "first_order"]),
        },
        2,
        20,
    ),
    "sam": (_sam_case, {"adaptive": st.booleans()}, 6, 20),
    "bsam": (_bsam_case, {}, 4, 20),
    "vsam": (_vsam_case, {}, 2, 12),
    "ausam": (_ausam_case, {}, 2, 12),
}


def _property_test(name: str, slow: bool):
    body, strategies, quick_examples, slow_examples = CASES[name]
    examples = slow_examples if slow else quick_examples
    test = given(spec=tree_specs, seed=st.integers(0, 2**16), **strategies)(body)
    test = settings(max_examples=examples, **SETTINGS)(test)
    return pytest.mark.slow(test) if slow else test


test_ags_properties = _property_test("ags", slow=False)
test_sam_properties = _property_test("sam", slow=False)
test_bsam_properties = _property_test("bsam", slow=False)
test_vsam_properties = _property_test("vsam", slow=False)
test_ausam_properties = _property_test("ausam", slow=False)
test_ags_properties_many = _property_test("ags", slow=True)
test_sam_properties_many = _property_test("sam", slow=True)
test_bsam_properties_many = _property_test("bsam", slow=True)
test_vsam_properties_many = _property_test("vsam", slow=True)
test_ausam_properties_many = _property_test("ausam", slow=True)


# --------------------------------------------------------------------------- faults

PARAMS = {"w": jnp.array([0.5, -1.0, 2.0]), "b": [jnp.float32(0.25)]}


def failing_loss(bad_value, threshold):
    """NaN/inf wherever the first coordinate exceeds ``threshold`` (some samples)."""

    def fn(p):
        return jnp.where(p["w"][0] > threshold, bad_value, loss(p))

    return fn


@pytest.mark.parametrize("bad_value", [jnp.nan, jnp.inf, -jnp.inf])
def test_ags_nonfinite_samples_are_counted_and_state_stays_finite(bad_value):
    num_samples, steps = 16, 4
    opt = optax.chain(agsopt.ags(0.5, num_samples, key=0), optax.sgd(0.05))
    fn = failing_loss(bad_value, PARAMS["w"][0] + 0.3)
    step = jax.jit(lambda p, s: opt.update(p, s, p, value_fn=fn))
    params, state = PARAMS, opt.init(PARAMS)
    for _ in range(steps):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
        for leaf in jax.tree.leaves((params, state)):
            if jnp.issubdtype(leaf.dtype, jnp.floating):
                assert np.all(np.isfinite(np.asarray(leaf)))
    smoothing = state[0]
    # about P(u_0 > 0.3/0.5) ≈ 27% of the samples fail (antithetic: either side)
    assert 0 < int(smoothing.num_nonfinite) < steps * num_samples
    assert int(smoothing.num_evaluations) == steps * 2 * num_samples


def test_ags_all_nonfinite_step_gives_zero_update_and_keeps_rule_state():
    opt = agsopt.ags(0.5, 8, covariance="adaptive_diagonal", key=0)
    state = opt.init(PARAMS)
    _, state = opt.update(PARAMS, state, PARAMS, value_fn=loss)
    _, state = opt.update(PARAMS, state, PARAMS, value_fn=loss)
    updates, bad_state = opt.update(PARAMS, state, PARAMS, value_fn=lambda p: jnp.nan * loss(p))
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert int(bad_state.num_nonfinite) == int(state.num_nonfinite) + 8
    rule_states = (jax.tree.leaves(bad_state.rule_state), jax.tree.leaves(state.rule_state))
    for new, old in zip(*rule_states, strict=True):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))
    # the step's estimate is undefined: value keeps the latest finite one, the step is skipped
    assert float(bad_state.value) == float(state.value)
    assert int(bad_state.num_skipped) == int(state.num_skipped) + 1
    assert int(bad_state.count) == int(state.count) + 1  # the key and σ schedule move on


@pytest.mark.parametrize("name", ["sam", "bsam"])
def test_sam_family_nan_step_leaves_state_finite(name):
    opt = optax.chain(
        agsopt.sam(0.1) if name == "sam" else agsopt.bsam(0.1), optax.sgd(0.1, momentum=0.9)
    )
    state = opt.init(PARAMS)
    bad = lambda p: jnp.nan * loss(p)
    _, state = opt.update(jax.grad(bad)(PARAMS), state, PARAMS, value_fn=bad)
    assert int(state[0].count) == 1
    # SAM's own state is its step count; the NaN reaches the base optimizer's momentum,
    # which is what optax.apply_if_finite is for (tests/test_compat.py).
    guarded = optax.apply_if_finite(opt, 3)
    gstate = guarded.init(PARAMS)
    updates, gstate = guarded.update(jax.grad(bad)(PARAMS), gstate, PARAMS, value_fn=bad)
    for leaf in jax.tree.leaves((updates, gstate)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert np.all(np.isfinite(np.asarray(leaf)))
    assert int(gstate.total_notfinite) == 1
