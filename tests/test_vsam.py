"""Tests for agsopt.vsam (vSAM / PSF sampling, arXiv:2403.08821)."""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from shared_problems import docstring_example

from agsopt.sharpness import (
    VSAMState,
    vsam,
    vsam_block_variance,
    vsam_control,
    vsam_push_records,
    vsam_record_leaves,
    vsam_relative_change,
    vsam_reuse_step,
    vsam_sam_step,
    vsam_step_position,
    vsam_window_control,
)

vsam_module = importlib.import_module("agsopt.sharpness._vsam")

RHO = 0.05
BETA = 0.7

# ---------------------------------------------------------------------------------------
# A non-quadratic loss with a hand-written float64 gradient (leaf order: "a", then "b"):
#   L(w; ξ) = Σ_leaves Σ_i [ c_leaf/4 · (w_i − 1 − ξ)⁴ + ½ w_i² ],
#   ∇L_i   = c_leaf · (w_i − 1 − ξ)³ + w_i
# ---------------------------------------------------------------------------------------
COEF = {"a": 0.5, "b": 2.0}


def quartic_loss(params, shift=0.0):
    total = jnp.zeros((), jnp.float32)
    for name, c in COEF.items():
        x = params[name].astype(jnp.float32)
        total = total + jnp.sum(c / 4 * (x - 1 - shift) ** 4 + 0.5 * x**2)
    return total


def np_grad(params, shift=0.0):
    return {
        k: COEF[k] * (np.asarray(v, np.float64) - 1 - shift) ** 3 + np.asarray(v, np.float64)
        for k, v in params.items()
    }


def np_norm(tree, keys=None):
    keys = list(tree) if keys is None else keys
    return math.sqrt(sum(np.sum(np.asarray(tree[k], np.float64) ** 2) for k in keys))


PARAMS = {
    "a": jnp.asarray([[0.3, -0.7], [1.5, 0.1]], jnp.float32),
    "b": jnp.asarray([0.2, -1.1, 2.0], jnp.float32),
}
PSF = {
    "a": jnp.asarray([[0.1, -0.2], [0.05, 0.3]], jnp.float32),
    "b": jnp.asarray([-0.4, 0.25, 0.15], jnp.float32),
}


