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
factorization of the block's b×d i.i.d. directions (rows g_j), ``u_j = q_j ‖g_j‖``, a Haar
direction times a χ_d norm that depends on L alone and so is independent of it. Each u_n is
still N(0, I), so the estimate stays unbiased, with lower variance. It costs an LQ
factorization of a b×d block, O(d b²), per block (staged Cholesky-QR in matmuls, no QR:
:mod:`agsopt.smoothing.directions`). With the
default ``chunk_size`` a block spans min(d, N) directions and its evaluations run in
cache-sized pieces; with an explicit ``chunk_size`` the blocks follow the chunks.

Samples whose function values (or, first-order, gradients) are not finite are left out of
the average and counted in ``num_nonfinite``; if none is finite the gradient is zero.

Precision. ``fun`` is evaluated at ``x + Σu`` computed and *kept* in each leaf's
accumulation dtype (float32 for bfloat16/float16 leaves, the leaf's own dtype otherwise):
a perturbation below a low-precision dtype's spacing (σ = 1e-3 at x = 1 in bfloat16,
whose spacing there is 2⁻⁷) is not rounded away, so the point evaluated is the point the
weight Σ^{-T}u assumes. Rounding the point back to bfloat16 would make the estimate unbiased
only for the smoothing of the rounded, staircase function, several times too small for
the smooth one. The estimate is cast to each leaf's dtype at the end.

Range. Finite values whose sums overflow (f = 1e37·x₀ over 256 samples) are handled: each
chunk's values are scaled by a power of two 2^-e, e the exponent of the chunk's largest
finite |value| (or |gradient entry|, first-order), the chunks' sums are merged at the larger
of their exponents, and Σ^{-T} is applied before scaling back. Scaling by powers of two is
exact, so wherever the unscaled computation neither overflowed nor went subnormal the
result is the same bit for bit (compared with the unscaled sums for every method,
chunking and Σ kind when this was written); the estimate is non-finite only when ∇f_Σ
itself is out of the dtype's range.

Curvature (``curvature=True``, opt-in). Second-order Stein identity: for u ~ N(0, I) and a
smooth g, Gaussian integration by parts twice gives E[g(u)(u_i u_j − δ_ij)] = E[∂_i∂_j g(u)];
with g(u) = f(x + Σu), ∂_i∂_j g = (Σᵀ∇²f(x + Σu)Σ)_ij, so

    E_u[f(x + Σu)(uuᵀ − I)] = Σᵀ E_u[∇²f(x + Σu)] Σ = Σᵀ ∇²f_Σ(x) Σ

(for non-smooth f the right side is the Hessian of the always-smooth f_Σ). The estimator
returns its diagonal, ``c_i = E[v (u_i² − 1)]``, from the evaluations it already makes (no
extra call of ``fun``): ``v_n = [f(x+Σu_n) + f(x−Σu_n)]/2`` (antithetic; the odd part of f,
which only adds variance here, cancels) or ``v_n = f(x+Σu_n)`` (forward, plain). The sample
mean ``v̄`` is subtracted as a baseline and the sum divided by ``N_valid − 1``: for i.i.d.
directions ``E[Σ_n (v_n − v̄)(u_ni² − 1)] = (N − 1) E[v (u_i² − 1)]`` (the cross terms
``E[v_m (u_ni² − 1)]``, m ≠ n, vanish since E[u_ni² − 1] = 0), so

    ĉ_i = Σ_n (v_n − v̄)(u_ni² − 1) / (N_valid − 1)

is unbiased. It is accumulated per chunk as ``Σ_n v_n (u_ni² − 1)`` (scaled by the chunk's
power of two, like the values) and ``Σ_n (u_ni² − 1)``, so chunking changes it only by float
rounding. With fewer than two finite samples it is NaN (undefined). With ``orthogonal=True``
(or a noise table) the directions of a block are dependent and the baseline's cross terms no
longer vanish: each term ``v_n (u_ni² − 1)`` is still unbiased, the centred estimate is off by
O(1/d) relative. ``method="first_order"`` does not offer it (``ValueError``).

Points and values (ask/tell). The zero-order estimators are two halves: the points
(:func:`points`, in a fixed order) and the combination of ``f`` at those points. Passing a
:class:`TabulatedValues` as ``fun`` makes the estimator read ``f`` from a table of values
computed elsewhere (a NumPy simulator: :func:`agsopt.smoothing.ask_tell`) instead of calling
a function, through the same code and arithmetic (bit for bit with XLA's fusion pass off;
``tests/test_ask_tell.py``). An estimator plugs into ask/tell as such a pair: its points in a
fixed order, and its combination reading a ``TabulatedValues`` at the points' places.

