"""The Flax NNX recipe for the SAM family with BatchNorm and Dropout (the README's).

The model carries three kinds of state: parameters, BatchNorm statistics and the dropout
RNG stream. ``nnx.split(model, nnx.Param, ...)`` separates the parameters from *all* the
rest (``nnx.merge(graphdef, params)`` alone fails: the graph also needs the statistics and
the RNG state). The recipe: the first pass returns the updated rest (statistics and the
advanced RNG); ``value_fn`` reruns the model on the *pre-step* rest, so the perturbed pass
sees the same dropout mask and its statistics are discarded.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import agsopt

nnx = pytest.importorskip("flax.nnx")

RHO, LR, MOMENTUM = 0.5, 0.1, 0.9


class Net(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 8, rngs=rngs)
        self.bn = nnx.BatchNorm(8, momentum=MOMENTUM, rngs=rngs)
        self.drop = nnx.Dropout(0.3, rngs=rngs)
        self.l2 = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(jnp.tanh(self.bn(self.l1(x)))))


def _batch():
    kx, ky = jax.random.split(jax.random.key(3))
    return jax.random.normal(kx, (16, 3)), jax.random.normal(ky, (16, 2))


# ----------------------------------------------------------------- the recipe, verbatim
def make_recipe(model, opt):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # rest: stats + RNG state

    def loss_fn(params, rest, x, y):
        m = nnx.merge(graphdef, params, rest, copy=True)  # train mode
        loss = jnp.mean((m(x) - y) ** 2)
        return loss, nnx.state(m, nnx.Not(nnx.Param))  # new stats, advanced RNG

    @jax.jit
    def train_step(params, rest, opt_state, x, y):
        (_, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, x, y)
        value_fn = lambda p: loss_fn(p, rest, x, y)[0]  # same mask; its stats dropped
        updates, opt_state = opt.update(grads, opt_state, params, value_fn=value_fn)
        return optax.apply_updates(params, updates), new_rest, opt_state

    return graphdef, params, rest, loss_fn, train_step


# ------------------------------------------------------------------------------ tests


def test_plain_merge_of_params_fails_and_split_rest_works():
    model = Net(nnx.Rngs(0, dropout=1))
    graphdef, _ = nnx.split(model)
    params = nnx.state(model, nnx.Param)
    with pytest.raises(ValueError):
        nnx.merge(graphdef, params)  # the failure the recipe avoids
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    nnx.merge(graphdef, params, rest, copy=True)


def test_sam_step_statistics_and_dropout():
    model = Net(nnx.Rngs(0, dropout=1))
    opt = optax.chain(agsopt.sam(RHO), optax.sgd(LR))
    graphdef, params, rest, loss_fn, train_step = make_recipe(model, opt)
    x, y = _batch()
    new_params, new_rest, _ = train_step(params, rest, opt.init(params), x, y)

    # SAM written out with the first pass's dropout mask (the pre-step RNG state)
    f = lambda p: loss_fn(p, rest, x, y)[0]
    g = jax.grad(f)(params)
    norm = jnp.sqrt(sum(jnp.sum(v**2) for v in jax.tree.leaves(g)))
    sharp = jax.grad(f)(jax.tree.map(lambda w, gi: w + RHO * gi / (norm + 1e-12), params, g))
    expected = jax.tree.map(lambda w, gi: w - LR * gi, params, sharp)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new_params, expected
    )

    # BatchNorm running statistics: those of the first pass, written out by hand
    h = x @ params["l1"]["kernel"][...] + params["l1"]["bias"][...]
    mean = (1 - MOMENTUM) * np.asarray(h.mean(0))  # running mean starts at 0
    var = MOMENTUM * 1.0 + (1 - MOMENTUM) * np.asarray(h.var(0))  # running var starts at 1
    np.testing.assert_allclose(new_rest["bn"]["mean"][...], mean, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new_rest["bn"]["var"][...], var, rtol=1e-5, atol=1e-7)
    # ... and not those of the perturbed pass
    perturbed_point = jax.tree.map(lambda w, gi: w + RHO * gi / norm, params, g)
    h_adv = x @ perturbed_point["l1"]["kernel"][...] + perturbed_point["l1"]["bias"][...]
    assert np.max(np.abs((1 - MOMENTUM) * np.asarray(h_adv.mean(0)) - mean)) > 1e-4

    # dropout RNG: advanced by exactly the first pass (one draw), not by the perturbed one
    before = int(rest["drop"]["rngs"]["count"][...])
    assert int(new_rest["drop"]["rngs"]["count"][...]) == before + 1
    # the next step draws a different mask (the same params give another loss)
    assert abs(float(f(params)) - float(loss_fn(params, new_rest, x, y)[0])) > 1e-6
    # and the perturbed pass with the next mask would have given another update
    f_next = lambda p: loss_fn(p, new_rest, x, y)[0]
    other = jax.grad(f_next)(perturbed_point)
    assert (
        np.max(np.abs(np.asarray(other["l2"]["kernel"][...] - sharp["l2"]["kernel"][...]))) > 1e-5
    )


def test_recipe_runs_over_steps_with_bsam_and_keeps_structure():
    model = Net(nnx.Rngs(0, dropout=1))
    opt = optax.chain(agsopt.bsam(0.05, 0.02), optax.sgd(LR, momentum=0.9))
    _, params, rest, loss_fn, train_step = make_recipe(model, opt)
    x, y = _batch()
    state = opt.init(params)
    first = float(loss_fn(params, rest, x, y)[0])
    for _ in range(5):
        params, rest, state = train_step(params, rest, state, x, y)
    assert jax.tree.structure(rest) == jax.tree.structure(nnx.split(model, nnx.Param, ...)[2])
    assert int(rest["drop"]["rngs"]["count"][...]) == 5
    assert np.isfinite(float(loss_fn(params, rest, x, y)[0]))
    assert float(loss_fn(params, rest, x, y)[0]) != first


def test_nnx_optimizer_variant_matches_functional_recipe():
    """With nnx.Optimizer: value_fn rebuilds the model from the parameters it receives and
    the rest split off *before* the first pass."""
    x, y = _batch()
    opt = optax.chain(agsopt.sam(RHO), optax.sgd(LR))

    _, params, rest, _, train_step = make_recipe(Net(nnx.Rngs(0, dropout=1)), opt)
    expected, expected_rest, _ = train_step(params, rest, opt.init(params), x, y)

    model = Net(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        rest = nnx.clone(rest)  # a snapshot before the first pass (split shares variables)
        loss_of = lambda m: jnp.mean((m(x) - y) ** 2)
        grads = nnx.grad(loss_of)(model)  # first pass: updates stats, advances the RNG
        value_fn = lambda p: loss_of(nnx.merge(graphdef, p, rest, copy=True))
        optimizer.update(model, grads, value_fn=value_fn)

    step(model, optimizer, x, y)
    got = nnx.state(model, nnx.Param)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)
    got_rest = nnx.state(model, nnx.Not(nnx.Param))
    np.testing.assert_allclose(
        got_rest["bn"]["mean"][...], expected_rest["bn"]["mean"][...], rtol=1e-6
    )


# ----------------------------------------------------- the adapter agsopt.nnx.state_loss
def _adapter_step(opt):
    @nnx.jit
    def step(model, optimizer, x, y):
        loss_of = lambda m: jnp.mean((m(x) - y) ** 2)
        value_fn = agsopt.nnx.state_loss(loss_of, model)  # before the first pass
        grads = nnx.grad(loss_of)(model)  # first pass: updates stats, advances the RNG
        optimizer.update(model, grads, value_fn=value_fn)

    return step


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: optax.chain(agsopt.sam(RHO), optax.sgd(LR)),
        lambda: optax.chain(agsopt.bsam(0.05, 0.02), optax.sgd(LR, momentum=0.9)),
    ],
    ids=["sam", "bsam"],
)
def test_state_loss_with_nnx_optimizer_matches_functional_recipe(make_opt):
    """One line, ``value_fn = agsopt.nnx.state_loss(loss_of, model)``, gives the recipe's
    step: the pre-step statistics and dropout mask in the perturbed passes, the first
    pass's statistics kept in the model."""
    x, y = _batch()
    opt = make_opt()
    _, params, rest, _, train_step = make_recipe(Net(nnx.Rngs(0, dropout=1)), opt)
    expected, expected_rest, _ = train_step(params, rest, opt.init(params), x, y)

    model = Net(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, opt, wrt=nnx.Param)
    _adapter_step(opt)(model, optimizer, x, y)
    got = nnx.state(model, nnx.Param)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)
    got_rest = nnx.state(model, nnx.Not(nnx.Param))
    np.testing.assert_allclose(
        got_rest["bn"]["mean"][...], expected_rest["bn"]["mean"][...], rtol=1e-6
    )
    assert int(got_rest["drop"]["rngs"]["count"][...]) == 1  # the first pass's draw only


