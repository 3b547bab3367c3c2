"""Tests for agsopt.bsam (Bilateral SAM, arXiv:2409.13173)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from shared_problems import COEF, make_params, np_norm, quartic_grad_np, quartic_loss, to_np

from agsopt.sharpness import BSAMState, bsam, bsam_reference_schedules, bsam_rho_min_schedule


# ---------------------------------------------------------------------------------------
# Non-quadratic test problem with a hand-written float64 gradient:
#   L(w) = Σ_leaves Σ_i [ c_leaf/4 · (w_i − 1)⁴ + ½ w_i² ],  ∇L_i = c_leaf (w_i − 1)³ + w_i
# ---------------------------------------------------------------------------------------
def bsam_formula_np(w, rho_max, rho_min):
    """d = g_max + g − ‖g_max‖/‖g_min‖ · g_min, written out in float64."""
    g = quartic_grad_np(w)
    gn = np_norm(g)
    g_max = quartic_grad_np({k: w[k] + rho_max * g[k] / gn for k in w})
    g_min = quartic_grad_np({k: w[k] - rho_min * g[k] / gn for k in w})
    ratio = np_norm(g_max) / np_norm(g_min)
    return {k: g_max[k] + g[k] - ratio * g_min[k] for k in w}


def one_update(opt, params, loss_fn=quartic_loss, state=None, **extra):
    state = opt.init(params) if state is None else state
    grads = jax.grad(loss_fn)(params)
    return opt.update(grads, state, params, value_fn=loss_fn, **extra)


def assert_tree_allclose(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
        ),
        a,
        b,
    )


# ----------------------------------------------------------------------------- formula


@pytest.mark.parametrize("rho_max,rho_min", [(0.05, 0.05), (0.1, 0.02), (0.05, 0.0)])
def test_matches_formula(rho_max, rho_min):
    params = make_params()
    got, state = one_update(bsam(rho_max, rho_min), params)
    expected = bsam_formula_np(to_np(params), rho_max, rho_min)
    assert_tree_allclose(got, expected)
    assert isinstance(state, BSAMState)
    assert int(state.count) == 1


def test_differs_from_sam_and_sgd():
    params = make_params()
    got, _ = one_update(bsam(0.1, 0.1), params)
    g = quartic_grad_np(to_np(params))
    assert not np.allclose(np.asarray(got["w"]), g["w"], rtol=1e-3)


def test_zero_radii_give_plain_gradient():
    params = make_params()
    got, _ = one_update(bsam(0.0, 0.0), params)
    assert_tree_allclose(got, quartic_grad_np(to_np(params)))


def test_matches_formula_mlp_plain_jnp():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {"w1": jax.random.normal(k1, (3, 5)), "w2": jax.random.normal(k2, (5, 2))}
    x, y = jax.random.normal(k3, (16, 3)), jnp.ones((16, 2))
    loss = lambda p: jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"] - y) ** 2)
    rmax, rmin = 0.05, 0.03

    grad = jax.grad(loss)
    norm = lambda t: jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(t)))
    g = grad(params)
    gn = norm(g)
    g_max = grad(jax.tree.map(lambda w, gi: w + rmax * gi / gn, params, g))
    g_min = grad(jax.tree.map(lambda w, gi: w - rmin * gi / gn, params, g))
    r = norm(g_max) / norm(g_min)
    expected = jax.tree.map(lambda a, b, c: a + b - r * c, g_max, g, g_min)

    got, _ = one_update(bsam(rmax, rmin), params, loss)
    assert_tree_allclose(got, expected)


# ------------------------------------------------------------------------------ schedules


def test_rho_min_schedule_evaluated_at_count():
    params = make_params()
    sched = optax.linear_schedule(0.08, 0.0, transition_steps=4)
    opt = bsam(0.05, sched)
    state = opt.init(params)
    w = to_np(params)
    for count in range(6):
        got, state = one_update(opt, params, state=state)
        expected = bsam_formula_np(w, 0.05, float(sched(count)))
        assert_tree_allclose(got, expected)
        assert int(state.count) == count + 1
    # the schedule really changed the result between counts 0 and 4
    assert not np.allclose(
        bsam_formula_np(w, 0.05, 0.08)["w"], bsam_formula_np(w, 0.05, 0.0)["w"], rtol=1e-4
    )


def test_rho_max_schedule():
    params = make_params()
    sched = lambda count: 0.1 / (1.0 + count)
    opt = bsam(sched, 0.02)
    state = opt.init(params)
    for count in range(3):
        got, state = one_update(opt, params, state=state)
        assert_tree_allclose(got, bsam_formula_np(to_np(params), 0.1 / (1 + count), 0.02))


def sched_ref(t, total=100):
    return 0.05 * 0.5 * (1 + np.cos(np.pi * t / total))  # = ρ_min(t) for lr_max = ρ_hi


def test_lr_tied_schedule_matches_formula():
    total = 100
    lr = optax.cosine_decay_schedule(0.05, decay_steps=total)
    sched = bsam_rho_min_schedule(lr, 0.05)  # reference: 0.05 → 0 with a cosine lr
    np.testing.assert_allclose(float(sched(0)), 0.05, rtol=1e-6)
    np.testing.assert_allclose(float(sched(total // 2)), 0.025, rtol=1e-5)
    np.testing.assert_allclose(float(sched(total)), 0.0, atol=1e-8)

    sched = bsam_rho_min_schedule(lr, 0.05, rho_hi=0.1, rho_lo=0.01, lr_min=0.001)
    for t in [0, 7, 33, 80, 100]:
        lr_t = 0.05 * 0.5 * (1 + np.cos(np.pi * t / total))
        expected = 0.01 + (0.1 - 0.01) * (lr_t - 0.001) / (0.05 - 0.001)
        np.testing.assert_allclose(float(sched(t)), expected, rtol=1e-5)

    # a constant learning rate equal to lr_max gives rho_hi
    np.testing.assert_allclose(float(bsam_rho_min_schedule(0.05, 0.05)(3)), 0.05, rtol=1e-6)

    # jit-able inside bsam
    params = make_params()
    opt = bsam(0.05, bsam_rho_min_schedule(lr, 0.05))
    state = opt.init(params)
    step = jax.jit(lambda s, p: one_update(opt, p, state=s))
    for t in range(3):
        got, state = step(state, params)
        assert_tree_allclose(got, bsam_formula_np(to_np(params), 0.05, float(sched_ref(t))))


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("name", ["rho_max", "rho_min"])
@pytest.mark.parametrize("bad", [-0.01, float("nan")])
def test_bad_radius_raises(name, bad):
    with pytest.raises(ValueError, match=name):
        bsam(**{name: bad})


def test_bad_eps_raises():
    with pytest.raises(ValueError, match="eps"):
        bsam(eps=0.0)


def test_schedule_helper_validation():
    lr = optax.cosine_decay_schedule(0.05, 10)
    with pytest.raises(ValueError, match="lr_max"):
        bsam_rho_min_schedule(lr, 0.0)
    with pytest.raises(ValueError, match="lr_max"):
        bsam_rho_min_schedule(lr, 0.05, lr_min=0.05)
    with pytest.raises(ValueError, match="rho_hi"):
        bsam_rho_min_schedule(lr, 0.05, rho_hi=-0.1)
    with pytest.raises(ValueError, match="rho_lo"):
        bsam_rho_min_schedule(lr, 0.05, rho_lo=-0.1)


def test_missing_value_fn_and_params():
    params = make_params()
    opt = bsam()
    grads = jax.grad(quartic_loss)(params)
    with pytest.raises(TypeError, match="value_fn"):
        opt.update(grads, opt.init(params), params)
    with pytest.raises(TypeError, match="params"):
        opt.update(grads, opt.init(params), None, value_fn=quartic_loss)


def test_unknown_extra_args_ignored():
    params = make_params()
    expected, _ = one_update(bsam(), params)
    got, _ = one_update(bsam(), params, grad_fn=None, foo=1)
    assert_tree_allclose(got, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------- edge cases


def test_zero_gradient_gives_finite_update():
    params = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}
    loss = lambda p: sum(jnp.sum(x**4) for x in jax.tree.leaves(p))  # ∇L(0) = 0
    out, _ = one_update(bsam(), params, loss)
    for leaf in jax.tree.leaves(out):
        assert np.all(np.isfinite(leaf))
        np.testing.assert_array_equal(leaf, 0.0)

    # zero incoming updates where ∇L(w) ≠ 0: ĝ = 0, so g_max = g_min = ∇L(w) and
    # d = g_max + 0 − (‖g_max‖/‖g_min‖) g_min, zero up to rounding
    params = make_params()
    opt = bsam()
    zeros = jax.tree.map(jnp.zeros_like, params)
    out, _ = opt.update(zeros, opt.init(params), params, value_fn=quartic_loss)
    for leaf in jax.tree.leaves(out):
        assert np.all(np.isfinite(leaf))
    assert_tree_allclose(out, jax.tree.map(jnp.zeros_like, params), atol=1e-5)


def test_bf16_params():
    params = make_params(jnp.bfloat16)

    def loss(p):
        total = jnp.zeros((), jnp.bfloat16)
        for name, c in COEF.items():
            total = total + jnp.sum(c / 4 * (p[name] - 1) ** 4 + 0.5 * p[name] ** 2)
        return total

    out, _ = one_update(bsam(0.05, 0.05), params, loss)
    for leaf in jax.tree.leaves(out):
        assert leaf.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    assert_tree_allclose(out, bsam_formula_np(to_np(params), 0.05, 0.05), rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------------- jit / chains


def test_jit_matches_eager():
    params = make_params()
    opt = bsam(0.05, optax.linear_schedule(0.05, 0.0, 5))
    step = lambda s, p: one_update(opt, p, state=s)
    s_e = s_j = opt.init(params)
    jstep = jax.jit(step)
    for _ in range(3):
        d_e, s_e = step(s_e, params)
        d_j, s_j = jstep(s_j, params)
        assert_tree_allclose(d_j, d_e)
    assert int(s_j.count) == 3


def test_inject_hyperparams():
    params = make_params()
    opt = optax.inject_hyperparams(bsam)(rho_max=0.05, rho_min=0.03)
    state = opt.init(params)
    update = jax.jit(lambda s, p: one_update(opt, p, state=s))
    got, state = update(state, params)
    assert_tree_allclose(got, bsam_formula_np(to_np(params), 0.05, 0.03))
    state.hyperparams["rho_min"] = jnp.asarray(0.01)
    got, _ = update(state, params)
    assert_tree_allclose(got, bsam_formula_np(to_np(params), 0.05, 0.01))


def test_reference_chain_decreases_convex_loss():
    key = jax.random.key(1)
    ka, kb = jax.random.split(key)
    a = jax.random.normal(ka, (32, 5))
    b = jax.random.normal(kb, (32,))
    loss = lambda p: 0.5 * jnp.mean((a @ p["w"] + p["c"] - b) ** 2)
    params = {"w": jnp.zeros((5,)), "c": jnp.zeros(())}

    steps = 30
    lr = optax.cosine_decay_schedule(0.05, decay_steps=steps)
    opt = optax.chain(
        bsam(rho_max=0.05, rho_min=bsam_rho_min_schedule(lr, 0.05)),
        optax.add_decayed_weights(1e-3),  # coupled weight decay, like torch SGD
        optax.sgd(lr, momentum=0.9),
    )
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    losses = [float(loss(params))]
    for _ in range(steps):
        params, state = step(params, state)
        losses.append(float(loss(params)))
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    # optimum of the least-squares problem, for scale
    design = np.concatenate([np.asarray(a), np.ones((32, 1))], axis=1)
    sol, *_ = np.linalg.lstsq(design, np.asarray(b), rcond=None)
    best = 0.5 * np.mean((design @ sol - np.asarray(b)) ** 2)
    assert losses[-1] - best < 0.1 * (losses[0] - best)


# ---------------------------------------------------------------------------- m-sharpness


def test_m_sharpness_averages_per_shard_directions():
    n_shards, m = 4, 8
    kx, ky, kw = jax.random.split(jax.random.key(2), 3)
    x = jax.random.normal(kx, (n_shards * m, 3))
    y = jax.random.normal(ky, (n_shards * m,))
    params = {"w": jax.random.normal(kw, (3,)), "c": jnp.zeros(())}

    def loss(p, xb, yb):
        return jnp.mean(jnp.log(jnp.cosh(xb @ p["w"] + p["c"] - yb)) + 0.1 * (xb @ p["w"]) ** 4)

    xs, ys = x.reshape(n_shards, m, 3), y.reshape(n_shards, m)
    opt = bsam(0.1, 0.05, axis_name="shards")
    state = opt.init(params)

    def per_shard(xb, yb):
        f = lambda p: loss(p, xb, yb)
        updates, _ = opt.update(jax.grad(f)(params), state, params, value_fn=f)
        return updates

    got = jax.vmap(per_shard, axis_name="shards")(xs, ys)
    separate = [
        one_update(bsam(0.1, 0.05), params, lambda p, i=i: loss(p, xs[i], ys[i]))[0]
        for i in range(n_shards)
    ]
    expected = jax.tree.map(lambda *t: np.mean(np.stack(t), axis=0), *separate)
    for i in range(n_shards):
        assert_tree_allclose(jax.tree.map(lambda t, i=i: t[i], got), expected)
    full, _ = one_update(bsam(0.1, 0.05), params, lambda p: loss(p, x, y))
    assert not np.allclose(np.asarray(full["w"]), np.asarray(expected["w"]), atol=1e-6)


# ------------------------------------------- where the base optimizer steps from (x64)
#
# The reference training loop (ajiaaa/BSAM, PyTorch SGD with momentum μ and coupled weight
# decay λ) written out in float64 numpy. On step k, with s = w − ρ_min ĝ the min point:
#   step_from="params":    p = w,   buf = μ buf + (d + λ w),   w ← w − lr_k buf
#   step_from="min_point": p = s,   buf = μ buf + (d + λ s),   w ← s − lr_k buf
# (torch starts the momentum buffer at the first d_p, i.e. buf₀ = 0 here.)


def _loss64(p):
    return sum(jnp.sum(COEF[k] / 4 * (p[k] - 1) ** 4 + 0.5 * p[k] ** 2) for k in sorted(COEF))


def _reference_loop(w, steps, lr_of, rho_min_of, rho_max, wd, mu, from_min_point):
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    buf = {k: np.zeros_like(v) for k, v in w.items()}
    for k in range(steps):
        g = quartic_grad_np(w)
        scale_max = rho_max / (np_norm(g) + 1e-12)
        scale_min = rho_min_of(k) / (np_norm(g) + 1e-12)
        g_max = quartic_grad_np({n: w[n] + scale_max * g[n] for n in w})
        s = {n: w[n] - scale_min * g[n] for n in w}
        g_min = quartic_grad_np(s)
        ratio = np_norm(g_max) / np_norm(g_min)
        d = {n: g_max[n] + g[n] - ratio * g_min[n] for n in w}
        p = s if from_min_point else w
        buf = {n: mu * buf[n] + d[n] + wd * p[n] for n in w}
        w = {n: p[n] - lr_of(k) * buf[n] for n in w}
    return w


def _run(opt, params, steps):
    state = opt.init(params)
    step = jax.jit(
        lambda p, s: (lambda u, s2: (optax.apply_updates(p, u), s2))(
            *opt.update(jax.grad(_loss64)(p), s, p, value_fn=_loss64)
        )
    )
    for _ in range(steps):
        params, state = step(params, state)
    return params


def _ref_lr(k, total, lr_max=0.05):
    """The reference CosineScheduler as the loop sees it: step k runs at c(max(k − 1, 0))."""
    j = max(k - 1, 0)
    return lr_max * (1 + np.cos(np.pi * j / total)) / 2


def _ref_rho_min(k, total, lr_max=0.05, rho_hi=0.05):
    """ρ_min = ρ_hi · lr_k / lr_max on the same step k ≥ 1; 0 on step 0."""
    return 0.0 if k == 0 else rho_hi * _ref_lr(k, total, lr_max) / lr_max


def test_reference_schedules_timing():
    total = 7
    lr, rho_min = bsam_reference_schedules(total)
    for k in range(total + 2):
        np.testing.assert_allclose(float(lr(k)), _ref_lr(k, total), rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(float(rho_min(k)), _ref_rho_min(k, total), rtol=1e-6, atol=1e-9)
    # general form: ρ_lo + (ρ_hi − ρ_lo)(lr − lr_min)/(lr_max − lr_min), P(0) on step 0
    lr, rho_min = bsam_reference_schedules(10, lr_max=0.1, lr_min=0.01, rho_hi=0.2, rho_lo=0.02)
    for k in [0, 1, 4, 10]:
        c = 0.01 + 0.09 * (1 + np.cos(np.pi * max(k - 1, 0) / 10)) / 2
        lr_k = 0.0 if k == 0 else c
        np.testing.assert_allclose(float(lr(k)), c, rtol=1e-6)
        np.testing.assert_allclose(
            float(rho_min(k)), 0.02 + 0.18 * (lr_k - 0.01) / 0.09, rtol=1e-6, atol=1e-9
        )


@pytest.mark.parametrize("from_min_point", [False, True])
def test_step_from_matches_reference_loop_float64(from_min_point):
    steps, total, wd, mu = 4, 5, 1e-3, 0.9
    with jax.enable_x64(True):
        params = make_params(jnp.float64)
        lr, rho_min = bsam_reference_schedules(total)
        base = optax.chain(optax.add_decayed_weights(wd), optax.sgd(lr, momentum=mu))
        step_from = "min_point" if from_min_point else "params"
        got = _run(bsam(0.05, rho_min, base=base, step_from=step_from), params, steps)
        expected = _reference_loop(
            to_np(params),
            steps,
            lambda k: _ref_lr(k, total),
            lambda k: _ref_rho_min(k, total),
            0.05,
            wd,
            mu,
            from_min_point,
        )
        assert_tree_allclose(got, expected, rtol=1e-13, atol=1e-15)
        other = _reference_loop(
            to_np(params),
            steps,
            lambda k: _ref_lr(k, total),
            lambda k: _ref_rho_min(k, total),
            0.05,
            wd,
            mu,
            not from_min_point,
        )
        # the two forms really differ
        assert np.max(np.abs(other["w"] - np.asarray(got["w"]))) > 1e-4
        if not from_min_point:  # base=... with "params" is the same as the chain
            chained = optax.chain(
                bsam(0.05, rho_min), optax.add_decayed_weights(wd), optax.sgd(lr, momentum=mu)
            )
            assert_tree_allclose(_run(chained, params, steps), got, rtol=1e-14, atol=1e-15)


def test_min_point_moves_params_at_zero_learning_rate():
    """With lr = 0 the reference still moves w by −ρ_min ĝ each step."""
    with jax.enable_x64(True):
        params = make_params(jnp.float64)
        opt = bsam(0.05, 0.02, step_from="min_point", base=optax.sgd(0.0, momentum=0.9))
        got = _run(opt, params, 1)
        w = to_np(params)
        g = quartic_grad_np(w)
        expected = {k: w[k] - 0.02 * g[k] / (np_norm(g) + 1e-12) for k in w}
        assert_tree_allclose(got, expected, rtol=1e-14, atol=1e-15)
        same = _run(bsam(0.05, 0.02, base=optax.sgd(0.0, momentum=0.9)), params, 1)
        assert_tree_allclose(same, to_np(params), rtol=0, atol=0)


def test_step_from_and_base_validation():
    with pytest.raises(ValueError, match="base"):
        bsam(0.05, 0.05, step_from="min_point")
    with pytest.raises(ValueError, match="step_from"):
        bsam(0.05, 0.05, step_from="min")
    with pytest.raises(TypeError, match="base"):
        bsam(0.05, 0.05, base="sgd")
    with pytest.raises(ValueError, match="total_steps"):
        bsam_reference_schedules(0)


@pytest.mark.parametrize(
    "name,bad,error",
    [
        ("rho_min", "0.05", TypeError),
        ("rho_max", None, TypeError),
        ("rho_min", jnp.ones(2), ValueError),
        ("rho_min", lambda c: c - 1.0, ValueError),  # ρ_min(0) = −1
    ],
)
def test_radius_validated_at_construction(name, bad, error):
    with pytest.raises(error, match=name):
        bsam(**{name: bad})


def _scan_loss(p):
    return sum(jnp.sum(0.25 * (x - 1) ** 4 + 0.5 * x**2) for x in jax.tree.leaves(p))


def _scan(opt, params, steps=3):
    def body(carry, _):
        p, s = carry
        u, s = opt.update(jax.grad(_scan_loss)(p), s, p, value_fn=_scan_loss)
        return (optax.apply_updates(p, u), s), None

    init = opt.init(params)
    (p, s), _ = jax.lax.scan(body, (params, init), None, length=steps)
    return init, p, s


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("step_from", ["params", "min_point"])
def test_state_dtypes_kept_over_scanned_steps(x64, step_from):
    """Every state leaf keeps its dtype over lax.scan steps, in float32 and x64 mode."""
    with jax.enable_x64(x64):
        for dtype in [jnp.float32] + ([jnp.float64] if x64 else []):
            params = make_params(dtype)
            lr, rho_min = bsam_reference_schedules(10)
            opt = bsam(
                optax.linear_schedule(0.05, 0.01, 5),
                rho_min,
                step_from=step_from,
                base=optax.chain(optax.add_decayed_weights(1e-3), optax.sgd(lr, momentum=0.9)),
            )
            init, p, s = _scan(opt, params)
            dtypes = lambda t: [x.dtype for x in jax.tree.leaves(t)]
            assert dtypes(s) == dtypes(init)
            assert dtypes(p) == dtypes(params)
            assert int(s.count) == 3
            # plain bsam (no base) chained in front, too
            init, p, s = _scan(optax.chain(bsam(0.05, rho_min), optax.sgd(lr)), params)
            assert dtypes(s) == dtypes(init)
            assert dtypes(p) == dtypes(params)


def test_min_point_under_m_sharpness_averages_the_shift():
    """step_from="min_point" with axis_name: every shard moves by the mean shift
    −ρ_min·mean_i(ĝ_i) plus the base step on the mean direction, so replicas stay equal."""
    n_shards, m, lr, rho_min = 3, 6, 0.1, 0.05
    kx, ky, kw = jax.random.split(jax.random.key(5), 3)
    xs = jax.random.normal(kx, (n_shards, m, 3))
    ys = jax.random.normal(ky, (n_shards, m))
    params = {"w": jax.random.normal(kw, (3,)), "c": jnp.asarray(0.2)}
    loss = lambda p, xb, yb: jnp.mean((jnp.tanh(xb @ p["w"]) + p["c"] - yb) ** 2)
    opt = bsam(0.1, rho_min, axis_name="s", step_from="min_point", base=optax.sgd(lr))
    state = opt.init(params)

    def per_shard(xb, yb):
        f = lambda p: loss(p, xb, yb)
        return opt.update(jax.grad(f)(params), state, params, value_fn=f)[0]

    got = jax.vmap(per_shard, axis_name="s")(xs, ys)
    shifts, directions = [], []
    for i in range(n_shards):
        f = lambda p, i=i: loss(p, xs[i], ys[i])
        g = jax.grad(f)(params)
        gn = np.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(g))) + 1e-12
        shifts.append(jax.tree.map(lambda v, gn=gn: -rho_min * np.asarray(v) / gn, g))
        directions.append(one_update(bsam(0.1, rho_min), params, f)[0])
    mean = lambda trees: jax.tree.map(lambda *t: np.mean(np.stack(t), axis=0), *trees)
    expected = jax.tree.map(lambda s, d: s - lr * np.asarray(d), mean(shifts), mean(directions))
    for i in range(n_shards):
        assert_tree_allclose(jax.tree.map(lambda t, i=i: t[i], got), expected)


# ------------------------------------------------- non-finite steps with step_from="min_point"
def _nan_tree(tree):
    return jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), tree)


def _nan_loss(params):  # NaN wherever it is evaluated: both perturbed points
    return jnp.nan * quartic_loss(params)


def _bsam_state(state):
    return state if isinstance(state, BSAMState) else state.inner_state


def _float_leaves(state):
    return [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]


@pytest.mark.parametrize("guard", ["apply_if_finite(base)", "apply_if_finite(bsam)"])
@pytest.mark.parametrize("source", ["incoming gradient", "perturbed point"])
def test_min_point_skips_a_non_finite_step(guard, source):
    """The min point's shift −ρ_min ĝ is applied by bsam, outside a guard around base, and
    apply_if_finite around bsam sees only g: bsam guards this mode itself. A NaN from either
    source leaves the parameters and the momentum as they were and is counted once."""
    sgd = optax.sgd(0.1, momentum=0.9)
    if guard == "apply_if_finite(base)":
        opt = bsam(0.05, 0.02, step_from="min_point", base=optax.apply_if_finite(sgd, 5))
    else:
        opt = optax.apply_if_finite(bsam(0.05, 0.02, step_from="min_point", base=sgd), 5)
    params = make_params()
    state = opt.init(params)
    updates, state = opt.update(
        jax.grad(quartic_loss)(params), state, params, value_fn=quartic_loss
    )
    params = optax.apply_updates(params, updates)  # one finite step: the momentum is non-zero
    assert all(float(jnp.max(jnp.abs(m))) > 0 for m in _float_leaves(state))

    grads = jax.grad(quartic_loss)(params)
    if source == "incoming gradient":
        bad_grads, bad_loss = _nan_tree(grads), quartic_loss
    else:
        bad_grads, bad_loss = grads, _nan_loss
    updates, bad_state = opt.update(bad_grads, state, params, value_fn=bad_loss)
    assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates))
    assert_tree_allclose(optax.apply_updates(params, updates), params, rtol=0, atol=0)
    for kept, before in zip(_float_leaves(bad_state), _float_leaves(state), strict=True):
        np.testing.assert_array_equal(kept, before)  # the momentum, untouched
    skipped = int(_bsam_state(bad_state).num_skipped)
    if guard == "apply_if_finite(bsam)":
        skipped += int(bad_state.total_notfinite)
    assert skipped == 1

    # the next finite step is the one that would have followed without the bad step
    after_bad, _ = opt.update(grads, bad_state, params, value_fn=quartic_loss)
    without, _ = opt.update(grads, state, params, value_fn=quartic_loss)
    assert_tree_allclose(after_bad, without, rtol=0, atol=0)


def test_min_point_guard_under_jit_counts_each_skipped_step():
    opt = bsam(0.05, 0.02, step_from="min_point", base=optax.sgd(0.1, momentum=0.9))
    params = make_params()

    @jax.jit
    def step(params, state, poison):
        loss = lambda p: quartic_loss(p) * jnp.where(poison, jnp.nan, 1.0)
        updates, state = opt.update(jax.grad(quartic_loss)(params), state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for poison in (False, True, False, True, True):
        params, state = step(params, state, poison)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves((params, state)))
    assert int(state.num_skipped) == 3
    assert int(state.count) == 5


def test_params_mode_passes_a_non_finite_direction_on():
    """With step_from="params" the guard is the caller's: a NaN at a perturbed point reaches
    the chained optimizer, so optax.apply_if_finite around it sees the step and skips it."""
    params = make_params()
    opt = bsam(0.05, 0.02)
    direction, state = opt.update(
        jax.grad(quartic_loss)(params), opt.init(params), params, value_fn=_nan_loss
    )
    assert not any(bool(jnp.all(jnp.isfinite(d))) for d in jax.tree.leaves(direction))
    assert int(state.num_skipped) == 0
    guarded = optax.chain(bsam(0.05, 0.02), optax.apply_if_finite(optax.sgd(0.1), 5))
    updates, state = guarded.update(
        jax.grad(quartic_loss)(params), guarded.init(params), params, value_fn=_nan_loss
    )
    assert all(float(jnp.max(jnp.abs(u))) == 0 for u in jax.tree.leaves(updates))
    assert int(state[1].total_notfinite) == 1
