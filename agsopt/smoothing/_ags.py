"""Anisotropic Gaussian smoothing (AGS, arXiv:2411.11747) as an Optax transformation.

AGS-GD, AGS-SGD and AGS-Adam (Starnes, Zhang, Reshniak & Webster, 2024) run GD, SGD or
Adam on the gradient of the Gaussian-smoothed loss ``f_Σ(x) = E_u f(x + Σu)`` with an
anisotropic Σ adapted to the gradient's behaviour; isotropic Gaussian smoothing (IGS) is
``Σ = σI``. :func:`ags` replaces the incoming gradient by a Monte Carlo estimate of ``∇f_Σ``
(:mod:`agsopt.estimator`) with Σ from a covariance rule (:mod:`agsopt.covariance_rules`);
the aliases chain it in front of the Optax optimizer.

Scale convention: ours is ``x + Σu`` with ``u ~ N(0, I)``; the paper's Σ is √2 times ours.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from agsopt import _validation as validation
from agsopt._control_flow import choose_branch
from agsopt.masking import check_masked_value_fn
from agsopt.smoothing import estimator
from agsopt.smoothing.covariance import map_with_prefix
from agsopt.smoothing.covariance_rules import CovarianceRule, get_rule
from agsopt.smoothing.directions import check_noise_table
from agsopt.smoothing.estimator import METHODS, SmoothedEstimate
from agsopt.tree_utils import (
    key_for_state,
    split_state_key,
    state_key_copy,
    statistics_dtype,
    tree_all_finite,
    tree_as_arrays,
    tree_size,
)

PyTree = Any
ScalarOrSchedule = float | jax.Array | PyTree | Callable[[jax.Array], jax.Array]

# Chosen by the convergence study (README, "AGS against IGS"): at least as good as IGS on 12 of
# 13 functions in d = 100 (round-off ties included), 1.4–3.2× better on the ill-conditioned
# ones; worse on Ackley (1.14× at d = 100, 515× in a shorter d = 50 run).
DEFAULT_COVARIANCE = "adaptive_gradient_aligned"


COUNTER_MAX = int(jnp.iinfo(jnp.int32).max)


class AGSState(NamedTuple):
    """State of :func:`ags`. Every leaf keeps its dtype and shape from step to step (float32
    and x64 mode alike), so the state can be carried through ``lax.scan``.

    Attributes:
      key: raw PRNG key data (``jax.random.key_data``), split at every step.
      count: steps taken (drives a σ schedule).
      rule_state: the covariance rule's state.
      value: the most recent finite Monte Carlo estimate of the smoothed loss f_Σ, in the
        parameters' float dtype promoted with float32 (float64 under x64 for float64
        parameters; 0 before the first one: finite, so that the state compares equal across
        processes).
      num_evaluations: function evaluations spent so far (all steps).
      num_nonfinite: samples left out so far because the loss (or, first-order, its
        gradient) was not finite.
      num_skipped: steps skipped — zero update, rule state kept — because σ was not finite
        and positive, no sample was finite, or the estimate itself was not finite.
      num_rule_skipped: applied steps whose covariance-rule update was dropped because the
        rule's new state was not finite (Σ keeps its last shape).

    The counters are int32 and saturate at ``COUNTER_MAX = 2**31 − 1`` instead of wrapping.
    """

    key: jax.Array
    count: jax.Array
    rule_state: Any
    value: jax.Array
    num_evaluations: jax.Array
    num_nonfinite: jax.Array
    num_skipped: jax.Array
    num_rule_skipped: jax.Array


def _check_sigma(sigma: ScalarOrSchedule) -> None:
    if callable(sigma):
        return
    if sigma is None or not jax.tree.leaves(sigma):
        raise TypeError(
            "sigma must be a positive number, one per leaf, a pytree like the parameters, "
            f"or an Optax schedule count -> sigma; got {sigma!r}"
        )
    validation.check_positive("sigma", sigma)


def _sigma_is_static(sigma: ScalarOrSchedule) -> bool:
    """σ was checked at construction: not a schedule and every leaf concrete."""
    return not callable(sigma) and all(validation.is_concrete(s) for s in jax.tree.leaves(sigma))


def _check_sigma_fits(sigma_now: PyTree, params: PyTree) -> None:
    """σ is a number, one per leaf, or a tree like ``params`` (a prefix of it) whose leaves
    broadcast to the parameters' shapes; else a ``ValueError`` naming sigma (trace time)."""
    if not jax.tree.leaves(sigma_now):  # a schedule returning None: _sigma_is_valid says so
        return
    shapes = lambda tree: jax.tree.map(lambda x: tuple(jnp.shape(x)), tree)
    try:
        scaled = jax.eval_shape(
            lambda s, p: map_with_prefix(lambda a, b: a * b, s, p), sigma_now, params
        )
        fits = shapes(scaled) == shapes(params)
    except (TypeError, ValueError):
        fits = False
    if not fits:
        raise ValueError(
            "agsopt.ags: sigma must be a number, one number per leaf of the parameters, or a "
            "pytree like them whose leaves broadcast to theirs; got shapes "
            f"{shapes(sigma_now)} for parameters of shapes {shapes(params)}"
        )


