"""Search directions for the Monte Carlo smoothing estimator.

Direction n is one standard normal vector of length d = Σ leaf sizes,
``normal(fold_in(key, n), (d,))``; split it into the parameters' leaves with
:func:`agsopt.tree_utils.tree_unflatten_vector`. ``orthogonal=True`` takes the same i.i.d.
directions and orthogonalizes them within blocks of ``b ≤ d`` rows, each keeping its length
(Choromanski et al., arXiv:1804.02395), so every direction is still marginally N(0, I).

Orthogonal blocks. With G a b × d block of the i.i.d. directions (rows g_j) and G = LQ its
LQ factorization (``diag(L) > 0``), direction j becomes ``u_j = q_j ‖g_j‖``. Q's rows are
the Gram–Schmidt of G's rows, Haar-distributed on the Stiefel manifold; since G ↦ GO (O
orthogonal) leaves G's law and the Gram matrix GGᵀ = LLᵀ unchanged and maps Q to QO, Q is
independent of GGᵀ, hence of the norms ‖g_j‖ = √(GGᵀ)_jj, which are i.i.d. χ_d. So u_j is a
uniform direction times an independent χ_d length: N(0, I_d).

Q is computed without Householder QR, by block Gram–Schmidt in stages: a stage of k rows
starting at row s is projected against the rows before it (twice once d − s ≤ d/2, where
the projected rows are short next to the rounding left along the basis), normalized, and
orthonormalized by a Cholesky-QR step ``q ← L⁻¹ q`` with ``L Lᵀ = q qᵀ`` (two steps where
d − s − k < 8), which is the same Gram–Schmidt in exact arithmetic. A stage takes
``k ≤ (d − s)/2`` rows and at most ``STAGE_ROWS``, so its projected rows form a
Gaussian k × (d − s) block in the orthogonal complement of the rows before, with condition
number about (√(d−s) + √k)/(√(d−s) − √k) ≤ 5.8: one Cholesky-QR step leaves the rows
orthonormal to ~1e-6 in float32 (a square 100 × 100 block takes stages of 50, 25, 12, 6,
3, 2, 1, 1 rows). ``L⁻¹`` is read off one Cholesky factorization of the bordered matrix
``[[qqᵀ, I], [I, cI]]``, whose lower-left block is ``L⁻ᵀ`` (its Schur complement
``cI − (qqᵀ)⁻¹`` is positive definite for ``c = 2⁴⁰``). Why: on CPU jaxlib runs QR and
triangular solves through OpenBLAS, whose worker threads fight XLA's own on a busy machine
(one 100 × 100 QR took 0.4–47 ms under load, the orthogonal estimator 20–330× the i.i.d.
one); a Cholesky factorization of at most 2·``STAGE_ROWS`` rows stays on OpenBLAS's
single-threaded path, and the rest is matmuls.
"""

from __future__ import annotations

import weakref
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agsopt import _validation as validation

__all__ = [
    "DEFAULT_TABLE_SIZE",
    "STAGE_ROWS",
    "TABLE_BIAS_LIMIT",
    "make_noise_table",
    "minimum_table_size",
    "orthonormal_rows",
    "sample_directions",
    "table_bias",
]

STAGE_ROWS = 64
"""Rows per Cholesky-QR stage at most (the bordered Cholesky factorization is 2·64 wide)."""
_BORDER = 2.0**40  # c in [[W, I], [I, cI]]: above ‖W⁻¹‖ for any unit-diagonal W not singular


def _iid_directions(key: jax.Array, dim: int, start: jax.Array, count: int, dtype) -> jax.Array:
    """Directions ``start … start + count − 1``: row n is ``normal(fold_in(key, n), (d,))``."""
    draw = lambda n: jax.random.normal(jax.random.fold_in(key, n), (dim,), dtype)
    return jax.vmap(draw)(start + jnp.arange(count))


TABLE_BIAS_LIMIT = 0.1
"""The largest relative bias :func:`check_noise_table` accepts from a noise table of L
numbers for d parameters: ``√((d + 1)/(L − d + 1)) ≤ 0.1``, i.e. ``L ≥ 100(d + 1) + d − 1``
(:func:`minimum_table_size`; the bias is derived in :func:`sample_directions`)."""
DEFAULT_TABLE_SIZE = 1 << 22
"""The smallest table :func:`make_noise_table` draws: 2²² numbers (16 MiB in float32), enough
for d ≤ 41,526 parameters; a larger d gets :func:`minimum_table_size` numbers."""
_SLICES_PER_PARAMETER = 100  # (1 / TABLE_BIAS_LIMIT)², as an exact integer
_MOMENT_TOLERANCE = 6.0  # standard errors a genuine standard normal table stays within
_CHECK_BLOCK = 1 << 20  # table entries the content check converts to float32 at a time


