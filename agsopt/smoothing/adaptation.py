"""Adaptation rules for directional smoothing: radius, learning rate, restarts.

The pieces of ASGF's loop (Dereventsov, Webster & Daws, arXiv:2006.10887), written as pure
elementwise functions so that :func:`agsopt.dgs` can apply them to one radius (isotropic
smoothing) or to several (one per group of directions: anisotropic smoothing). Radii are in
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
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = [
    "RadiusThresholds",
    "adapt_factor",
    "adapt_radius",
    "average_lipschitz",
    "curvature_learning_rate",
    "initial_thresholds",
    "lipschitz_learning_rate",
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


def adapt_factor(
    factor: jax.Array,
    roughness: jax.Array,
    *,
    rough: float = 0.5,
    smooth: float = 0.2,
    rate: float = 0.9,
    max_factor: float = 10.0,
) -> jax.Array:
    """Anisotropy factor a ≥ 1 of the directions across the main one: ``a ← a/rate`` where
    their mean roughness exceeds ``rough`` (ripples: smooth them wider), ``a ← a·rate``
    below ``smooth`` (smooth at this scale: no need), clipped to ``[1, max_factor]``; a
    non-finite roughness keeps a."""
    grown = jnp.where(roughness > rough, factor / rate, factor)
    shrunk = jnp.where(roughness < smooth, factor * rate, grown)
    return jnp.where(jnp.isfinite(roughness), jnp.clip(shrunk, 1.0, max_factor), factor)


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
