"""Directional Gaussian smoothing (DGS): the smoothed gradient by Gauss–Hermite quadrature.

Zhang, Tran, Lu & Webster, arXiv:2002.03001 (DGS); used by ASGF (Dereventsov, Webster &
Daws, arXiv:2006.10887). Pure functions, no optimizer state: :func:`directional_basis`
draws the directions, :func:`directional_value_and_grad` evaluates the function along them.

Convention (the library's, ``u ~ N(0, 1)``): for orthonormal directions ξ_1..ξ_k (rows of
U, k ≤ d) and radii s_1..s_k, the smoothing of f along ξ_i is
``G_i(t) = E_u f(x + (t + s_i u) ξ_i)``, whose derivative and second derivative at 0 are

    D_i = E_u[u f(x + s_i u ξ_i)] / s_i,     C_i = E_u[(u² − 1) f(x + s_i u ξ_i)] / s_i².

With physicists' Gauss–Hermite nodes τ_m and weights w_m (weight e^{−τ²}, M nodes),
``E_u g(u) ≈ π^{−1/2} Σ_m w_m g(√2 τ_m)``, so with ``g_im = f(x + √2 s_i τ_m ξ_i)``

    D_i ≈ (√2 / (s_i √π)) Σ_m w_m τ_m g_im,   C_i ≈ (1 / (s_i² √π)) Σ_m w_m (2τ_m² − 1) g_im.

D_i is exact when ``t ↦ f(x + t ξ_i)`` is a polynomial of degree ≤ 2M − 2 (the integrand
``u·p(u)`` then has degree ≤ 2M − 1, the rule's exactness), C_i when it is of degree
≤ 2M − 3. The gradient estimate is ``Σ_i D_i ξ_i = Uᵀ D``. With k = d it is the gradient of
f smoothed by ``Σ = Uᵀ diag(s) U`` exactly when f is a quadratic or separable in the basis U
(then ``f_Σ`` is a sum of the directional smoothings); otherwise it is the DGS surrogate: the
directional derivatives of the one-dimensional smoothings, assembled. With k < d it
estimates the projection ``UᵀU ∇`` of that surrogate onto the span of the k directions.
ASGF/DGS write the radius for the weight e^{−τ²}: their s is √2 times ours.

The quadrature gives, for free, each direction's local Lipschitz estimate
``L_i = max_m |g_i,m+1 − g_im| / (√2 s_i (τ_m+1 − τ_m))`` (nodes in increasing order) and,
for odd M, ``f(x)`` itself (the node τ = 0, shared by every direction): one step costs
``k (M − 1) + 1`` evaluations, ``(M − 1) + (k − 1)(M' − 1) + 1`` with M' = ``lateral_nodes``
nodes on the directions after the first. The best of the evaluated points is returned too,
so an optimizer tracks its best point without another evaluation.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from agsopt import _validation as validation
from agsopt.smoothing.directions import orthonormal_rows
from agsopt.smoothing.estimator import TabulatedValues
from agsopt.tree_utils import tree_unflatten_vector

__all__ = [
    "DirectionalEstimate",
    "directional_basis",
    "directional_points",
    "directional_value_and_grad",
    "evaluations_per_step",
    "gauss_hermite",
]

PyTree = Any


class DirectionalEstimate(NamedTuple):
    """What :func:`directional_value_and_grad` returns.

    Attributes:
      value: ``f(x)`` (the shared node τ = 0).
      grad: ``Σ_i D_i ξ_i``, a pytree like the parameters (a direction with a non-finite
        node value contributes 0).
      derivatives: ``D_i``, shape ``(k,)`` (0 where direction i had a non-finite value).
      curvatures: ``C_i``, shape ``(k,)`` (NaN where direction i had a non-finite value).
      lipschitz: ``L_i``, shape ``(k,)`` (NaN where direction i had a non-finite value).
      roughness: ``R_i ∈ [0, 1]``, shape ``(k,)``: the part of the node values along ξ_i that
        a quadratic in t does not explain, ``‖(I − P) g_i‖ / ‖g_i − ḡ_i‖`` (P the
        least-squares projection onto quadratics at the nodes; 0 for a smooth direction at
        this scale, near 1 where ripples dominate; 0 for constant values, NaN where
        direction i had a non-finite value).
      best_value: the smallest finite value among the evaluated points (+inf if none).
      best_params: the point where it was found, a pytree like the parameters.
      num_evaluations: ``k (M − 1) + 1`` (:func:`evaluations_per_step`).
      num_nonfinite: how many of the evaluated values were not finite.
    """

    value: jax.Array
    grad: PyTree
    derivatives: jax.Array
    curvatures: jax.Array
    lipschitz: jax.Array
    roughness: jax.Array
    best_value: jax.Array
    best_params: PyTree
    num_evaluations: jax.Array
    num_nonfinite: jax.Array


def _check_num_nodes(num_nodes: int, name: str = "num_nodes") -> int:
    num_nodes = validation.check_int(name, num_nodes, minimum=1)
    if num_nodes < 3 or num_nodes % 2 == 0:
        raise ValueError(
            f"{name} must be an odd int ≥ 3 (the node τ = 0 is f(x), shared by every "
            f"direction), got {num_nodes}"
        )
    return int(num_nodes)


def gauss_hermite(num_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Physicists' Gauss–Hermite nodes τ_m (increasing) and weights w_m, for the weight
    e^{−τ²}: ``∫ g(τ) e^{−τ²} dτ ≈ Σ_m w_m g(τ_m)``, exact for polynomials of degree
    ≤ 2M − 1. float64 NumPy arrays (constants of the compiled step)."""
    nodes, weights = np.polynomial.hermite.hermgauss(_check_num_nodes(num_nodes))
    nodes[len(nodes) // 2] = 0.0  # exactly: f(x) is that node
    return nodes, weights


def evaluations_per_step(
    num_directions: int, num_nodes: int, lateral_nodes: int | None = None
) -> int:
    """Function evaluations of one :func:`directional_value_and_grad`:
    ``(M − 1) + (k − 1)(M' − 1) + 1`` (M nodes on the first direction, M' =
    ``lateral_nodes`` on the others; ``k (M − 1) + 1`` when M' = M)."""
    groups = _node_groups(int(num_directions), num_nodes, lateral_nodes)
    return sum((rows.stop - rows.start) * (nodes - 1) for rows, nodes in groups) + 1


def _node_groups(k: int, num_nodes: int, lateral_nodes: int | None) -> list[tuple[slice, int]]:
    """``[(rows, nodes), ...]``: the k directions in order, as slices of rows sharing a node
    count (the first direction alone where ``lateral_nodes`` differs from ``num_nodes``)."""
    num_nodes = _check_num_nodes(num_nodes)
    lateral = num_nodes
    if lateral_nodes is not None:
        lateral = _check_num_nodes(lateral_nodes, "lateral_nodes")
    if lateral == num_nodes or k == 1:
        return [(slice(0, k), num_nodes)]
    return [(slice(0, 1), num_nodes), (slice(1, k), lateral)]


def directional_basis(
    key: jax.Array,
    dim: int,
    num_directions: int,
    first: jax.Array | None = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """``(k, d)`` orthonormal rows: Gram–Schmidt of Gaussian rows (Haar-distributed).

    With ``first`` (a length-d vector, e.g. the last gradient estimate) the first row is
    ``first / ‖first‖`` and the others are random orthonormal in its complement, as ASGF
    draws them (arXiv:2006.10887); a zero or non-finite ``first`` is replaced by a Gaussian
    row. Uses :func:`agsopt.smoothing.directions.orthonormal_rows` (no LAPACK QR).
    """
    if not 1 <= num_directions <= dim:
        raise ValueError(f"num_directions must be in [1, d = {dim}], got {num_directions}")
    rows = jax.random.normal(key, (num_directions, dim), dtype)
    if first is not None:
        first = jnp.asarray(first, dtype).reshape(dim)
        norm = jnp.sqrt(jnp.sum(first * first))
        usable = jnp.isfinite(norm) & (norm > 0)
        scale = jnp.sqrt(jnp.sum(rows[0] * rows[0]))  # keep the row's length: conditioning
        lead = jnp.where(usable, first / jnp.where(usable, norm, 1.0) * scale, rows[0])
        rows = rows.at[0].set(lead)
    return orthonormal_rows(rows)


def _flatten(params: PyTree) -> jax.Array:
    leaves = jax.tree.leaves(params)
    return jnp.concatenate([jnp.ravel(leaf) for leaf in leaves]) if leaves else jnp.zeros(0)


def _roughness(values: jax.Array, nodes: np.ndarray) -> jax.Array:
    """``‖(I − P) g‖ / ‖g − ḡ‖`` per row, P the projection onto quadratics at the nodes."""
    vander = np.vander(nodes, 3, increasing=True)
    residual_map = np.eye(len(nodes)) - vander @ np.linalg.pinv(vander)
    residual = values @ jnp.asarray(residual_map.T, values.dtype)
    centred = values - jnp.mean(values, axis=1, keepdims=True)
    spread = jnp.sqrt(jnp.sum(centred * centred, axis=1))
    rough = jnp.sqrt(jnp.sum(residual * residual, axis=1))
    return jnp.where(spread > 0, rough / jnp.where(spread > 0, spread, 1.0), 0.0)


def _offsets(num_nodes: int, dtype: Any) -> jax.Array:
    """``√2 τ_m`` for the nodes other than τ = 0, in increasing order."""
    nodes, _ = gauss_hermite(num_nodes)
    side = np.concatenate([nodes[: num_nodes // 2], nodes[num_nodes // 2 + 1 :]])
    return jnp.asarray(math.sqrt(2.0) * side, dtype)


def directional_points(
    params: PyTree,
    directions: jax.Array,
    radii: jax.Array | float,
    *,
    num_nodes: int = 5,
    lateral_nodes: int | None = None,
) -> PyTree:
    """The points :func:`directional_value_and_grad` evaluates, stacked on a new leading axis
    (the first half of the estimator, for ask/tell): x first, then for each direction i in
    order its nodes other than τ = 0, ``x + √2 s_i τ_m ξ_i`` (τ_m increasing; M − 1 on the
    first direction, ``lateral_nodes`` − 1 on the others); :func:`evaluations_per_step`
    points. Given their values as an
    :class:`agsopt.smoothing.estimator.TabulatedValues` in place of ``fn``, the estimator
    reads them instead of evaluating ``fn``."""
    x = _flatten(params)
    k = directions.shape[0]
    dtype = jnp.result_type(x.dtype, jnp.float32)
    radii = jnp.broadcast_to(jnp.asarray(radii, dtype), (k,))
    rows = [x[None].astype(dtype)]
    for group, nodes in _node_groups(k, num_nodes, lateral_nodes):
        offsets = _offsets(nodes, dtype)[None, :, None]
        shifts = offsets * radii[group, None, None] * directions[group, None]
        rows.append((x + shifts).reshape(-1, x.shape[0]))
    flat = jnp.concatenate(rows).astype(x.dtype)
    return jax.vmap(lambda row: tree_unflatten_vector(row, params))(flat)


def _check_inputs(
    fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    directions: Any,
    radii: Any,
    chunk_size: int | None,
    owner: str,
    fun_name: str,
) -> jax.Array:
    """The argument checks of :func:`directional_value_and_grad` (errors name the argument
    and ``owner``, the caller); returns ``directions`` as a JAX array."""
    validation.check_float_params(params, owner)
    if not isinstance(inspect.unwrap(fn), TabulatedValues):
        validation.check_scalar_output(fn, params, owner, fun_name)
    directions = jnp.asarray(directions)
    if directions.ndim != 2:
        raise ValueError(f"directions must be a (k, d) array, got shape {directions.shape}")
    validation.check_positive("radii", radii)
    if chunk_size is not None:
        validation.check_int("chunk_size", chunk_size, minimum=1)
    return directions


def directional_value_and_grad(
    fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    directions: jax.Array,
    radii: jax.Array | float,
    *,
    num_nodes: int = 5,
    lateral_nodes: int | None = None,
    chunk_size: int | None = None,
) -> DirectionalEstimate:
    """Value, DGS gradient and per-direction statistics of ``fn`` at ``params``.

    Args:
      fn: the loss, a pytree of parameters → scalar; called only on points (black-box: no
        autodiff), :func:`evaluations_per_step` times (``k (M − 1) + 1``).
      params: the point x, a pytree of floating arrays (d numbers in all).
      directions: ``(k, d)`` orthonormal rows ξ_i in the order of ``jax.tree.leaves(params)``
        (:func:`directional_basis`). Other rows v_i give the derivatives along them (D_i of
        ``t ↦ f(x + t v_i)``) and ``grad = Σ_i D_i v_i``: :func:`agsopt.dgs` passes
        ``a ⊙ ξ_i`` for its anisotropic metric.
      radii: s_i > 0, a scalar or shape ``(k,)``.
      num_nodes: M, odd, ≥ 3 (ASGF uses 5): the nodes on every direction, or on the first
        one only where ``lateral_nodes`` is given.
      lateral_nodes: M', odd, ≥ 3, the nodes on the directions after the first (ASGF's
        auxiliary directions; None: M). The first is the main one, along which a step is
        taken (:func:`directional_basis`'s ``first``); its curvature is exact to degree
        2M − 3, the others' to 2M' − 3.
      chunk_size: directions evaluated at once (``vmap``-ped), the rest in sequence
        (``lax.map``): memory O(chunk_size · M · d). ``None``: all at once.

    Returns:
      A :class:`DirectionalEstimate` (see the module doc for the formulas).
    """
    return directional_estimate(
        fn,
        params,
        directions,
        radii,
        num_nodes=num_nodes,
        lateral_nodes=lateral_nodes,
        chunk_size=chunk_size,
        owner="agsopt.directional_value_and_grad",
        fun_name="fn",
    )


class _Quadrature(NamedTuple):
    """One group of directions sharing a node count: their statistics and best node."""

    derivatives: jax.Array
    curvatures: jax.Array
    lipschitz: jax.Array
    roughness: jax.Array
    best_value: jax.Array
    best_shift: jax.Array
    num_nonfinite: jax.Array


def _quadrature(
    center: jax.Array,
    side_values: jax.Array,
    num_nodes: int,
    directions: jax.Array,
    radii: jax.Array,
) -> _Quadrature:
    """The module doc's D_i, C_i, L_i, R_i from the node values ``side_values`` (rows × M − 1,
    τ = 0 left out) and the shared ``center`` f(x); the smallest finite node value and its
    shift from x."""
    dtype = side_values.dtype
    rows = side_values.shape[0]
    nodes, weights = gauss_hermite(num_nodes)
    half = num_nodes // 2
    g = jnp.concatenate(
        [side_values[:, :half], jnp.broadcast_to(center, (rows, 1)), side_values[:, half:]], 1
    )
    finite = jnp.isfinite(g)
    valid = jnp.all(finite, axis=1)
    g_safe = jnp.where(finite, g, 0.0)
    tau = jnp.asarray(nodes, dtype)
    w = jnp.asarray(weights, dtype)
    sqrt_pi = math.sqrt(math.pi)
    derivatives = math.sqrt(2.0) * (g_safe @ (w * tau)) / (sqrt_pi * radii)
    curvatures = (g_safe @ (w * (2.0 * tau**2 - 1.0))) / (sqrt_pi * radii**2)
    slopes = jnp.abs(jnp.diff(g_safe, axis=1)) / (math.sqrt(2.0) * jnp.diff(tau))
    lipschitz = jnp.max(slopes, axis=1) / radii
    nan = jnp.asarray(jnp.nan, dtype)
    ranked = jnp.where(finite, g, jnp.inf).reshape(-1)
    best = jnp.argmin(ranked)
    row, col = best // num_nodes, best % num_nodes
    return _Quadrature(
        derivatives=jnp.where(valid, derivatives, 0.0),
        curvatures=jnp.where(valid, curvatures, nan),
        lipschitz=jnp.where(valid, lipschitz, nan),
        roughness=jnp.where(valid, _roughness(g_safe, nodes), nan),
        best_value=ranked[best],
        best_shift=math.sqrt(2.0) * tau[col] * radii[row] * directions[row],
        num_nonfinite=jnp.sum(~finite[:, :half]).astype(jnp.int32)
        + jnp.sum(~finite[:, half + 1 :]).astype(jnp.int32),
    )


def directional_estimate(
    fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    directions: jax.Array,
    radii: jax.Array | float,
    *,
    num_nodes: int = 5,
    lateral_nodes: int | None = None,
    chunk_size: int | None = None,
    owner: str,
    fun_name: str,
) -> DirectionalEstimate:
    """:func:`directional_value_and_grad`, with the caller's names in its error messages."""
    directions = _check_inputs(fn, params, directions, radii, chunk_size, owner, fun_name)
    x = _flatten(params)
    k, dim = directions.shape
    if dim != x.shape[0]:
        raise ValueError(
            f"directions must have d = {x.shape[0]} columns, got shape {directions.shape}"
        )
    groups = _node_groups(k, num_nodes, lateral_nodes)
    dtype = jnp.result_type(x.dtype, jnp.float32)
    directions = directions.astype(dtype)
    radii = jnp.broadcast_to(jnp.asarray(radii, dtype), (k,))

    def point(shift: jax.Array) -> PyTree:
        return tree_unflatten_vector((x + shift).astype(x.dtype), params)

    def values_along(offsets: jax.Array, row: tuple[jax.Array, jax.Array]) -> jax.Array:
        xi, s = row
        return jax.vmap(lambda c: jnp.asarray(fn(point(c * s * xi)), dtype))(offsets)

    table = inspect.unwrap(fn)
    count = evaluations_per_step(k, num_nodes, lateral_nodes)
    if isinstance(table, TabulatedValues):  # ask/tell: the values of directional_points
        values = jnp.asarray(table.values, dtype)
        if values.shape != (count,):
            raise ValueError(
                f"the tabulated values must have shape ({count},), one per point of "
                f"directional_points, got {values.shape}"
            )
        center = values[0]
    else:
        center = jnp.asarray(fn(params), dtype)
    parts, read = [], 1  # read: the first tabulated value of the group
    for group, nodes in groups:
        rows = group.stop - group.start
        if isinstance(table, TabulatedValues):
            side_values = values[read : read + rows * (nodes - 1)].reshape(rows, nodes - 1)
        else:
            batch = rows if chunk_size is None else max(1, min(int(chunk_size), rows))
            along = functools.partial(values_along, _offsets(nodes, dtype))
            side_values = jax.lax.map(along, (directions[group], radii[group]), batch_size=batch)
        parts.append(_quadrature(center, side_values, nodes, directions[group], radii[group]))
        read += rows * (nodes - 1)

    def joined(field: str) -> jax.Array:
        return jnp.concatenate([getattr(part, field) for part in parts])

    derivatives = joined("derivatives")
    grad_flat = jnp.matmul(derivatives, directions, precision=jax.lax.Precision.HIGHEST)
    best_values = jnp.stack([part.best_value for part in parts])
    best = jnp.argmin(best_values)
    best_shift = jnp.stack([part.best_shift for part in parts])[best]
    num_nonfinite = sum(part.num_nonfinite for part in parts)
    return DirectionalEstimate(
        value=center,
        grad=tree_unflatten_vector(grad_flat, params),
        derivatives=derivatives,
        curvatures=joined("curvatures"),
        lipschitz=joined("lipschitz"),
        roughness=joined("roughness"),
        best_value=best_values[best],
        best_params=point(best_shift),
        num_evaluations=jnp.asarray(count, jnp.int32),
        num_nonfinite=num_nonfinite + (~jnp.isfinite(center)).astype(jnp.int32),
    )