def to_np(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def np_block_variance(h, blocks):
    h = np.sort(np.asarray(h, np.float64))
    m = len(h) // blocks
    return np.mean([np.var(h[b * m : (b + 1) * m], ddof=1) for b in range(blocks)])


def np_relative_change(h):
    h = np.asarray(h, np.float64)
    rel = [(h[i + 1] - h[i]) / h[i] for i in range(len(h) - 1) if h[i] > 0]
    return float(np.clip(np.mean(rel), -1, 1)) if rel else 0.0


def counting_loss(counter):
    """value_fn that appends to ``counter`` each time it is *executed* (not traced)."""

    def value_fn(params):
        jax.debug.callback(lambda: counter.append(1))
        return quartic_loss(params)

    return value_fn


def make_step(opt, value_fn=quartic_loss, jit=False):
    """One update with g = ∇L(w); jit-compiled once per call of make_step."""

    def f(state, params=PARAMS):
        grads = jax.grad(quartic_loss)(params)
        out = opt.update(grads, state, params, value_fn=value_fn)
        return out

    f = jax.jit(f) if jit else f

    def run(state, params=PARAMS):
        out = f(state, params)
        jax.effects_barrier()
        return out

    return run


def step(opt, state, value_fn=quartic_loss, jit=False):
    return make_step(opt, value_fn, jit)(state)


def assert_tree_allclose(a, b, rtol=1e-5, atol=1e-6):
    for k in b:
        np.testing.assert_allclose(np.asarray(a[k], np.float64), b[k], rtol=rtol, atol=atol)


def other_step_state(opt, **fields):
    """A state positioned inside a window whose schedule has no SAM step."""
    state = opt.init(PARAMS)
    base = dict(
        count=jnp.asarray(3 + 1, jnp.int32),  # warmup_steps=3 below: position 1 of window 0
        psf=PSF,
        psf_weight=jnp.asarray(1.0, jnp.float32),
        reuse_count=jnp.asarray(0, jnp.int32),
        schedule=jnp.zeros_like(state.schedule),
    )
    base.update(fields)
    return state._replace(**base)


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("last_layer", [1, None])
def test_sam_step_matches_formula(last_layer):
    opt = vsam(RHO, warmup_steps=3, last_layer=last_layer, window=10, var_blocks=2)
    out, state = step(opt, opt.init(PARAMS))
    w = to_np(PARAMS)
    g = np_grad(w)
    gn = np_norm(g)
    g_s = np_grad({k: w[k] + RHO * g[k] / gn for k in w})
    assert_tree_allclose(out, g_s)
    psf = {k: g_s[k] - g[k] for k in w}
    assert_tree_allclose(state.psf, psf, rtol=1e-4, atol=1e-6)
    assert np_norm(psf) > 1e-3
    assert float(state.psf_weight) == 1.0 and int(state.reuse_count) == 0
    assert int(state.num_sam_steps) == 1 and bool(state.last_was_sam)
    keys = ["b"] if last_layer == 1 else ["a", "b"]
    psf_norm = np_norm(psf, keys)
    np.testing.assert_allclose(float(state.psf_norm_history[-1]), psf_norm, rtol=1e-4)
    np.testing.assert_allclose(
        float(state.ratio_history[-1]), psf_norm / np_norm(g, keys), rtol=1e-4
    )
    norms = np.zeros(10)
    norms[-1] = psf_norm
    np.testing.assert_allclose(float(state.var_history[-1]), np_block_variance(norms, 2), rtol=1e-4)
    np.testing.assert_array_equal(np.asarray(state.ratio_history[:-1]), 0.0)


def test_reuse_steps_then_plain_steps_and_decay_rule():
    opt = vsam(RHO, beta=BETA, warmup_steps=3)
    state = other_step_state(opt)
    g = np_grad(to_np(PARAMS))
    calls: list[int] = []
    weights = []
    run = make_step(opt, counting_loss(calls), jit=True)
    for j in range(1, 10):
        out, state = run(state)
        if j <= 6:  # r_w = β^j > β⁶ ... until r_w reaches β⁶
            expected = {k: g[k] + BETA**j * np.asarray(PSF[k], np.float64) for k in g}
            assert_tree_allclose(out, expected)
        else:  # plain SGD gradient, exactly
            for k in g:
                np.testing.assert_array_equal(
                    np.asarray(out[k]), np.asarray(jax.grad(quartic_loss)(PARAMS)[k])
                )
        weights.append(float(state.psf_weight))
        assert not bool(state.last_was_sam)
    np.testing.assert_allclose(weights, [BETA ** min(j, 6) for j in range(1, 10)], rtol=1e-6)
    assert int(state.reuse_count) == 6
    assert int(state.num_sam_steps) == 0
    assert calls == []  # value_fn never ran: no second gradient on other steps
    assert_tree_allclose(state.psf, to_np(PSF), rtol=0, atol=0)


def test_reuse_horizon_is_configurable():
    opt = vsam(RHO, beta=0.5, warmup_steps=3, reuse_steps=2)
    state = other_step_state(opt)
    g = np_grad(to_np(PARAMS))
    outs = []
    run = make_step(opt, jit=True)
    for _ in range(3):
        out, state = run(state)
        outs.append(to_np(out))
    assert_tree_allclose(outs[0], {k: g[k] + 0.5 * np.asarray(PSF[k]) for k in g})
    assert_tree_allclose(outs[1], {k: g[k] + 0.25 * np.asarray(PSF[k]) for k in g})
    assert_tree_allclose(outs[2], g)


def test_sam_step_resets_reuse_weight():
    opt = vsam(RHO, beta=BETA, warmup_steps=3)
    state = other_step_state(opt, reuse_count=jnp.asarray(6, jnp.int32))
    state = state._replace(schedule=state.schedule.at[1].set(True))
    out, state = step(opt, state)
    assert bool(state.last_was_sam)
    assert float(state.psf_weight) == 1.0 and int(state.reuse_count) == 0
    out, state = step(opt, state)  # position 2: reuse with β
    g = np_grad(to_np(PARAMS))
    psf = to_np(state.psf)
    assert_tree_allclose(out, {k: g[k] + BETA * psf[k] for k in g})


def test_non_sam_step_does_not_run_the_second_gradient():
    opt = vsam(RHO, warmup_steps=1)
    calls: list[int] = []
    update = jax.jit(
        lambda st: opt.update(
            jax.grad(quartic_loss)(PARAMS), st, PARAMS, value_fn=counting_loss(calls)
        )
    )
    _, state = update(opt.init(PARAMS))  # warm-up: a SAM step
    jax.effects_barrier()
    assert len(calls) == 1
    # a position that the schedule marks as a non-SAM step: the same compiled function
    state = state._replace(count=jnp.asarray(2, jnp.int32), schedule=jnp.zeros(50, bool))
    _, state = update(state)
    jax.effects_barrier()
    assert len(calls) == 1 and not bool(state.last_was_sam)
    state = state._replace(count=jnp.asarray(3, jnp.int32), schedule=jnp.ones(50, bool))
    _, state = update(state)
    jax.effects_barrier()
    assert len(calls) == 2 and bool(state.last_was_sam)
    # and the compiled program holds the loss inside a cond, not outside it
    jaxpr = jax.make_jaxpr(lambda st: opt.update(PARAMS, st, PARAMS, value_fn=quartic_loss))(state)
    top = [eqn.primitive.name for eqn in jaxpr.jaxpr.eqns]
    assert "cond" in top and "integer_pow" not in top


def test_relative_change_and_block_variance_match_formula():
    rng = np.random.default_rng(1)
    for _ in range(5):
        h = rng.uniform(0.1, 2.0, size=20)
        np.testing.assert_allclose(float(vsam_relative_change(h)), np_relative_change(h), 1e-5)
        np.testing.assert_allclose(
            float(vsam_block_variance(h, 4)), np_block_variance(h, 4), rtol=1e-5
        )
    h = np.concatenate([np.zeros(12), rng.uniform(0.1, 2.0, size=8)])  # partly recorded
    np.testing.assert_allclose(float(vsam_relative_change(h)), np_relative_change(h), 1e-5)
    assert float(vsam_relative_change(np.zeros(20))) == 0.0
    assert float(vsam_relative_change(np.geomspace(1, 1e6, 20))) == 1.0  # clipped
    shrinking = float(vsam_relative_change(np.geomspace(1, 1e-6, 20)))
    assert shrinking == pytest.approx(1e-6 ** (1 / 19) - 1, rel=1e-4)
    # K mod w_w largest values are left out, as in the reference
    h = np.arange(11.0)
    np.testing.assert_allclose(float(vsam_block_variance(h, 2)), np_block_variance(h[:10], 2))


def test_control_rule_on_handcrafted_history():
    rng = np.random.default_rng(2)
    window, blocks, a1, a2, max_p, warmup = 20, 4, 0.13, 0.4, 0.8, 5
    ratio = np.linspace(0.2, 0.6, window) * rng.uniform(0.9, 1.1, window)
    var = rng.uniform(0.01, 0.05, window)
    base_sr = 6.5
    expected = base_sr * (1 + a1 * np_relative_change(ratio) + a2 * np_relative_change(var))
    expected = float(np.clip(expected, 1, int(window * max_p)))
    got = vsam_control(base_sr, ratio, var, a1, a2, int(window * max_p))
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    assert expected != pytest.approx(base_sr)
    # the same rule runs at a window start inside update()
    opt = vsam(
        RHO, window=window, var_blocks=blocks, a1=a1, a2=a2, max_p=max_p, warmup_steps=warmup
    )
    state = opt.init(PARAMS)._replace(
        count=jnp.asarray(warmup + 3 * window, jnp.int32),
        base_sr=jnp.asarray(base_sr, jnp.float32),
        ratio_history=jnp.asarray(ratio, jnp.float32),
        var_history=jnp.asarray(var, jnp.float32),
    )
    _, new = step(opt, state)
    np.testing.assert_allclose(float(new.base_sr), expected, rtol=1e-5)
    assert int(np.sum(np.asarray(new.schedule))) == int(expected)
    # clipping to [1, floor(K·max_p)]
    up = np.geomspace(1, 1e3, window)
    assert float(vsam_control(39.0, up, up, 0.5, 0.5, 16)) == 16.0
    assert float(vsam_control(1.2, up[::-1], up[::-1], 0.5, 0.5, 16)) == 1.0


# ---------------------------------------------------------------- schedule and counts


def _scan_training(opt, steps, seed=0):
    shifts = jax.random.normal(jax.random.key(seed), (steps,)) * 0.3

    def body(carry, shift):
        params, st = carry

        def loss(p):
            return quartic_loss(p, shift)

        g = jax.grad(loss)(params)
        u, st = opt.update(g, st, params, value_fn=loss)
        params = jax.tree.map(lambda w, d: w - 0.02 * d, params, u)
        return (params, st), (st.last_was_sam, st.base_sr, loss(params))

    (params, state), trace = jax.jit(lambda c: jax.lax.scan(body, c, shifts))(
        (PARAMS, opt.init(PARAMS))
    )
    return params, state, [np.asarray(t) for t in trace]


def test_exactly_floor_base_sr_sam_steps_per_window_and_counter():
    window, warmup, steps = 10, 20, 420
    opt = vsam(
        RHO, window=window, var_blocks=2, warmup_steps=warmup, a1=3.0, a2=3.0, max_p=0.8, key=4
    )
    _, state, (is_sam, base_sr, losses) = _scan_training(opt, steps)
    assert np.all(is_sam[:warmup])
    assert int(state.num_sam_steps) == int(is_sam.sum())
    assert int(state.count) == steps
    per_window = is_sam[warmup:].reshape(-1, window)
    n_expected = np.floor(base_sr[warmup::window]).astype(int)
    np.testing.assert_array_equal(per_window.sum(1), n_expected)
    assert np.all((n_expected >= 1) & (n_expected <= 8))
    assert len(set(n_expected.tolist())) > 2  # the controller really moved
    # base_sr only changes at window starts
    inside = base_sr[warmup:].reshape(-1, window)
    assert np.all(inside == inside[:, :1])
    # the SAM positions are spread over the window, not bunched at a fixed place
    positions = np.nonzero(per_window)[1]
    assert len(set(positions.tolist())) == window
    assert np.all(np.isfinite(losses))


def test_scan_many_steps_trains():
    opt = vsam(RHO, window=10, var_blocks=2, warmup_steps=10)
    params, state, (is_sam, _, losses) = _scan_training(opt, 300, seed=1)
    assert losses[-1] < 0.5 * float(quartic_loss(PARAMS))
    assert 0 < int(state.num_sam_steps) < 300
    assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state.psf))