def table_bias(size: int, dim: int) -> float:
    """The relative bias ``√((d + 1)/(L − d + 1))`` of a table of L numbers for d parameters
    (∞ if ``L < d``): the root mean square of ``‖(Ĉ − I)a‖/‖a‖`` over tables and over
    directions a of the gradient (derivation in :func:`sample_directions`)."""
    slices = size - dim + 1
    return float("inf") if slices < 1 else ((dim + 1) / slices) ** 0.5


def minimum_table_size(dim: int) -> int:
    """The fewest numbers a noise table for d parameters may hold: ``100(d + 1) + d − 1``, the
    smallest L with :func:`table_bias` ``≤ TABLE_BIAS_LIMIT = 0.1``."""
    return _SLICES_PER_PARAMETER * (dim + 1) + dim - 1


def make_noise_table(
    key: jax.Array, size: int | None = None, dtype: Any = jnp.float32, *, dim: int | None = None
) -> jax.Array:
    """A shared noise table ``normal(key, (L,))`` for ``noise_table``, drawn once and reused
    across steps (arXiv:1703.03864, §2.1).

    Args:
      key: a JAX PRNG key.
      size: L, the number of entries. ``None`` (default): sized from ``dim``,
        ``max(2²², minimum_table_size(dim))`` (16 MiB in float32 up to d = 41,526, about
        ``101 d`` numbers above: 385 MiB at d = 10⁶), or 2²² when ``dim`` is not given either.
      dtype: the table's floating dtype.
      dim: d, the number of parameters the table will serve (``tree_size(params)``).
    """
    if dim is not None and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
        raise ValueError(f"make_noise_table: dim must be a positive int, got {dim!r}")
    if size is None:
        size = DEFAULT_TABLE_SIZE
        if dim is not None:
            size = max(size, minimum_table_size(dim))
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"make_noise_table: size must be a positive int, got {size!r}")
    return jax.random.normal(key, (size,), dtype)


def _table_directions(
    table: jax.Array, key: jax.Array, dim: int, start: jax.Array, count: int, dtype
) -> jax.Array:
    """Row n is ``table[o_n : o_n + d]`` with ``o_n = randint(fold_in(key, n), 0, L − d + 1)``."""
    span = table.shape[0] - dim + 1
    offset = lambda n: jax.random.randint(jax.random.fold_in(key, n), (), 0, span)
    offsets = jax.vmap(offset)(start + jnp.arange(count))
    rows = jax.vmap(lambda o: jax.lax.dynamic_slice_in_dim(table, o, dim))(offsets)
    return rows.astype(dtype)


def _table_moments(table: np.ndarray) -> tuple[bool, float, float, float, float]:
    """``(all finite, mean, E t², E t⁴, E t_i t_{i+1})`` of a concrete table: float32
    pairwise sums over blocks of ``_CHECK_BLOCK`` entries, accumulated in float64."""
    table = np.asarray(table)  # one transfer (none for a CPU array)
    size = table.shape[0]
    sums, last = np.zeros(4), None
    for start in range(0, size, _CHECK_BLOCK):
        block = table[start : start + _CHECK_BLOCK].astype(np.float32)
        if not np.all(np.isfinite(block)):
            return False, 0.0, 0.0, 0.0, 0.0
        squares = block * block
        joined = block if last is None else np.concatenate([last, block])
        products = joined[:-1] * joined[1:]
        sums += [block.sum(), squares.sum(), (squares * squares).sum(), products.sum()]
        last = block[-1:]
    mean, second, fourth, lagged = sums / [size, size, size, size - 1]
    return True, float(mean), float(second), float(fourth), float(lagged)


# Concrete jax tables whose contents passed, by id (a jax.Array is immutable): the estimator
# checks its table at every trace, and a 2²² table takes ~0.1 s.
_CHECKED: dict[int, weakref.ref] = {}