def _sigma_is_valid(sigma_now: PyTree) -> jax.Array:
    """Is every entry of the step's σ finite and positive? (a traced boolean)"""
    leaves = [jnp.asarray(s) for s in jax.tree.leaves(sigma_now)]
    if not leaves:
        raise TypeError(f"agsopt.ags: the sigma schedule returned no value ({sigma_now!r})")
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(s) & (s > 0)) for s in leaves]))


def _saturating_add(counter: jax.Array, increment: jax.Array) -> jax.Array:
    """``counter + increment`` (int32, increment ≥ 0), saturating at ``COUNTER_MAX``."""
    increment = jnp.asarray(increment, jnp.int32)
    total = jnp.where(counter > COUNTER_MAX - increment, COUNTER_MAX, counter + increment)
    return total.astype(jnp.int32)


def _skipped_estimate(shapes: SmoothedEstimate) -> SmoothedEstimate:
    """What a step with an invalid σ returns: no evaluation, a zero gradient, a NaN value."""
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return zeros._replace(value=jnp.full(shapes.value.shape, jnp.nan, shapes.value.dtype))


def _check_state(
    state: AGSState, params: PyTree, rule: CovarianceRule, key_shape: tuple[int, ...]
) -> None:
    """Trace-time check that ``state`` was built by this ``ags`` for parameters shaped like
    ``params``: its fields, its key's shape, and its rule state's structure and shapes against
    ``rule.init(params)`` (e.g. a checkpoint restored into parameters of another size)."""
    validation.check_state_fields(state, AGSState, "agsopt.ags")
    if tuple(jnp.shape(state.key)) != key_shape:
        raise ValueError(
            f"agsopt.ags: state.key has shape {tuple(jnp.shape(state.key))}, but this ags's "
            f"key needs {key_shape}: the state was made by a differently configured ags"
        )
    expected = jax.eval_shape(rule.init, params)
    got = state.rule_state
    same = jax.tree.structure(got) == jax.tree.structure(expected) and all(
        jnp.shape(a) == b.shape
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True)
    )
    if not same:
        shapes = lambda tree: jax.tree.map(lambda x: tuple(jnp.shape(x)), tree)
        raise ValueError(
            "agsopt.ags: state.rule_state does not match these params: the state was "
            "initialized for other parameters or another covariance rule (e.g. a checkpoint "
            f"restored into parameters of another size); expected shapes {shapes(expected)}, "
            f"got {shapes(got)}. Re-initialize it with init(params)."
        )