# ----------------------------------------------------------------------- conventions


def test_jit_matches_eager_and_key_changes():
    opt = vsam(RHO, window=4, var_blocks=2, warmup_steps=1, key=jax.random.key(3))
    state_e = state_j = opt.init(PARAMS)
    keys = [np.asarray(state_e.key)]
    schedules = set()
    run_e, run_j = make_step(opt), make_step(opt, jit=True)
    for _ in range(9):
        out_e, state_e = run_e(state_e)
        out_j, state_j = run_j(state_j)
        assert_tree_allclose(out_j, to_np(out_e), rtol=1e-5)
        assert bool(state_e.last_was_sam) == bool(state_j.last_was_sam)
        keys.append(np.asarray(state_e.key))
        schedules.add(tuple(np.asarray(state_e.schedule).tolist()))
    assert all(not np.array_equal(a, b) for a, b in zip(keys[:-1], keys[1:], strict=True))
    assert len(schedules) > 2


def test_state_is_namedtuple_of_arrays_and_extra_args_ignored():
    opt = optax.chain(vsam(RHO, steps_per_epoch=10), optax.sgd(0.1))
    state = opt.init(PARAMS)
    assert isinstance(state[0], VSAMState)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state[0]))
    grads = jax.grad(quartic_loss)(PARAMS)
    u, _ = opt.update(grads, state, PARAMS, value_fn=quartic_loss, ids=1, batch=None)
    assert set(u) == {"a", "b"}


