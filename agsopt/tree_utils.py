"""Pytree arithmetic used across agsopt.

Every "vector" in this library is a pytree: inner products and norms run over all
leaves. Reductions are accumulated in float32 (or wider, if the leaves are wider) so
that bf16/f16 parameters neither underflow nor lose the norm, and results are cast back
to the leaves' dtypes where a pytree is returned.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any

__all__ = [
    "accumulation_dtype",
    "as_key",
    "key_for_state",
    "split_state_key",
    "state_key_copy",
    "statistics_dtype",
    "tree_add_scaled",
    "tree_all_finite",
    "tree_as_arrays",
    "tree_norm",
    "tree_normalize",
    "tree_scale",
    "tree_size",
    "tree_unflatten_vector",
    "tree_vdot",
]


def accumulation_dtype(dtype: Any) -> jnp.dtype:
    """The dtype reductions over leaves of ``dtype`` are carried out in (≥ float32; a NumPy
    float64 without x64 is float32, as JAX would make it, without its truncation warning)."""
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32))


def statistics_dtype(params: PyTree) -> jnp.dtype:
    """The float dtype of running statistics for ``params``: their float leaves' dtypes
    promoted with float32 (float64 for float64 parameters under x64)."""
    dtype = jnp.dtype(jnp.float32)
    for leaf in jax.tree.leaves(params):
        leaf_dtype = jnp.result_type(leaf)
        if jnp.issubdtype(leaf_dtype, jnp.floating):
            dtype = jnp.promote_types(dtype, leaf_dtype)
    return dtype


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """``Σ_leaves Σ_i a_i b_i``, accumulated in at least float32."""
    parts = [
        jnp.sum(x.astype(accumulation_dtype(x.dtype)) * y.astype(accumulation_dtype(y.dtype)))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    ]
    return sum(parts, jnp.zeros((), jnp.float32))


def tree_norm(tree: PyTree) -> jax.Array:
    """Euclidean norm over every leaf, ``sqrt(tree_vdot(tree, tree))``."""
    return jnp.sqrt(tree_vdot(tree, tree))


def tree_scale(scalar: jax.Array, tree: PyTree) -> PyTree:
    """``scalar · tree``, computed in float32 and cast back to each leaf's dtype."""
    return jax.tree.map(
        lambda x: (scalar * x.astype(accumulation_dtype(x.dtype))).astype(x.dtype), tree
    )


def tree_add_scaled(a: PyTree, scalar: jax.Array, b: PyTree) -> PyTree:
    """``a + scalar · b`` leafwise, in float32, cast back to the dtypes of ``a``."""
    return jax.tree.map(
        lambda x, y: (
            x.astype(accumulation_dtype(x.dtype)) + scalar * y.astype(accumulation_dtype(y.dtype))
        ).astype(x.dtype),
        a,
        b,
    )


def tree_normalize(tree: PyTree, eps: float = 1e-12) -> PyTree:
    """``tree / (‖tree‖ + eps)``: a unit pytree, or (nearly) zero for a zero tree."""
    return tree_scale(1.0 / (tree_norm(tree) + eps), tree)


def tree_size(tree: PyTree) -> int:
    """Total number of scalar entries over all leaves (static)."""
    return sum(int(jnp.size(x)) for x in jax.tree.leaves(tree))


def tree_as_arrays(tree: PyTree) -> PyTree:
    """``tree`` with its Python-number leaves (``2.0``, ``[1.0, 2.0]``) made JAX arrays;
    array leaves (JAX or NumPy) are kept as they are."""
    return jax.tree.map(lambda x: x if hasattr(x, "shape") else jnp.asarray(x), tree)


def tree_all_finite(tree: PyTree) -> jax.Array:
    """A boolean scalar: are all entries of every leaf finite?"""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


SEED_LIMIT = 2**64


