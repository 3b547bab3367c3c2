"""Adaptation rules for directional smoothing: radius, metric, learning rate.

The pieces of ASGF's loop (Dereventsov, Webster & Daws, arXiv:2006.10887), written as pure
functions for :func:`agsopt.dgs`, and the anisotropic metric (ours). Radii are in
the library's convention (perturbation ``s·u``, ``u ~ N(0, 1)``); ASGF's are √2 times ours.

- :func:`smoothness_ratio`: ``r = |D| / L``, the smoothed directional derivative over the
  local Lipschitz estimate of the same quadrature. Near 1 the function is monotone at the
  scale s along that direction (the smoothing is not hiding anything: s may grow); near 0
  the ripples at scale s dominate the slope, or the point is a smoothed minimum (s shrinks).
- :func:`adapt_radius`: ASGF's threshold rule with thresholds that adapt: ``r < A`` shrinks
  s by ``rate`` and lowers A, ``r > B`` grows s by ``1/rate`` and raises B, otherwise A
  rises and B falls (so a radius that stays put becomes easier to move).
- :func:`curvature_learning_rate`: ``lr = 1/C_1``, the Newton step of the smoothed function
  along the main direction, capped at the quadrature's span (ours; the default step).
- :func:`lipschitz_learning_rate`: ``lr = clip(√2 s / L̄, lr_min, lr_max)`` with L̄ a
  running average of the main direction's Lipschitz estimate: a step of about the
  smoothing radius where the slope is about L̄.
- :func:`coordinate_curvature`, :func:`diagonal_fit`, :func:`adapt_scales`,
  :func:`adapt_metric`: the anisotropic metric ``Σ = s² diag(a)²`` — a diagonal Hessian
  fitted to the directional curvatures, a ∝ h^{-1/2} followed as far as that fit predicts
  fresh directions (the anisotropy of AGS, arXiv:2411.11747, learned from the function).
- :func:`root_factors`, :func:`sketch_hessian`, :func:`secant_hessian`,
  :func:`adapt_root`, :func:`adapt_full_metric`: the full metric ``Σ = s² A²`` (A
  symmetric): a Hessian model updated by projections onto the measured directional
  curvatures and the secant pair of consecutive gradients, scored against the diagonal fit;
  A moves towards the better model's ``^{-1/2}`` as far as it predicts fresh directions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "RadiusThresholds",
    "FullMetric",
    "adapt_full_metric",
    "adapt_metric",
    "adapt_radius",
    "adapt_root",
    "adapt_scales",
    "average_lipschitz",
    "coordinate_curvature",
    "curvature_learning_rate",
    "fit_trust",
    "diagonal_fit",
    "initial_thresholds",
    "lipschitz_learning_rate",
    "metric_step",
    "r_squared",
    "running_fit",
    "root_factors",
    "secant_hessian",
    "sketch_hessian",
    "smoothness_ratio",
]

LOWER_THRESHOLD = 0.1
"""A_0: below it the radius shrinks (ASGF's default)."""
UPPER_THRESHOLD = 0.9
"""B_0: above it the radius grows (ASGF's default)."""


class RadiusThresholds(NamedTuple):
    """The adaptive thresholds A (lower) and B (upper), one per radius."""

    lower: jax.Array
    upper: jax.Array


def initial_thresholds(shape: tuple[int, ...], dtype=jnp.float32) -> RadiusThresholds:
    """``A = 0.1``, ``B = 0.9`` for every radius."""
    return RadiusThresholds(
        jnp.full(shape, LOWER_THRESHOLD, dtype), jnp.full(shape, UPPER_THRESHOLD, dtype)
    )


def smoothness_ratio(
    derivatives: jax.Array, lipschitz: jax.Array, tiny: float = 1e-12
) -> jax.Array:
    """``|D_i| / L_i`` elementwise (0 where L_i is 0 or not finite)."""
    ok = jnp.isfinite(lipschitz) & (lipschitz > tiny)
    return jnp.where(ok, jnp.abs(derivatives) / jnp.where(ok, lipschitz, 1.0), 0.0)


def adapt_radius(
    radius: jax.Array,
    ratio: jax.Array,
    thresholds: RadiusThresholds,
    *,
    rate: float = 0.9,
    lower_decrease: float = 0.95,
    lower_increase: float = 1.02,
    upper_decrease: float = 0.98,
    upper_increase: float = 1.01,
) -> tuple[jax.Array, RadiusThresholds]:
    """One step of ASGF's radius rule, elementwise over radii.

    ``r < A``: ``s ← rate·s``, ``A ← lower_decrease·A``; ``r > B``: ``s ← s/rate``,
    ``B ← upper_increase·B``; otherwise ``A ← lower_increase·A``, ``B ← upper_decrease·B``.
    """
    lower, upper = thresholds
    shrink = ratio < lower
    grow = (ratio > upper) & ~shrink
    stay = ~shrink & ~grow
    radius = jnp.where(shrink, radius * rate, jnp.where(grow, radius / rate, radius))
    lower = jnp.where(
        shrink, lower * lower_decrease, jnp.where(stay, lower * lower_increase, lower)
    )
    upper = jnp.where(grow, upper * upper_increase, jnp.where(stay, upper * upper_decrease, upper))
    return radius, RadiusThresholds(lower, upper)


def average_lipschitz(average: jax.Array, new: jax.Array, decay: float = 0.9) -> jax.Array:
    """``decay·L̄ + (1 − decay)·L``; the first finite L itself where L̄ is NaN (no average
    yet: ASGF's L̄_0 = 1 is scale-dependent and made the first steps diverge on functions
    with large slopes); L̄ kept where L is not finite."""
    mixed = jnp.where(jnp.isnan(average), new, decay * average + (1.0 - decay) * new)
    return jnp.where(jnp.isfinite(new), mixed, average)


def lipschitz_learning_rate(
    radius: jax.Array, lipschitz_avg: jax.Array, lr_min: float = 0.0, lr_max: float = jnp.inf
) -> jax.Array:
    """``clip(√2 s / L̄, lr_min, lr_max)`` (ASGF's ``s/L̄`` in its own radius convention).

    No clipping by default: ASGF's absolute bounds [1e-3, 1e3] are scale-dependent (on an
    ellipsoid with slopes of 10⁵ the floor 1e-3 is a step 100× too long, and it diverged).
    """
    lr = math.sqrt(2.0) * radius / jnp.maximum(lipschitz_avg, jnp.finfo(jnp.float32).tiny)
    return jnp.clip(lr, lr_min, lr_max)


REACH = 2.0
"""Steps are at most ``√2·REACH·s`` long: the span of the quadrature's nodes at M = 5
(the outer nodes sit at ±2.02·√2 s), where the measured curvature holds."""


def curvature_learning_rate(
    curvature: jax.Array, grad_norm: jax.Array, radius: jax.Array, fallback: jax.Array
) -> jax.Array:
    """``lr = 1/C_1``, the Newton step of the smoothed function along the main direction
    (C_1 = G_1''(0) from the same quadrature, no extra evaluation), where ``C_1 > 0``;
    ``fallback`` (the Lipschitz rate) where it is not; in both cases at most the rate that
    makes the step ``√2·REACH·s`` long (a trust region: the span the quadrature saw).

    Exact line minimization for a quadratic along its gradient (the sphere in one step);
    scale-free, unlike a Lipschitz rate whose L̄ reflects the steepest slope seen.
    """
    positive = jnp.isfinite(curvature) & (curvature > 0)
    lr = jnp.where(positive, 1.0 / jnp.where(positive, curvature, 1.0), fallback)
    cap = math.sqrt(2.0) * REACH * radius / jnp.maximum(grad_norm, jnp.finfo(jnp.float32).tiny)
    return jnp.minimum(lr, cap)


def coordinate_curvature(basis: jax.Array, curvatures: jax.Array, ridge: float = 1e-6) -> jax.Array:
    """Each coordinate's curvature ``h_j`` fitted to the directional curvatures
    ``C_i = ξ_iᵀHξ_i`` along the orthonormal rows ξ_i of ``basis`` (k × d).

    The model of a diagonal H, ``C_i = Σ_j ξ_ij² h_j``, i.e. ``C = W h`` with
    ``W_ij = ξ_ij²``, solved in ridge least squares,
    ``h = argmin ‖W h − C‖² + λ‖h‖² = Wᵀ (W Wᵀ + λI)⁻¹ C`` with
    ``λ = ridge·‖W‖²_F / d``, computed from the thin SVD ``W = U S Vᵀ`` as
    ``h = V diag(s / (s² + λ)) Uᵀ C`` (memory O(k·d), as the basis). The SVD keeps the
    rounding error at ``ε·cond(W)`` where forming ``W Wᵀ`` squares the condition number:
    W of a random orthonormal basis is ill-conditioned (cond(W) ≈ 20 at d = 8, ≈ 2000 at
    d = 100, with a heavy tail), so ``cond(W)²`` exceeds float32's 1/ε. Exact for a
    diagonal H and a full basis, up to that rounding; with k < d the minimum-norm fit. NaN
    where a C_i is not finite."""
    weights = basis * basis
    dim = basis.shape[1]
    finite = jnp.all(jnp.isfinite(curvatures))
    c = jnp.where(jnp.isfinite(curvatures), curvatures, 0.0)
    hp = jax.lax.Precision.HIGHEST
    left, singular, right = jnp.linalg.svd(weights, full_matrices=False)
    lam = ridge * jnp.sum(singular**2) / dim
    filtered = singular / (singular**2 + lam) * jnp.matmul(c, left, precision=hp)
    estimate = jnp.matmul(filtered, right, precision=hp)
    return jnp.where(finite, estimate, jnp.nan)


def diagonal_fit(basis: jax.Array, curvatures: jax.Array, curvature: jax.Array) -> jax.Array:
    """How well a diagonal curvature ``h`` (fitted on earlier directions) predicts the
    directional curvatures ``C_i`` along fresh rows ξ_i of ``basis``: the coefficient of
    determination ``R² = 1 − Σ_i (C_i − Σ_j ξ_ij² h_j)² / Σ_i (C_i − C̄)²``, clipped to
    [0, 1]. Near 1 for a quadratic with a diagonal Hessian, near 0 where ripples or a
    rotated Hessian make the diagonal model useless; 0 where anything is not finite."""
    predicted = jnp.matmul(basis * basis, curvature, precision=jax.lax.Precision.HIGHEST)
    return r_squared(curvatures, predicted)


def r_squared(observed: jax.Array, predicted: jax.Array) -> jax.Array:
    """``1 − Σ(o − p)² / Σ(o − ō)²`` clipped to [0, 1]; 0 where anything is not finite or
    the observations do not vary."""
    residual = jnp.sum((observed - predicted) ** 2)
    spread = jnp.sum((observed - jnp.mean(observed)) ** 2)
    r2 = 1.0 - residual / jnp.where(spread > 0, spread, 1.0)
    ok = jnp.isfinite(r2) & (spread > 0) & jnp.all(jnp.isfinite(predicted))
    return jnp.where(ok, jnp.clip(r2, 0.0, 1.0), 0.0)


def adapt_scales(
    scales: jax.Array,
    curvature: jax.Array,
    rate: jax.Array | float,
    relax: jax.Array | float = 0.0,
    *,
    max_ratio: float = 10.0,
    span: float = 100.0,
) -> jax.Array:
    """One multiplicative step of per-coordinate scales a towards ``a_j ∝ h_j^{-1/2}``.

    ``h`` is the coordinate curvature in the current scaled coordinates ``y = x / a``
    (:func:`coordinate_curvature`); at the fixed point h is flat in y, i.e. ``Σ ∝ H⁻¹`` in
    x, the smoothing's length along each coordinate matched to the function's (the shape
    CMA-ES learns). With ``h⁺ = max(h, max_j h_j / span)`` (a ripple's or a concave
    stretch's h ≤ 0 counts as the flattest allowed)

        log a ← (1 − relax)·log a − (rate/2)·(log h⁺ − mean log h⁺),

    then centred (geometric mean 1: the radius keeps its meaning) and clipped to
    ``[1/max_ratio, max_ratio]``. Where every h_j ≤ 0 or one is not finite only the
    relaxation ``a ← a^(1 − relax)`` applies.
    """
    top = jnp.max(curvature)
    usable = jnp.all(jnp.isfinite(curvature)) & (top > 0)
    h = jnp.maximum(curvature, top / span)
    log_h = jnp.log(jnp.where(usable, h, 1.0))
    kept = (1.0 - relax) * jnp.log(scales)
    log_a = kept - 0.5 * jnp.where(usable, rate, 0.0) * (log_h - jnp.mean(log_h))
    bound = math.log(max_ratio)
    return jnp.exp(jnp.clip(log_a - jnp.mean(log_a), -bound, bound))


METRIC_RATE = 0.5
"""The metric's learning rate at a perfect diagonal fit (R² = 1)."""
METRIC_FIT_DECAY = 0.8
"""The decay of the running R² that weights the metric's steps."""
METRIC_RELAX = 0.3
"""How fast the metric relaxes towards isotropy where the diagonal fit is poor (R² = 0)."""
DGS_FIT_THRESHOLD = 0.3
""":func:`adapt_metric`'s threshold on the running R²: below it the quadrature's diagonal
fit is not followed at all (measured on the black-box suite: a rotated ellipsoid's partial
fits cost 1.2× the calls of one radius without it)."""


def running_fit(fit: jax.Array, r2: jax.Array) -> jax.Array:
    """The running R² of a curvature model: ``decay·fit + (1 − decay)·R²`` (decay
    :data:`METRIC_FIT_DECAY`)."""
    return METRIC_FIT_DECAY * fit + (1.0 - METRIC_FIT_DECAY) * r2


def fit_trust(fit: jax.Array, threshold: float) -> jax.Array:
    """How far a model with running R² ``fit`` is followed: ``clip((fit − t) / (1 − t), 0, 1)``
    (t = ``threshold``; 0 at or below it, 1 at a perfect fit)."""
    return jnp.clip((fit - threshold) / (1.0 - threshold), 0.0, 1.0)


def metric_step(
    scales: jax.Array,
    curvature: jax.Array,
    fit: jax.Array,
    h_y: jax.Array,
    r2: jax.Array,
    ok: jax.Array,
    threshold: float = 0.0,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The metric's step given this step's coordinate curvature ``h_y`` (in the scaled
    coordinates y = x / a) and the R² with which the last one predicted this step's
    measurements: ``(scales, curvature in x, fit)``. ``fit`` averages R² (decay
    :data:`METRIC_FIT_DECAY`); with the trust ``τ = clip((fit − t) / (1 − t), 0, 1)``
    (``t = threshold``; τ = fit for t = 0) the scales take an :func:`adapt_scales` step at
    the rate ``METRIC_RATE·τ``, relaxing towards 1 at ``METRIC_RELAX·(1 − τ)``: a diagonal
    model that predicts fresh measurements is followed, one that does not (ripples, a
    rotated Hessian, sampling noise) is forgotten. Everything is kept where ``ok`` is false
    or h_y is not finite."""
    new_fit = running_fit(fit, r2)
    trust = fit_trust(new_fit, threshold)
    new_scales = adapt_scales(scales, h_y, METRIC_RATE * trust, METRIC_RELAX * (1.0 - trust))
    good = ok & jnp.all(jnp.isfinite(h_y))
    return (
        jnp.where(good, new_scales, scales),
        jnp.where(good, h_y / scales**2, curvature),
        jnp.where(ok, new_fit, fit),
    )


def adapt_metric(
    scales: jax.Array,
    curvature: jax.Array,
    fit: jax.Array,
    basis: jax.Array,
    curvatures: jax.Array,
    ok: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One step of :func:`agsopt.dgs`'s anisotropic metric: ``(scales, curvature, fit)``.

    ``curvature`` is the last diagonal fit in x (zeros before the first: R² = 0), ``fit``
    the running R² of such fits on fresh directions; ``basis`` this step's orthonormal rows
    in y = x / a and ``curvatures`` their measured C_i. The R² of the last curvature on
    this step's directions (:func:`diagonal_fit`) and this step's fit
    (:func:`coordinate_curvature`) go to :func:`metric_step`, with the threshold
    :data:`DGS_FIT_THRESHOLD` on the running R².
    """
    r2 = diagonal_fit(basis, curvatures, curvature * scales**2)
    h_y = coordinate_curvature(basis, curvatures)
    return metric_step(scales, curvature, fit, h_y, r2, ok, DGS_FIT_THRESHOLD)


# --------------------------------------------------------------------------------------
# The full metric Σ = s² A² (A symmetric positive definite, det A = 1)
# --------------------------------------------------------------------------------------

FULL_METRIC_SPAN = 1e4
""":func:`adapt_root`'s floor on the model's curvatures, as a fraction of the largest (in x,
where the diagonal rule's ``span = 100`` applies to the scaled coordinates y: the same reach
as its ``a ∈ [1/10, 10]``, 10⁴ in curvature)."""

_HIGHEST = jax.lax.Precision.HIGHEST


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    return jnp.matmul(a, b, precision=_HIGHEST)


def _from_eigen(vectors: jax.Array, values: jax.Array) -> jax.Array:
    """``U diag(values) Uᵀ``."""
    return _matmul(vectors * values, vectors.T)


def root_factors(root: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(A⁻¹, log A)`` of a symmetric positive definite A, from one eigendecomposition."""
    values, vectors = jnp.linalg.eigh(root)
    return _from_eigen(vectors, 1.0 / values), _from_eigen(vectors, jnp.log(values))


def sketch_hessian(
    hessian: jax.Array, directions: jax.Array, duals: jax.Array, curvatures: jax.Array
) -> jax.Array:
    """The Hessian model Ĥ (in x) projected onto the measured curvatures ``C_i = v_iᵀHv_i``.

    ``directions`` holds the rows ``v_i = A ξ_i`` (ξ_i orthonormal), ``duals`` the rows
    ``w_i = A⁻¹ ξ_i`` (``v_iᵀ w_j = δ_ij``). The smallest change of ``AĤA`` in the Frobenius
    norm that makes every ``v_iᵀĤv_i = C_i``:

        Ĥ ← Ĥ + Σ_i (C_i − v_iᵀĤv_i) w_i w_iᵀ,

    a sketch-and-project (randomized Kaczmarz) step towards H: with fresh orthonormal ξ each
    step, the error of a quadratic's model shrinks by about ``1 − 2k / (d(d + 1))`` in
    expectation. Kept where a C_i is not finite."""
    predicted = jnp.sum(_matmul(directions, hessian) * directions, axis=1)
    finite = jnp.all(jnp.isfinite(curvatures))
    residual = jnp.where(finite, curvatures - predicted, 0.0)
    updated = hessian + _matmul(duals.T * residual, duals)
    return jnp.where(finite, 0.5 * (updated + updated.T), hessian)


def secant_hessian(
    hessian: jax.Array,
    root: jax.Array,
    root_inverse: jax.Array,
    step: jax.Array,
    gradient_change: jax.Array,
) -> jax.Array:
    """The Hessian model Ĥ (in x) updated to the secant pair ``Ĥ Δx = Δg`` of two
    consecutive smoothed gradients: Powell's symmetric Broyden (PSB) update, the smallest
    symmetric change of ``AĤA`` in the Frobenius norm, in the scaled coordinates
    ``u = A⁻¹Δx``, ``r = AΔg − AĤA u``:

        AĤA ← AĤA + (r uᵀ + u rᵀ) / (uᵀu) − (rᵀu) u uᵀ / (uᵀu)².

    Exact for a quadratic (its Gaussian smoothing has the same gradient). Kept where the pair
    is not finite (e.g. before the second step) or ``Δx = 0``."""
    u = _matmul(root_inverse, step)
    scaled = _matmul(root, _matmul(hessian, root))
    norm2 = jnp.sum(u * u)
    residual = _matmul(root, gradient_change) - _matmul(scaled, u)
    ok = jnp.all(jnp.isfinite(residual)) & jnp.all(jnp.isfinite(u)) & (norm2 > 0)
    norm2 = jnp.where(ok, norm2, 1.0)
    residual = jnp.where(ok, residual, 0.0)
    u = jnp.where(ok, u, 0.0)
    change = (jnp.outer(residual, u) + jnp.outer(u, residual)) / norm2
    change = change - jnp.dot(residual, u) * jnp.outer(u, u) / norm2**2
    updated = _matmul(root_inverse, _matmul(scaled + change, root_inverse))
    return jnp.where(ok, 0.5 * (updated + updated.T), hessian)


def adapt_root(
    log_root: jax.Array,
    hessian: jax.Array,
    rate: jax.Array | float,
    relax: jax.Array | float = 0.0,
    *,
    max_ratio: float = 10.0,
    span: float = FULL_METRIC_SPAN,
) -> jax.Array:
    """One step of the metric's square root A towards ``A ∝ Ĥ^{-1/2}``, in log space: with
    ``Ĥ = U diag(h) Uᵀ`` and ``h⁺ = max(h, max_j h_j / span)``

        log A ← (1 − relax − rate)·log A − (rate/2)·U diag(log h⁺ − mean log h⁺) Uᵀ,

    then traced to 0 (det A = 1: the radius keeps its meaning) and its eigenvalues clipped
    to ``[−log max_ratio, log max_ratio]``; returns the new A. :func:`adapt_scales`'s rule
    for a matrix (the same for a diagonal Ĥ, with the floor taken in x). Where every
    ``h_j ≤ 0`` or one is not finite only the relaxation applies."""
    dim = log_root.shape[0]
    values, vectors = jnp.linalg.eigh(hessian)
    top = jnp.max(values)
    usable = jnp.all(jnp.isfinite(values)) & (top > 0)
    log_h = jnp.log(jnp.where(usable, jnp.maximum(values, top / span), 1.0))
    target = _from_eigen(vectors, -0.5 * (log_h - jnp.mean(log_h)))
    rate = jnp.where(usable, rate, 0.0)
    new_log = (1.0 - relax - rate) * log_root + rate * target
    new_log = new_log - jnp.trace(new_log) / dim * jnp.eye(dim, dtype=log_root.dtype)
    values, vectors = jnp.linalg.eigh(0.5 * (new_log + new_log.T))
    bound = math.log(max_ratio)
    return _from_eigen(vectors, jnp.exp(jnp.clip(values, -bound, bound)))


class FullMetric(NamedTuple):
    """The full metric's state (:func:`adapt_full_metric`).

    Attributes:
      root: A, symmetric positive definite with det 1 (Σ = s² A², x = A y).
      hessian: Ĥ, the Hessian model in x (zeros before the first step).
      hessian_fit: running R² of Ĥ's predictions of fresh directional curvatures.
      diagonal: the last diagonal fit h in x (:func:`coordinate_curvature` of the directions
        ``A ξ_i``; zeros before the first step).
      diagonal_fit: running R² of that fit's predictions.
    """

    root: jax.Array
    hessian: jax.Array
    hessian_fit: jax.Array
    diagonal: jax.Array
    diagonal_fit: jax.Array


def adapt_full_metric(
    metric: FullMetric,
    basis: jax.Array,
    curvatures: jax.Array,
    step: jax.Array,
    gradient_change: jax.Array,
    ok: jax.Array,
    factors: tuple[jax.Array, jax.Array] | None = None,
) -> FullMetric:
    """One step of :func:`agsopt.dgs`'s full metric ``Σ = s² A²``.

    ``basis`` holds this step's orthonormal rows ξ_i (the directions were ``v_i = A ξ_i``),
    ``curvatures`` their measured ``C_i``, ``(step, gradient_change)`` the secant pair since
    the last step (in x; NaN before it). Two models of the curvature are kept and scored by
    the running R² (decay :data:`METRIC_FIT_DECAY`) with which each predicted the fresh
    ``C_i`` (:func:`r_squared`):

    - the Hessian model Ĥ, updated by :func:`secant_hessian` then :func:`sketch_hessian`
      (it learns any H, rotated or not, in about d/2 steps);
    - the diagonal fit h of this step's curvatures alone (:func:`coordinate_curvature` of
      the rows v_i, their columns equilibrated by A's row norms: for a diagonal A the
      diagonal metric's own fit; exact in one step where H is diagonal in the coordinates).

    A takes an :func:`adapt_root` step towards the better-scoring model (Ĥ or diag(h)) with
    the trust of :func:`metric_step` on its score (threshold :data:`DGS_FIT_THRESHOLD`).
    Everything is kept where ``ok`` is false; each model where its update is not finite.
    ``factors``: :func:`root_factors` of A where the caller has them (else computed here).
    """
    root_inverse, log_root = root_factors(metric.root) if factors is None else factors
    directions = _matmul(basis, metric.root)  # rows A ξ_i (A is symmetric)
    predicted = jnp.sum(_matmul(directions, metric.hessian) * directions, axis=1)
    hessian_r2 = r_squared(curvatures, predicted)
    diagonal_r2 = diagonal_fit(directions, curvatures, metric.diagonal)
    hessian = secant_hessian(metric.hessian, metric.root, root_inverse, step, gradient_change)
    hessian = sketch_hessian(hessian, directions, _matmul(basis, root_inverse), curvatures)
    # columns scaled by A's row norms (a_j for a diagonal A: then the diagonal metric's fit,
    # in y); unscaled, W = v ⊙ v inherits A's spread and the ridge biases the fit
    scale = jnp.sqrt(jnp.sum(metric.root * metric.root, axis=1))
    diagonal = coordinate_curvature(directions / scale, curvatures) / scale**2
    hessian_ok = jnp.all(jnp.isfinite(hessian))
    diagonal_ok = jnp.all(jnp.isfinite(diagonal))
    hessian_fit = running_fit(metric.hessian_fit, hessian_r2)
    diagonal_fit_ = running_fit(metric.diagonal_fit, diagonal_r2)
    use_diagonal = diagonal_ok & (diagonal_fit_ > hessian_fit)
    score = jnp.where(use_diagonal, diagonal_fit_, hessian_fit)
    target = jnp.where(use_diagonal, jnp.diag(jnp.where(diagonal_ok, diagonal, 0.0)), hessian)
    trust = fit_trust(score, DGS_FIT_THRESHOLD)
    root = adapt_root(log_root, target, METRIC_RATE * trust, METRIC_RELAX * (1.0 - trust))
    root_ok = ok & jnp.all(jnp.isfinite(root))
    return FullMetric(
        root=jnp.where(root_ok, root, metric.root),
        hessian=jnp.where(ok & hessian_ok, hessian, metric.hessian),
        hessian_fit=jnp.where(ok, hessian_fit, metric.hessian_fit),
        diagonal=jnp.where(ok & diagonal_ok, diagonal, metric.diagonal),
        diagonal_fit=jnp.where(ok, diagonal_fit_, metric.diagonal_fit),
    )