def _check_table_contents(noise_table: Any, owner: str) -> None:
    """``ValueError`` naming ``noise_table`` unless a concrete table is finite and roughly
    standard normal: its mean, E t², kurtosis E t⁴/(E t²)² and lag-1 correlation each within
    6 standard errors of 0, 1, 3 and 0 (standard errors 1, √2, √24 and 1 over √L). Catches a
    NaN, a zero, a scaled, a uniform or a sorted table; a traced table passes unchecked."""
    if not validation.is_concrete(noise_table):
        return
    seen = _CHECKED.get(id(noise_table))
    if seen is not None and seen() is noise_table:
        return
    size = noise_table.shape[0]
    finite, mean, second, fourth, lagged = _table_moments(noise_table)
    if not finite:
        raise ValueError(f"{owner}: noise_table has non-finite entries (NaN or inf)")
    bound = _MOMENT_TOLERANCE / size**0.5
    kurtosis = fourth / second**2 if second > 0 else float("nan")
    problems = {
        "mean": (mean, 0.0, bound),
        "E t²": (second, 1.0, 2**0.5 * bound),
        "kurtosis E t⁴/(E t²)²": (kurtosis, 3.0, 24**0.5 * bound),
        "lag-1 correlation": (lagged, 0.0, bound),
    }
    for name, (value, target, tolerance) in problems.items():
        if not abs(value - target) <= tolerance:
            raise ValueError(
                f"{owner}: noise_table must hold standard normal numbers (e.g. "
                f"agsopt.smoothing.make_noise_table(key, dim=d)); its {name} is {value:.4g}, "
                f"expected {target:g} ± {tolerance:.2g} for {size} numbers"
            )
    if isinstance(noise_table, jax.Array):
        key = id(noise_table)
        try:
            _CHECKED[key] = weakref.ref(noise_table, lambda _: _CHECKED.pop(key, None))
        except TypeError:  # an array type without weak references: checked every time
            pass


def check_noise_table(
    noise_table: Any, dim: int | None, owner: str = "sample_directions", *, contents: bool = True
) -> None:
    """Check a noise table: a 1-D real floating array (``TypeError``/``ValueError`` naming
    ``noise_table``); with ``dim``, long enough for d parameters, ``L ≥ minimum_table_size(d)``
    (a relative bias ≤ 0.1, see :func:`table_bias`); with ``contents`` and a concrete table,
    finite and roughly standard normal (mean, variance, kurtosis, lag-1 correlation)."""
    shape = getattr(noise_table, "shape", None)
    dtype = getattr(noise_table, "dtype", None)
    if shape is None or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{owner}: noise_table must be a floating array, got {noise_table!r}")
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(f"{owner}: noise_table must be 1-D with at least 2 entries, got {shape}")
    if dim is not None and shape[0] < minimum_table_size(dim):
        raise ValueError(
            f"{owner}: noise_table of L = {shape[0]} numbers is too short for d = {dim} "
            f"parameters: given the table the estimate's mean is off by about "
            f"√((d + 1)/(L − d + 1)) = {table_bias(shape[0], dim):.2g} of the gradient's norm "
            f"(the slices span at most L − d + 1 directions); a bias ≤ {TABLE_BIAS_LIMIT} needs "
            f"at least {minimum_table_size(dim)} numbers: "
            f"agsopt.smoothing.make_noise_table(key, dim={dim})"
        )
    if contents:
        _check_table_contents(noise_table, owner)


def _dot(a: jax.Array, b: jax.Array) -> jax.Array:
    # Full float32 products: a GPU's default (TF32) would leave rows orthogonal to ~1e-3 only.
    return jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)


def _inverse_cholesky(gram: jax.Array) -> jax.Array:
    """``L⁻¹`` for ``gram = L Lᵀ`` (unit diagonal, positive definite), lower triangular.

    The Cholesky factor of ``[[W, I], [I, cI]]`` is ``[[L, 0], [L⁻ᵀ, chol(cI − W⁻¹)]]``.
    """
    size = gram.shape[-1]
    eye = jnp.eye(size, dtype=gram.dtype)
    bordered = jnp.block([[gram, eye], [eye, _BORDER * eye]])
    return jnp.linalg.cholesky(bordered)[size:, :size].T


