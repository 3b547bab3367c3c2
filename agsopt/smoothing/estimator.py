"""Monte Carlo estimates of a Gaussian-smoothed function and its gradient.

For ``u ~ N(0, I)`` and a smoothing matrix Σ (see :mod:`agsopt.covariance`),

    f_Σ(x) = E_u f(x + Σu),    ∇f_Σ(x) = E_u[f(x + Σu) Σ^{-T}u] = E_u[∇f(x + Σu)].

The estimators (all unbiased for ∇f_Σ; arXiv:2411.11747 §4, zero-order practice):

- ``"antithetic"`` (default): ``(1/N) Σ_n [f(x+Σu_n) − f(x−Σu_n)]/2 · Σ^{-T}u_n``, 2N evaluations;
- ``"forward"``: ``(1/N) Σ_n [f(x+Σu_n) − f(x)] Σ^{-T}u_n``, N + 1 evaluations;
- ``"plain"``: ``(1/N) Σ_n f(x+Σu_n) Σ^{-T}u_n``, N evaluations (high variance);
- ``"first_order"``: ``(1/N) Σ_n ∇f(x+Σu_n)``, N gradient evaluations (needs a differentiable f).

The zero-order forms never differentiate ``fun``: a black-box, non-differentiable function
works. Since Σ^{-T} is linear, it is applied once, to ``Σ_n w_n u_n``, not per sample.

Samples are evaluated with ``vmap`` in chunks of ``chunk_size`` inside a ``lax.scan``, so
memory is O(chunk_size · d) whatever ``num_samples`` is; by default the chunk is sized from
d and the backend (:func:`default_chunk_size`). Direction n is one normal vector of length
d = Σ leaf sizes, ``normal(fold_in(key, n), (d,))``, split into the leaves in
``jax.tree.leaves`` order: for i.i.d. sampling, chunked and unchunked runs give the same
estimate for the same key. Each chunk's directions are drawn once and stored (an
``optimization_barrier``), then read by the evaluations and by the sum ``Σ w_n u_n``.

``orthogonal=True`` draws the directions of each block of ``b = min(d, chunk)`` samples
orthogonal to each other (Choromanski et al., arXiv:1804.02395): with ``G = LQ`` the LQ
factorization of a b×d Gaussian block (rows g_j), ``u_j = q_j ‖g_j‖``, a Haar direction
times a χ_d norm that depends on L alone and so is independent of it. Each u_n is still
N(0, I), so the estimate stays unbiased, with lower variance. It costs an LQ factorization
of a b×d block, O(d b²), per block (CholeskyQR2 in matmuls for wide blocks). With the
default ``chunk_size`` a block spans min(d, N) directions and its evaluations run in
cache-sized pieces; with an explicit ``chunk_size`` the blocks follow the chunks.

Samples whose function values (or, first-order, gradients) are not finite are left out of
the average and counted in ``num_nonfinite``; if none is finite the gradient is zero.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from agsopt import _validation as validation
from agsopt.smoothing.covariance import SmoothingMatrix
from agsopt.smoothing.directions import sample_directions
from agsopt.tree_utils import tree_size, tree_unflatten_vector

PyTree = Any

__all__ = [
    "ACCELERATOR_CHUNK_FLOATS",
    "CPU_CHUNK_FLOATS",
    "METHODS",
    "SmoothedEstimate",
    "default_chunk_size",
    "evaluations_per_estimate",
    "sample_directions",
    "smoothed_grad",
    "smoothed_value_and_grad",
]

METHODS = ("antithetic", "forward", "plain", "first_order")
CPU_CHUNK_FLOATS = 1 << 16  # directions per chunk × d, see default_chunk_size
ACCELERATOR_CHUNK_FLOATS = 1 << 26


class SmoothedEstimate(NamedTuple):
    """A Monte Carlo estimate of ``f_Σ(x)`` and ``∇f_Σ(x)``.

    Attributes:
      value: mean of the finite function values at the sample points, an estimate of f_Σ(x).
      grad: the estimate of ∇f_Σ(x), a pytree with the dtypes of the parameters.
      num_evaluations: function (first-order: gradient) evaluations spent.
      num_nonfinite: samples left out because a value or gradient was not finite.
    """

    value: jax.Array
    grad: PyTree
    num_evaluations: jax.Array
    num_nonfinite: jax.Array


def evaluations_per_estimate(method: str, num_samples: int) -> int:
    """Function evaluations one estimate costs: 2N, N + 1, N or N (gradients)."""
    return {"antithetic": 2 * num_samples, "forward": num_samples + 1}.get(method, num_samples)


def _noise_dtype(params: PyTree) -> jnp.dtype:
    return jnp.result_type(jnp.float32, *[x.dtype for x in jax.tree.leaves(params)])


def default_chunk_size(
    dim: int, num_samples: int, *, orthogonal: bool = False, backend: str | None = None
) -> int:
    """The chunk size used when ``chunk_size`` is None.

    About ``2¹⁶`` floats of directions per chunk on CPU (256 KiB in float32: a chunk's
    directions and points stay in cache, which on CPU is worth more than a wider ``vmap``)
    and ``2²⁶`` (256 MiB) on GPU/TPU, where wide batches pay and only memory bounds them:
    ``min(N, max(1, budget // d))``. Orthogonal sampling keeps whole blocks,
    ``chunk ≥ min(d, N)``, so that the default never weakens the orthogonality.
    """
    backend = jax.default_backend() if backend is None else backend
    budget = CPU_CHUNK_FLOATS if backend == "cpu" else ACCELERATOR_CHUNK_FLOATS
    chunk = max(1, budget // max(dim, 1))
    if orthogonal:
        chunk = max(chunk, dim)
    return min(num_samples, chunk)


def _shift(params: PyTree, perturbation: PyTree, sign: float) -> PyTree:
    """``x + sign · Σu`` in the noise dtype, cast back to each parameter's dtype."""
    return jax.tree.map(
        lambda x, p: (x.astype(p.dtype) + sign * p).astype(x.dtype), params, perturbation
    )


def _chunk_sums(fun, params, matrix, flat_directions, method: str, base_value):
    """Sums over one chunk: (Σ w_n u_n or Σ ∇f, Σ values, number of finite samples).

    ``flat_directions`` is a ``(chunk, d)`` array, one direction per row.
    """
    directions = jax.vmap(lambda row: tree_unflatten_vector(row, params))(flat_directions)
    perturbations = jax.vmap(matrix.apply)(directions)
    value_dtype = _noise_dtype(params) if base_value is None else base_value.dtype

    def at(sign):
        return lambda p: jnp.asarray(fun(_shift(params, p, sign)), value_dtype)

    if method == "first_order":
        values, grads = jax.vmap(jax.value_and_grad(lambda p: fun(_shift(params, p, 1.0))))(
            perturbations
        )
        values = values.astype(value_dtype)
        finite_grads = [
            jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1) for g in jax.tree.leaves(grads)
        ]
        valid = jnp.isfinite(values) & jnp.all(jnp.stack(finite_grads), axis=0)
        vector = jax.tree.map(
            lambda g: jnp.sum(jnp.where(valid.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0), 0),
            grads,
        )
    else:
        if method == "antithetic":
            plus, minus = jax.vmap(lambda p: (at(1.0)(p), at(-1.0)(p)))(perturbations)
            weights, values = (plus - minus) / 2, (plus + minus) / 2
            valid = jnp.isfinite(plus) & jnp.isfinite(minus)
        else:
            values = jax.vmap(at(1.0))(perturbations)
            weights = values - base_value if method == "forward" else values
            valid = jnp.isfinite(weights)
        weights = jnp.where(valid, weights, 0.0).astype(flat_directions.dtype)
        # A weighted sum over the rows (not a matvec): XLA fuses it with the chunk's reads
        # and the running total.
        total = jnp.sum(weights[:, None] * flat_directions, axis=0)
        vector = tree_unflatten_vector(total, params)
    value_sum = jnp.sum(jnp.where(valid, values, 0.0))
    return vector, value_sum, jnp.sum(valid, dtype=jnp.int32)


def _sum_in_pieces(sums_of: Callable[[jax.Array, int], Any], total: int, piece: int) -> Any:
    """``Σ sums_of(offset, size)`` over pieces covering ``[0, total)``: the full pieces of
    ``piece`` in a ``lax.scan`` (one compiled body), then the remainder."""
    num_full, rest = divmod(total, piece)
    if num_full == 1:
        totals = sums_of(jnp.int32(0), piece)
    else:
        zeros = jax.eval_shape(lambda: sums_of(jnp.int32(0), piece))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zeros)

        def body(carry, offset):
            return jax.tree.map(jnp.add, carry, sums_of(offset, piece)), None

        offsets = piece * jnp.arange(num_full, dtype=jnp.int32)
        totals, _ = jax.lax.scan(body, zeros, offsets)
    if rest:
        totals = jax.tree.map(jnp.add, totals, sums_of(jnp.int32(num_full * piece), rest))
    return totals


