"""Donation: every transformation's state and the parameters donated to a jitted step.

``jax.jit(step, donate_argnums=(0, 1))`` (the parameters and the optimizer state) is the
usual training-loop idiom: XLA may reuse the donated buffers for the outputs, and deletes
them. It failed for AGS, vSAM and AUSAM (issue 18, item 8): ``init`` put one array in several
state fields ("donate the same buffer twice"), and the state's key was the transformation's
own key array, so that after a donated step the next ``init`` found it deleted.

For every registry entry (``tests/transformations.py``): two donated steps give, bit for bit,
the parameters and state of two steps without donation; the donated inputs are deleted (the
donation took place); and ``init`` afterwards returns the same state as before.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from transformations import REGISTRY, Problem, cases, representatives, select

X = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
PARAMS = {"w": jnp.asarray([0.3, -0.2, 0.5]), "b": jnp.asarray([0.1, -0.4])}


def per_example_loss_fn(p, positions):
    x = X[positions]
    return jnp.sum(jnp.tanh(x * p["w"]) ** 2, -1) + jnp.sum(x, -1) * p["b"][0] + p["b"][1] ** 2


PROBLEM = Problem(
    value_fn=lambda p: jnp.mean(per_example_loss_fn(p, jnp.arange(4))),
    per_example_loss_fn=per_example_loss_fn,
    ids=jnp.arange(4),
)
OVERRIDES = {"ausam": {"num_examples": 4}}
DEFAULT = [*representatives(), REGISTRY["ags_adam"]]


def fresh_params():
    return jax.tree.map(jnp.copy, PARAMS)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("entry", cases(select(), default=DEFAULT))
def test_donated_steps(entry):
    opt = entry.make(**OVERRIDES.get(entry.name, {}))

    def step(params, state):
        updates, state = entry.update(opt, None, state, params, PROBLEM)
        return optax.apply_updates(params, updates), state

    first_init = opt.init(fresh_params())
    plain = jax.jit(step)
    params, state = fresh_params(), opt.init(fresh_params())
    for _ in range(2):
        params, state = plain(params, state)

    donated = jax.jit(step, donate_argnums=(0, 1))
    donated_params, donated_state = fresh_params(), opt.init(fresh_params())
    inputs = jax.tree.leaves((donated_params, donated_state))
    with warnings.catch_warnings():  # "some donated buffers were not usable" is not a failure
        warnings.filterwarnings("ignore", message=".*donated buffers.*")
        for _ in range(2):
            donated_params, donated_state = donated(donated_params, donated_state)
    assert any(x.is_deleted() for x in inputs), "nothing was donated"
    assert_trees_equal(donated_params, params)
    assert_trees_equal(donated_state, state)
    # the transformation's own arrays (its key) were not handed over with the state
    assert_trees_equal(opt.init(fresh_params()), first_init)
