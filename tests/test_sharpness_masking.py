"""SAM-family transformations inside optax.masked / optax.multi_transform (SAM on some
layers only): ε on the selected leaves, with the norm over those leaves, the other leaves
held at w; the unselected leaves keep their own optimizer."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import agsopt


def _loss(p, batch):
    x, y = batch
    h = jnp.tanh(x @ p["body"]["w"] + p["body"]["b"])
    return jnp.mean((h @ p["head"]["w"] + p["head"]["b"] - y) ** 2)


def _setup():
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    params = {
        "body": {"w": 0.5 * jax.random.normal(k1, (3, 6)), "b": 0.1 * jnp.ones((6,))},
        "head": {"w": 0.5 * jax.random.normal(k2, (6, 2)), "b": jnp.zeros((2,))},
    }
    batch = (jax.random.normal(k3, (16, 3)), jax.random.normal(k4, (16, 2)))
    return params, batch


def _sam_on_body(params, loss, rho):
    """Written out: ε = ρ g_body/‖g_body‖ on the body leaves only; ∇_body L(w + ε)."""
    g = jax.grad(loss)(params)
    g_body = g["body"]
    norm = np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in jax.tree.leaves(g_body)))
    point = {
        "body": jax.tree.map(lambda w, gi: w + rho * gi / (norm + 1e-12), params["body"], g_body),
        "head": params["head"],
    }
    return jax.grad(loss)(point)["body"], g["head"]


def _close(a, b, rtol=1e-5, atol=1e-6):
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol),
        a,
        b,
    )


def test_multi_transform_sam_on_some_layers():
    params, batch = _setup()
    loss = lambda p: _loss(p, batch)
    rho, lr_sam, lr_plain = 0.2, 0.1, 0.03
    labels = {"body": {"w": "sam", "b": "sam"}, "head": {"w": "plain", "b": "plain"}}
    opt = optax.multi_transform(
        {"sam": optax.chain(agsopt.sam(rho), optax.sgd(lr_sam)), "plain": optax.sgd(lr_plain)},
        labels,
    )

    @jax.jit
    def update(state, params):
        grads = jax.grad(loss)(params)
        return opt.update(grads, state, params, value_fn=agsopt.fill_masked_params(loss, params))

    updates, _ = update(opt.init(params), params)
    sharp_body, g_head = _sam_on_body(params, loss, rho)
    _close(updates["body"], jax.tree.map(lambda g: -lr_sam * g, sharp_body))
    _close(updates["head"], jax.tree.map(lambda g: -lr_plain * g, g_head))
    # not the same as SAM on every leaf (whose norm runs over all leaves)
    full = optax.chain(agsopt.sam(rho), optax.sgd(lr_sam))
    everywhere, _ = full.update(jax.grad(loss)(params), full.init(params), params, value_fn=loss)
    assert not np.allclose(
        np.asarray(everywhere["body"]["w"]), np.asarray(updates["body"]["w"]), rtol=1e-4
    )


@pytest.mark.parametrize("prefix", [False, True])
def test_masked_sam_with_prefix_or_full_mask(prefix):
    params, batch = _setup()
    loss = lambda p: _loss(p, batch)
    rho = 0.3
    mask = (
        {"body": True, "head": False}
        if prefix
        else {"body": {"w": True, "b": True}, "head": {"w": False, "b": False}}
    )
    opt = optax.masked(agsopt.sam(rho), mask)
    grads = jax.grad(loss)(params)
    out, state = opt.update(
        grads, opt.init(params), params, value_fn=agsopt.fill_masked_params(loss, params)
    )
    sharp_body, g_head = _sam_on_body(params, loss, rho)
    _close(out["body"], sharp_body)
    _close(out["head"], g_head)  # passed through untouched
    assert int(state.inner_state.count) == 1


def test_masked_bsam():
    params, batch = _setup()
    loss = lambda p: _loss(p, batch)
    opt = optax.masked(agsopt.bsam(0.1, 0.05), {"body": True, "head": False})
    grads = jax.grad(loss)(params)
    out, _ = opt.update(
        grads, opt.init(params), params, value_fn=agsopt.fill_masked_params(loss, params)
    )
    # written out on the body leaves: ĝ over the body, points w ± ρ ĝ, head held at w
    g = grads["body"]
    norm = np.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(g))) + 1e-12

    def body_grad(shift):
        point = {
            "body": jax.tree.map(lambda w, gi: w + shift * gi / norm, params["body"], g),
            "head": params["head"],
        }
        return jax.grad(loss)(point)["body"]

    g_max, g_min = body_grad(0.1), body_grad(-0.05)
    nrm = lambda t: np.sqrt(sum(float(jnp.sum(v**2)) for v in jax.tree.leaves(t)))
    ratio = nrm(g_max) / nrm(g_min)
    expected = jax.tree.map(lambda a, b, c: a + b - ratio * c, g_max, g, g_min)
    _close(out["body"], expected)
    _close(out["head"], grads["head"])


def test_plain_value_fn_under_masking_names_the_fix():
    params, batch = _setup()
    loss = lambda p: _loss(p, batch)
    opt = optax.masked(agsopt.sam(0.1), {"body": True, "head": False})
    with pytest.raises(TypeError, match="fill_masked_params"):
        opt.update(jax.grad(loss)(params), opt.init(params), params, value_fn=loss)


def test_fill_masked_params_passes_full_trees_through():
    params, batch = _setup()
    loss = lambda p: _loss(p, batch)
    filled = agsopt.fill_masked_params(loss, params)
    shifted = jax.tree.map(lambda x: x + 0.1, params)
    assert float(filled(shifted)) == float(loss(shifted))


# ------------------------------------------ ASAM's name-based mask (SamsungLabs/ASAM)
def _vit_like():
    k = jax.random.split(jax.random.key(5), 6)
    return {
        "embed": {"embedding": 0.5 * jax.random.normal(k[0], (5, 4))},
        "cls_token": 0.3 * jax.random.normal(k[1], (4,)),
        "norm": {"scale": 1.0 + 0.1 * jax.random.normal(k[2], (4,)), "bias": 0.2 * jnp.ones(4)},
        "gain": 1.5 + 0.1 * jax.random.normal(k[3], (4,)),
        "head": {"kernel": 0.5 * jax.random.normal(k[4], (4, 3)), "bias": -0.1 * jnp.ones(3)},
        "blocks": [{"kernel": 0.4 * jax.random.normal(k[5], (4, 4))}],
    }


def _vit_loss(p):
    tokens = p["embed"]["embedding"] + p["cls_token"]
    h = tokens / jnp.sqrt(jnp.mean(tokens**2, axis=-1, keepdims=True) + 1e-6)
    h = p["gain"] * (p["norm"]["scale"] * h + p["norm"]["bias"])
    h = jnp.tanh(h @ p["blocks"][0]["kernel"])
    return jnp.mean((h @ p["head"]["kernel"] + p["head"]["bias"]) ** 2)


def test_asam_weight_mask_selects_by_leaf_name():
    mask = agsopt.sharpness.asam_weight_mask()(_vit_like())
    assert mask == {
        "embed": {"embedding": True},
        "cls_token": False,
        "norm": {"scale": True, "bias": False},
        "gain": False,
        "head": {"kernel": True, "bias": False},
        "blocks": [{"kernel": True}],
    }
    torch_named = {"conv1": {"weight": jnp.ones(2), "bias": jnp.ones(2)}, "gain": jnp.ones(2)}
    assert agsopt.sharpness.asam_weight_mask()(torch_named) == {
        "conv1": {"weight": True, "bias": False},
        "gain": False,
    }
    custom = agsopt.sharpness.asam_weight_mask(["gain"])(torch_named)
    assert custom == {"conv1": {"weight": False, "bias": False}, "gain": True}


def test_asam_weight_mask_reproduces_the_samsunglabs_ascent_step():
    """SamsungLabs/ASAM ``ascent_step``, written out in float64: ``T = |w| + η`` where
    ``'weight' in name`` (Flax: kernel, scale, embedding), ``T = 1`` on every other leaf —
    the gain and the cls_token included —, ``ε = ρ T² g/(‖T g‖ + 1e-16)``."""
    params = _vit_like()
    rho, eta = 0.5, 0.01
    scaled = {"embedding", "scale", "kernel"}
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    g = jax.tree.leaves(jax.grad(_vit_loss)(params))
    w = [np.asarray(x, np.float64) for _, x in flat]
    names = [str(getattr(path[-1], "key", "")) for path, _ in flat]
    t = [
        np.abs(wi) + eta if n in scaled else np.ones_like(wi)
        for wi, n in zip(w, names, strict=True)
    ]
    tg = [ti * np.asarray(gi, np.float64) for ti, gi in zip(t, g, strict=True)]
    norm = np.sqrt(sum(np.sum(x**2) for x in tg)) + 1e-16
    point = [wi + rho * ti * tgi / norm for wi, ti, tgi in zip(w, t, tg, strict=True)]
    point = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in point])
    expected = jax.grad(_vit_loss)(point)

    mask = agsopt.sharpness.asam_weight_mask()
    opt = agsopt.sam(rho, adaptive=True, eta=eta, eps=1e-16, adaptive_mask=mask)
    got, _ = opt.update(jax.grad(_vit_loss)(params), opt.init(params), params, value_fn=_vit_loss)
    _close(got, expected, rtol=2e-5, atol=1e-7)

    # a "not a bias" mask scales the gain and the cls_token too: another ascent point
    not_bias = lambda p: jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) != "bias", p
    )
    other = agsopt.sam(rho, adaptive=True, eta=eta, eps=1e-16, adaptive_mask=not_bias)
    wrong, _ = other.update(
        jax.grad(_vit_loss)(params), other.init(params), params, value_fn=_vit_loss
    )
    assert np.max(np.abs(np.asarray(wrong["gain"]) - np.asarray(expected["gain"]))) > 1e-4


@pytest.mark.parametrize(
    "names, error",
    [("weight", TypeError), ([], ValueError), (["kernel", 3], TypeError), (None, TypeError)],
)
def test_asam_weight_mask_checks_names(names, error):
    with pytest.raises(error, match="names"):
        agsopt.sharpness.asam_weight_mask(names)


def _two_groups(rho=0.2):
    labels = {"body": {"w": "sam", "b": "sam"}, "head": {"w": "plain", "b": "plain"}}
    return optax.multi_transform(
        {"sam": optax.chain(agsopt.sam(rho), optax.sgd(0.1)), "plain": optax.sgd(0.3)}, labels
    )


def test_fill_masked_params_built_in_each_step_tracks_the_other_group():
    """Built from each step's params, ten steps of SAM on the body with the head moved by
    its own SGD equal the written-out steps (a filler built once kept the head at its first
    values: 0.08 off after 10 steps)."""
    params, batch = _setup()
    loss = lambda p: _loss(p, batch)
    opt = _two_groups()

    @jax.jit
    def step(state, p):
        grads = jax.grad(loss)(p)
        updates, state = opt.update(grads, state, p, value_fn=agsopt.fill_masked_params(loss, p))
        return state, optax.apply_updates(p, updates)

    state, p, expected = opt.init(params), params, params
    for _ in range(10):
        state, p = step(state, p)
        sharp_body, g_head = _sam_on_body(expected, loss, 0.2)
        expected = {
            "body": jax.tree.map(lambda w, g: w - 0.1 * g, expected["body"], sharp_body),
            "head": jax.tree.map(lambda w, g: w - 0.3 * g, expected["head"], g_head),
        }
    _close(p, expected, rtol=1e-4, atol=1e-5)


def test_fill_masked_params_built_once_is_refused():
    """A filler built before the loop: refused at the first step whose parameters are not
    the ones it holds (eagerly, the second; under jit, where the held leaves are constants
    and the step's are traced, the first) with a ValueError saying to build it each step."""
    params, batch = _setup()
    loss = lambda p: _loss(p, batch)
    opt = _two_groups()
    stale = agsopt.fill_masked_params(loss, params)

    def step(state, p):
        updates, state = opt.update(jax.grad(loss)(p), state, p, value_fn=stale)
        return state, optax.apply_updates(p, updates)

    state, p = step(opt.init(params), params)  # the parameters it was built from: fine
    with pytest.raises(ValueError, match="built once before the training loop"):
        step(state, p)
    with pytest.raises(ValueError, match="Build it in every step"):
        jax.jit(step)(opt.init(params), params)
    other = {"body": params["body"]}  # another structure
    with pytest.raises(ValueError, match="another structure"):
        opt.update(
            jax.grad(loss)(params),
            opt.init(params),
            params,
            value_fn=agsopt.fill_masked_params(loss, other),
        )


@pytest.mark.parametrize("use", ["cast", "index"])
def test_plain_loss_touching_a_masked_leaf_is_refused(use):
    """A plain loss under masking receives ``MaskedNode`` leaves. Cast with
    ``jnp.asarray(leaf, float32)`` a MaskedNode is an empty array: the head term vanished and
    the update was silently wrong; indexed, it raised an unrelated IndexError. Both are the
    TypeError that names ``fill_masked_params`` (the loss is never called on such a tree)."""
    params, batch = _setup()

    def loss(p):
        head = jnp.asarray(p["head"]["w"], jnp.float32)
        scale = jnp.sum(head**2) if use == "cast" else p["head"]["b"][0] ** 2
        return jnp.sum(jnp.cos(p["body"]["w"])) + (1.0 + scale) * jnp.sum(p["body"]["b"] ** 2)

    # a mask per leaf: each head leaf (not the head subtree) becomes a MaskedNode
    mask = {"body": {"w": True, "b": True}, "head": {"w": False, "b": False}}
    opt = optax.masked(agsopt.sam(0.1), mask)
    with pytest.raises(TypeError, match="fill_masked_params"):
        opt.update(jax.grad(loss)(params), opt.init(params), params, value_fn=loss)
    filled = agsopt.fill_masked_params(loss, params)
    out, _ = opt.update(jax.grad(loss)(params), opt.init(params), params, value_fn=filled)
    sharp_body, _ = _sam_on_body(params, loss, 0.1)
    _close(out["body"], sharp_body)
