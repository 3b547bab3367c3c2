"""How the smoothing matrix Σ adapts from step to step: pluggable covariance rules.

AGS (Starnes et al., arXiv:2411.11747) smooths with a Σ "adjusted to the gradient's
behaviour"; the paper's exact rule is not published, so agsopt offers rules as pieces:

    rule = CovarianceRule(init, matrix, update)
    rule_state = rule.init(params)
    Σ = rule.matrix(rule_state, sigma)            # sigma: the step's σ (scalar or per leaf)
    rule_state = rule.update(rule_state, grad_estimate)

Every rule keeps the overall scale σ (which a schedule may drive) and decides the *shape*
of Σ. The rules:

- :func:`isotropic`: ``Σ = σI`` (IGS, the baseline);
- :func:`fixed_diagonal`: ``Σ = σ diag(s)`` for a user-given pytree ``s``;
- :func:`gradient_aligned`: ``Σ = σ(I + (κ − 1) v vᵀ)``, ``v`` the unit direction of an
  exponential moving average of past gradient estimates: radius κσ along the direction the
  iterates travel, σ across it;
- :func:`adaptive_gradient_aligned` (the default of :func:`agsopt.ags`): the same shape with
  κ ≤ 1 re-chosen every step to minimize the estimator's error for a locally linear f,
  narrow along a direction the gradients keep following, isotropic when it tells nothing;
- :func:`adaptive_diagonal`: ``Σ = σ diag(r)``, ``r_i`` proportional to the running standard
  deviation of the i-th gradient coordinate, normalized to mean square 1 (so ‖Σ‖_F equals
  IGS's) and clipped: smooth more where the gradient fluctuates more.

Rule states are NamedTuples of arrays whose dtypes and shapes do not change from step to
step (in float32 and in x64 mode), so they can be carried through ``lax.scan``. The caller
(:func:`agsopt.ags`) applies ``update`` only to a finite estimate and drops a new state that
is not finite, so a bad step never corrupts the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from agsopt import _validation as validation
from agsopt.smoothing import covariance
from agsopt.tree_utils import accumulation_dtype, tree_norm, tree_scale, tree_size, tree_vdot

PyTree = Any

__all__ = [
    "AdaptiveDiagonalState",
    "AdaptiveGradientAlignedState",
    "CovarianceRule",
    "EmptyRuleState",
    "GradientAlignedState",
    "adaptive_diagonal",
    "adaptive_gradient_aligned",
    "fixed_diagonal",
    "get_rule",
    "gradient_aligned",
    "isotropic",
]


class CovarianceRule(NamedTuple):
    """A pluggable rule for Σ: ``init(params)``, ``matrix(state, sigma)``, ``update(state, g)``."""

    init: Callable[[PyTree], Any]
    matrix: Callable[[Any, PyTree], Any]
    update: Callable[[Any, PyTree], Any]


class EmptyRuleState(NamedTuple):
    """State of the stateless rules."""


def _f32_zeros_like(params: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, accumulation_dtype(x.dtype)), params)


def _ema(old: PyTree, new: PyTree, decay: float) -> PyTree:
    return jax.tree.map(lambda m, g: decay * m + (1.0 - decay) * g.astype(m.dtype), old, new)


def isotropic() -> CovarianceRule:
    """IGS: ``Σ = σI`` at every step (σ a scalar or one per leaf)."""
    return CovarianceRule(
        init=lambda params: EmptyRuleState(),
        matrix=lambda state, sigma: covariance.isotropic(sigma),
        update=lambda state, grad: state,
    )


def fixed_diagonal(scale: PyTree) -> CovarianceRule:
    """``Σ = σ diag(scale)`` for a fixed positive pytree ``scale`` like the parameters."""
    validation.check_positive("scale", scale)

    def matrix(state, sigma):
        del state
        return covariance.Product(covariance.Diagonal(sigma), covariance.Diagonal(scale))

    return CovarianceRule(lambda params: EmptyRuleState(), matrix, lambda state, grad: state)


class GradientAlignedState(NamedTuple):
    """Moving average ``m`` of the gradient estimates; Σ's long axis is ``m/‖m‖``."""

    momentum: PyTree