Checks (at trace time): every parameter leaf must be a real floating array (a
``TypeError`` naming the leaf otherwise), the tree must have an entry, and ``fun`` must
return a real scalar (checked once with ``jax.eval_shape``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from agsopt import _validation as validation
from agsopt.smoothing.covariance import SmoothingMatrix
from agsopt.smoothing.directions import check_noise_table, sample_directions
from agsopt.tree_utils import (
    accumulation_dtype,
    as_key,
    statistics_dtype,
    tree_size,
    tree_unflatten_vector,
)

PyTree = Any

__all__ = [
    "ACCELERATOR_CHUNK_FLOATS",
    "CPU_CHUNK_FLOATS",
    "METHODS",
    "SmoothedEstimate",
    "TabulatedValues",
    "default_chunk_size",
    "evaluations_per_estimate",
    "points",
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
      curvature: with ``curvature=True``, the estimate of ``diag(Σᵀ ∇²f_Σ(x) Σ)`` (see the
        module doc), a pytree shaped like the parameters in their accumulation dtypes
        (float32 for bfloat16/float16 leaves: a statistic for the rule, not an update), NaN
        where fewer than two samples were finite; ``None`` otherwise.
    """

    value: jax.Array
    grad: PyTree
    num_evaluations: jax.Array
    num_nonfinite: jax.Array
    curvature: PyTree = None


class TabulatedValues:
    """Function values at the points of :func:`points`, given in place of ``fun``.

    ``values[m]`` is ``f`` at point m of :func:`points` for the same parameters, key, Σ and
    settings (zero-order methods only): the estimator then reads the values instead of
    evaluating a function, with the same arithmetic, non-finite handling and counters. A
    value is used in the dtype it has here, as a function's result would be.

    Attributes:
      values: a 1-D array of ``evaluations_per_estimate(method, num_samples)`` real values.
    """

    def __init__(self, values: jax.Array):
        self.values = values

    def __call__(self, params: PyTree) -> jax.Array:
        raise TypeError(
            "TabulatedValues holds f at the estimator's own points; it cannot evaluate other "
            "points (pass it as fun/value_fn to the estimator, e.g. through ask/tell)"
        )


def _segments(method: str, num_samples: int) -> dict[str, int]:
    """Where each group of points starts in the order of :func:`points`: ``"plus"``
    (x + Σu_n), ``"minus"`` (x − Σu_n, antithetic) and ``"base"`` (x, forward)."""
    if method == "antithetic":
        return {"plus": 0, "minus": num_samples}
    if method == "forward":
        return {"base": 0, "plus": 1}
    return {"plus": 0}


def _check_table(table: TabulatedValues, method: str, num_samples: int, owner: str) -> None:
    if method == "first_order":
        raise ValueError(
            f"{owner}: tabulated values need a zero-order method (antithetic, forward, plain), "
            "got method='first_order' (it needs gradients)"
        )
    values = table.values
    expected = evaluations_per_estimate(method, num_samples)
    if jnp.ndim(values) != 1 or jnp.shape(values)[0] != expected:
        raise ValueError(
            f"{owner}: values must be one value per point, shape ({expected},) for "
            f"method={method!r} and num_samples={num_samples}; got shape {jnp.shape(values)}"
        )
    dtype = jnp.result_type(values)
    if not jnp.issubdtype(dtype, jnp.floating) and not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(f"{owner}: values must be real numbers, got dtype {dtype}")


def evaluations_per_estimate(method: str, num_samples: int) -> int:
    """Function evaluations one estimate costs: 2N, N + 1, N or N (gradients)."""
    return {"antithetic": 2 * num_samples, "forward": num_samples + 1}.get(method, num_samples)


def _noise_dtype(params: PyTree) -> jnp.dtype:
    """The directions' dtype: the parameters' float dtypes promoted with float32."""
    return statistics_dtype(params)


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
    """``x + sign · Σu`` in the noise dtype, kept in each leaf's accumulation dtype (≥ float32:
    a bfloat16/float16 point is not rounded back to its own dtype, see the module doc)."""
    return jax.tree.map(
        lambda x, p: (x.astype(p.dtype) + sign * p).astype(accumulation_dtype(x.dtype)),
        params,
        perturbation,
    )


def _lift(params: PyTree) -> PyTree:
    """The parameters as ``fun`` sees them: each leaf in its accumulation dtype (≥ float32)."""
    return jax.tree.map(lambda x: jnp.asarray(x).astype(accumulation_dtype(x.dtype)), params)


# Exponent of a chunk with nothing to sum: far below any float's range, so that merging it
# into another chunk scales it to zero (its sums are zero anyway).
_EMPTY_EXPONENT = -(1 << 20)


def _pow2(exponent: jax.Array, dtype: Any) -> jax.Array:
    """``2**exponent`` in ``dtype``, built from its bits (exact), clipped to the normal range."""
    info = jnp.finfo(dtype)
    bias = int(info.maxexp) - 1
    int_dtype = jnp.int64 if info.bits == 64 else jnp.int32
    exponent = jnp.clip(exponent, 1 - bias, bias).astype(int_dtype)
    return jax.lax.bitcast_convert_type(jnp.left_shift(exponent + bias, int(info.nmant)), dtype)


def _scale_by_pow2(x: jax.Array, exponent: jax.Array) -> jax.Array:
    """``x · 2**exponent``, exact apart from under/overflow of the result: two factors of half
    the exponent each, so that neither leaves the dtype's range."""
    half = jnp.floor_divide(exponent, 2)
    return x * _pow2(half, x.dtype) * _pow2(exponent - half, x.dtype)


def _exponent(magnitude: jax.Array) -> jax.Array:
    """``e`` with ``magnitude < 2**e ≤ 2·magnitude`` (``frexp``), or ``_EMPTY_EXPONENT`` for 0."""
    _, exponent = jnp.frexp(magnitude)
    return jnp.where(magnitude > 0, exponent.astype(jnp.int32), jnp.int32(_EMPTY_EXPONENT))


class _Sums(NamedTuple):
    """Partial sums over samples, each stored as ``sum · 2**-exponent`` (see the module doc).

    ``vector``: ``Σ w_n u_n`` (zero-order) or ``Σ ∇f(x + Σu_n)`` (first-order);
    ``value``: ``Σ f(x + Σu_n)``; both over the finite samples, ``num_valid`` of them.
    With curvature (else ``None``): ``curvature``, ``Σ v_n (u_n² − 1)`` (flat, scaled by
    ``2**-value_exponent`` like ``value``), and ``centering``, ``Σ (u_n² − 1)`` (unscaled).
    """

    vector: PyTree
    vector_exponent: jax.Array
    value: jax.Array
    value_exponent: jax.Array
    num_valid: jax.Array
    curvature: jax.Array | None = None
    centering: jax.Array | None = None


def _merge(a: _Sums, b: _Sums) -> _Sums:
    """``a + b`` at the larger of the two exponents (powers of two: exact)."""
    vector_exponent = jnp.maximum(a.vector_exponent, b.vector_exponent)
    value_exponent = jnp.maximum(a.value_exponent, b.value_exponent)
    vector = jax.tree.map(
        lambda x, y: (
            _scale_by_pow2(x, a.vector_exponent - vector_exponent)
            + _scale_by_pow2(y, b.vector_exponent - vector_exponent)
        ),
        a.vector,
        b.vector,
    )
    value = _scale_by_pow2(a.value, a.value_exponent - value_exponent) + _scale_by_pow2(
        b.value, b.value_exponent - value_exponent
    )
    curvature = centering = None
    if a.curvature is not None:
        curvature = _scale_by_pow2(a.curvature, a.value_exponent - value_exponent) + _scale_by_pow2(
            b.curvature, b.value_exponent - value_exponent
        )
        centering = a.centering + b.centering
    return _Sums(
        vector,
        vector_exponent,
        value,
        value_exponent,
        a.num_valid + b.num_valid,
        curvature,
        centering,
    )


def _empty(shapes: _Sums) -> _Sums:
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    empty = jnp.int32(_EMPTY_EXPONENT)
    return zeros._replace(vector_exponent=empty, value_exponent=empty)


def _largest(x: jax.Array, valid: jax.Array) -> jax.Array:
    """The largest ``|x|`` over the valid samples (rows), 0 if there is none."""
    valid = valid.reshape(valid.shape + (1,) * (x.ndim - valid.ndim))
    return jnp.max(jnp.where(valid, jnp.abs(x), 0), initial=0)


def _perturbations(params: PyTree, matrix: SmoothingMatrix, flat_directions: jax.Array) -> PyTree:
    """``Σu_n`` for the rows ``u_n`` of ``flat_directions``, stacked on a leading axis."""
    directions = jax.vmap(lambda row: tree_unflatten_vector(row, params))(flat_directions)
    return jax.vmap(matrix.apply)(directions)


def _evaluate(fun, params, perturbations, signs, index, value_dtype, num_samples, method):
    """``f(x + s·Σu_n)`` for each sign s, over the rows; rows are samples ``index, index+1, …``.

    ``fun`` is called through ``vmap``, or a :class:`TabulatedValues` is read at the
    samples' places in the order of :func:`points`.
    """
    if isinstance(fun, TabulatedValues):
        count = jax.tree.leaves(perturbations)[0].shape[0]
        segments = _segments(method, num_samples)
        name = {1.0: "plus", -1.0: "minus"}
        return tuple(
            jnp.asarray(
                jax.lax.dynamic_slice_in_dim(fun.values, segments[name[s]] + index, count),
                value_dtype,
            )
            for s in signs
        )
    at = lambda s: lambda p: jnp.asarray(fun(_shift(params, p, s)), value_dtype)
    return jax.vmap(lambda p: tuple(at(s)(p) for s in signs))(perturbations)


def _chunk_sums(
    fun,
    params,
    matrix,
    flat_directions,
    method: str,
    base_value,
    value_dtype,
    curvature=False,
    index=0,
    num_samples=0,
):
    """The :class:`_Sums` of one chunk. ``flat_directions`` is ``(chunk, d)``, a direction a row,
    the samples ``index, index+1, …`` of ``num_samples`` (where a table is read).

    Each chunk is scaled by ``2**-e``, ``e`` the exponent of its largest finite |value|
    (first-order: also of its largest gradient entry, with an exponent of its own), before
    anything is added, so that finite values never overflow a difference or a sum.
    """
    perturbations = _perturbations(params, matrix, flat_directions)
    evaluate = lambda *signs: _evaluate(
        fun, params, perturbations, signs, index, value_dtype, num_samples, method
    )

    if method == "first_order":
        values, grads = jax.vmap(jax.value_and_grad(lambda p: fun(_shift(params, p, 1.0))))(
            perturbations
        )
        values = values.astype(value_dtype)
        finite_grads = [
            jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1) for g in jax.tree.leaves(grads)
        ]
        valid = jnp.isfinite(values) & jnp.all(jnp.stack(finite_grads), axis=0)
        grad_leaves = jax.tree.leaves(grads)
        grad_dtype = jnp.result_type(*grad_leaves)
        vector_exponent = _exponent(
            jnp.max(jnp.stack([_largest(g, valid).astype(grad_dtype) for g in grad_leaves]))
        )
        mask = lambda g: valid.reshape((-1,) + (1,) * (g.ndim - 1))
        vector = jax.tree.map(
            lambda g: jnp.sum(jnp.where(mask(g), _scale_by_pow2(g, -vector_exponent), 0), 0),
            grads,
        )
        value_exponent = _exponent(_largest(values, valid))
        values = _scale_by_pow2(jnp.where(valid, values, 0), -value_exponent)
    else:
        if method == "antithetic":
            plus, minus = evaluate(1.0, -1.0)
            valid = jnp.isfinite(plus) & jnp.isfinite(minus)
            magnitude = jnp.maximum(_largest(plus, valid), _largest(minus, valid))
        else:
            (values,) = evaluate(1.0)
            valid = jnp.isfinite(values)
            if method == "forward":
                valid = valid & jnp.isfinite(base_value)
            magnitude = _largest(values, valid)
            if method == "forward":
                magnitude = jnp.maximum(magnitude, _largest(base_value, valid.any()))
        exponent = _exponent(magnitude)
        scaled = lambda v: _scale_by_pow2(jnp.where(valid, v, 0), -exponent)
        if method == "antithetic":
            plus, minus = scaled(plus), scaled(minus)
            weights, values = (plus - minus) / 2, (plus + minus) / 2
        else:
            values = scaled(values)
            if method == "forward":
                base = _scale_by_pow2(jnp.where(jnp.isfinite(base_value), base_value, 0), -exponent)
                weights = values - base
            else:
                weights = values
        weights = jnp.where(valid, weights, 0.0).astype(flat_directions.dtype)
        # A weighted sum over the rows (not a matvec): XLA fuses it with the chunk's reads
        # and the running total.
        total = jnp.sum(weights[:, None] * flat_directions, axis=0)
        vector = tree_unflatten_vector(total, params)
        vector_exponent = value_exponent = exponent
    value_sum = jnp.sum(jnp.where(valid, values, 0.0))
    curvature_sum = centering = None
    if curvature:  # Σ v_n (u_n² − 1) and Σ (u_n² − 1) over the valid rows (module doc)
        second = jnp.where(valid[:, None], flat_directions * flat_directions - 1.0, 0.0)
        scaled_values = jnp.where(valid, values, 0.0).astype(flat_directions.dtype)
        curvature_sum = jnp.sum(scaled_values[:, None] * second, axis=0)
        centering = jnp.sum(second, axis=0)
    return _Sums(
        vector,
        vector_exponent,
        value_sum,
        value_exponent,
        jnp.sum(valid, dtype=jnp.int32),
        curvature_sum,
        centering,
    )


