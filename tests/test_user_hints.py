"""Mistakes a new user makes, each answered by an error that says what to do (issue 20, 8).

- ``optax.inject_hyperparams(factory)`` without ``static_args`` turns the integer arguments
  into arrays: the error names ``static_args`` and the argument.
- ``value_fn`` returning ``(loss, aux)`` (a ``has_aux`` loss): the error says to pass the
  loss alone, for every transformation that takes ``value_fn``.
- Clipping placed *before* ``ags`` (which ignores its incoming updates) or ``sam`` (which
  normalizes them) changes nothing; placed after, it clips. The README documents both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import agsopt

PARAMS = {"w": jnp.asarray([0.5, -1.5, 2.0]), "b": jnp.asarray(0.3)}


def loss(params):
    return jnp.sum((params["w"] - 1.0) ** 2) + params["b"] ** 2 + 0.1 * jnp.sum(params["w"] ** 4)


@pytest.mark.parametrize(
    "factory, kwargs, integer",
    [
        (agsopt.ags, {"sigma": 0.5, "num_samples": 8}, "num_samples"),
        (agsopt.vsam, {"rho": 0.05, "warmup_steps": 3, "window": 10}, "warmup_steps"),
        (agsopt.ausam, {"num_examples": 100, "rho": 0.05, "steps_per_epoch": 10}, "num_examples"),
        (agsopt.dgs, {"radius": 0.5, "step": "gradient"}, "num_nodes"),
    ],
)
def test_inject_hyperparams_without_static_args_names_them(factory, kwargs, integer):
    opt = optax.inject_hyperparams(factory)(**kwargs)
    with pytest.raises(TypeError, match=rf"static_args=\('{integer}',\)"):
        opt.init(PARAMS)


def test_inject_hyperparams_with_static_args_works():
    opt = optax.inject_hyperparams(agsopt.ags, static_args=("num_samples",))(
        sigma=0.5, num_samples=8
    )
    state = opt.init(PARAMS)
    updates, _ = opt.update(PARAMS, state, PARAMS, value_fn=loss)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.parametrize(
    "opt",
    [
        agsopt.sam(0.05),
        agsopt.sam(0.5, adaptive=True),
        agsopt.bsam(0.05, 0.02),
        agsopt.vsam(0.05, warmup_steps=2, window=4, var_blocks=2),
        agsopt.ags(0.1, 4),
    ],
    ids=["sam", "asam", "bsam", "vsam", "ags"],
)
def test_value_fn_with_aux_output_says_to_pass_the_loss_alone(opt):
    with_aux = lambda p: (loss(p), {"accuracy": jnp.ones(())})  # value_and_grad(has_aux=True)
    grads = jax.grad(loss)(PARAMS)
    with pytest.raises(TypeError, match=r"has_aux=True.*loss_fn\(p, batch\)\[0\]"):
        opt.update(grads, opt.init(PARAMS), PARAMS, value_fn=with_aux)
    with pytest.raises(TypeError, match="has_aux"):
        jax.jit(lambda s: opt.update(grads, s, PARAMS, value_fn=with_aux))(opt.init(PARAMS))
    # the advice works
    updates, _ = opt.update(grads, opt.init(PARAMS), PARAMS, value_fn=lambda p: with_aux(p)[0])
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


def _one_update(opt, grads):
    return opt.update(grads, opt.init(PARAMS), PARAMS, value_fn=loss)[0]


@pytest.mark.parametrize(
    "piece",
    [lambda: agsopt.ags(0.3, 8, key=1), lambda: agsopt.sam(0.05)],
    ids=["ags", "sam"],
)
def test_clipping_before_the_piece_is_a_no_op_and_after_it_clips(piece):
    """What the README says: ``ags`` ignores its incoming updates and ``sam`` normalizes
    them, so a clip in front of either changes nothing; clip after them."""
    grads = jax.tree.map(lambda g: 100.0 * g, jax.grad(loss)(PARAMS))  # a clip would bite
    plain = _one_update(optax.chain(piece(), optax.sgd(1.0)), grads)
    before = _one_update(
        optax.chain(optax.clip_by_global_norm(1e-3), piece(), optax.sgd(1.0)), grads
    )
    after = _one_update(
        optax.chain(piece(), optax.clip_by_global_norm(1e-3), optax.sgd(1.0)), grads
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), before, plain)
    norm = np.sqrt(sum(float(jnp.sum(u**2)) for u in jax.tree.leaves(after)))
    assert norm == pytest.approx(1e-3, rel=1e-4)
    assert np.sqrt(sum(float(jnp.sum(u**2)) for u in jax.tree.leaves(plain))) > 1e-2


@pytest.mark.parametrize("alias", [agsopt.ags_adam, agsopt.igs_adam])
def test_positional_smoothing_arguments_reach_adam_and_are_refused(alias):
    """``ags_adam(lr, σ, N)`` would set Adam's b1 and b2: b2 = 64 is refused by name."""
    with pytest.raises(ValueError, match=r"b2 must lie in \[0, 1\)"):
        alias(0.01, 0.5, 64)
    with pytest.raises(ValueError, match="b1"):
        alias(0.01, 1.5)
    with pytest.raises(ValueError, match="momentum"):
        agsopt.ags_sgd(0.01, 2.0)


@pytest.mark.parametrize(
    "alias",
    [
        agsopt.ags_gd,
        agsopt.ags_sgd,
        agsopt.ags_adam,
        agsopt.igs_gd,
        agsopt.igs_sgd,
        agsopt.igs_adam,
    ],
)
def test_alias_docstrings_say_how_to_call_them(alias):
    doc = alias.__doc__
    for needed in ("value_fn", "sigma", "num_samples", "keyword-only", "Example::"):
        assert needed in doc, (alias.__name__, needed)


def test_injected_box_of_dgs_blackbox_names_static_args():
    """The box is read when dgs_blackbox is built; injected, it is traced in update."""
    ints = ("num_nodes", "lateral_nodes", "restarts")
    opt = optax.inject_hyperparams(agsopt.dgs_blackbox, static_args=ints)(lower=-1.0, upper=1.0)
    x = jnp.ones(3)
    state = opt.init(x)
    with pytest.raises(TypeError, match=r"static_args=\('lower', 'upper'"):
        jax.jit(lambda s: opt.update(x, s, x, value_fn=jnp.sum))(state)
    fixed = optax.inject_hyperparams(agsopt.dgs_blackbox, static_args=("lower", "upper", *ints))(
        lower=-1.0, upper=1.0
    )
    updates, _ = jax.jit(lambda s: fixed.update(x, s, x, value_fn=jnp.sum))(fixed.init(x))
    assert bool(jnp.all(jnp.isfinite(updates)))