def gradient_aligned(ratio: float = 2.0, decay: float = 0.9) -> CovarianceRule:
    """``Σ = σ(I + (κ − 1) v vᵀ)`` with ``v = m/‖m‖``, ``m ← β m + (1 − β) ĝ``.

    The radius is ``κσ`` along the running-average direction of past gradient estimates and
    σ in every direction across it (ASGF-style, Tran, Webster & Zhang: the first smoothing
    direction follows the previous gradient). κ > 1 smooths harder along the descent path
    (to step over ripples there), κ < 1 keeps the descent direction sharp. Before the first
    estimate ``m = 0`` and Σ = σI.

    Args:
      ratio: κ = σ∥/σ⊥ > 0.
      decay: β in [0, 1) of the moving average.
    """
    validation.check_positive("ratio", ratio)
    _check_decay(decay)

    def init(params):
        return GradientAlignedState(momentum=_f32_zeros_like(params))

    def matrix(state, sigma):
        norm = tree_norm(state.momentum)
        direction = tree_scale(jnp.where(norm > 0, 1.0 / norm, 0.0), state.momentum)
        return covariance.gradient_aligned(sigma, ratio, direction)

    def update(state, grad):
        return GradientAlignedState(momentum=_ema(state.momentum, grad, decay))

    return CovarianceRule(init, matrix, update)


class AdaptiveDiagonalState(NamedTuple):
    """Moving averages of the gradient estimate and of its squared deviation, per entry."""

    mean: PyTree
    variance: PyTree
    count: jax.Array


def adaptive_diagonal(
    decay: float = 0.9, min_ratio: float = 0.25, max_ratio: float = 4.0
) -> CovarianceRule:
    """``Σ = σ diag(r)``: smooth more along coordinates whose gradient fluctuates more.

    With ``m ← βm + (1−β)g`` and ``v ← βv + (1−β)(g − m)²`` (bias-corrected), the raw ratios
    ``ρ_i = sqrt(v_i)`` are normalized to mean square one over all d entries,
    ``r = clip(ρ / sqrt(mean ρ²), min_ratio, max_ratio)``, so ``‖Σ‖_F ≈ σ√d`` as for IGS
    with the same σ. Until two estimates have been seen, or while the spread is below 1e-5 of
    the gradient's RMS (float rounding of a constant gradient), ``r = 1``.

    Args:
      decay: β in [0, 1) of the moving averages.
      min_ratio, max_ratio: bounds on r_i, which keep Σ well conditioned and invertible.
    """
    _check_decay(decay)
    validation.check_positive("min_ratio", min_ratio)
    validation.check_positive("max_ratio", max_ratio)
    if min_ratio > max_ratio:
        raise ValueError(f"min_ratio ({min_ratio}) must not exceed max_ratio ({max_ratio})")

    def init(params):
        zeros = _f32_zeros_like(params)
        return AdaptiveDiagonalState(zeros, zeros, jnp.zeros((), jnp.int32))

    def matrix(state, sigma):
        correction = 1.0 - decay ** jnp.maximum(state.count - 1, 1).astype(jnp.float32)
        spread = jax.tree.map(lambda v: jnp.sqrt(v / correction), state.variance)
        mean_square = tree_vdot(spread, spread) / tree_size(spread)
        # Spread below 1e-5 of the gradient's RMS is rounding noise of the averages, not signal.
        floor = 1e-10 * tree_vdot(state.mean, state.mean) / tree_size(spread)
        ready = (state.count >= 2) & (mean_square > floor)
        scale = 1.0 / jnp.sqrt(jnp.where(ready, mean_square, 1.0))
        ratios = jax.tree.map(
            lambda s: jnp.where(ready, jnp.clip(s * scale, min_ratio, max_ratio), 1.0), spread
        )
        return covariance.Product(covariance.Diagonal(sigma), covariance.Diagonal(ratios))

    def update(state, grad):
        first = state.count == 0
        grad = jax.tree.map(lambda g, m: g.astype(m.dtype), grad, state.mean)
        mean = jax.tree.map(
            lambda m, g: jnp.where(first, g, decay * m + (1 - decay) * g), state.mean, grad
        )
        variance = jax.tree.map(
            lambda v, m, g: jnp.where(first, v, decay * v + (1 - decay) * (g - m) ** 2),
            state.variance,
            mean,
            grad,
        )
        return AdaptiveDiagonalState(mean, variance, optax.safe_increment(state.count))

    return CovarianceRule(init, matrix, update)


def _check_decay(decay: float) -> None:
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must lie in [0, 1), got {decay}")


class AdaptiveGradientAlignedState(NamedTuple):
    """Moving averages: gradient estimates ``m``, their projection on ``v = m/‖m‖``, ``‖ĝ‖²``."""

    momentum: PyTree
    projection: jax.Array
    power: jax.Array
    count: jax.Array