def _constrain_samples(
    directions: jax.Array, sharding: jax.sharding.Sharding, owner: str, num_samples: int, chunk: int
) -> jax.Array:
    """``directions`` (one chunk's rows) constrained to ``sample_sharding``. Under ``jit`` a
    chunk whose row count the sharding does not divide is padded by XLA; outside it (concrete
    rows) that is a ``ValueError`` naming ``num_samples`` and ``chunk_size``, not JAX's
    ``IndivisibleError`` about an internal array."""
    if not isinstance(directions, jax.core.Tracer):
        try:
            sharding.shard_shape(directions.shape)
        except ValueError as err:
            raise ValueError(
                f"{owner}: sample_sharding splits each chunk's samples over its devices; "
                f"called outside jax.jit, every chunk must hold a multiple of that number, "
                f"but with num_samples={num_samples} and chunks of {chunk} one holds "
                f"{directions.shape[0]}. Choose num_samples and chunk_size as multiples of "
                f"the device count, or call under jax.jit (which pads). ({err})"
            ) from err
    return jax.lax.with_sharding_constraint(directions, sharding)


def _sum_in_pieces(sums_of: Callable[[jax.Array, int], _Sums], total: int, piece: int) -> _Sums:
    """``Σ sums_of(offset, size)`` over pieces covering ``[0, total)``: the full pieces of
    ``piece`` in a ``lax.scan`` (one compiled body), then the remainder. A piece longer
    than ``total`` (the last, short chunk of an orthogonal run) is cut to ``total``."""
    piece = min(piece, total)
    num_full, rest = divmod(total, piece)
    if num_full == 1:
        totals = sums_of(jnp.int32(0), piece)
    else:
        empty = _empty(jax.eval_shape(lambda: sums_of(jnp.int32(0), piece)))

        def body(carry, offset):
            return _merge(carry, sums_of(offset, piece)), None

        offsets = piece * jnp.arange(num_full, dtype=jnp.int32)
        totals, _ = jax.lax.scan(body, empty, offsets)
    if rest:
        totals = _merge(totals, sums_of(jnp.int32(num_full * piece), rest))
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
    noise_table: jax.Array | None = None,
    curvature: bool = False,
) -> SmoothedEstimate:
    """Estimate ``f_Σ(params)`` and ``∇f_Σ(params)`` by Monte Carlo (see the module doc).

    Args:
      fun: ``params -> scalar``; called on batches of points through ``vmap``. It need not be
        differentiable unless ``method="first_order"``. It receives the points with each
        leaf in its accumulation dtype (float32 for bfloat16/float16 leaves).
      params: the point x, a non-empty pytree of real floating arrays (``TypeError`` naming
        the leaf for an integer or complex one).
      key: a JAX PRNG key (any implementation) or an int seed; sample n uses
        ``fold_in(key, n)`` (with ``orthogonal``, the same rows orthogonalized within their
        block).
      matrix: Σ, e.g. ``agsopt.covariance.isotropic(0.1)``. A Σ with a zero or non-finite
        entry gives a non-finite estimate (the :func:`agsopt.ags` wrapper checks σ).
      num_samples: N, the number of directions u_n (antithetic pairs count once), at most
        ``MAX_NUM_SAMPLES = 2**30 − 1`` (the evaluations are counted in int32).
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
      noise_table: a 1-D array of standard normals, e.g.
        :func:`~agsopt.smoothing.directions.make_noise_table`: direction n is a slice of it
        at a random offset from ``fold_in(key, n)``, one random integer instead of d
        normals per direction (a shared noise table, arXiv:1703.03864). Cheaper draws at a
        statistical price: given the table the estimate's mean is Ĉ∇f_Σ, Ĉ the table's
        lagged second moment, off by about ``√((d + 1)/(L − d + 1))`` of ‖∇f_Σ‖ for a table
        of L numbers, and slices closer than d overlap; see
        :func:`~agsopt.smoothing.directions.sample_directions`. A table shorter than
        ``minimum_table_size(d)`` (bias > 0.1), non-finite or not roughly standard normal
        is a ``ValueError`` naming ``noise_table``.
      curvature: also estimate ``diag(Σᵀ ∇²f_Σ(x) Σ)`` from the same evaluations by the
        second-order Stein identity ``E[f(x + Σu)(uuᵀ − I)] = Σᵀ∇²f_Σ(x)Σ`` (module doc), into
        :attr:`SmoothedEstimate.curvature`: ``Σ_n (v_n − v̄)(u_ni² − 1)/(N_valid − 1)``, NaN
        if fewer than two samples are finite. Zero-order methods only (``ValueError`` for
        ``"first_order"``). ``False`` (default) traces exactly the program without it.

    Returns:
      A :class:`SmoothedEstimate`. Its ``grad`` is non-finite only if ∇f_Σ is out of the
      parameters' range (or Σ is not invertible); ``value`` is NaN if no sample was finite.
    """
    return estimate(
        fun,
        params,
        key,
        matrix,
        num_samples=num_samples,
        method=method,
        orthogonal=orthogonal,
        chunk_size=chunk_size,
        sample_sharding=sample_sharding,
        noise_table=noise_table,
        curvature=curvature,
        owner="agsopt.smoothed_value_and_grad",
        fun_name="fun",
    )


