"""``ags`` and ``dgs`` inside ``optax.masked`` (agsopt.masking, shared with the SAM family).

A plain loss given the hidden ``optax.MaskedNode`` leaves failed inside the user's loss with
``unsupported operand type(s) for ** or pow(): 'MaskedNode' and 'int'``; it is now a
``TypeError`` naming ``fill_masked_params``. With the filler, the masked group's smoothed
gradient is exactly that of the group alone with the other leaves held fixed (same key,
same directions: the masked tree flattens to the group's leaves).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import agsopt

PARAMS = {"a": jnp.asarray([0.5, -1.0, 2.0]), "b": jnp.asarray([1.5, -0.5])}
MASK = {"a": True, "b": False}


def loss(q):
    return jnp.sum(jnp.cos(q["a"]) * q["a"] ** 2) + jnp.sum(q["b"] ** 2) * jnp.sum(q["a"])


PIECES = {
    "ags": lambda: agsopt.ags(0.3, 8, key=1),
    "dgs": lambda: agsopt.dgs(0.5, step="gradient", key=1),
}


@pytest.mark.parametrize("name", sorted(PIECES))
def test_a_plain_loss_under_masking_names_the_filler(name):
    opt = optax.masked(PIECES[name](), MASK)
    with pytest.raises(TypeError, match="fill_masked_params"):
        opt.update(PARAMS, opt.init(PARAMS), PARAMS, value_fn=loss)


@pytest.mark.parametrize("name", sorted(PIECES))
def test_a_filler_from_other_params_is_refused(name):
    opt = optax.masked(PIECES[name](), MASK)
    stale = jax.tree.map(lambda x: x + 1.0, PARAMS)
    with pytest.raises(ValueError, match="other parameters"):
        opt.update(
            PARAMS, opt.init(PARAMS), PARAMS, value_fn=agsopt.fill_masked_params(loss, stale)
        )


@pytest.mark.parametrize("name", sorted(PIECES))
def test_masked_group_gets_the_smoothed_gradient_of_the_group_alone(name):
    masked = optax.masked(PIECES[name](), MASK)

    @jax.jit
    def masked_step(params):
        filled = agsopt.fill_masked_params(loss, params)
        updates, _ = masked.update(params, masked.init(params), params, value_fn=filled)
        return updates

    alone = PIECES[name]()
    group = {"a": PARAMS["a"]}

    @jax.jit
    def alone_step(group):
        def group_loss(g):
            return loss({"a": g["a"], "b": PARAMS["b"]})

        updates, _ = alone.update(group, alone.init(group), group, value_fn=group_loss)
        return updates

    got, want = masked_step(PARAMS), alone_step(group)
    np.testing.assert_allclose(got["a"], want["a"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got["b"], PARAMS["b"])  # unmasked: passed through
