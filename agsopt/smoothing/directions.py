"""Search directions for the Monte Carlo smoothing estimator.

Direction n is one standard normal vector of length d = Σ leaf sizes,
``normal(fold_in(key, n), (d,))``; split it into the parameters' leaves with
:func:`agsopt.tree_utils.tree_unflatten_vector`. ``orthogonal=True`` draws each block of
``b ≤ d`` directions orthogonal to each other with χ_d norms (Choromanski et al.,
arXiv:1804.02395), so every direction is still marginally N(0, I).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["sample_directions"]


def _iid_directions(key: jax.Array, dim: int, start: jax.Array, count: int, dtype) -> jax.Array:
    """Directions ``start … start + count − 1``: row n is ``normal(fold_in(key, n), (d,))``."""
    draw = lambda n: jax.random.normal(jax.random.fold_in(key, n), (dim,), dtype)
    return jax.vmap(draw)(start + jnp.arange(count))


def _cholesky_qr2(gaussian: jax.Array, gram: jax.Array) -> jax.Array:
    """Q of ``G = LQ``, ``diag(L) > 0``, for a wide ``b × d`` G (d ≥ 2b) with ``gram = GGᵀ``.

    Two rounds of ``Q ← chol(QQᵀ)^{-1} Q`` (CholeskyQR2): matmuls and b×b factorizations
    only. Its accuracy needs a well-conditioned G: a b × d Gaussian block with d ≥ 2b has
    condition number about (√d + √b)/(√d − √b) ≤ 5.8.
    """
    identity = jnp.eye(gaussian.shape[0], dtype=gaussian.dtype)
    q = gaussian
    for round_index in range(2):
        if round_index:
            gram = q @ q.T
        lower = jnp.linalg.cholesky(gram)
        q = jax.scipy.linalg.solve_triangular(lower, identity, lower=True) @ q
    return q


def _orthogonal_block(key: jax.Array, dim: int, size: int, dtype) -> jax.Array:
    """``size ≤ d`` mutually orthogonal rows, each marginally N(0, I_d).

    Row j is ``q_j ‖g_j‖`` with G = LQ (``diag(L) > 0``: Q is the Gram–Schmidt of G's rows,
    Haar-distributed) and ``‖g_j‖ = ‖L_j‖ ~ χ_d``, a function of L alone. Wide blocks
    (d ≥ 2b) use :func:`_cholesky_qr2`, squarer ones Householder QR of Gᵀ.
    """
    # Stored once: XLA on CPU would otherwise redo the normal transform in each consumer.
    gaussian = jax.lax.optimization_barrier(jax.random.normal(key, (size, dim), dtype))
    if dim >= 2 * size:
        gram = gaussian @ gaussian.T
        q = _cholesky_qr2(gaussian, gram)
        norms = jnp.sqrt(jnp.diagonal(gram))
    else:
        q, r = jnp.linalg.qr(gaussian.T)
        q = (q * jnp.sign(jnp.diagonal(r))).T
        norms = jnp.linalg.norm(gaussian, axis=1)
    return q * norms[:, None]


def _orthogonal_directions(
    key: jax.Array, dim: int, start: jax.Array, count: int, dtype
) -> jax.Array:
    """Blocks of ``b = min(d, count)`` orthogonal rows; block keys fold in their start.

    A last, partial block of r < b rows is the first r rows of a full block (the first r
    rows of Q depend on the first r rows of G alone, so they are distributed as the LQ of
    an r×d block): all blocks go through one batched factorization, never two at once
    (two concurrent batched LAPACK QRs deadlocked on a 2-core CPU, jaxlib 0.10.2).
    """
    block = min(dim, count)
    num_blocks = -(-count // block)
    starts = start + block * jnp.arange(num_blocks)
    draw = jax.vmap(lambda s: _orthogonal_block(jax.random.fold_in(key, s), dim, block, dtype))
    return draw(starts).reshape(num_blocks * block, dim)[:count]


def sample_directions(
    key: jax.Array,
    dim: int,
    start: int | jax.Array,
    count: int,
    *,
    orthogonal: bool = False,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """The directions u_start … u_{start+count−1} the estimator draws, as ``(count, d)`` rows.

    Split a row into the parameters' leaves with
    :func:`agsopt.tree_utils.tree_unflatten_vector`. With ``orthogonal``, ``start`` and
    ``count`` are one chunk's: its blocks are ``min(d, count)`` rows.
    """
    draw = _orthogonal_directions if orthogonal else _iid_directions
    return draw(key, dim, jnp.asarray(start, jnp.int32), count, dtype)