MAX_NUM_SAMPLES = 2**30 - 1
"""The largest ``num_samples``: one estimate's evaluations (2N for ``"antithetic"``) and the
sample indices are int32."""


def check_num_samples(num_samples: Any) -> int:
    """``num_samples`` as an int in ``[1, MAX_NUM_SAMPLES]`` (``TypeError``/``ValueError``
    naming it)."""
    return validation.check_int(
        "num_samples",
        num_samples,
        minimum=1,
        maximum=MAX_NUM_SAMPLES,
        why="an estimate's evaluations (2N for the antithetic method) are counted in int32",
    )


def _chunking(
    dim: int,
    num_samples: int,
    orthogonal: bool,
    chunk_size: int | None,
    sample_sharding: jax.sharding.Sharding | None,
) -> tuple[int, int | None]:
    """``(chunk, piece)``: samples whose directions are drawn together (an orthogonal block
    with ``orthogonal``), and how many of them one ``vmap`` evaluates (``None``: the chunk)."""
    if chunk_size is None:
        chunk = default_chunk_size(dim, num_samples, orthogonal=orthogonal)
        if sample_sharding is not None:  # a default-sized piece for every device
            chunk = min(num_samples, chunk * len(sample_sharding.device_set))
    else:
        chunk = min(validation.check_int("chunk_size", chunk_size, minimum=1), num_samples)
    # Orthogonal blocks by default span min(d, N) directions; their evaluations then run
    # in cache-sized pieces (memory is O(block · d) for the block's directions either way).
    piece = None
    if orthogonal and chunk_size is None and sample_sharding is None:
        piece = default_chunk_size(dim, chunk)
    return chunk, piece