def adaptive_gradient_aligned(
    decay: float = 0.9,
    statistics_decay: float = 0.9,
    min_ratio: float = 0.1,
    max_ratio: float = 1.0,
) -> CovarianceRule:
    """``Σ = σ(I + (κ − 1) v vᵀ)`` as :func:`gradient_aligned`, with κ chosen at every step.

    The direction ``v = m/‖m‖`` is the same as in :func:`gradient_aligned`
    (``m ← β m + (1 − β) ĝ``). The ratio κ = σ∥/σ⊥ minimizes the error of the antithetic
    estimate for a locally linear f, ``∇f ≈ g``: with ``c = cos²(v, g)`` its mean squared
    error is ``‖g‖²/N · [1 + ((1 − c) + κ² c)(d − 1 + 1/κ²)]``, smallest at
    ``κ⁴ = (1 − c) / (c (d − 1))``. So Σ is narrow along a direction the gradients keep
    pointing to (the error across it shrinks like κ) and isotropic when the direction carries
    no information (c ≲ 1/d). ``c`` is estimated from running averages of the projection
    ``v·ĝ`` (unbiased for ``v·g``, since ``v`` predates ``ĝ``) and of ``‖ĝ‖²``, which the
    estimator's noise inflates: the estimate of c errs low, towards isotropic smoothing.

    In the convergence study (``python -m agsopt study``, d = 100) this rule matches IGS on
    the separable multimodal functions and lowers the final f − f* of the rotated
    ill-conditioned ones, where the fixed κ = 2 of :func:`gradient_aligned` raises it.

    Args:
      decay: β in [0, 1) of the moving average ``m`` that gives the direction.
      statistics_decay: in [0, 1), of the averages that estimate ``c``.
      min_ratio, max_ratio: bounds on κ (0 < min_ratio ≤ max_ratio); ``max_ratio = 1`` never
        smooths more along ``v`` than across it.
    """
    _check_decay(decay)
    _check_decay(statistics_decay)
    validation.check_positive("min_ratio", min_ratio)
    validation.check_positive("max_ratio", max_ratio)
    if min_ratio > max_ratio:
        raise ValueError(f"min_ratio ({min_ratio}) must not exceed max_ratio ({max_ratio})")

    def init(params):
        zero = jnp.zeros((), jnp.float32)
        return AdaptiveGradientAlignedState(
            _f32_zeros_like(params), zero, zero, jnp.zeros((), jnp.int32)
        )

    def direction(state):
        norm = tree_norm(state.momentum)
        return tree_scale(jnp.where(norm > 0, 1.0 / norm, 0.0), state.momentum)

    def ratio(state, dim: int) -> jax.Array:
        if dim < 2:
            return jnp.ones((), jnp.float32)
        seen = jnp.maximum(state.count - 1, 1).astype(jnp.float32)  # updates with a direction
        correction = 1.0 - statistics_decay**seen
        projection = state.projection / correction
        power = state.power / correction
        cos2 = jnp.clip(projection * projection / jnp.maximum(power, 1e-30), 1e-12, 1.0)
        kappa = ((1.0 - cos2) / (cos2 * (dim - 1))) ** 0.25
        kappa = jnp.clip(kappa, min_ratio, max_ratio)
        return jnp.where((state.count >= 2) & (power > 0), kappa, 1.0)

    def matrix(state, sigma):
        return covariance.gradient_aligned(
            sigma, ratio(state, tree_size(state.momentum)), direction(state)
        )

    def update(state, grad):
        have_direction = state.count >= 1
        # The statistics keep their dtype (float32): a float64 leaf in x64 mode would
        # otherwise promote them and change the state's dtype after one step.
        projection = tree_vdot(direction(state), grad).astype(state.projection.dtype)
        power = tree_vdot(grad, grad).astype(state.power.dtype)
        rho = statistics_decay
        return AdaptiveGradientAlignedState(
            momentum=_ema(state.momentum, grad, decay),
            projection=jnp.where(
                have_direction, rho * state.projection + (1 - rho) * projection, 0.0
            ),
            power=jnp.where(have_direction, rho * state.power + (1 - rho) * power, 0.0),
            count=optax.safe_increment(state.count),
        )

    return CovarianceRule(init, matrix, update)


RULES: dict[str, Callable[[], CovarianceRule]] = {
    "isotropic": isotropic,
    "gradient_aligned": gradient_aligned,
    "adaptive_diagonal": adaptive_diagonal,
    "adaptive_gradient_aligned": adaptive_gradient_aligned,
}


def get_rule(rule: str | CovarianceRule) -> CovarianceRule:
    """A rule by name (with its default settings), or the given :class:`CovarianceRule`."""
    if isinstance(rule, CovarianceRule):
        return rule
    if isinstance(rule, str):
        validation.check_choice("covariance", rule, tuple(RULES))
        return RULES[rule]()
    raise TypeError(
        f"covariance must be a rule name ({', '.join(RULES)}) or a CovarianceRule, "
        f"got {type(rule).__name__}"
    )