def test_zero_gradient_gives_finite_update():
    opt = vsam(RHO, warmup_steps=1)

    def flat(p):
        return 0.0 * quartic_loss(p)

    zeros = jax.tree.map(jnp.zeros_like, PARAMS)
    out, state = opt.update(zeros, opt.init(PARAMS), PARAMS, value_fn=flat)
    for leaf in jax.tree.leaves((out, state.psf)):
        assert np.all(np.asarray(leaf) == 0)
    assert np.all(np.isfinite(np.asarray(state.ratio_history)))


def test_nonfinite_perturbed_gradient_is_not_stored():
    """The loss is NaN at w + ε only: the SAM step's output is NaN (the caller sees it), but
    the stored PSF and the records keep their last finite values."""
    opt = vsam(RHO, warmup_steps=3)
    state = opt.init(PARAMS)
    grads = jax.grad(quartic_loss)(PARAMS)
    _, state = opt.update(grads, state, PARAMS, value_fn=quartic_loss)
    good = state

    def nan_away_from_w(p):
        moved = jnp.abs(p["a"] - PARAMS["a"]).sum() > 0
        return quartic_loss(p) * jnp.where(moved, jnp.nan, 1.0)  # NaN value and gradient

    out, state = opt.update(grads, state, PARAMS, value_fn=nan_away_from_w)
    assert bool(state.last_was_sam)
    assert not np.all(np.isfinite(np.asarray(out["a"])))
    for new, old in zip(jax.tree.leaves(state.psf), jax.tree.leaves(good.psf), strict=True):
        np.testing.assert_array_equal(new, old)
    for name in ("ratio_history", "psf_norm_history", "var_history"):
        np.testing.assert_array_equal(getattr(state, name), getattr(good, name))
    assert int(state.count) == 2