def smoothed_value_and_grad(
    fun: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    matrix: SmoothingMatrix,
    *,
    num_samples: int = 16,
    method: str = "antithetic",
    orthogonal: bool = False,
    chunk_size: int | None = None,
    sample_sharding: jax.sharding.Sharding | None = None,
) -> SmoothedEstimate:
    """Estimate ``f_Σ(params)`` and ``∇f_Σ(params)`` by Monte Carlo (see the module doc).

    Args:
      fun: ``params -> scalar``; called on batches of points through ``vmap``. It need not be
        differentiable unless ``method="first_order"``.
      params: the point x, any pytree of float arrays.
      key: a JAX PRNG key (any implementation); sample n uses ``fold_in(key, n)`` (blocks
        fold in their first sample's index, if ``orthogonal``).
      matrix: Σ, e.g. ``agsopt.covariance.isotropic(0.1)``.
      num_samples: N, the number of directions u_n (antithetic pairs count once).
      method: one of ``"antithetic"``, ``"forward"``, ``"plain"``, ``"first_order"``.
      orthogonal: draw orthogonal directions within blocks of ``min(d, chunk)`` samples.
      chunk_size: samples evaluated per ``vmap`` call; memory is O(chunk_size · d) and the
        last chunk holds the remainder, so no evaluation is wasted. ``None`` (default):
        :func:`default_chunk_size` (about 2¹⁶ floats of directions per chunk on CPU, 2²⁶ on
        GPU/TPU), times the number of devices of ``sample_sharding``.
        ``chunk_size=num_samples`` evaluates all samples in one ``vmap``.
      sample_sharding: spread each chunk's samples over devices, e.g.
        ``NamedSharding(Mesh(jax.devices(), ("s",)), PartitionSpec("s"))``: the directions'
        leading (sample) axis is constrained to it and XLA partitions the evaluations and
        reduces the sums across devices. The random numbers do not depend on it, so the
        estimate equals the single-device one up to float summation order.

    Returns:
      A :class:`SmoothedEstimate`.
    """
    num_samples = validation.check_int("num_samples", num_samples, minimum=1)
    validation.check_choice("method", method, METHODS)
    dim = tree_size(params)
    if chunk_size is None:
        chunk = default_chunk_size(dim, num_samples, orthogonal=orthogonal)
        if sample_sharding is not None:  # a default-sized piece for every device
            chunk = min(num_samples, chunk * len(sample_sharding.device_set))
    else:
        chunk = min(validation.check_int("chunk_size", chunk_size, minimum=1), num_samples)
    noise_dtype = _noise_dtype(params)

    base_value = None
    if method == "forward":
        base_value = jnp.asarray(fun(params))
        base_value = base_value.astype(jnp.promote_types(base_value.dtype, jnp.float32))

    # Orthogonal blocks by default span min(d, N) directions; their evaluations then run
    # in cache-sized pieces (memory is O(block · d) for the block's directions either way).
    piece = None
    if orthogonal and chunk_size is None and sample_sharding is None:
        piece = default_chunk_size(dim, chunk)

    def sums_from(start, count):
        directions = sample_directions(
            key, dim, start, count, orthogonal=orthogonal, dtype=noise_dtype
        )
        # Stored once: XLA on CPU would otherwise redo the normal transform in each consumer.
        directions = jax.lax.optimization_barrier(directions)
        if sample_sharding is not None:
            directions = jax.lax.with_sharding_constraint(directions, sample_sharding)

        def sums_of_rows(offset, size):
            rows = jax.lax.dynamic_slice_in_dim(directions, offset, size)
            return _chunk_sums(fun, params, matrix, rows, method, base_value)

        return _sum_in_pieces(sums_of_rows, count, piece or count)

    totals = _sum_in_pieces(sums_from, num_samples, chunk)

    vector, value_sum, num_valid = totals
    denominator = jnp.maximum(num_valid, 1)
    mean = jax.tree.map(lambda v: v / denominator.astype(v.dtype), vector)
    grad = mean if method == "first_order" else matrix.solve_transpose(mean)
    grad = jax.tree.map(lambda g, x: jnp.where(num_valid > 0, g, 0).astype(x.dtype), grad, params)
    value = jnp.where(num_valid > 0, value_sum / denominator, jnp.nan)
    if base_value is not None:  # the baseline failing invalidates every sample
        value = jnp.where(jnp.isfinite(base_value), value, jnp.nan)
    return SmoothedEstimate(
        value=value,
        grad=grad,
        num_evaluations=jnp.int32(evaluations_per_estimate(method, num_samples)),
        num_nonfinite=jnp.int32(num_samples) - num_valid,
    )


def smoothed_grad(
    fun: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    matrix: SmoothingMatrix,
    **kwargs: Any,
) -> PyTree:
    """The gradient part of :func:`smoothed_value_and_grad` (same arguments)."""
    return smoothed_value_and_grad(fun, params, key, matrix, **kwargs).grad
