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
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformations import Problem, cases, select

import agsopt
from agsopt.tree_utils import tree_size

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


PROBLEM = Problem(value_fn=loss, per_example_loss_fn=per_example_loss_fn, ids=jnp.arange(4))
OVERRIDES = {  # file-specific: AUSAM on this 4-example batch, its second step sampled
    "ausam": {"num_examples": 4, "steps_per_epoch": 1, "alpha": 0.5},
}


def two_steps(entry, opt, params):
    state, outputs = opt.init(params), []
    for _ in range(2):
        updates, state = entry.update(opt, None, state, params, PROBLEM)
        outputs.append(updates)
    return outputs, state


def check_properties(entry, opt, params):
    eager = two_steps(entry, opt, params)
    jitted = jax.jit(lambda p: two_steps(entry, opt, p))(params)
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


METHODS = (None, "antithetic", "forward", "first_order", "plain")  # None: the entry's own
VARIANTS = {"ags": {"method": st.sampled_from(METHODS)}}  # drawn on top of each entry
EXAMPLES = {"ags": (2, 20), "sam": (6, 20), "bsam": (4, 20)}  # (by default, when slow)
FACTORIES = sorted({entry.factory_name for entry in select(alias=False)})


def _property_test(factory: str, slow: bool):
    """Random trees through entries of ``factory`` (the core ones unless ``slow``)."""
    group = [e for e in select(alias=False) if e.factory_name == factory]
    drawn = [e for e in group if e.core or slow] or group
    quick_examples, slow_examples = EXAMPLES.get(factory, (2, 12))

    def body(spec, seed, entry, **variant):
        drawn_variant = {k: v for k, v in variant.items() if v is not None}
        try:
            opt = entry.make(**OVERRIDES.get(entry.name, {}), **drawn_variant)
        except ValueError:  # a variant the entry refuses (a curvature rule with first_order)
            assume(not drawn_variant)
            raise
        params = build(spec, seed)
        # dgs with a block of k directions needs d ≥ k parameters (init refuses fewer)
        assume(entry.kwargs.get("num_directions", 0) <= tree_size(params))
        check_properties(entry, opt, params)

    strategies = {"entry": st.sampled_from(drawn), **VARIANTS.get(factory, {})}
    test = given(spec=tree_specs, seed=st.integers(0, 2**16), **strategies)(body)
    test = settings(max_examples=slow_examples if slow else quick_examples, **SETTINGS)(test)
    return pytest.mark.slow(test) if slow else test


for _factory in FACTORIES:  # test_ags_properties, test_ags_properties_many, ...
    globals()[f"test_{_factory}_properties"] = _property_test(_factory, slow=False)
    globals()[f"test_{_factory}_properties_many"] = _property_test(_factory, slow=True)


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


@pytest.mark.parametrize("entry", cases(select(needs_grads=True, final_updates=False)))
def test_sam_family_nan_step_leaves_state_finite(entry):
    opt = optax.chain(entry.make(), optax.sgd(0.1, momentum=0.9))
    state = opt.init(PARAMS)
    bad = Problem(value_fn=lambda p: jnp.nan * loss(p))
    _, state = entry.update(opt, None, state, PARAMS, bad)
    assert int(state[0].count) == 1
    # SAM's own state is its step count; the NaN reaches the base optimizer's momentum,
    # which is what optax.apply_if_finite is for (tests/test_compat.py).
    guarded = optax.apply_if_finite(opt, 3)
    gstate = guarded.init(PARAMS)
    updates, gstate = entry.update(guarded, None, gstate, PARAMS, bad)
    for leaf in jax.tree.leaves((updates, gstate)):
        if jnp.issubdtype(leaf.dtype, jnp.floating):
            assert np.all(np.isfinite(np.asarray(leaf)))
    assert int(gstate.total_notfinite) == 1
