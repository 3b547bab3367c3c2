"""Tests for agsopt.sam (SAM, arXiv:2010.01412; ASAM, arXiv:2102.11600)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from shared_problems import COEF, make_params, np_norm, quartic_grad_np, quartic_loss, to_np

from agsopt.sharpness import sam

RHO = 0.05


# ---------------------------------------------------------------------------------------
# A small non-quadratic problem with a hand-written gradient (float64 numpy reference):
#   L(w) = Σ_leaves Σ_i [ c_leaf/4 · (w_i − 1)⁴ + ½ w_i² ]
#   ∇L(w)_i = c_leaf · (w_i − 1)³ + w_i
# ---------------------------------------------------------------------------------------
def sam_update(opt, params, loss_fn=quartic_loss, **extra):
    state = opt.init(params)
    grads = jax.grad(loss_fn)(params)
    updates, _ = opt.update(grads, state, params, value_fn=loss_fn, **extra)
    return updates


def assert_tree_allclose(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(
            np.asarray(x, np.float64), np.asarray(y, np.float64), rtol=rtol, atol=atol
        ),
        a,
        b,
    )


# ----------------------------------------------------------------------------- formulas


def test_sam_matches_formula():
    params = make_params()
    w = to_np(params)
    g = quartic_grad_np(w)
    gn = np_norm(g)
    w_adv = {k: w[k] + RHO * g[k] / gn for k in w}
    expected = quartic_grad_np(w_adv)

    got = sam_update(sam(RHO), params)
    assert_tree_allclose(got, expected)
    # the perturbation really moved the gradient
    assert not np.allclose(np.asarray(got["w"]), g["w"], rtol=1e-3)


def test_asam_matches_formula():
    rho, eta = 0.5, 0.01
    params = make_params()
    w = to_np(params)
    g = quartic_grad_np(w)
    t = {k: np.abs(w[k]) + eta for k in w}
    tg_norm = np_norm({k: t[k] * g[k] for k in w})
    w_adv = {k: w[k] + rho * t[k] ** 2 * g[k] / tg_norm for k in w}
    expected = quartic_grad_np(w_adv)

    got = sam_update(sam(rho, adaptive=True, eta=eta), params)
    assert_tree_allclose(got, expected)


def _mlp_loss(params, batch):
    x, y = batch
    h = jnp.tanh(x @ params["w1"] + params["b1"])
    out = h @ params["w2"] + params["b2"]
    return jnp.mean((out - y) ** 2)


def _mlp_params(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": 0.5 * jax.random.normal(k1, (3, 8)),
        "b1": jnp.zeros((8,)),
        "w2": 0.5 * jax.random.normal(k2, (8, 2)),
        "b2": jnp.zeros((2,)),
    }


def _mlp_batch(key, n=16):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (n, 3)), jax.random.normal(ky, (n, 2))


def test_sam_matches_formula_mlp_plain_jnp():
    params = _mlp_params(jax.random.key(0))
    batch = _mlp_batch(jax.random.key(1))
    loss = lambda p: _mlp_loss(p, batch)

    g = jax.grad(loss)(params)
    leaves = jax.tree.leaves(g)
    gn = jnp.sqrt(sum(jnp.sum(x**2) for x in leaves))
    w_adv = jax.tree.map(lambda w, gi: w + RHO * gi / gn, params, g)
    expected = jax.grad(loss)(w_adv)

    got = sam_update(sam(RHO), params, loss)
    assert_tree_allclose(got, expected)


# --------------------------------------------------------------- optax.contrib.sam parity


def test_matches_optax_contrib_sam_opaque_mode():
    """optax.contrib.sam in opaque mode with sync_period=2 and a normalized-SGD adversary.

    Its adversary step is ``-(sgd(ρ)(normalize(g))) = +ρ g/‖g‖`` (it negates the adversary's
    updates), i.e. exactly SAM's ε = ρ ĝ; then the outer optimizer steps the original
    params with ∇L(w + ε).
    """
    lr, rho, steps = 0.1, 0.05, 10
    params0 = _mlp_params(jax.random.key(2))
    batches = [_mlp_batch(k) for k in jax.random.split(jax.random.key(3), steps)]

    ref = optax.contrib.sam(
        optax.sgd(lr),
        optax.chain(optax.contrib.normalize(), optax.sgd(rho)),
        sync_period=2,
        opaque_mode=True,
    )
    ours = optax.chain(sam(rho), optax.sgd(lr))

    p_ref, s_ref = params0, ref.init(params0)
    p_ours, s_ours = params0, ours.init(params0)
    for batch in batches:
        loss = lambda p, b=batch: _mlp_loss(p, b)
        g_ref = jax.grad(loss)(p_ref)
        u_ref, s_ref = ref.update(g_ref, s_ref, p_ref, grad_fn=lambda p, _i, f=loss: jax.grad(f)(p))
        p_ref = optax.apply_updates(p_ref, u_ref)

        g_ours = jax.grad(loss)(p_ours)
        u_ours, s_ours = ours.update(g_ours, s_ours, p_ours, value_fn=loss)
        p_ours = optax.apply_updates(p_ours, u_ours)

        assert_tree_allclose(p_ours, p_ref, rtol=1e-5, atol=1e-6)
    # and the trajectory is not the plain-SGD one
    p_sgd = params0
    for batch in batches:
        p_sgd = jax.tree.map(lambda w, g: w - lr * g, p_sgd, jax.grad(_mlp_loss)(p_sgd, batch))
    assert not np.allclose(np.asarray(p_sgd["w1"]), np.asarray(p_ours["w1"]), atol=1e-5)


# ----------------------------------------------------------------------- edge cases / API


def test_zero_gradient_gives_finite_update():
    params = {"a": jnp.zeros((3,)), "b": jnp.zeros((2, 2))}
    loss = lambda p: sum(jnp.sum(x**4) for x in jax.tree.leaves(p))  # ∇L(0) = 0
    for opt in (sam(RHO), sam(1.0, adaptive=True)):
        out = sam_update(opt, params, loss)
        for leaf in jax.tree.leaves(out):
            assert np.all(np.isfinite(leaf))
            np.testing.assert_array_equal(leaf, 0.0)

    # zero incoming updates at a point where the loss is not stationary: ε = 0 → ∇L(w)
    params = make_params()
    zeros = jax.tree.map(jnp.zeros_like, params)
    opt = sam(RHO)
    out, _ = opt.update(zeros, opt.init(params), params, value_fn=quartic_loss)
    assert_tree_allclose(out, quartic_grad_np(to_np(params)))


def test_rho_zero_is_plain_gradient():
    params = make_params()
    got = sam_update(sam(0.0), params)
    assert_tree_allclose(got, quartic_grad_np(to_np(params)))


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_bad_rho_raises(bad):
    with pytest.raises(ValueError, match="rho"):
        sam(bad)


def test_bad_eta_and_eps_raise():
    with pytest.raises(ValueError, match="eta"):
        sam(RHO, adaptive=True, eta=-1.0)
    with pytest.raises(ValueError, match="eps"):
        sam(RHO, eps=0.0)


def test_missing_value_fn_raises():
    params = make_params()
    opt = sam(RHO)
    grads = jax.grad(quartic_loss)(params)
    with pytest.raises(TypeError, match="value_fn"):
        opt.update(grads, opt.init(params), params)
    with pytest.raises(TypeError, match="value_fn"):
        opt.update(grads, opt.init(params), params, value_fn=3.0)


def test_missing_params_raises():
    params = make_params()
    opt = sam(RHO)
    with pytest.raises(TypeError, match="params"):
        opt.update(params, opt.init(params), None, value_fn=quartic_loss)


def test_unknown_extra_args_ignored():
    params = make_params()
    expected = sam_update(sam(RHO), params)
    got = sam_update(sam(RHO), params, grad_fn=lambda p, i: p, foo=1, batch_stats={"x": 1})
    assert_tree_allclose(got, expected, rtol=0, atol=0)


def test_state_counts_steps_and_is_array_tuple():
    params = make_params()
    opt = sam(RHO)
    state = opt.init(params)
    for _ in range(3):
        grads = jax.grad(quartic_loss)(params)
        _, state = opt.update(grads, state, params, value_fn=quartic_loss)
    assert int(state.count) == 3
    assert state.count.dtype == jnp.int32
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(state))


def test_jit_matches_eager():
    params = _mlp_params(jax.random.key(4))
    batch = _mlp_batch(jax.random.key(5))
    opt = optax.chain(sam(RHO), optax.sgd(0.1, momentum=0.9))

    def step(params, state, batch):
        loss = lambda p: _mlp_loss(p, batch)
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params, value_fn=loss)
        return optax.apply_updates(params, updates), state

    p_e, s_e = params, opt.init(params)
    p_j, s_j = params, opt.init(params)
    jstep = jax.jit(step)
    for _ in range(3):
        p_e, s_e = step(p_e, s_e, batch)
        p_j, s_j = jstep(p_j, s_j, batch)
    assert_tree_allclose(p_j, p_e)


def test_chain_with_clipping_clips_sharp_gradient():
    params = make_params()
    lr = 0.1
    sharp = sam_update(sam(RHO), params)
    norm = np_norm(to_np(sharp))
    assert norm > 1.0  # so the clip is active
    expected = {k: -lr * np.asarray(v) / norm for k, v in sharp.items()}

    opt = optax.chain(sam(RHO), optax.clip_by_global_norm(1.0), optax.sgd(lr))
    got = sam_update(opt, params)
    assert_tree_allclose(got, expected)


def test_inject_hyperparams_rho():
    params = _mlp_params(jax.random.key(6))
    batch = _mlp_batch(jax.random.key(7))
    loss = lambda p: _mlp_loss(p, batch)
    opt = optax.inject_hyperparams(sam)(rho=RHO)

    @jax.jit
    def update(state, params):
        grads = jax.grad(loss)(params)
        return opt.update(grads, state, params, value_fn=loss)

    state = opt.init(params)
    assert "rho" in state.hyperparams
    got, state = update(state, params)
    assert_tree_allclose(got, sam_update(sam(RHO), params, loss))

    # change ρ in the state: traced values pass validation and take effect
    state.hyperparams["rho"] = jnp.asarray(0.2)
    got, _ = update(state, params)
    assert_tree_allclose(got, sam_update(sam(0.2), params, loss))

    # eager (concrete) path too
    got, _ = opt.update(jax.grad(loss)(params), opt.init(params), params, value_fn=loss)
    assert_tree_allclose(got, sam_update(sam(RHO), params, loss))


def test_inject_hyperparams_with_rho_schedule():
    params = make_params()
    opt = optax.inject_hyperparams(sam)(rho=optax.linear_schedule(0.0, 0.1, 10))
    state = opt.init(params)
    grads = jax.grad(quartic_loss)(params)
    got, state = opt.update(grads, state, params, value_fn=quartic_loss)
    assert_tree_allclose(got, quartic_grad_np(to_np(params)))  # ρ(0) = 0
    got, state = opt.update(grads, state, params, value_fn=quartic_loss)
    assert_tree_allclose(got, sam_update(sam(0.01), params))


# ------------------------------------------------------------------------- m-sharpness


@pytest.mark.parametrize("adaptive", [False, True])
def test_m_sharpness_axis_name(adaptive):
    n_shards, m = 4, 8
    params = _mlp_params(jax.random.key(8))
    x, y = _mlp_batch(jax.random.key(9), n_shards * m)
    shards = (x.reshape(n_shards, m, 3), y.reshape(n_shards, m, 2))
    kw = {"rho": 0.1, "adaptive": adaptive}

    opt = sam(axis_name="shards", **kw)
    state = opt.init(params)

    def per_shard(shard):
        loss = lambda p: _mlp_loss(p, shard)
        grads = jax.grad(loss)(params)  # local, un-reduced gradient
        updates, _ = opt.update(grads, state, params, value_fn=loss)
        return updates

    got = jax.vmap(per_shard, axis_name="shards")(shards)

    separate = [
        sam_update(sam(**kw), params, lambda p, i=i: _mlp_loss(p, (shards[0][i], shards[1][i])))
        for i in range(n_shards)
    ]
    expected = jax.tree.map(lambda *xs: np.mean(np.stack(xs), axis=0), *separate)
    for i in range(n_shards):  # every shard receives the same averaged gradient
        assert_tree_allclose(jax.tree.map(lambda t, i=i: t[i], got), expected)

    # not the same as SAM on the whole batch (one ĝ for all shards)
    full = sam_update(sam(**kw), params, lambda p: _mlp_loss(p, (x, y)))
    assert not np.allclose(np.asarray(full["w1"]), np.asarray(expected["w1"]), atol=1e-6)


# ------------------------------------------------------------------ BatchNorm-style state


def _bn_model(params, stats, x, momentum=0.9):
    """Dense → BatchNorm (training mode: batch statistics) → tanh → Dense.

    Returns the predictions and the updated running statistics (a side output).
    """
    h = x @ params["w1"]
    mean, var = jnp.mean(h, axis=0), jnp.var(h, axis=0)
    h = (h - mean) / jnp.sqrt(var + 1e-5) * params["scale"] + params["shift"]
    out = jnp.tanh(h) @ params["w2"]
    new_stats = {
        "mean": momentum * stats["mean"] + (1 - momentum) * mean,
        "var": momentum * stats["var"] + (1 - momentum) * var,
    }
    return out, new_stats


def _bn_loss(params, stats, batch):
    x, y = batch
    out, new_stats = _bn_model(params, stats, x)
    return jnp.mean((out - y) ** 2), new_stats


def test_batchnorm_statistics_from_first_pass_only():
    k1, k2, k3 = jax.random.split(jax.random.key(10), 3)
    params = {
        "w1": jax.random.normal(k1, (3, 6)),
        "scale": jnp.ones((6,)),
        "shift": jnp.zeros((6,)),
        "w2": jax.random.normal(k2, (6, 2)),
    }
    stats = {"mean": jnp.zeros((6,)), "var": jnp.ones((6,))}
    batch = _mlp_batch(k3, 32)
    rho = 0.5  # large, so the perturbed pass's statistics differ visibly
    opt = optax.chain(sam(rho), optax.sgd(0.1))
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, stats, opt_state, batch):
        # first (unperturbed) pass: gradient and the new running statistics
        (_, new_stats), grads = jax.value_and_grad(_bn_loss, has_aux=True)(params, stats, batch)
        # SAM's second pass: a function of the params only; its statistics are dropped
        value_fn = lambda p: _bn_loss(p, new_stats, batch)[0]
        updates, opt_state = opt.update(grads, opt_state, params, value_fn=value_fn)
        return optax.apply_updates(params, updates), new_stats, opt_state

    new_params, new_stats, _ = train_step(params, stats, opt_state, batch)

    _, first_pass_stats = _bn_model(params, stats, batch[0])
    assert_tree_allclose(new_stats, first_pass_stats, rtol=1e-6, atol=1e-7)

    # the perturbed pass would have produced different statistics
    grads = jax.grad(lambda p: _bn_loss(p, stats, batch)[0])(params)
    gn = np_norm(to_np(grads))
    w_adv = jax.tree.map(lambda w, g: w + rho * g / gn, params, grads)
    _, perturbed_stats = _bn_model(w_adv, stats, batch[0])
    assert not np.allclose(new_stats["mean"], perturbed_stats["mean"], atol=1e-4)
    # and the step used the perturbed gradient
    expected = sam_update(sam(rho), params, lambda p: _bn_loss(p, stats, batch)[0])
    assert_tree_allclose(
        new_params, jax.tree.map(lambda w, g: w - 0.1 * g, params, expected), atol=1e-5
    )


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("adaptive", [False, True])
def test_bf16_params(adaptive):
    params = make_params(jnp.bfloat16)

    def loss(p):
        total = jnp.zeros((), jnp.bfloat16)
        for name, c in COEF.items():
            x = p[name]
            total = total + jnp.sum(c / 4 * (x - 1) ** 4 + 0.5 * x**2)
        return total

    out = sam_update(sam(RHO, adaptive=adaptive), params, loss)
    for leaf in jax.tree.leaves(out):
        assert leaf.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    ref = sam_update(sam(RHO, adaptive=adaptive), make_params(), quartic_loss)
    assert_tree_allclose(out, ref, rtol=5e-2, atol=5e-2)

    zeros = {"a": jnp.zeros((4,), jnp.bfloat16)}
    out = sam_update(sam(RHO, adaptive=adaptive), zeros, lambda p: jnp.sum(p["a"] ** 4))
    assert out["a"].dtype == jnp.bfloat16
    assert np.all(np.isfinite(np.asarray(out["a"], np.float32)))


def test_batchnorm_statistics_flax_nnx():
    """The same pattern with flax.nnx.BatchNorm: split off the BatchStat collection."""
    nnx = pytest.importorskip("flax.nnx")

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 6, rngs=rngs)
            self.bn = nnx.BatchNorm(6, momentum=0.9, rngs=rngs)
            self.l2 = nnx.Linear(6, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.bn(self.l1(x))))

    graphdef, params, stats = nnx.split(Net(nnx.Rngs(0)), nnx.Param, nnx.BatchStat)
    batch = _mlp_batch(jax.random.key(11), 32)
    rho = 0.5

    def loss_fn(params, stats, batch):
        model = nnx.merge(graphdef, params, stats, copy=True)  # train mode: updates stats
        x, y = batch
        return jnp.mean((model(x) - y) ** 2), nnx.state(model, nnx.BatchStat)

    opt = optax.chain(sam(rho), optax.sgd(0.1))

    @jax.jit
    def train_step(params, stats, opt_state, batch):
        (_, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, batch)
        value_fn = lambda p: loss_fn(p, new_stats, batch)[0]  # 2nd pass: stats discarded
        updates, opt_state = opt.update(grads, opt_state, params, value_fn=value_fn)
        return optax.apply_updates(params, updates), new_stats, opt_state

    _, new_stats, _ = train_step(params, stats, opt.init(params), batch)

    _, first_pass = loss_fn(params, stats, batch)
    assert_tree_allclose(new_stats, first_pass, rtol=1e-6, atol=1e-7)

    grads = jax.grad(lambda p: loss_fn(p, stats, batch)[0])(params)
    gn = np.sqrt(sum(float(jnp.sum(g**2)) for g in jax.tree.leaves(grads)))
    w_adv = jax.tree.map(lambda w, g: w + rho * g / gn, params, grads)
    _, perturbed = loss_fn(w_adv, stats, batch)
    diffs = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(new_stats), jax.tree.leaves(perturbed), strict=True)
    ]
    assert max(diffs) > 1e-4


# ------------------------------------------- ASAM: the public implementations' settings


def _mlp_np(params):
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _expected_asam(params, loss, rho, eta, eps, weight_leaves):
    """ASAM written out in float64: T = |w| + η on ``weight_leaves``, T = 1 elsewhere,
    ε = ρ T² g / (‖T g‖ + eps); returns ∇L(w + ε) (by jax.grad at the written-out point)."""
    w = _mlp_np(params)
    g = _mlp_np(jax.grad(loss)(params))
    t = {k: (np.abs(w[k]) + eta) if k in weight_leaves else np.ones_like(w[k]) for k in w}
    norm = np.sqrt(sum(np.sum((t[k] * g[k]) ** 2) for k in w))
    w_adv = {k: jnp.asarray(w[k] + rho * t[k] ** 2 * g[k] / (norm + eps), jnp.float32) for k in w}
    return jax.grad(loss)(w_adv)


def _not_bias(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in ("b1", "b2"), params
    )


def test_asam_davda54_setting_no_eta_every_leaf():
    """davda54/sam SAM(adaptive=True): ε = ρ w² g / (‖|w| g‖ + 1e-12) on every leaf."""
    params = _mlp_params(jax.random.key(20))
    params["b1"] = 0.3 * jnp.ones((8,))  # non-zero biases, so their scaling shows
    batch = _mlp_batch(jax.random.key(21))
    loss = lambda p: _mlp_loss(p, batch)
    rho = 2.0
    expected = _expected_asam(params, loss, rho, 0.0, 1e-12, {"w1", "b1", "w2", "b2"})
    got = sam_update(sam(rho, adaptive=True, eta=0.0), params, loss)
    assert_tree_allclose(got, expected, rtol=2e-5, atol=1e-6)
    # η matters: the default η = 0.01 gives a different point
    other = sam_update(sam(rho, adaptive=True), params, loss)
    assert not np.allclose(np.asarray(other["w1"]), np.asarray(got["w1"]), rtol=1e-4)


@pytest.mark.parametrize("form", ["callable", "tree", "prefix"])
def test_asam_samsunglabs_setting_weights_only(form):
    """SamsungLabs/ASAM: T = |w| + η on weights only (biases T = 1), eps = 1e-16."""
    params = _mlp_params(jax.random.key(22))
    params["b1"] = 0.3 * jnp.ones((8,))
    params["b2"] = -0.2 * jnp.ones((2,))
    batch = _mlp_batch(jax.random.key(23))
    loss = lambda p: _mlp_loss(p, batch)
    rho, eta = 0.5, 0.01
    mask = {
        "callable": _not_bias,
        "tree": {"w1": True, "b1": False, "w2": True, "b2": False},
        "prefix": {"w1": True, "b1": False, "w2": True, "b2": False},
    }[form]
    if form == "prefix":  # a nested tree with a bool covering a whole subtree
        nested = {"layer1": {"w": params["w1"], "b": params["b1"]}, "layer2": params["w2"]}
        nested_loss = lambda p: loss(
            {"w1": p["layer1"]["w"], "b1": p["layer1"]["b"], "w2": p["layer2"], "b2": params["b2"]}
        )
        nested_mask = {"layer1": {"w": True, "b": False}, "layer2": True}
        got = sam_update(
            sam(rho, adaptive=True, eta=eta, eps=1e-16, adaptive_mask=nested_mask),
            nested,
            nested_loss,
        )
        sub = {k: params[k] for k in ("w1", "b1", "w2")}
        sub_loss = lambda p: loss({**p, "b2": params["b2"]})
        exp = _expected_asam(sub, sub_loss, rho, eta, 1e-16, {"w1", "w2"})
        assert_tree_allclose(
            got, {"layer1": {"w": exp["w1"], "b": exp["b1"]}, "layer2": exp["w2"]}, rtol=2e-5
        )
        return
    expected = _expected_asam(params, loss, rho, eta, 1e-16, {"w1", "w2"})
    got = sam_update(sam(rho, adaptive=True, eta=eta, eps=1e-16, adaptive_mask=mask), params, loss)
    assert_tree_allclose(got, expected, rtol=2e-5, atol=1e-6)
    # the mask matters: scaling every leaf gives another point
    every = _expected_asam(params, loss, rho, eta, 1e-16, {"w1", "b1", "w2", "b2"})
    assert not np.allclose(np.asarray(every["b1"]), np.asarray(got["b1"]), rtol=1e-4)


def test_asam_mask_all_true_equals_default_and_ignored_without_adaptive():
    params = _mlp_params(jax.random.key(24))
    batch = _mlp_batch(jax.random.key(25))
    loss = lambda p: _mlp_loss(p, batch)
    all_true = jax.tree.map(lambda _: True, params)
    a = sam_update(sam(0.5, adaptive=True, adaptive_mask=all_true), params, loss)
    b = sam_update(sam(0.5, adaptive=True), params, loss)
    assert_tree_allclose(a, b, rtol=0, atol=0)
    c = sam_update(sam(0.05, adaptive_mask=_not_bias), params, loss)
    assert_tree_allclose(c, sam_update(sam(0.05), params, loss), rtol=0, atol=0)


def test_asam_mask_errors_name_the_argument():
    params = _mlp_params(jax.random.key(26))
    batch = _mlp_batch(jax.random.key(27))
    loss = lambda p: _mlp_loss(p, batch)
    with pytest.raises(TypeError, match="adaptive_mask"):
        sam_update(
            sam(0.5, adaptive=True, adaptive_mask=jax.tree.map(lambda _: 1, params)), params, loss
        )
    with pytest.raises(ValueError, match="adaptive_mask"):
        sam_update(sam(0.5, adaptive=True, adaptive_mask={"w1": True}), params, loss)


# ------------------------------------------------------------------------ ρ schedules


def test_rho_schedule_evaluated_at_count():
    """ρ(count): step 0 with ρ(0) = 0 is the plain gradient, step 1 is SAM with ρ(1)."""
    params = make_params()
    schedule = optax.linear_schedule(0.0, 0.1, 10)  # ρ(1) = 0.01, ρ(2) = 0.02
    opt = sam(schedule)
    state = opt.init(params)
    grads = jax.grad(quartic_loss)(params)
    w, g = to_np(params), quartic_grad_np(to_np(params))
    gn = np_norm(g)
    step = jax.jit(lambda s: opt.update(grads, s, params, value_fn=quartic_loss))
    for count, rho in enumerate([0.0, 0.01, 0.02]):
        got, state = step(state)
        expected = quartic_grad_np({k: w[k] + rho * g[k] / gn for k in w})
        assert_tree_allclose(got, expected)
        assert int(state.count) == count + 1


def test_asam_rho_schedule():
    params = make_params()
    opt = sam(lambda count: 0.5 * (count + 1), adaptive=True)  # ρ(0) = 0.5, ρ(1) = 1.0
    state = opt.init(params)
    grads = jax.grad(quartic_loss)(params)
    _, state = opt.update(grads, state, params, value_fn=quartic_loss)
    got, _ = opt.update(grads, state, params, value_fn=quartic_loss)
    assert_tree_allclose(got, sam_update(sam(1.0, adaptive=True), params))


@pytest.mark.parametrize(
    "bad,error,pattern",
    [
        ("0.05", TypeError, "rho"),
        (None, TypeError, "rho"),
        (True, TypeError, "rho"),
        (jnp.ones(2), ValueError, "rho must be a scalar"),
        (lambda count: -0.1 + 0 * count, ValueError, r"rho\(0\)"),
        (lambda count: jnp.ones(3) * count, ValueError, "rho: a schedule must return a scalar"),
        (lambda: 0.1, TypeError, "rho: a schedule"),
    ],
)
def test_rho_validated_at_construction(bad, error, pattern):
    with pytest.raises(error, match=pattern):
        sam(bad)


# ------------------------------------------------------- dtypes over steps (lax.scan)


def _scan_steps(opt, params, loss, steps=3):
    def body(carry, _):
        p, s = carry
        grads = jax.grad(loss)(p)
        updates, s = opt.update(grads, s, p, value_fn=loss)
        return (optax.apply_updates(p, updates), s), None

    state = opt.init(params)
    (p, s), _ = jax.lax.scan(body, (params, state), None, length=steps)
    return state, p, s


def _dtypes(tree):
    return [x.dtype for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("x64", [False, True])
@pytest.mark.parametrize("adaptive", [False, True])
def test_state_dtypes_kept_over_scanned_steps(x64, adaptive):
    """Every state leaf keeps its dtype across steps (lax.scan requires it), in float32 and
    in x64 mode, with a ρ schedule (whose values are float64 under x64)."""
    with jax.enable_x64(x64):
        for dtype in [jnp.float32] + ([jnp.float64] if x64 else []):
            params = {
                "b": jnp.asarray([[0.3, -0.7], [1.5, 0.1]], dtype),
                "w": jnp.asarray([0.2, -1.1, 2.0], dtype),
            }
            loss = lambda p: sum(
                jnp.sum(0.25 * (x - 1) ** 4 + 0.5 * x**2) for x in jax.tree.leaves(p)
            )
            opt = optax.chain(
                sam(optax.linear_schedule(0.01, 0.1, 5), adaptive=adaptive),
                optax.sgd(0.01, momentum=0.9),
            )
            init, p, s = _scan_steps(opt, params, loss)
            assert _dtypes(s) == _dtypes(init)
            assert _dtypes(p) == _dtypes(params)
            assert int(s[0].count) == 3