def test_state_loss_from_a_graphdef_is_the_merged_loss():
    model = Net(nnx.Rngs(0, dropout=1))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    x, y = _batch()
    loss_of = lambda m: jnp.mean((m(x) - y) ** 2)
    value_fn = agsopt.nnx.state_loss(loss_of, graphdef, rest)
    by_hand = lambda p: loss_of(nnx.merge(graphdef, p, rest, copy=True))
    np.testing.assert_allclose(value_fn(params), by_hand(params), rtol=1e-7)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
        jax.grad(value_fn)(params),
        jax.grad(by_hand)(params),
    )
    # the module form snapshots the same states and leaves the model untouched
    before = nnx.state(model, nnx.Not(nnx.Param))
    from_module = agsopt.nnx.state_loss(loss_of, model)
    np.testing.assert_allclose(from_module(params), by_hand(params), rtol=1e-7)
    after = nnx.state(model, nnx.Not(nnx.Param))
    np.testing.assert_array_equal(after["bn"]["mean"][...], before["bn"]["mean"][...])
    assert int(after["drop"]["rngs"]["count"][...]) == int(before["drop"]["rngs"]["count"][...])


def test_state_loss_arguments_are_checked():
    model = Net(nnx.Rngs(0, dropout=1))
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    loss_of = lambda m: jnp.sum(m(jnp.ones((2, 3))))
    with pytest.raises(TypeError, match="nnx.Module or the nnx.GraphDef"):
        agsopt.nnx.state_loss(loss_of, {"w": jnp.ones(3)})
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        agsopt.nnx.state_loss(3.0, model)
    with pytest.raises(TypeError, match="wrt"):
        agsopt.nnx.state_loss(loss_of, graphdef, rest, wrt=nnx.Param)
    with pytest.raises(TypeError, match="only with a GraphDef"):
        agsopt.nnx.state_loss(loss_of, model, rest)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda: optax.chain(agsopt.sam(RHO), optax.sgd(LR)),
        lambda: optax.chain(agsopt.bsam(0.05, 0.02), optax.sgd(LR)),
        lambda: optax.chain(
            agsopt.vsam(0.05, warmup_steps=2, window=4, var_blocks=2), optax.sgd(LR)
        ),
        lambda: optax.chain(agsopt.ags(0.1, 4), optax.sgd(LR)),
    ],
    ids=["sam", "bsam", "vsam", "ags"],
)
def test_a_model_loss_given_as_value_fn_names_the_adapter(make_opt):
    """``nnx.Optimizer`` passes ``value_fn`` the parameters' ``nnx.State``; a loss of the
    model fails on it with an error that names ``agsopt.nnx.state_loss``."""
    model = Net(nnx.Rngs(0, dropout=1))
    optimizer = nnx.Optimizer(model, make_opt(), wrt=nnx.Param)
    x, y = _batch()
    loss_of = lambda m: jnp.mean((m(x) - y) ** 2)
    grads = nnx.grad(loss_of)(model)
    with pytest.raises(TypeError, match=r"agsopt\.nnx\.state_loss\(loss_fn, model\)"):
        optimizer.update(model, grads, value_fn=loss_of)