def _chunk_directions(key, dim, start, count, orthogonal, noise_dtype, noise_table) -> jax.Array:
    """One chunk's directions, ``(count, d)``, drawn once (the caller constrains them to a
    sample sharding)."""
    directions = sample_directions(
        key,
        dim,
        start,
        count,
        orthogonal=orthogonal,
        dtype=noise_dtype,
        noise_table=noise_table,
    )
    # Stored once: XLA on CPU would otherwise redo the normal transform in each consumer.
    return jax.lax.optimization_barrier(directions)


def check_inputs(
    fun: Callable[[PyTree], jax.Array], params: PyTree, *, owner: str, fun_name: str
) -> None:
    """The trace-time checks of the estimator: real floating leaves, at least one entry, and
    ``fun`` returning a real scalar at the points it will be evaluated at."""
    validation.check_float_params(params, owner)
    validation.check_scalar_output(fun, _lift(params), owner, fun_name)


def estimate(
    fun: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    matrix: SmoothingMatrix,
    *,
    num_samples: int,
    method: str,
    orthogonal: bool,
    chunk_size: int | None,
    sample_sharding: jax.sharding.Sharding | None,
    owner: str,
    fun_name: str,
    noise_table: jax.Array | None = None,
    curvature: bool = False,
) -> SmoothedEstimate:
    """:func:`smoothed_value_and_grad`, with the caller's names in its error messages."""
    key = as_key(key)
    if not (hasattr(matrix, "apply") and hasattr(matrix, "solve_transpose")):
        raise TypeError(
            f"{owner}: matrix must be a smoothing matrix Σ, e.g. "
            f"agsopt.covariance.isotropic(0.1), got {type(matrix).__name__}"
        )
    num_samples = check_num_samples(num_samples)
    validation.check_choice("method", method, METHODS)
    orthogonal = validation.check_bool("orthogonal", orthogonal)
    curvature = validation.check_bool("curvature", curvature)
    if curvature and method == "first_order":
        raise ValueError(
            f"{owner}: curvature=True needs a zero-order method (antithetic, forward, plain): "
            "the curvature is estimated from function values, not from method='first_order'"
        )
    if isinstance(inspect.unwrap(fun), TabulatedValues):  # also behind require_value_fn
        fun = inspect.unwrap(fun)
    tabulated = isinstance(fun, TabulatedValues)
    if tabulated:
        _check_table(fun, method, num_samples, owner)
        validation.check_float_params(params, owner)
    else:
        check_inputs(fun, params, owner=owner, fun_name=fun_name)
    dim = tree_size(params)
    if noise_table is not None:
        check_noise_table(noise_table, dim, owner)
    chunk, piece = _chunking(dim, num_samples, orthogonal, chunk_size, sample_sharding)
    noise_dtype = _noise_dtype(params)

    base_value = None
    value_dtype = noise_dtype
    if method == "forward":
        if tabulated:
            base_value = fun.values[_segments(method, num_samples)["base"]]
        else:
            base_value = jnp.asarray(fun(_lift(params)))
        base_value = base_value.astype(jnp.promote_types(base_value.dtype, jnp.float32))
        value_dtype = base_value.dtype

    def sums_from(start, count):
        directions = _chunk_directions(key, dim, start, count, orthogonal, noise_dtype, noise_table)
        if sample_sharding is not None:
            directions = _constrain_samples(directions, sample_sharding, owner, num_samples, chunk)

        def sums_of_rows(offset, size):
            rows = jax.lax.dynamic_slice_in_dim(directions, offset, size)
            return _chunk_sums(
                fun,
                params,
                matrix,
                rows,
                method,
                base_value,
                value_dtype,
                curvature,
                index=start + offset,
                num_samples=num_samples,
            )

        return _sum_in_pieces(sums_of_rows, count, piece or count)

    totals = _sum_in_pieces(sums_from, num_samples, chunk)

    num_valid = totals.num_valid
    denominator = jnp.maximum(num_valid, 1)
    mean = jax.tree.map(lambda v: v / denominator.astype(v.dtype), totals.vector)
    # Σ^{-T} is linear: applied to the scaled mean, then scaled back (no intermediate overflow).
    grad = mean if method == "first_order" else matrix.solve_transpose(mean)
    grad = jax.tree.map(
        lambda g, x: jnp.where(num_valid > 0, _scale_by_pow2(g, totals.vector_exponent), 0).astype(
            x.dtype
        ),
        grad,
        params,
    )
    value = _scale_by_pow2(totals.value / denominator, totals.value_exponent)
    value = jnp.where(num_valid > 0, value, jnp.nan)
    if base_value is not None:  # the baseline failing invalidates every sample
        value = jnp.where(jnp.isfinite(base_value), value, jnp.nan)
    diagonal = None
    if curvature:
        # Σ_n (v_n − v̄)(u_n² − 1) = Σ_n v_n (u_n² − 1) − v̄ Σ_n (u_n² − 1), at the values' scale.
        mean_value = (totals.value / denominator).astype(totals.curvature.dtype)
        centred = totals.curvature - mean_value * totals.centering
        centred = centred / jnp.maximum(num_valid - 1, 1).astype(centred.dtype)
        centred = _scale_by_pow2(centred, totals.value_exponent)
        if base_value is not None:
            centred = jnp.where(jnp.isfinite(base_value), centred, jnp.nan)
        centred = jnp.where(num_valid >= 2, centred, jnp.nan)
        diagonal = jax.tree.map(
            lambda c, x: c.astype(accumulation_dtype(x.dtype)),
            tree_unflatten_vector(centred, params),
            params,
        )
    return SmoothedEstimate(
        value=value,
        grad=grad,
        num_evaluations=jnp.int32(evaluations_per_estimate(method, num_samples)),
        num_nonfinite=jnp.int32(num_samples) - num_valid,
        curvature=diagonal,
    )


