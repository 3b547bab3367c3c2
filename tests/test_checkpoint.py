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
from transformations import REGISTRY, Problem, cases, select

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


BASES = (lambda: optax.sgd(0.05, momentum=0.9), lambda: optax.adam(0.05))
ENTRIES = select(alias=False)  # the aliases are ags chained with a base: tests/test_registry.py
# by default the core entries and the gradient-aligned rule's state
DEFAULT = [e for e in ENTRIES if e.core] + [REGISTRY["ags gradient_aligned plain orthogonal"]]


def make(entry):
    """The entry (on this dataset) chained with a base optimizer, SGD or Adam in turn."""
    opt = entry.make(num_examples=NUM_EXAMPLES) if entry.factory is ausam else entry.make()
    if entry.final_updates:  # it wraps its base optimizer
        return opt
    return optax.chain(opt, BASES[ENTRIES.index(entry) % 2]())


def problem(ids):
    x, y = X[ids], Y[ids]
    return Problem(
        value_fn=lambda p: loss(p, x, y),
        per_example_loss_fn=lambda p, positions: per_example_loss(p, x[positions], y[positions]),
        ids=ids,
    )


def _step_fn(entry):
    opt = make(entry)

    def step(params, state, ids):
        updates, state = entry.update(opt, None, state, params, problem(ids))
        return optax.apply_updates(params, updates), state

    return jax.jit(step)


@functools.cache
def _runs(entry):
    """The uninterrupted run, and the run resumed from bytes after INTERRUPT steps."""
    step = _step_fn(entry)
    params, state = PARAMS, make(entry).init(PARAMS)
    trajectory = []
    for ids in BATCH_IDS:
        params, state = step(params, state, jnp.asarray(ids))
        trajectory.append((params, state))

    checkpoint = serialization.to_bytes(
        {"params": trajectory[INTERRUPT - 1][0], "opt_state": trajectory[INTERRUPT - 1][1]}
    )
    # as in a new process, a freshly built optimizer provides the template
    template = {"params": PARAMS, "opt_state": make(entry).init(PARAMS)}
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


@pytest.mark.parametrize("entry", cases(ENTRIES, default=DEFAULT))
def test_state_round_trips_through_bytes_and_msgpack(entry):
    trajectory, _ = _runs(entry)
    template = make(entry).init(PARAMS)
    for _, state in (trajectory[0], trajectory[-1]):
        assert_trees_identical(
            serialization.from_bytes(template, serialization.to_bytes(state)), state
        )
        packed = serialization.msgpack_serialize(serialization.to_state_dict(state))
        restored = serialization.from_state_dict(template, serialization.msgpack_restore(packed))
        assert_trees_identical(restored, state)


@pytest.mark.parametrize("entry", cases(ENTRIES, default=DEFAULT))
def test_resumed_run_is_bit_identical(entry):
    trajectory, (params, state) = _runs(entry)
    final_params, final_state = trajectory[-1]
    assert_trees_identical(params, final_params)
    assert_trees_identical(state, final_state)
    assert not np.array_equal(np.asarray(final_params["w"]), np.asarray(PARAMS["w"]))


@pytest.mark.parametrize("entry", cases(select(alias=False, random=True), default=DEFAULT))
def test_states_hold_raw_key_data(entry):
    """Raw ``uint32`` key data, not typed keys (which msgpack cannot store)."""
    _, (_, state) = _runs(entry)
    states = (state,) if hasattr(state, "key") else state  # the entry alone or in a chain
    keys = [s.key for s in states if hasattr(s, "key")]
    assert keys and all(np.asarray(k).dtype == np.uint32 for k in keys)
    for leaf in jax.tree.leaves(state):
        assert not jnp.issubdtype(jnp.asarray(leaf).dtype, jax.dtypes.prng_key)


WRAPPERS = {  # name: (the registry entry inside, the wrapped optimizer)
    "ags fixed_diagonal + sgd": (
        "ags",
        lambda: optax.chain(
            REGISTRY["ags"].make(
                sigma=0.2,
                num_samples=4,
                covariance=agsopt.covariance_rules.fixed_diagonal(
                    jax.tree.map(lambda x: jnp.full(jnp.shape(x), 0.5), PARAMS)
                ),
            ),
            optax.sgd(0.1),
        ),
    ),
    "inject_hyperparams(ags)": (
        "ags",
        lambda: optax.inject_hyperparams(agsopt.ags, static_args=REGISTRY["ags"].static_args)(
            sigma=0.2, num_samples=4
        ),
    ),
    "inject_hyperparams(sam)": ("sam", lambda: optax.inject_hyperparams(agsopt.sam)(rho=0.05)),
    "apply_if_finite(sam)": (
        "sam",
        lambda: optax.apply_if_finite(optax.chain(REGISTRY["sam"].make(), optax.sgd(0.1)), 3),
    ),
    "MultiSteps(bsam)": (
        "bsam",
        lambda: optax.MultiSteps(optax.chain(REGISTRY["bsam"].make(), optax.adam(0.1)), 2),
    ),
}


@pytest.mark.parametrize("name", sorted(WRAPPERS))
def test_more_states_round_trip(name):
    entry_name, wrapped = WRAPPERS[name]
    entry, opt = REGISTRY[entry_name], wrapped()
    state = opt.init(PARAMS)
    ids = jnp.arange(BATCH)
    update = jax.jit(lambda s, p: entry.update(opt, None, s, p, problem(ids)))
    for _ in range(2):
        _, state = update(state, PARAMS)
    template = wrapped().init(PARAMS)
    assert_trees_identical(serialization.from_bytes(template, serialization.to_bytes(state)), state)
    packed = serialization.msgpack_serialize(serialization.to_state_dict(state))
    restored = serialization.from_state_dict(template, serialization.msgpack_restore(packed))
    assert_trees_identical(restored, state)
