"""Checkpoint and resume: every optimizer state serializes, and a resumed run is bit-identical.

States hold plain arrays only (the PRNG key as raw ``uint32`` key data), so
``flax.serialization.to_bytes``/``from_bytes`` and ``msgpack_serialize``/``msgpack_restore``
(through ``to_state_dict``/``from_state_dict``) round-trip them. A run interrupted after k
steps, written to bytes, restored into the state of a freshly built optimizer and continued
gives exactly (``array_equal``) the parameters and state of the uninterrupted run on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

import agsopt
from agsopt.sharpness import ausam

NUM_EXAMPLES, BATCH, STEPS, INTERRUPT = 16, 8, 6, 3
_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.normal(size=(NUM_EXAMPLES, 4)), jnp.float32)
Y = jnp.asarray(_rng.normal(size=(NUM_EXAMPLES,)), jnp.float32)
PARAMS = {
    "w": jnp.asarray(_rng.normal(size=(4, 3)) / 2, jnp.float32),
    "head": [jnp.asarray(_rng.normal(size=(3,)), jnp.float32), jnp.float32(0.1)],
}
# the batches of each step: dataset ids (a fixed shuffle per epoch)
BATCH_IDS = [
    np.random.default_rng(100 + step // 2).permutation(NUM_EXAMPLES)[
        (step % 2) * BATCH : (step % 2 + 1) * BATCH
    ]
    for step in range(STEPS)
]


def per_example_loss(p, x, y):
    return (jnp.tanh(x @ p["w"]) @ p["head"][0] + p["head"][1] - y) ** 2


def loss(p, x, y):
    return jnp.mean(per_example_loss(p, x, y))


OPTIMIZERS = {
    "ags isotropic + sgd": lambda: optax.chain(
        agsopt.ags(0.2, 8, covariance="isotropic", key=1), optax.sgd(0.05, momentum=0.9)
    ),
    "ags gradient_aligned + adam": lambda: optax.chain(
        agsopt.ags(0.2, 8, covariance="gradient_aligned", key=2), optax.adam(0.05)
    ),
    "ags adaptive_diagonal forward + sgd": lambda: optax.chain(
        agsopt.ags(
            optax.exponential_decay(0.2, 2, 0.5),
            6,
            covariance="adaptive_diagonal",
            method="forward",
            chunk_size=4,
            key=3,
        ),
        optax.sgd(0.05),
    ),
    "sam + sgd": lambda: optax.chain(agsopt.sam(0.05), optax.sgd(0.1, momentum=0.9)),
    "asam + adam": lambda: optax.chain(agsopt.sam(0.5, adaptive=True), optax.adam(0.05)),
    "bsam + adam": lambda: optax.chain(agsopt.bsam(0.05, 0.02), optax.adam(0.05)),
    "vsam + adam": lambda: optax.chain(
        agsopt.vsam(0.05, window=2, var_blocks=1, warmup_steps=2, reuse_steps=2, key=4),
        optax.adam(0.05),
    ),
    "ausam + sgd": lambda: optax.chain(
        ausam(NUM_EXAMPLES, 0.05, steps_per_epoch=2, alpha=0.5, key=5),
        optax.sgd(0.1, momentum=0.9),
    ),
}


def _step_fn(name):
    opt = OPTIMIZERS[name]()

    def step(params, state, ids):
        x, y = X[ids], Y[ids]
        if name.startswith("ausam"):

            def per_example_loss_fn(p, positions):
                return per_example_loss(p, x[positions], y[positions])

            updates, state = opt.update(
                None, state, params, per_example_loss_fn=per_example_loss_fn, ids=ids
            )
        else:
            grads = jax.grad(loss)(params, x, y)
            updates, state = opt.update(grads, state, params, value_fn=lambda p: loss(p, x, y))
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


@functools.cache
def _runs(name):
    """The uninterrupted run, and the run resumed from bytes after INTERRUPT steps."""
    step = _step_fn(name)
    params, state = PARAMS, OPTIMIZERS[name]().init(PARAMS)
    trajectory = []
    for ids in BATCH_IDS:
        params, state = step(params, state, jnp.asarray(ids))
        trajectory.append((params, state))

    checkpoint = serialization.to_bytes(
        {"params": trajectory[INTERRUPT - 1][0], "opt_state": trajectory[INTERRUPT - 1][1]}
    )
    # as in a new process, a freshly built optimizer provides the template
    template = {"params": PARAMS, "opt_state": OPTIMIZERS[name]().init(PARAMS)}
    restored = serialization.from_bytes(template, checkpoint)
    params, state = restored["params"], restored["opt_state"]
    for ids in BATCH_IDS[INTERRUPT:]:
        params, state = step(params, state, jnp.asarray(ids))
    return trajectory, (params, state)


def assert_trees_identical(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)  # NaN == NaN here, bit for bit otherwise


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_state_round_trips_through_bytes_and_msgpack(name):
    trajectory, _ = _runs(name)
    template = OPTIMIZERS[name]().init(PARAMS)
    for _, state in (trajectory[0], trajectory[-1]):
        assert_trees_identical(
            serialization.from_bytes(template, serialization.to_bytes(state)), state
        )
        packed = serialization.msgpack_serialize(serialization.to_state_dict(state))
        restored = serialization.from_state_dict(template, serialization.msgpack_restore(packed))
        assert_trees_identical(restored, state)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_resumed_run_is_bit_identical(name):
    trajectory, (params, state) = _runs(name)
    final_params, final_state = trajectory[-1]
    assert_trees_identical(params, final_params)
    assert_trees_identical(state, final_state)
    assert not np.array_equal(np.asarray(final_params["w"]), np.asarray(PARAMS["w"]))


@pytest.mark.parametrize("name", ["ags isotropic + sgd", "vsam + adam", "ausam + sgd"])
def test_states_hold_raw_key_data(name):
    """Raw ``uint32`` key data, not typed keys (which msgpack cannot store)."""
    _, (_, state) = _runs(name)
    keys = [s.key for s in state if hasattr(s, "key")]
    assert keys and all(np.asarray(k).dtype == np.uint32 for k in keys)
    for leaf in jax.tree.leaves(state):
        assert not jnp.issubdtype(jnp.asarray(leaf).dtype, jax.dtypes.prng_key)


WRAPPERS = {
    "ags fixed_diagonal + sgd": lambda: optax.chain(
        agsopt.ags(
            0.2,
            4,
            covariance=agsopt.covariance_rules.fixed_diagonal(
                jax.tree.map(lambda x: jnp.full(jnp.shape(x), 0.5), PARAMS)
            ),
        ),
        optax.sgd(0.1),
    ),
    "inject_hyperparams(ags)": lambda: optax.inject_hyperparams(
        agsopt.ags, static_args=("num_samples",)
    )(sigma=0.2, num_samples=4),
    "inject_hyperparams(sam)": lambda: optax.inject_hyperparams(agsopt.sam)(rho=0.05),
    "apply_if_finite(sam)": lambda: optax.apply_if_finite(
        optax.chain(agsopt.sam(0.05), optax.sgd(0.1)), 3
    ),
    "MultiSteps(bsam)": lambda: optax.MultiSteps(
        optax.chain(agsopt.bsam(0.05), optax.adam(0.1)), 2
    ),
}


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_more_states_round_trip(name):
    opt = WRAPPERS[name]()
    x, y = X[:BATCH], Y[:BATCH]
    state = opt.init(PARAMS)
    update = jax.jit(lambda g, s, p: opt.update(g, s, p, value_fn=lambda q: loss(q, x, y)))
    for _ in range(2):
        _, state = update(jax.grad(loss)(PARAMS, x, y), state, PARAMS)
    template = WRAPPERS[name]().init(PARAMS)
    assert_trees_identical(serialization.from_bytes(template, serialization.to_bytes(state)), state)
    packed = serialization.msgpack_serialize(serialization.to_state_dict(state))
    restored = serialization.from_state_dict(template, serialization.msgpack_restore(packed))
    assert_trees_identical(restored, state)