def test_axis_name_averages_and_keeps_shards_identical():
    opt = vsam(RHO, warmup_steps=1, axis_name="d", last_layer=None)
    shifts = jnp.asarray([0.0, 0.4])
    state = opt.init(PARAMS)

    def shard_step(shift):
        def loss(p):
            return quartic_loss(p, shift)

        return opt.update(jax.grad(loss)(PARAMS), state, PARAMS, value_fn=loss)

    out, new = jax.vmap(shard_step, axis_name="d")(shifts)
    w = to_np(PARAMS)
    g_s_mean = {k: 0.0 for k in w}
    g_mean = {k: 0.0 for k in w}
    for shift in (0.0, 0.4):
        g = np_grad(w, shift)
        gn = np_norm(g)
        g_s = np_grad({k: w[k] + RHO * g[k] / gn for k in w}, shift)
        for k in w:
            g_s_mean[k] += g_s[k] / 2
            g_mean[k] += g[k] / 2
    for k in w:
        np.testing.assert_allclose(np.asarray(out[k][0]), g_s_mean[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(out[k][1]), g_s_mean[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            np.asarray(new.psf[k][1]), g_s_mean[k] - g_mean[k], rtol=1e-4, atol=1e-6
        )
    np.testing.assert_array_equal(
        np.asarray(new.ratio_history[0]), np.asarray(new.ratio_history[1])
    )


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        (dict(rho=-0.1), ValueError, "rho"),
        (dict(window=1), ValueError, "window"),
        (dict(window=10.0), TypeError, "window"),
        (dict(window=10, var_blocks=6), ValueError, "var_blocks"),
        (dict(max_p=0.0), ValueError, "max_p"),
        (dict(max_p=1.5), ValueError, "max_p"),
        (dict(window=4, var_blocks=2, max_p=0.2), ValueError, "max_p"),
        (dict(a1=-0.1), ValueError, "a1"),
        (dict(a2=float("inf")), ValueError, "a2"),
        (dict(beta=0.0), ValueError, "beta"),
        (dict(beta=1.2), ValueError, "beta"),
        (dict(last_layer=0), ValueError, "last_layer"),
        (dict(warmup_steps=-1), ValueError, "warmup_steps"),
        (dict(reuse_steps=-1), ValueError, "reuse_steps"),
        (dict(key="seed"), TypeError, "key"),
        (dict(eps=0.0), ValueError, "eps"),
    ],
)
def test_constructor_validation(kwargs, error, name):
    with pytest.raises(error, match=name):
        vsam(**{"warmup_steps": 3, **kwargs})


