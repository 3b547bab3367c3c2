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
  IGS's) and clipped: smooth more where the gradient fluctuates more;
- :func:`curvature_diagonal`: ``Σ = σ diag(r)``, ``r_i`` from the *function's* measured
  curvature along coordinate i (the estimator's second-order Stein statistic, no extra
  evaluations): by default its fluctuation along the path (a ripple's curvature changes sign
  from period to period, a quadratic's is constant), or its running magnitude; normalized
  and clipped as above: smooth more where ripples have not been smoothed out. Its
  ``update`` takes the curvature as a third argument (``needs_curvature=True``);
- :func:`scaled` wraps any of these and adapts the *scale*: σ becomes ``c·σ`` with ``c``
  shrunk by 0.9 or grown by 1/0.9 from a directional Lipschitz ratio along the travel
  direction, with adaptive thresholds (after ASGF, arXiv:2006.10887); registered as
  ``"scaled_isotropic"`` and ``"scaled_adaptive_gradient_aligned"``.

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
from agsopt.smoothing import adaptation, covariance
from agsopt.tree_utils import (
    accumulation_dtype,
    tree_norm,
    tree_scale,
    tree_size,
    tree_unflatten_vector,
    tree_vdot,
)

PyTree = Any

__all__ = [
    "AdaptiveDiagonalState",
    "AdaptiveGradientAlignedState",
    "CovarianceRule",
    "CurvatureDiagonalState",
    "CurvatureMetricState",
    "EmptyRuleState",
    "GradientAlignedState",
    "ScaledState",
    "adaptive_diagonal",
    "adaptive_gradient_aligned",
    "curvature_diagonal",
    "curvature_metric",
    "fixed_diagonal",
    "get_rule",
    "gradient_aligned",
    "isotropic",
    "scaled",
]


class CovarianceRule(NamedTuple):
    """A pluggable rule for Σ: ``init(params)``, ``matrix(state, sigma)``, ``update(state, g)``.

    ``needs_curvature`` (default ``False``; a rule built from three fields keeps the
    two-argument ``update``): if ``True`` the caller also estimates the measured curvature
    ``c = diag(Σᵀ ∇²f_Σ(x) Σ)`` at the Σ of the step (``curvature=True`` of
    :func:`agsopt.smoothing.estimator.smoothed_value_and_grad`, from the same evaluations)
    and calls ``update(state, g, c)``. ``c`` is NaN when it is undefined (fewer than two
    finite samples); :func:`agsopt.ags` then drops the rule's non-finite new state.
    """

    init: Callable[[PyTree], Any]
    matrix: Callable[[Any, PyTree], Any]
    update: Callable[..., Any]
    needs_curvature: bool = False


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
    σ in every direction across it. (ASGF, arXiv:2006.10887, also takes its first direction
    along the previous gradient estimate, but smooths with one radius in every direction;
    the two radii here are not ASGF's.) κ > 1 smooths harder along the descent path
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

    def init(params):  # every field its own buffer (a donated state must not alias itself)
        return AdaptiveDiagonalState(
            _f32_zeros_like(params), _f32_zeros_like(params), jnp.zeros((), jnp.int32)
        )

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


class CurvatureDiagonalState(NamedTuple):
    """State of :func:`curvature_diagonal`, per coordinate, in σ² units.

    Attributes:
      curvature: moving average of φ(h) (``|h|``, ``max(−h, 0)`` or, ``"fluctuation"``, h²).
      mean: moving average of h itself.
      count: updates seen (int32, saturating).
    """

    curvature: PyTree
    mean: PyTree
    count: jax.Array


CURVATURE_MODES = ("absolute", "negative", "fluctuation")


def curvature_diagonal(
    decay: float = 0.9,
    power: float = 0.25,
    min_ratio: float = 0.25,
    max_ratio: float = 4.0,
    mode: str = "fluctuation",
) -> CovarianceRule:
    """``Σ = σ diag(r)``: a larger radius along coordinates where f_Σ is still strongly curved.

    Anisotropy from the function, not from gradient noise: the estimator measures, from the
    evaluations it makes anyway, ``c_i = (Σᵀ∇²f_Σ(x)Σ)_ii`` by the second-order Stein identity
    ``E[f(x + Σu)(u_i² − 1)] = (Σᵀ∇²f_Σ Σ)_ii`` (:mod:`agsopt.smoothing.estimator`). With the
    step's ``Σ = σ diag(r)`` that is ``c_i = σ² r_i² ∂²_i f_Σ``, so ``h_i = c_i / r_i²`` is the
    curvature of f_Σ along coordinate i in parameter coordinates (times σ², a factor common
    to all i that the normalization below removes, so σ's schedule does not matter). Then

        m ← β m + (1 − β) φ(h),   ρ_i = m_i^p,   r = clip(ρ / sqrt(mean ρ²), min_ratio, max_ratio),

    with ``φ(h) = |h|`` (``mode="absolute"``) or ``max(−h, 0)`` (``"negative"``), mean over all
    d entries (so ‖Σ‖_F ≈ σ√d as for IGS). No bias correction of m is needed: it would
    multiply every m_i by the same factor. ``"fluctuation"`` takes instead the running
    standard deviation of h over the steps, ``ρ_i = sd_i^p`` with ``sd² = m₂/b − (m₁/b)²``
    (m₂, m₁ the moving averages of h² and h, ``b = 1 − β^k`` after k updates; from k = 2 on).
    Before the first update, or while every ``ρ_i`` is 0 (e.g. ``"negative"`` on a convex f),
    ``r = 1`` (IGS).

    Why larger radii where |h| is large: a ripple ``A(1 − cos(ωx_i))`` smoothed at radius s
    has curvature ``Aω² cos(ωx_i) exp(−ω²s²/2)`` in f_Σ: a large measured |curvature| means the
    ripple along i is not yet smoothed out (local minima of f_Σ remain; the iterate can be
    trapped in one, where the curvature is positive), and the radius along i should grow,
    while a coordinate whose ripples are smoothed out shows only its smooth part and can take
    a smaller radius. A quadratic term ``q x_i²`` shows the constant ``2q`` whatever the
    radius: its smoothed gradient is unbiased at any radius, so on an ill-conditioned
    quadratic this rule widens Σ along the stiff coordinates for no gain in bias, at a cost in
    the estimator's variance (bounded by the clipping). ``"negative"`` reacts only to
    concavity of f_Σ along i (``φ = 0`` on convex coordinates, so a convex quadratic stays
    isotropic), which misses the convex bottom of a trap. ``"fluctuation"`` separates the two
    by how the curvature changes along the path: a ripple's changes sign from one period to
    the next, a quadratic's is constant (it too misses a trap, where the iterate stands
    still). ``p`` tempers the response (``p = 1/2``: r ∝ sqrt|h|).

    Measured (AGS at equal evaluations against IGS, d = 50, 500 iterations, Adam and GD forms
    of :mod:`agsopt.study`; ratios of median final values): in a first run (5 starts)
    ``"absolute"`` at p = 1/2 lost on the ill-conditioned smooth functions (ellipsoid 1.47×,
    mixed_asymmetric 1.53×, 4.5× at p = 1), as the quadratic argument above predicts, and
    ``"negative"`` lost on Rastrigin and mixed_asymmetric; the defaults, ``"fluctuation"``
    at p = 1/4, were the most even (0.76× on rastrigin_multifrequency, at most 1.10× worse).
    A second run (another seed, 10 starts) did not reproduce the gains: 1.33× (Adam) and
    1.09× (GD) on rastrigin_multifrequency, 1.31× (Adam) and 0.82× (GD) on
    mixed_asymmetric, within 10 % of IGS elsewhere. The learned radii stay within about
    ±10 % of σ there, where 16× between the slowest and the fastest ripple would be needed:
    the per-step estimate of c_i carries the sampling noise of all d coordinates
    (≈ sqrt(Σ_j c_j² / N)), which swamps the per-coordinate differences. It is not a default.

    The curvature is not finite when the step had fewer than two finite samples; the new
    state is then not finite and :func:`agsopt.ags` keeps the old one (``num_rule_skipped``).

    Args:
      decay: β in [0, 1) of the moving average of φ(h).
      power: p > 0.
      min_ratio, max_ratio: bounds on r_i (0 < min_ratio ≤ max_ratio), which keep Σ
        invertible and well conditioned.
      mode: ``"fluctuation"`` (default), ``"absolute"`` or ``"negative"``.
    """
    _check_decay(decay)
    validation.check_positive("power", power)
    validation.check_positive("min_ratio", min_ratio)
    validation.check_positive("max_ratio", max_ratio)
    if min_ratio > max_ratio:
        raise ValueError(f"min_ratio ({min_ratio}) must not exceed max_ratio ({max_ratio})")
    validation.check_choice("mode", mode, CURVATURE_MODES)

    def init(params):  # every field its own buffer (a donated state must not alias itself)
        return CurvatureDiagonalState(
            _f32_zeros_like(params), _f32_zeros_like(params), jnp.zeros((), jnp.int32)
        )

    def levels(state):
        """``m_i`` (absolute, negative) or the running standard deviation of h (fluctuation)."""
        if mode != "fluctuation":
            return jax.tree.map(lambda m: jnp.maximum(m, 0.0), state.curvature)
        correction = 1.0 - decay ** jnp.maximum(state.count, 1).astype(jnp.float32)
        return jax.tree.map(
            lambda s2, s1: jnp.sqrt(jnp.maximum(s2 / correction - (s1 / correction) ** 2, 0.0)),
            state.curvature,
            state.mean,
        )

    def ratios(state):
        raw = jax.tree.map(lambda m: m**power, levels(state))
        mean_square = tree_vdot(raw, raw) / tree_size(raw)
        ready = (state.count >= (2 if mode == "fluctuation" else 1)) & (mean_square > 0)
        scale = 1.0 / jnp.sqrt(jnp.where(ready, mean_square, 1.0))
        return jax.tree.map(  # in each leaf's state dtype (x64: a float64 scale would promote)
            lambda x: jnp.where(ready, jnp.clip(x * scale, min_ratio, max_ratio), 1.0).astype(
                x.dtype
            ),
            raw,
        )

    def matrix(state, sigma):
        return covariance.Product(covariance.Diagonal(sigma), covariance.Diagonal(ratios(state)))

    statistic = {
        "absolute": jnp.abs,
        "negative": lambda h: jnp.maximum(-h, 0.0),
        "fluctuation": jnp.square,
    }[mode]

    def update(state, grad, curvature):
        del grad
        h = jax.tree.map(
            lambda c, m, ri: c.astype(m.dtype) / ri**2, curvature, state.mean, ratios(state)
        )
        return CurvatureDiagonalState(
            curvature=_ema(state.curvature, jax.tree.map(statistic, h), decay),
            mean=_ema(state.mean, h, decay),
            count=optax.safe_increment(state.count),
        )

    return CovarianceRule(init, matrix, update, needs_curvature=True)


class CurvatureMetricState(NamedTuple):
    """State of :func:`curvature_metric`.

    Attributes:
      scales: a, like the parameters (ones at first).
      curvature: the last measured curvature in parameter coordinates (σ² units; zeros
        before the first).
      fit: running R² with which the last curvature predicted the next (0–1).
    """

    scales: PyTree
    curvature: PyTree
    fit: jax.Array


def _flat32(tree: PyTree) -> jax.Array:
    return jnp.concatenate([jnp.ravel(leaf).astype(jnp.float32) for leaf in jax.tree.leaves(tree)])


def curvature_metric() -> CovarianceRule:
    """``Σ = σ diag(a)``: :func:`agsopt.dgs`'s learned metric for the Monte Carlo estimator.

    The estimator's curvature ``c = diag(Σᵀ∇²f_Σ Σ)`` (the second-order Stein identity, from
    the same evaluations) is the coordinate curvature in the scaled coordinates y = x / a
    (times σ²); :func:`~agsopt.smoothing.adaptation.metric_step` moves a towards
    ``h^{-1/2}`` (``Σ ∝ H⁻¹``; geometric mean 1, within [1/10, 10]) at a rate set by the
    running R² with which the last measured curvature, ``h_x·a²``, predicts this one
    (:func:`~agsopt.smoothing.adaptation.r_squared`), and relaxes a towards 1 where it does
    not. The same pieces as ``dgs(anisotropic=True, metric="diagonal")``, whose directional
    quadrature measures
    each direction's curvature exactly; the Monte Carlo statistic carries the sampling
    noise of every coordinate (``≈ sqrt(Σ_j c_j² / N)`` per coordinate, see
    :func:`curvature_diagonal`), so here the gate stays low, and a near 1, unless N is large
    against d. Not a default.
    """

    def init(params):  # every field its own buffer (a donated state must not alias itself)
        return CurvatureMetricState(
            jax.tree.map(lambda x: jnp.ones(x.shape, accumulation_dtype(x.dtype)), params),
            _f32_zeros_like(params),
            jnp.zeros((), jnp.float32),
        )

    def matrix(state, sigma):
        return covariance.Product(covariance.Diagonal(sigma), covariance.Diagonal(state.scales))

    def update(state, grad, curvature):
        del grad
        scales, last, c = _flat32(state.scales), _flat32(state.curvature), _flat32(curvature)
        r2 = adaptation.r_squared(c, last * scales**2)
        scales, last, fit = adaptation.metric_step(
            scales, last, state.fit, c, r2, jnp.all(jnp.isfinite(c))
        )
        return CurvatureMetricState(
            jax.tree.map(
                lambda v, x: v.astype(x.dtype),
                tree_unflatten_vector(scales, state.scales),
                state.scales,
            ),
            jax.tree.map(
                lambda v, x: v.astype(x.dtype),
                tree_unflatten_vector(last, state.curvature),
                state.curvature,
            ),
            fit.astype(state.fit.dtype),
        )

    return CovarianceRule(init, matrix, update, needs_curvature=True)


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

    It is a variance-reduction rule: it shapes Σ to lower the estimator's error, not to
    follow the function's structure. In ``python -m agsopt rules`` (Adam form, d = 100, 20
    starts, 3000 iterations) it was at least as good as IGS on 12 of 13 functions and
    1.4–3.2× better on the ill-conditioned ones, where the fixed κ = 2 of
    :func:`gradient_aligned` is worse than IGS; it lost on Ackley, by 1.14× there and by
    515× at d = 50 with 500 iterations (IGS 6e-5, this rule 0.03).

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

    def init(params):  # every field its own buffer (a donated state must not alias itself)
        return AdaptiveGradientAlignedState(
            _f32_zeros_like(params),
            jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.float32),
            jnp.zeros((), jnp.int32),
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


class ScaledState(NamedTuple):
    """State of :func:`scaled`: the wrapped rule's state and the σ-scale controller.

    Attributes:
      inner: the wrapped rule's state.
      momentum: moving average ``m`` of the gradient estimates; the travel direction is
        ``v = m/‖m‖``.
      scale: the factor ``c`` multiplying the step's σ, in ``[min_scale, max_scale]``.
      lipschitz: ``L``, a decaying running maximum of the directional slopes ``|v·ĝ|``.
      lower, upper: the adaptive thresholds ``A`` and ``B`` on the ratio.
      ratio: the last ratio ``r`` (for inspection; −1 before the first comparison).
      count: updates seen (int32, saturating).
    """

    inner: Any
    momentum: PyTree
    scale: jax.Array
    lipschitz: jax.Array
    lower: jax.Array
    upper: jax.Array
    ratio: jax.Array
    count: jax.Array


def scaled(
    rule: str | CovarianceRule = "isotropic",
    *,
    factor: float = 0.9,
    lower: float = 0.1,
    upper: float = 0.9,
    min_scale: float = 0.5,
    max_scale: float = 2.0,
    decay: float = 0.9,
    lipschitz_decay: float = 0.9,
    lower_shrink: float = 0.95,
    lower_grow: float = 1.02,
    upper_shrink: float = 0.98,
    upper_grow: float = 1.01,
) -> CovarianceRule:
    """σ-scale adaptation: ``rule``'s Σ at the scaled radius ``c·σ``, ``c`` adapted every step.

    A controller of the smoothing radius after ASGF ("An adaptive stochastic gradient-free
    approach for high-dimensional blackbox optimization", arXiv:2006.10887), which shrinks
    σ by γ = 0.9 when a local directional Lipschitz ratio falls below a threshold A and
    grows it by 1/γ above a threshold B, the thresholds themselves adapting. ``rule`` (any
    rule, default :func:`isotropic`) keeps deciding the *shape* of Σ; this wrapper only
    multiplies the σ it is given: ``matrix(state, σ) = rule.matrix(state.inner, c·σ)``. If
    ``rule`` needs the measured curvature (``needs_curvature``), so does the wrapper, which
    passes it on unchanged to ``rule.update``.

    What it computes from the gradient estimates ``ĝ_k``, at every update:

    - ``v = m/‖m‖``, ``m`` the moving average of past estimates (``m ← βm + (1 − β)ĝ``), the
      direction the iterates travel against; ``v`` predates ``ĝ_k``, so the directional slope
      ``s_k = v·ĝ_k`` is an unbiased estimate of the slope of f_Σ along v, with error of
      order ``‖∇f_Σ‖/√N`` (not ``√(d/N)``, as for the whole vector);
    - ``L_k = max(λ L_{k−1}, |s_k|)`` (λ = ``lipschitz_decay``): a running estimate of the
      local Lipschitz constant of f_Σ along the path, forgetting old maxima at rate λ;
    - the ratio ``r_k = max(s_k, 0) / L_k`` in [0, 1]: 1 while the slope along v holds up
      (f is linear at the scale of the recent steps; σ can grow), near 0 when the descent
      along v has run out or reversed (the iterate sits at the bottom of a valley of f_Σ
      along v; σ shrinks to resolve it);
    - from the second comparison on (``L`` set by a previous estimate): ``r < A``:
      ``c ← max(γc, min_scale)``, ``A ← A·lower_shrink``; else ``r > B``:
      ``c ← min(c/γ, max_scale)``, ``B ← min(B·upper_grow, 1)``; else
      ``A ← A·lower_grow``, ``B ← B·upper_shrink`` (the band narrows until one side fires).
      The thresholds move as ASGF's do (a shrink lowers A, a grow raises B); the factors
      0.95, 1.01, 0.98, 1.02 are this implementation's defaults.

    Relation to ASGF (not the same algorithm): ASGF estimates directional derivatives of the
    smoothed f by Gauss–Hermite quadrature along orthonormal directions and takes its local
    Lipschitz estimates from those quadrature values, using them to set its other
    hyperparameters (the learning rate among them) as well. Here the ratio comes from the
    Monte Carlo estimates along one direction, the travel direction; the learning rate stays
    the optimizer's, and σ stays within ``[min_scale, max_scale]`` times the given σ.

    Args:
      rule: the rule that shapes Σ (a name of :data:`RULES` or a :class:`CovarianceRule`).
      factor: γ in (0, 1).
      lower, upper: the initial thresholds, ``0 < lower ≤ upper < 1``.
      min_scale, max_scale: bounds on ``c``, ``0 < min_scale ≤ 1 ≤ max_scale``; ``c``
        starts at 1, so σ stays in ``[min_scale·σ, max_scale·σ]``. The defaults (½, 2) were
        chosen on the study's functions (d = 20): wider bounds let σ grow on Ackley's
        plateau until f_Σ is flat (σ ×10 lost seven orders of magnitude there), and narrower
        ones gave up most of the gain on Rastrigin.
      decay: β in [0, 1) of the moving average that gives ``v``.
      lipschitz_decay: λ in [0, 1).
      lower_shrink, lower_grow, upper_shrink, upper_grow: positive threshold factors.
    """
    inner = get_rule(rule)
    if not 0.0 < factor < 1.0:
        raise ValueError(f"factor must lie in (0, 1), got {factor}")
    if not 0.0 < lower <= upper < 1.0:
        raise ValueError(f"need 0 < lower <= upper < 1, got lower={lower}, upper={upper}")
    validation.check_positive("min_scale", min_scale)
    validation.check_positive("max_scale", max_scale)
    if not min_scale <= 1.0 <= max_scale:
        raise ValueError(
            f"need min_scale <= 1 <= max_scale, got min_scale={min_scale}, max_scale={max_scale}"
        )
    _check_decay(decay)
    if not 0.0 <= lipschitz_decay < 1.0:
        raise ValueError(f"lipschitz_decay must lie in [0, 1), got {lipschitz_decay}")
    for name, value in (
        ("lower_shrink", lower_shrink),
        ("lower_grow", lower_grow),
        ("upper_shrink", upper_shrink),
        ("upper_grow", upper_grow),
    ):
        validation.check_positive(name, value)

    def init(params):
        def f32(value):
            return jnp.asarray(value, jnp.float32)

        return ScaledState(
            inner=inner.init(params),
            momentum=_f32_zeros_like(params),
            scale=f32(1.0),
            lipschitz=f32(0.0),
            lower=f32(lower),
            upper=f32(upper),
            ratio=f32(-1.0),
            count=jnp.zeros((), jnp.int32),
        )

    def matrix(state, sigma):
        return inner.matrix(state.inner, jax.tree.map(lambda s: s * state.scale, sigma))

    def update(state, grad, *curvature):
        norm = tree_norm(state.momentum)
        direction = tree_scale(jnp.where(norm > 0, 1.0 / norm, 0.0), state.momentum)
        f32 = state.scale.dtype
        slope = tree_vdot(direction, grad).astype(f32)
        have_direction = state.count >= 1  # m ≠ 0 from the first estimate on
        lipschitz = jnp.where(
            have_direction, jnp.maximum(lipschitz_decay * state.lipschitz, jnp.abs(slope)), 0.0
        )
        ratio = jnp.where(lipschitz > 0, jnp.maximum(slope, 0.0) / lipschitz, 0.0)
        compare = (state.count >= 2) & (state.lipschitz > 0)
        shrink = compare & (ratio < state.lower)
        grow = compare & ~shrink & (ratio > state.upper)
        between = compare & ~shrink & ~grow
        scale = jnp.where(shrink, jnp.maximum(factor * state.scale, min_scale), state.scale)
        scale = jnp.where(grow, jnp.minimum(state.scale / factor, max_scale), scale)
        new_lower = jnp.where(shrink, state.lower * lower_shrink, state.lower)
        new_lower = jnp.where(between, state.lower * lower_grow, new_lower)
        new_upper = jnp.where(grow, jnp.minimum(state.upper * upper_grow, 1.0), state.upper)
        new_upper = jnp.where(between, state.upper * upper_shrink, new_upper)
        return ScaledState(
            inner=inner.update(state.inner, grad, *curvature),
            momentum=_ema(state.momentum, grad, decay),
            scale=scale.astype(f32),
            lipschitz=lipschitz.astype(f32),
            lower=new_lower.astype(f32),
            upper=new_upper.astype(f32),
            ratio=jnp.where(compare, ratio, state.ratio).astype(f32),
            count=optax.safe_increment(state.count),
        )

    if inner.needs_curvature:  # update(state, g, c): c goes on to the inner rule
        return CovarianceRule(init, matrix, update, needs_curvature=True)
    return CovarianceRule(init, matrix, lambda state, grad: update(state, grad))


RULES: dict[str, Callable[[], CovarianceRule]] = {
    "isotropic": isotropic,
    "gradient_aligned": gradient_aligned,
    "adaptive_diagonal": adaptive_diagonal,
    "adaptive_gradient_aligned": adaptive_gradient_aligned,
    "scaled_isotropic": lambda: scaled("isotropic"),
    "scaled_adaptive_gradient_aligned": lambda: scaled("adaptive_gradient_aligned"),
    "curvature_diagonal": curvature_diagonal,
    "curvature_metric": curvature_metric,
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