def _seed_key(seed: int) -> jax.Array:
    """The typed key of an int seed in ``[0, 2**64)``, the same in float32 and x64 mode.

    Seeds below ``2**32`` give ``jax.random.key(seed)``. A larger seed keeps its high word
    instead of losing it (``jax.random.key`` truncates to 32 bits outside x64 mode, so
    ``2**40`` would alias ``0``): with the default threefry implementation its key data is
    ``[seed >> 32, seed & 0xffffffff]``, which is what ``jax.random.key(seed)`` gives in x64
    mode; with another implementation it is ``fold_in(key(seed & 0xffffffff), seed >> 32)``.
    """
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"key: an int seed must lie in [0, 2**64), got {seed}")
    high, low = divmod(seed, 2**32)
    typed = jax.random.key(low)
    if high == 0:
        return typed
    impl = jax.random.key_impl(typed)
    if str(impl) == "threefry2x32":
        return jax.random.wrap_key_data(jnp.asarray([high, low], jnp.uint32), impl=impl)
    return jax.random.fold_in(typed, high)


def _single_key(key: jax.Array, shape: tuple[int, ...], single: tuple[int, ...]) -> jax.Array:
    """``key`` itself if its shape is one key's (``single``), else a ``ValueError``: a batch
    of keys (``jax.random.split(key, n)``) is not one key."""
    if tuple(shape) != single:
        raise ValueError(
            f"key must be a single PRNG key, got a batch of keys of shape {tuple(shape)} "
            f"(one key has shape {single}); pass one of them, e.g. keys[0]"
        )
    return key


def as_key(key: int | jax.Array) -> jax.Array:
    """Accept an int seed in ``[0, 2**64)`` (also a 0-d integer array), a typed key or a raw
    ``uint32`` key. Distinct seeds give distinct keys (see :func:`_seed_key`); a negative or
    too large seed, or a batch of keys, is a ``ValueError``."""
    if isinstance(key, bool):
        raise TypeError("key must be an int seed or a JAX PRNG key, got bool")
    if isinstance(key, numbers.Integral):
        return _seed_key(int(key))
    dtype = getattr(key, "dtype", None)
    if dtype is not None:
        if jnp.issubdtype(dtype, jax.dtypes.prng_key):
            return _single_key(key, jnp.shape(key), ())
        if dtype == jnp.uint32 and jnp.shape(key)[-1:] == (2,):
            return jax.random.wrap_key_data(_single_key(key, jnp.shape(key), (2,)))
        if jnp.issubdtype(dtype, jnp.integer) and jnp.ndim(key) == 0:
            if not isinstance(key, jax.core.Tracer):
                return _seed_key(int(key))
            return jax.random.key(key)  # e.g. a seed turned into an array by inject_hyperparams
    raise TypeError(
        f"key must be an int seed or a JAX PRNG key, got {type(key).__name__} {dtype or ''}"
    )


def key_for_state(key: int | jax.Array) -> tuple[jax.Array, Any]:
    """Raw key data to keep in optimizer state, and the key's implementation.

    States hold ``jax.random.key_data(key)`` (plain ``uint32``), not a typed key, so that
    they serialize with ``flax.serialization`` and checkpoint like any array.
    """
    typed = as_key(key)
    return jax.random.key_data(typed), jax.random.key_impl(typed)


def state_key_copy(key_data: jax.Array) -> jax.Array:
    """A new buffer holding ``key_data``, for ``init`` to put in a state. A jitted step that
    donates the state (``donate_argnums``) deletes its buffers; were the state's key the
    transformation's own key array, the next ``init`` would find it deleted."""
    return jnp.array(key_data, copy=True)


def split_state_key(key_data: jax.Array, impl: Any) -> tuple[jax.Array, jax.Array]:
    """Split a state's raw key: ``(raw data of the next state key, typed key for this step)``."""
    next_key, step_key = jax.random.split(jax.random.wrap_key_data(key_data, impl=impl))
    return jax.random.key_data(next_key), step_key


def tree_unflatten_vector(vector: jax.Array, like: PyTree) -> PyTree:
    """Split a length-``tree_size(like)`` vector into leaves shaped like ``like``'s.

    The inverse of concatenating the raveled leaves in ``jax.tree.leaves`` order. Unlike
    ``jax.flatten_util.ravel_pytree``'s unravel it keeps the vector's dtype (directions drawn
    in float32 stay float32 for bfloat16 parameters).
    """
    leaves, treedef = jax.tree.flatten(like)
    pieces, offset = [], 0
    for leaf in leaves:
        size = int(jnp.size(leaf))
        pieces.append(vector[offset : offset + size].reshape(jnp.shape(leaf)))
        offset += size
    return jax.tree.unflatten(treedef, pieces)