def test_update_validation():
    opt = vsam(RHO, warmup_steps=2)
    state = opt.init(PARAMS)
    with pytest.raises(TypeError, match="value_fn"):
        opt.update(PARAMS, state, PARAMS)
    with pytest.raises(TypeError, match="params"):
        opt.update(PARAMS, state, None, value_fn=quartic_loss)


# -------------------------------------------------------------------------- docstring


def test_docstring_example_trains(capsys):
    namespace: dict = {}
    exec(compile(docstring_example(vsam_module), "vsam_example", "exec"), namespace)
    state = namespace["vstate"]
    assert int(state.count) == 20 * 16
    assert 48 < int(state.num_sam_steps) < int(state.count)
    assert float(namespace["loss"]) < 0.6


def test_inject_hyperparams_schedules_rho():
    static = ("window", "var_blocks", "last_layer", "warmup_steps", "reuse_steps", "key")
    opt = optax.inject_hyperparams(vsam, static_args=static)(rho=RHO, warmup_steps=2)
    state = opt.init(PARAMS)
    out, state = jax.jit(
        lambda st: opt.update(jax.grad(quartic_loss)(PARAMS), st, PARAMS, value_fn=quartic_loss)
    )(state)
    w = to_np(PARAMS)
    g = np_grad(w)
    gn = np_norm(g)
    assert_tree_allclose(out, np_grad({k: w[k] + RHO * g[k] / gn for k in w}))
    assert float(state.hyperparams["rho"]) == pytest.approx(RHO)


# ---------------------------------------------------------------------------- kernels
# Each branch of the update on its own, against a formula written out here.


def test_kernel_step_position():
    warmup, window = 7, 5
    for count in range(40):
        in_warmup, pos, start = vsam_step_position(jnp.asarray(count, jnp.int32), warmup, window)
        assert bool(in_warmup) == (count < warmup)
        expected_pos = 0 if count < warmup else (count - warmup) % window
        assert int(pos) == expected_pos
        assert bool(start) == (count >= warmup and (count - warmup) % window == 0)


def test_kernel_window_control_counts_and_spreads_sam_steps():
    window, a1, a2, max_sr = 10, 0.13, 0.4, 8.0
    rng = np.random.default_rng(5)
    ratio = rng.uniform(0.2, 0.6, window)
    var = rng.uniform(0.01, 0.05, window)
    base_sr = 3.4
    expected = base_sr * (1 + a1 * np_relative_change(ratio) + a2 * np_relative_change(var))
    expected = float(np.clip(expected, 1.0, max_sr))
    keys = jax.random.split(jax.random.key(0), 2000)
    new_sr, schedules = jax.vmap(
        lambda k: vsam_window_control(
            k,
            jnp.asarray(base_sr, jnp.float32),
            jnp.asarray(ratio, jnp.float32),
            jnp.asarray(var, jnp.float32),
            a1,
            a2,
            max_sr,
            window,
        )
    )(keys)
    np.testing.assert_allclose(np.asarray(new_sr), expected, rtol=1e-5)
    n = int(np.floor(expected))
    assert n >= 2
    schedules = np.asarray(schedules)
    assert schedules.shape == (2000, window) and schedules.dtype == bool
    np.testing.assert_array_equal(schedules.sum(1), n)  # exactly floor(base_sr) per window
    # uniform placement: every position is a SAM step with probability n/K (5σ bound)
    freq = schedules.mean(0)
    sigma = math.sqrt(n / window * (1 - n / window) / len(keys))
    assert np.all(np.abs(freq - n / window) < 5 * sigma)