def _stack_in_pieces(rows_of: Callable[[jax.Array, int], PyTree], total: int, piece: int):
    """``rows_of(offset, size)`` for pieces covering ``[0, total)``, concatenated on the
    leading axis: the full pieces of ``piece`` in a ``lax.map``, then the remainder (the
    pieces of :func:`_sum_in_pieces`)."""
    num_full, rest = divmod(total, piece)
    parts = []
    if num_full == 1:
        parts.append(rows_of(jnp.int32(0), piece))
    elif num_full > 1:
        offsets = piece * jnp.arange(num_full, dtype=jnp.int32)
        stacked = jax.lax.map(lambda offset: rows_of(offset, piece), offsets)
        parts.append(jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), stacked))
    if rest:
        parts.append(rows_of(jnp.int32(num_full * piece), rest))
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *parts)


def points(
    params: PyTree,
    key: jax.Array,
    matrix: SmoothingMatrix,
    *,
    num_samples: int = 16,
    method: str = "antithetic",
    orthogonal: bool = False,
    chunk_size: int | None = None,
    noise_table: jax.Array | None = None,
) -> PyTree:
    """The points a zero-order estimate evaluates ``f`` at, stacked on a new leading axis.

    The first half of the estimator: with the same arguments, :func:`smoothed_value_and_grad`
    evaluates ``f`` at exactly these points (the same directions, chunks and arithmetic), and
    given their values as a :class:`TabulatedValues` it returns the same estimate as with
    ``f``. The order, M = :func:`evaluations_per_estimate` points:

    - ``"antithetic"``: ``x + Σu_0, …, x + Σu_{N−1}, x − Σu_0, …, x − Σu_{N−1}`` (2N);
    - ``"forward"``: ``x, x + Σu_0, …, x + Σu_{N−1}`` (N + 1);
    - ``"plain"``: ``x + Σu_0, …, x + Σu_{N−1}`` (N).

    Each leaf has shape ``(M,) + leaf.shape`` in the leaf's accumulation dtype (float32 for
    bfloat16/float16 leaves), as ``fun`` would receive it. Memory is O(M · d).

    Raises:
      ValueError: for ``method="first_order"`` (it needs gradients, not values).
    """
    owner = "agsopt.smoothing.estimator.points"
    num_samples = check_num_samples(num_samples)
    validation.check_choice("method", method, METHODS)
    if method == "first_order":
        raise ValueError(
            f"{owner}: method='first_order' evaluates gradients, not values; use 'antithetic', "
            "'forward' or 'plain'"
        )
    orthogonal = validation.check_bool("orthogonal", orthogonal)
    validation.check_float_params(params, owner)
    dim = tree_size(params)
    if noise_table is not None:
        check_noise_table(noise_table, dim, owner)
    chunk, piece = _chunking(dim, num_samples, orthogonal, chunk_size, None)
    noise_dtype = _noise_dtype(params)
    signs = (1.0, -1.0) if method == "antithetic" else (1.0,)

    def chunk_points(start, count):
        directions = _chunk_directions(key, dim, start, count, orthogonal, noise_dtype, noise_table)

        def piece_points(offset, size):
            rows = jax.lax.dynamic_slice_in_dim(directions, offset, size)
            perturbations = _perturbations(params, matrix, rows)
            return tuple(
                jax.vmap(lambda p, s=s: _shift(params, p, s))(perturbations) for s in signs
            )

        return _stack_in_pieces(piece_points, count, piece or count)

    groups = _stack_in_pieces(chunk_points, num_samples, chunk)
    if method == "forward":
        groups = (jax.tree.map(lambda x: x[None], _lift(params)), *groups)
    return jax.tree.map(lambda *xs: jnp.concatenate(xs), *groups)


def smoothed_grad(
    fun: Callable[[PyTree], jax.Array],
    params: PyTree,
    key: jax.Array,
    matrix: SmoothingMatrix,
    **kwargs: Any,
) -> PyTree:
    """The gradient part of :func:`smoothed_value_and_grad` (same arguments)."""
    return smoothed_value_and_grad(fun, params, key, matrix, **kwargs).grad