def _stage_sizes(rows: int, dim: int) -> list[int]:
    """Rows per stage: ``k = min(rows left, STAGE_ROWS, max(1, (d − s) // 2))`` from row s."""
    sizes, done = [], 0
    while done < rows:
        size = min(rows - done, STAGE_ROWS, max(1, (dim - done) // 2))
        sizes.append(size)
        done += size
    return sizes


def orthonormal_rows(gaussian: jax.Array) -> jax.Array:
    """Q of the LQ factorization ``G = LQ`` (``diag(L) > 0``) of a ``b × d`` block, b ≤ d.

    Block Gram–Schmidt in stages of Cholesky-QR (see the module doc); rows orthonormal to
    about 1e-6 in float32 for Gaussian G (a stage's rows are well conditioned by
    construction; a general ill-conditioned G is not this function's job).
    """
    rows, dim = gaussian.shape
    if rows > dim:
        raise ValueError(f"orthonormal_rows needs at most d = {dim} rows, got {rows}")
    done: list[jax.Array] = []
    offset = 0
    for size in _stage_sizes(rows, dim):
        stage = gaussian[offset : offset + size]
        if done:
            basis = done[0] if len(done) == 1 else jnp.concatenate(done)
            # Twice once the complement is at most half of R^d: the projected rows are then
            # short next to the rounding left along the basis ("twice is enough").
            for _ in range(2 if 2 * (dim - offset) <= dim else 1):
                stage = stage - _dot(_dot(stage, basis.T), basis)
        stage = stage * jax.lax.rsqrt(jnp.sum(stage * stage, axis=1, keepdims=True))
        # One Cholesky-QR step; two where the stage is nearly square in its complement
        # (a k × m Gaussian with m − k < 8 has a heavy-tailed condition number).
        for _ in range(0 if size == 1 else 2 if dim - offset - size < 8 else 1):
            stage = _dot(_inverse_cholesky(_dot(stage, stage.T)), stage)
        done.append(stage)
        offset += size
    return done[0] if len(done) == 1 else jnp.concatenate(done)


def _orthogonalize(gaussian: jax.Array) -> jax.Array:
    """The ``(count, d)`` rows of ``gaussian``, orthogonalized in blocks of
    ``b = min(d, count)`` rows, each keeping its length: row j of a block is ``q_j ‖g_j‖``.

    Every block goes through one batched computation, never two at once: a last, partial
    block of r < b rows is completed to b rows with rows of the first block (independent of
    it) and only its first r rows are kept. The first r rows of Q depend on the first r rows
    of G alone, so they are exactly the LQ factor of the r rows. (Two batched LAPACK
    factorizations that XLA may run concurrently deadlocked on a 2-core CPU, jaxlib 0.10.2,
    once the directions were ``vmap``-ped over keys.)
    """
    # Stored once: XLA on CPU would otherwise redo the normal transform in each consumer.
    gaussian = jax.lax.optimization_barrier(gaussian)
    count, dim = gaussian.shape
    norms = jnp.sqrt(jnp.sum(gaussian * gaussian, axis=1, keepdims=True))
    block = min(dim, count)
    num_blocks, rest = -(-count // block), count % block
    padded = gaussian
    if rest:
        padded = jnp.concatenate([gaussian, gaussian[: block - rest]])
    blocks = padded.reshape(num_blocks, block, dim)
    rows = jax.vmap(orthonormal_rows)(blocks).reshape(num_blocks * block, dim)[:count]
    return rows * norms


def sample_directions(
    key: jax.Array,
    dim: int,
    start: int | jax.Array,
    count: int,
    *,
    orthogonal: bool = False,
    dtype: Any = jnp.float32,
    noise_table: jax.Array | None = None,
) -> jax.Array:
    """The directions u_start … u_{start+count−1} the estimator draws, as ``(count, d)`` rows.

    Split a row into the parameters' leaves with
    :func:`agsopt.tree_utils.tree_unflatten_vector`. With ``orthogonal``, ``start`` and
    ``count`` are one chunk's: the same i.i.d. rows, orthogonalized within blocks of
    ``min(d, count)`` rows, each keeping its length.

    ``noise_table`` (a 1-D array of L standard normals,
    :func:`~agsopt.smoothing.directions.make_noise_table`): row n is the slice
    ``table[o_n : o_n + d]`` at a random offset ``o_n`` drawn from ``fold_in(key, n)``, one
    random integer per direction instead of d normals (arXiv:1703.03864). The price: given
    the table, E[u uᵀ] is the table's lagged second moment Ĉ = (1/K) Σ_o t_o t_oᵀ over the
    K = L − d + 1 slices t_o, not I, so for linear f (and to first order in Σ for smooth f)
    the estimate's mean is Ĉ a, not a. Ĉ is symmetric positive semidefinite of rank ≤ K: a
    fixed preconditioner, singular (the run stalls along its null space) when K < d.
    Averaged over tables, with Ĉ_ij − δ_ij = (1/K) Σ_o (t_{o+i} t_{o+j} − δ_ij) and Isserlis'
    theorem,

        E‖(Ĉ − I)a‖² = [(d + 1)‖a‖² + Σ_i Σ_{j≠i} (1 − |i − j|/K)₊ a_j a_{2i−j}] / K,

    whose second term averages to zero over directions of a: the relative bias is about
    ``√((d + 1)/(L − d + 1))`` (:func:`table_bias`; 0.56 at d = 10⁶, L = 2²²), and a few times
    more along the worst direction (‖Ĉ − I‖₂ is 2.5–3× it at d = 100–400, measured). Tables
    shorter than :func:`minimum_table_size` (bias > 0.1) are refused. Two directions whose
    offsets are closer than d share numbers and are correlated (probability ≈ 2d/L per pair).
    """
    start = jnp.asarray(start, jnp.int32)
    if noise_table is None:
        rows = _iid_directions(key, dim, start, count, dtype)
    else:
        check_noise_table(noise_table, dim)
        rows = _table_directions(noise_table, key, dim, start, count, dtype)
    return _orthogonalize(rows) if orthogonal else rows