def test_kernel_push_records_matches_formula():
    rng = np.random.default_rng(3)
    window, blocks, eps = 8, 2, 1e-12
    ratio, norms, var = (rng.uniform(0.1, 1.0, window) for _ in range(3))
    psf_norm, grad_norm = 0.37, 1.9
    got = vsam_push_records(
        tuple(jnp.asarray(h, jnp.float32) for h in (ratio, norms, var)),
        jnp.asarray(psf_norm),
        jnp.asarray(grad_norm),
        blocks,
        eps,
    )
    pushed_norms = np.append(norms[1:], psf_norm)
    expected = (
        np.append(ratio[1:], psf_norm / (grad_norm + eps)),
        pushed_norms,
        np.append(var[1:], np_block_variance(pushed_norms, blocks)),
    )
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == jnp.float32 and g.shape == (window,)
        np.testing.assert_allclose(np.asarray(g), e, rtol=1e-5)


def test_kernel_sam_step_matches_formula_and_keeps_state_on_nonfinite():
    window, blocks = 6, 2
    base = np.linspace(0.1, 0.6, window)
    histories = tuple(jnp.asarray(base * c, jnp.float32) for c in (1, 2, 3))
    grads = jax.grad(quartic_loss)(PARAMS)
    out, psf, records = vsam_sam_step(
        quartic_loss, PARAMS, grads, grads, PSF, histories, RHO, last_layer=1, var_blocks=blocks
    )
    w = to_np(PARAMS)
    g = np_grad(w)
    gn = np_norm(g)
    g_s = np_grad({k: w[k] + RHO * g[k] / gn for k in w})
    assert_tree_allclose(out, g_s)
    expected_psf = {k: g_s[k] - g[k] for k in w}
    assert_tree_allclose(psf, expected_psf, rtol=1e-4)
    psf_norm, grad_norm = np_norm(expected_psf, ["b"]), np_norm(g, ["b"])  # last leaf: "b"
    h = [np.asarray(x, np.float64) for x in histories]
    pushed = np.append(h[1][1:], psf_norm)
    np.testing.assert_allclose(
        np.asarray(records[0]), np.append(h[0][1:], psf_norm / grad_norm), rtol=1e-4
    )
    np.testing.assert_allclose(np.asarray(records[1]), pushed, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(records[2]), np.append(h[2][1:], np_block_variance(pushed, blocks)), rtol=1e-4
    )

    def nan_loss(p):
        return quartic_loss(p) * jnp.nan

    out, psf, records = vsam_sam_step(
        nan_loss, PARAMS, grads, grads, PSF, histories, RHO, last_layer=1, var_blocks=blocks
    )
    assert not np.all(np.isfinite(np.asarray(out["a"])))  # passed on for the caller to see
    assert_tree_allclose(psf, to_np(PSF), rtol=0, atol=0)  # not stored
    for new, old in zip(records, histories, strict=True):
        np.testing.assert_array_equal(np.asarray(new), np.asarray(old))


@pytest.mark.parametrize("reuse_count", [0, 3, 5, 6])
def test_kernel_reuse_step_matches_formula(reuse_count):
    grads = to_np(jax.grad(quartic_loss)(PARAMS))
    weight, beta, horizon = 0.49, 0.7, 6
    out, new_weight, new_count = vsam_reuse_step(
        jax.tree.map(jnp.asarray, {k: v.astype(np.float32) for k, v in grads.items()}),
        PSF,
        jnp.asarray(weight, jnp.float32),
        jnp.asarray(reuse_count, jnp.int32),
        beta,
        horizon,
    )
    if reuse_count < horizon:
        r = beta * weight
        assert_tree_allclose(out, {k: grads[k] + r * np.asarray(PSF[k], np.float64) for k in grads})
        np.testing.assert_allclose(float(new_weight), r, rtol=1e-6)
        assert int(new_count) == reuse_count + 1
    else:  # no reuse left: g exactly, counters unchanged
        for k in grads:
            np.testing.assert_array_equal(np.asarray(out[k]), grads[k].astype(np.float32))
        assert float(new_weight) == pytest.approx(weight) and int(new_count) == reuse_count
    assert new_weight.dtype == jnp.float32 and new_count.dtype == jnp.int32