def ags(
    sigma: ScalarOrSchedule = 0.1,
    num_samples: int = 16,
    *,
    covariance: str | CovarianceRule = DEFAULT_COVARIANCE,
    key: int | jax.Array = 0,
    method: str = "antithetic",
    orthogonal: bool = False,
    chunk_size: int | None = None,
    sample_sharding: jax.sharding.Sharding | None = None,
    noise_table: jax.Array | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Replace the gradient by a Monte Carlo estimate of the smoothed gradient ∇f_Σ.

    ``update(updates, state, params, *, value_fn, **extra_args)`` ignores the incoming
    ``updates`` and returns ``∇f_Σ(params)`` estimated from ``value_fn(params) -> scalar``
    (the Optax extra-args convention). A zero-order user with no gradient passes any tree of
    the parameters' shape, e.g. ``optax.tree.zeros_like(params)``, as ``updates``.

    Example::

        opt = optax.chain(agsopt.ags(sigma=0.5, num_samples=32), optax.adam(1e-2))
        state = opt.init(params)
        updates, state = opt.update(grads_or_zeros, state, params, value_fn=loss)

    Args:
      sigma: the smoothing scale σ > 0: a scalar, one per leaf or a pytree like the
        parameters, or an Optax schedule ``count -> σ`` (e.g. ``optax.exponential_decay``).
        A schedule (or an injected σ) is checked at every step: a step whose σ is not finite
        and positive (``optax.linear_schedule(0.0, 0.5, 5)`` at count 0) is skipped — zero
        update, nothing evaluated, the rule's state kept — and counted in ``num_skipped``.
      num_samples: Monte Carlo directions per step (antithetic pairs count once), at most
        ``2**30 − 1`` (a step's evaluations are counted in int32).
      covariance: ``"adaptive_gradient_aligned"`` (default), ``"gradient_aligned"``,
        ``"adaptive_diagonal"``, ``"curvature_diagonal"`` (radii from the measured curvature
        of f_Σ per coordinate; needs a zero-order ``method`` and ``num_samples ≥ 2``),
        ``"curvature_metric"`` (:func:`agsopt.dgs`'s learned metric ``Σ ∝ H⁻¹`` on that
        statistic; the same needs),
        ``"isotropic"`` (IGS), the ``"scaled_*"`` rules, or a
        :class:`~agsopt.covariance_rules.CovarianceRule`. A rule with ``needs_curvature``
        gets the estimator's curvature statistic (same evaluations) in its ``update``.
      key: an int seed or a JAX PRNG key; it lives in the state and is split every step.
      method: ``"antithetic"``, ``"forward"``, ``"plain"`` or ``"first_order"``.
      orthogonal: orthogonal sample directions within blocks (variance reduction).
      chunk_size: samples per vectorized evaluation; bounds memory for large N. ``None``:
        sized from d and the backend (:func:`agsopt.estimator.default_chunk_size`).
      sample_sharding: shard the Monte Carlo sample axis over devices (see
        :func:`agsopt.estimator.smoothed_value_and_grad`).
      noise_table: a 1-D array of standard normals, e.g.
        ``agsopt.smoothing.make_noise_table(jax.random.key(1), dim=d)``: every direction
        is a slice of it at a random offset (one random integer per direction instead of d
        normals), at the statistical price stated in
        :func:`agsopt.estimator.smoothed_value_and_grad`. Off (``None``) by default. The
        table is held by the transformation, not its state (checkpoints stay small), so it
        is a constant of every compiled step (``2²²`` float32 numbers add 16 MiB to the
        program). Checked at construction: finite and roughly standard normal (mean,
        variance, kurtosis, lag-1 correlation); at ``init``: at least
        ``minimum_table_size(d) = 100(d + 1) + d − 1`` numbers, a relative bias
        ``√((d + 1)/(L − d + 1)) ≤ 0.1`` (:mod:`agsopt.smoothing.directions`).

    Non-finite losses at some samples are left out and counted in ``num_nonfinite``. A step
    at which no sample is finite, or whose estimate is not finite (∇f_Σ out of float range),
    or whose σ is invalid, returns a zero update, keeps the covariance rule's state and is
    counted in ``num_skipped``: no single bad step corrupts the state, so no
    ``optax.apply_if_finite`` is needed behind ``ags``. A rule update whose new state is not
    finite is dropped (counted in ``num_rule_skipped``). Finite losses whose Monte Carlo
    sums would overflow are handled by the estimator's power-of-two scaling.

    The parameters must be a non-empty pytree of real floating arrays (checked at ``init``
    and ``update``) and ``value_fn`` must return a real scalar (checked once per trace).
    """
    _check_sigma(sigma)
    num_samples = estimator.check_num_samples(num_samples)
    validation.check_choice("method", method, METHODS)
    orthogonal = validation.check_bool("orthogonal", orthogonal)
    sigma_static = _sigma_is_static(sigma)
    if chunk_size is not None:
        validation.check_int("chunk_size", chunk_size, minimum=1)
    rule = get_rule(covariance)
    if rule.needs_curvature and (method == "first_order" or num_samples < 2):
        raise ValueError(
            "agsopt.ags: the covariance rule needs the measured curvature, which needs a "
            f"zero-order method and num_samples >= 2; got method={method!r}, "
            f"num_samples={num_samples}"
        )
    key_data, key_impl = key_for_state(key)
    if noise_table is not None:
        check_noise_table(noise_table, None, "agsopt.ags")

    def init_fn(params: PyTree) -> AGSState:
        params = tree_as_arrays(params)
        validation.check_float_params(params, "agsopt.ags")
        if noise_table is not None:
            check_noise_table(noise_table, tree_size(params), "agsopt.ags")
        if sigma_static:
            _check_sigma_fits(sigma, params)
        # Every field its own buffer, and a copy of the transformation's key: a state donated
        # to a jitted step (donate_argnums) must neither alias itself nor delete that key.
        zero = lambda: jnp.zeros((), jnp.int32)
        return AGSState(
            key=state_key_copy(key_data),
            count=zero(),
            rule_state=rule.init(params),
            value=jnp.zeros((), statistics_dtype(params)),  # finite: processes compare it
            num_evaluations=zero(),
            num_nonfinite=zero(),
            num_skipped=zero(),
            num_rule_skipped=zero(),
        )

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del updates, extra_args
        value_fn = validation.require_value_fn(value_fn, "agsopt.ags")
        if params is None:
            raise TypeError("agsopt.ags: update() needs params")
        check_masked_value_fn(value_fn, params, "agsopt.ags")
        params = tree_as_arrays(params)
        _check_state(state, params, rule, key_data.shape)
        next_key, step_key = split_state_key(state.key, key_impl)
        sigma_now = sigma(state.count) if callable(sigma) else sigma
        _check_sigma_fits(sigma_now, params)

        def run_estimate() -> SmoothedEstimate:
            return estimator.estimate(
                value_fn,
                params,
                step_key,
                rule.matrix(state.rule_state, sigma_now),
                num_samples=num_samples,
                method=method,
                orthogonal=orthogonal,
                chunk_size=chunk_size,
                sample_sharding=sample_sharding,
                noise_table=noise_table,
                curvature=rule.needs_curvature,
                owner="agsopt.ags",
                fun_name="value_fn",
            )

        if sigma_static:  # checked at construction
            sigma_ok = jnp.asarray(True)
            estimate = run_estimate()
        else:  # a schedule or an injected σ: nothing is evaluated at an invalid one
            sigma_ok = _sigma_is_valid(sigma_now)
            skipped = _skipped_estimate(jax.eval_shape(run_estimate))
            estimate = choose_branch(sigma_ok, run_estimate, lambda: skipped)
        applied = sigma_ok & (estimate.num_nonfinite < num_samples) & tree_all_finite(estimate.grad)
        grad = jax.tree.map(lambda g: jnp.where(applied, g, jnp.zeros_like(g)), estimate.grad)
        if rule.needs_curvature:  # NaN curvature (< 2 finite samples): state dropped below
            candidate = rule.update(state.rule_state, estimate.grad, estimate.curvature)
        else:
            candidate = rule.update(state.rule_state, estimate.grad)
        rule_ok = tree_all_finite(candidate)
        rule_state = jax.tree.map(
            lambda new, old: jnp.where(applied & rule_ok, new, old).astype(old.dtype),
            candidate,
            state.rule_state,
        )
        value = estimate.value.astype(state.value.dtype)
        new_state = AGSState(
            key=next_key,
            count=optax.safe_increment(state.count),
            rule_state=rule_state,
            value=jnp.where(jnp.isfinite(value), value, state.value),
            num_evaluations=_saturating_add(state.num_evaluations, estimate.num_evaluations),
            num_nonfinite=_saturating_add(state.num_nonfinite, estimate.num_nonfinite),
            num_skipped=_saturating_add(state.num_skipped, jnp.where(applied, 0, 1)),
            num_rule_skipped=_saturating_add(
                state.num_rule_skipped, jnp.where(applied & ~rule_ok, 1, 0)
            ),
        )
        return grad, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _with_smoothing(
    base: optax.GradientTransformation, **ags_kwargs: Any
) -> optax.GradientTransformationExtraArgs:
    return optax.chain(ags(**ags_kwargs), base)


def ags_gd(learning_rate: optax.ScalarOrSchedule, **ags_kwargs: Any):
    """AGS-GD: ``x ← x − η ∇f_Σ(x)``, i.e. ``optax.chain(ags(...), optax.sgd(η))``."""
    return _with_smoothing(optax.sgd(learning_rate), **ags_kwargs)


def ags_sgd(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = 0.9,
    nesterov: bool = False,
    **ags_kwargs: Any,
):
    """AGS-SGD: SGD with (Nesterov) momentum on the smoothed gradient of a minibatch loss.

    The minibatch enters through ``value_fn``; with a fixed Σ the iterates converge to a
    noisy ball whose radius grows with ‖Σ‖_F (arXiv:2411.11747).
    """
    if momentum is not None:
        validation.check_decay("momentum", momentum)
    return _with_smoothing(optax.sgd(learning_rate, momentum, nesterov), **ags_kwargs)


def ags_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    **ags_kwargs: Any,
):
    """AGS-Adam: Adam on the smoothed-gradient estimate (arXiv:2411.11747)."""
    validation.check_decay("b1", b1)
    validation.check_decay("b2", b2)
    validation.check_positive("eps", eps, allow_zero=True)
    return _with_smoothing(optax.adam(learning_rate, b1, b2, eps), **ags_kwargs)


def igs_gd(learning_rate: optax.ScalarOrSchedule, **ags_kwargs: Any):
    """IGS-GD: AGS-GD with the isotropic Σ = σI."""
    return ags_gd(learning_rate, covariance="isotropic", **ags_kwargs)


def igs_sgd(learning_rate, momentum: float | None = 0.9, nesterov: bool = False, **ags_kwargs):
    """IGS-SGD: AGS-SGD with the isotropic Σ = σI."""
    return ags_sgd(learning_rate, momentum, nesterov, covariance="isotropic", **ags_kwargs)


def igs_adam(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, **ags_kwargs):
    """IGS-Adam: AGS-Adam with the isotropic Σ = σI."""
    return ags_adam(learning_rate, b1, b2, eps, covariance="isotropic", **ags_kwargs)


def _spell_out_ags_keywords(alias: Callable[..., Any], fixed: tuple[str, ...] = ()) -> None:
    """Give ``alias(..., **ags_kwargs)`` the signature with :func:`ags`'s keywords spelled
    out (keyword-only, less ``fixed``), so that ``optax.inject_hyperparams(alias)`` binds
    ``sigma``, ``num_samples``, ``key``… by name (with ``**ags_kwargs`` it passed a keyword
    ``ags_kwargs`` that :func:`ags` refused)."""
    own = [
        p
        for p in inspect.signature(alias).parameters.values()
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    keywords = [
        p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
        for name, p in inspect.signature(ags).parameters.items()
        if name not in fixed
    ]
    alias.__signature__ = inspect.signature(alias).replace(parameters=own + keywords)


ALIAS_USAGE = """

    ``optax.chain(ags(...), base)`` in one call, ``base`` the Optax optimizer named above
    with its own positional arguments, in Optax's order. ``update(updates, state, params,
    value_fn=f)``: the incoming ``updates`` are ignored (pass ``optax.tree.zeros_like(params)``
    or the gradient tree) and ``f(params) -> scalar`` is the loss that is smoothed (a
    minibatch loss closes over its batch). The smoothing is set by :func:`ags`'s arguments,
    keyword-only here: ``sigma`` (σ, default 0.1), ``num_samples`` (16), ``covariance`` (AGS forms),
    ``key``, ``method``… Name them: ``ags_adam(0.01, 0.5, 64)`` would set Adam's ``b1`` and
    ``b2`` (and is refused, ``b2`` must lie in [0, 1)); write ``ags_adam(0.01, sigma=0.5,
    num_samples=64)``.

    Example::

        opt = agsopt.ags_adam(0.01, sigma=0.5, num_samples=64, key=0)
        state = opt.init(x)
        updates, state = opt.update(optax.tree.zeros_like(x), state, x, value_fn=f)
        x = optax.apply_updates(x, updates)
    """

for _alias in (ags_gd, ags_sgd, ags_adam):
    _spell_out_ags_keywords(_alias)
for _alias in (igs_gd, igs_sgd, igs_adam):
    _spell_out_ags_keywords(_alias, fixed=("covariance",))
for _alias in (ags_gd, ags_sgd, ags_adam, igs_gd, igs_sgd, igs_adam):
    _alias.__doc__ = inspect.cleandoc(_alias.__doc__ + ALIAS_USAGE)
del _alias