def test_kernel_record_leaves():
    tree = {"layer_9": jnp.ones(2), "layer_10": 2 * jnp.ones(3), "head": {"w": 3 * jnp.ones(4)}}
    # jax.tree.leaves sorts dict keys: head, layer_10, layer_9 — "last" is layer_9, not the head
    assert [x.shape for x in vsam_record_leaves(tree, 1)] == [(2,)]
    assert [x.shape for x in vsam_record_leaves(tree, 2)] == [(3,), (2,)]
    assert len(vsam_record_leaves(tree, None)) == 3
    assert len(vsam_record_leaves(tree, 99)) == 3
    mask = {"layer_9": False, "layer_10": False, "head": True}  # a prefix mask
    assert [x.shape for x in vsam_record_leaves(tree, mask)] == [(4,)]
    full_mask = {"layer_9": True, "layer_10": False, "head": {"w": True}}
    assert sorted(x.shape for x in vsam_record_leaves(tree, full_mask)) == [(2,), (4,)]
    by_rank = vsam_record_leaves(tree, lambda p: jax.tree.map(lambda x: x.shape[0] > 2, p))
    assert sorted(x.shape for x in by_rank) == [(3,), (4,)]
    with pytest.raises(ValueError, match="last_layer"):
        vsam_record_leaves(tree, {"a": True})
    with pytest.raises(ValueError, match="last_layer"):
        vsam_record_leaves(tree, {"layer_9": False, "layer_10": False, "head": False})
    with pytest.raises(TypeError, match="last_layer"):
        vsam_record_leaves(tree, lambda p: jax.tree.map(lambda x: x.sum() > 0, p))


def test_last_layer_mask_picks_the_recorded_norms():
    mask = {"a": True, "b": False}
    opt = vsam(RHO, warmup_steps=3, last_layer=mask, window=10, var_blocks=2)
    _, state = step(opt, opt.init(PARAMS))
    w = to_np(PARAMS)
    g = np_grad(w)
    g_s = np_grad({k: w[k] + RHO * g[k] / np_norm(g) for k in w})
    psf = {k: g_s[k] - g[k] for k in w}
    np.testing.assert_allclose(float(state.psf_norm_history[-1]), np_norm(psf, ["a"]), rtol=1e-4)
    np.testing.assert_allclose(
        float(state.ratio_history[-1]), np_norm(psf, ["a"]) / np_norm(g, ["a"]), rtol=1e-4
    )
    for bad in (True, {"a": 1, "b": 0}, {"a": False, "b": False}):
        with pytest.raises((TypeError, ValueError), match="last_layer"):
            vsam(RHO, warmup_steps=3, last_layer=bad)


def flags_of_steps(opt, steps):
    """``last_was_sam`` of ``steps`` jitted steps from ``opt.init``."""

    def body(state, _):
        grads = jax.grad(quartic_loss)(PARAMS)
        _, state = opt.update(grads, state, PARAMS, value_fn=quartic_loss)
        return state, state.last_was_sam

    _, flags = jax.jit(lambda s: jax.lax.scan(body, s, length=steps))(opt.init(PARAMS))
    return [bool(f) for f in np.asarray(flags)]


def test_warmup_in_the_references_terms():
    steps_per_epoch = 4
    opt = vsam(RHO, steps_per_epoch=steps_per_epoch, window=4, var_blocks=2, key=1)
    flags = flags_of_steps(opt, 3 * steps_per_epoch + 4)
    assert all(flags[: 3 * steps_per_epoch])  # 3 epochs of SAM steps (warmup_epochs=3)
    # then a window of 4: base_sr ≤ 1·(1 + 0.13 + 0.13) < 2, so exactly one SAM step
    assert sum(flags[3 * steps_per_epoch :]) == 1
    flags = flags_of_steps(vsam(RHO, steps_per_epoch=5, warmup_epochs=1, window=4, var_blocks=2), 9)
    assert all(flags[:5]) and sum(flags[5:]) == 1
    with pytest.raises(ValueError, match="steps_per_epoch"):
        vsam(RHO)
    with pytest.raises(ValueError, match="warmup_steps"):
        vsam(RHO, steps_per_epoch=4, warmup_steps=3)
    with pytest.raises(ValueError, match="warmup_epochs"):
        vsam(RHO, steps_per_epoch=4, warmup_epochs=-1)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        vsam(RHO, steps_per_epoch=0)
