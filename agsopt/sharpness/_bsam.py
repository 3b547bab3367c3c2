"""Bilateral sharpness-aware minimization (BSAM, arXiv:2409.13173) as an Optax gradient
transformation.

BSAM adds *min-sharpness* (the loss minus the lowest loss around ``w``) to SAM's
max-sharpness. Per step, on one minibatch, with ``g = ∇L(w)`` and ``ĝ = g/(‖g‖ + eps)``:

    g_max = ∇L(w + ρ_max ĝ)                     (SAM's ascent point)
    g_min = ∇L(w − ρ_min ĝ)                     (the descent point reuses ĝ)
    d     = g_max + g − (‖g_max‖ / ‖g_min‖) g_min

and, as the paper writes it, the base optimizer steps the *original* ``w`` with ``d``.
The authors' training code instead steps from the min point ``w − ρ_min ĝ``
(``step_from="min_point"``); its ρ_min follows the learning rate
(:func:`bsam_rho_min_schedule`, :func:`bsam_reference_schedules`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from agsopt import _validation as validation
from agsopt._control_flow import choose_branch
from agsopt.sharpness._perturbation import (
    Radius,
    check_gradient_call,
    check_radius,
    mean_over_shards,
    perturbed_gradient,
    radius_at,
)
from agsopt.sharpness._sam import count_skip, radius_is_static, radius_is_valid, skip_unless
from agsopt.tree_utils import accumulation_dtype, tree_all_finite, tree_norm, tree_scale

PyTree = Any
StepFrom = Literal["params", "min_point"]

__all__ = ["BSAMState", "bsam", "bsam_reference_schedules", "bsam_rho_min_schedule"]


class BSAMState(NamedTuple):
    """State of :func:`bsam`.

    Attributes:
      count: the number of steps taken (the argument of ρ schedules).
      num_skipped: steps skipped — zero update, ``base``'s state kept — because a scheduled
        or injected ρ was not finite and ≥ 0 (nothing is evaluated then), or, with
        ``step_from="min_point"``, because the direction ``d`` or the shift ``−ρ_min ĝ`` was
        not finite.
      base_state: the state of the wrapped ``base`` optimizer (an empty tuple when there is
        none).
    """

    count: jax.Array
    num_skipped: jax.Array
    base_state: Any = ()


def bsam_rho_min_schedule(
    learning_rate: float | Callable[[jax.Array], jax.Array],
    lr_max: float,
    *,
    rho_hi: float = 0.05,
    rho_lo: float = 0.0,
    lr_min: float = 0.0,
) -> Callable[[jax.Array], jax.Array]:
    """BSAM's learning-rate–tied ρ_min schedule (arXiv:2409.13173, reference code).

    ``ρ_min(t) = ρ_lo + (ρ_hi − ρ_lo) · (lr(t) − lr_min) / (lr_max − lr_min)``

    so ρ_min moves in proportion to the learning rate *of the same step*: with the
    reference cosine schedule from ``lr_max = 0.05`` to ``lr_min = 0`` it decays from
    ``rho_hi = 0.05`` to ``rho_lo = 0``. Pass the learning-rate schedule the base optimizer
    uses; the result is an Optax schedule ``count -> ρ_min`` for :func:`bsam`'s
    ``rho_min``. It stays in ``[min(ρ_lo, ρ_hi), max(ρ_lo, ρ_hi)]`` as long as ``lr(t)``
    stays in ``[lr_min, lr_max]``.

    Timing in the reference code (ajiaaa/BSAM, ``ProportionScheduler``): after every step
    it advances the learning-rate scheduler and then sets ρ_min from the learning rate just
    set, so on each step ``k ≥ 1`` ρ_min and the learning rate belong together, as here. It
    is the *learning rate* that lags: step ``k`` uses the cosine's value at ``k − 1`` (the
    scheduler is first advanced after step 0, which runs at the optimizer's initial
    ``lr_max``). On step 0 the reference ρ_min is ``ρ_lo`` (computed from the scheduler's
    initial value 0 before its first advance), not ``ρ_hi``.
    :func:`bsam_reference_schedules` returns both schedules with exactly this timing.

    Args:
      learning_rate: the base optimizer's learning-rate schedule (or a constant).
      lr_max: the learning rate at which ρ_min equals ``rho_hi`` (the schedule's peak).
      rho_hi: ρ_min at ``lr_max`` (≥ 0).
      rho_lo: ρ_min at ``lr_min`` (≥ 0).
      lr_min: the learning rate at which ρ_min equals ``rho_lo``; must be < ``lr_max``.
    """
    validation.check_positive("lr_max", lr_max)
    validation.check_positive("lr_min", lr_min, allow_zero=True)
    validation.check_positive("rho_hi", rho_hi, allow_zero=True)
    validation.check_positive("rho_lo", rho_lo, allow_zero=True)
    if validation.is_concrete(lr_max) and validation.is_concrete(lr_min):
        if float(lr_max) <= float(lr_min):
            raise ValueError(f"lr_max must exceed lr_min, got lr_max={lr_max}, lr_min={lr_min}")
    if not callable(learning_rate):
        validation.check_positive("learning_rate", learning_rate, allow_zero=True)

    def schedule(count: jax.Array) -> jax.Array:
        lr = radius_at(learning_rate, count)
        return rho_lo + (rho_hi - rho_lo) * (lr - lr_min) / (lr_max - lr_min)

    return schedule


def bsam_reference_schedules(
    total_steps: int,
    *,
    lr_max: float = 0.05,
    lr_min: float = 0.0,
    rho_hi: float = 0.05,
    rho_lo: float = 0.0,
) -> tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array], jax.Array]]:
    """The learning rate and ρ_min of the BSAM reference script, step for step.

    The reference (ajiaaa/BSAM ``train_bsam.py``: ``CosineScheduler`` with
    ``T_max = total_steps`` and no warm-up, ``ProportionScheduler`` for ρ_min) gives, with
    ``c(j) = lr_min + (lr_max − lr_min)(1 + cos(π j / total_steps))/2`` and
    ``P(lr) = ρ_lo + (ρ_hi − ρ_lo)(lr − lr_min)/(lr_max − lr_min)``, on step ``k``
    (0-based, counted over all epochs)::

        lr(k)     = c(max(k − 1, 0))
        ρ_min(k)  = P(lr(k))  for k ≥ 1,     ρ_min(0) = P(0)

    Returns ``(learning_rate, rho_min)``, two Optax schedules: pass the first to the base
    optimizer and the second to :func:`bsam`'s ``rho_min``. ``total_steps`` is the
    reference's ``epochs · len(train_loader)``.
    """
    total_steps = validation.check_int("total_steps", total_steps, minimum=1)
    validation.check_positive("lr_max", lr_max)
    validation.check_positive("lr_min", lr_min, allow_zero=True)
    if float(lr_max) <= float(lr_min):
        raise ValueError(f"lr_max must exceed lr_min, got lr_max={lr_max}, lr_min={lr_min}")

    def learning_rate(count: jax.Array) -> jax.Array:
        j = jnp.clip(jnp.asarray(count) - 1, 0, total_steps)
        return lr_min + (lr_max - lr_min) * (1.0 + jnp.cos(jnp.pi * j / total_steps)) / 2.0

    proportional = bsam_rho_min_schedule(
        learning_rate, lr_max, rho_hi=rho_hi, rho_lo=rho_lo, lr_min=lr_min
    )

    def rho_min(count: jax.Array) -> jax.Array:
        first = rho_lo + (rho_hi - rho_lo) * (0.0 - lr_min) / (lr_max - lr_min)
        return jnp.where(jnp.asarray(count) == 0, first, proportional(count))

    return learning_rate, rho_min


def bsam(
    rho_max: Radius = 0.05,
    rho_min: Radius = 0.05,
    *,
    eps: float = 1e-12,
    axis_name: str | None = None,
    base: optax.GradientTransformation | None = None,
    step_from: StepFrom = "params",
) -> optax.GradientTransformationExtraArgs:
    """Bilateral SAM, BSAM (arXiv:2409.13173).

    ``update`` receives ``g = ∇L(w)`` as its updates, evaluates two more gradients of the
    keyword extra argument ``value_fn`` on the same minibatch, and forms::

        ĝ     = g / (‖g‖ + eps)
        g_max = ∇L(w + ρ_max ĝ)
        g_min = ∇L(w − ρ_min ĝ)
        d     = g_max + g − (‖g_max‖ / ‖g_min‖) · g_min     (ratio := 0 when g_min = 0)

    Norms run over the whole pytree and are accumulated in at least float32; ``d`` is
    formed there and cast back to the gradients' dtype. A zero gradient gives ``ĝ = 0``
    and a finite ``d``. ``ρ_max = ρ_min = 0`` returns ``g`` (all three gradients coincide).

    Where the base optimizer steps from (``step_from``):

    - ``"params"`` (default; the algorithm as the paper writes it): the base optimizer
      steps the original ``w`` with ``d``. Without ``base``, ``update`` returns ``d`` and is
      chained in front of the base optimizer; with ``base`` it returns ``base``'s updates
      for ``d`` at ``w`` (the same thing as the chain).
    - ``"min_point"`` (the authors' public code, ajiaaa/BSAM, which produced the paper's
      published numbers): the base optimizer steps from the min point
      ``w_min = w − ρ_min ĝ``, with ``d`` as its gradient and ``w_min`` as its params (so
      weight decay is computed at ``w_min``), and the new parameters are ``w_min`` plus its
      update: ``update`` returns ``(w_min − w) + base.update(d, ·, w_min)``, so that
      ``optax.apply_updates(w, ·)`` ends at the reference's parameters (even at learning
      rate 0 the parameters move by ``−ρ_min ĝ``). This needs ``base``: the whole base
      optimizer, weight decay included, wrapped by ``bsam``.

    Non-finite values. With ``step_from="min_point"`` the shift ``−ρ_min ĝ`` is applied by
    ``bsam`` itself, outside any guard around ``base``, and ``optax.apply_if_finite`` around
    ``bsam`` checks only the incoming ``g``. So this mode guards itself: a step whose ``d``
    (a NaN or inf at either perturbed point, or in ``g``) or shift is not finite is
    skipped — zero update, ``base``'s state (its momentum) kept — and counted in
    ``state.num_skipped``; ``optax.apply_if_finite`` on either side is then optional.
    With ``step_from="params"`` a non-finite ``d`` is passed on as the update: wrap the
    base optimizer, ``optax.apply_if_finite(optax.sgd(lr), 5)``, to skip such steps.
    In both modes a ρ (scheduled or injected) that is not finite and ≥ 0 at a step skips
    that step: zero update, nothing evaluated, ``base``'s state kept, counted in
    ``state.num_skipped``.

    The reference recipe, exact step for step (its ρ_min timing included)::

        lr, rho_min = agsopt.bsam_reference_schedules(epochs * steps_per_epoch)
        opt = agsopt.bsam(0.05, rho_min, step_from="min_point", base=optax.chain(
            optax.add_decayed_weights(1e-3), optax.sgd(lr, momentum=0.9)))

    (batch 128, BatchNorm statistics from the first pass only, label smoothing 0.1.) The
    paper's algorithm with the same hyperparameters::

        lr = optax.cosine_decay_schedule(0.05, decay_steps=total_steps)
        opt = optax.chain(
            agsopt.bsam(0.05, agsopt.bsam_rho_min_schedule(lr, 0.05)),
            optax.add_decayed_weights(1e-3),
            optax.sgd(lr, momentum=0.9),
        )
        grads = jax.grad(loss)(params, batch)
        updates, state = opt.update(grads, state, params,
                                    value_fn=lambda p: loss(p, batch))

    Args:
      rho_max: radius of the ascent point (≥ 0), a number or a schedule ``count -> ρ``.
      rho_min: radius of the descent point (≥ 0), a number or a schedule ``count -> ρ``
        (evaluated at this transformation's own step count, starting at 0). Schedules
        are checked at count 0 at construction and at every step (see above).
      eps: added to ‖g‖ so that a zero gradient gives finite updates.
      axis_name: m-sharpness under ``shard_map``/``pmap``/named ``vmap``. Pass the *local*
        (un-reduced) gradient: each shard normalizes its own ``g``, evaluates its own
        ``g_max`` and ``g_min`` and forms its own ``d`` with its own norm ratio; only the
        final ``d`` is averaged over ``axis_name`` (and, with ``"min_point"``, the shift
        ``−ρ_min ĝ``, so that replicas stay equal). This makes BSAM over ``n`` shards the
        mean of ``n`` single-device BSAM directions on the shards' minibatches.
      base: an Optax transformation for ``bsam`` to wrap (it then returns final updates);
        required by ``step_from="min_point"``. It receives the other extra arguments too.
      step_from: ``"params"`` or ``"min_point"``, see above.

    Raises:
      ValueError / TypeError: a ``rho_max`` or ``rho_min`` that is not a finite number ≥ 0
        or a schedule returning one at count 0; a non-positive ``eps``; an unknown
        ``step_from``; ``step_from="min_point"`` without ``base``.
    """
    check_radius("rho_max", rho_max)
    check_radius("rho_min", rho_min)
    validation.check_positive("eps", eps)
    validation.check_choice("step_from", step_from, ("params", "min_point"))
    if base is not None and not (hasattr(base, "init") and hasattr(base, "update")):
        raise TypeError(f"base must be an optax.GradientTransformation, got {type(base).__name__}")
    if step_from == "min_point" and base is None:
        raise ValueError(
            "step_from='min_point' needs base=<the base optimizer>: it must step from "
            "w − ρ_min ĝ (weight decay included), which a transformation chained in front "
            "of it cannot arrange"
        )
    inner = None if base is None else optax.with_extra_args_support(base)
    static = radius_is_static(rho_max) and radius_is_static(rho_min)

    def init_fn(params: PyTree) -> BSAMState:
        base_state = () if inner is None else inner.init(params)
        return BSAMState(  # one buffer per field (donation)
            count=jnp.zeros((), jnp.int32),
            num_skipped=jnp.zeros((), jnp.int32),
            base_state=base_state,
        )

    def update_fn(
        updates: PyTree,
        state: BSAMState,
        params: PyTree | None = None,
        *,
        value_fn: Callable[[PyTree], jax.Array] | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, BSAMState]:
        value_fn = validation.require_value_fn(value_fn, "agsopt.bsam")
        validation.check_state_fields(state, BSAMState, "agsopt.bsam")
        if params is None:
            raise TypeError("agsopt.bsam: update() needs params")
        check_gradient_call(updates, params, value_fn, "agsopt.bsam")
        r_max = radius_at(rho_max, state.count)
        r_min = radius_at(rho_min, state.count)
        g_norm = tree_norm(updates) + eps
        to_min = tree_scale(-r_min / g_norm, updates)  # −ρ_min ĝ, the same ĝ as ρ_max ĝ

        def bilateral_direction() -> PyTree:
            to_max = tree_scale(r_max / g_norm, updates)  # ρ_max ĝ
            g_max = perturbed_gradient(value_fn, params, to_max)
            g_min = perturbed_gradient(value_fn, params, to_min)
            max_norm, min_norm = tree_norm(g_max), tree_norm(g_min)
            ratio = jnp.where(min_norm > 0, max_norm / jnp.where(min_norm > 0, min_norm, 1), 0)

            def combine(gmax: jax.Array, g: jax.Array, gmin: jax.Array) -> jax.Array:
                acc = accumulation_dtype(g.dtype)
                d = gmax.astype(acc) + g.astype(acc) - ratio.astype(acc) * gmin.astype(acc)
                return d.astype(g.dtype)

            return jax.tree.map(combine, g_max, updates, g_min)

        rho_ok = None if static else radius_is_valid(r_max, r_min)
        direction, ok = skip_unless(rho_ok, bilateral_direction, static)
        direction = mean_over_shards(direction, axis_name)
        count = optax.safe_increment(state.count)

        def guarded(step: Callable[[], tuple[PyTree, Any]]) -> tuple[PyTree, Any]:
            """``step()`` when ``ok``; else zero updates and ``base``'s state kept."""
            updates_shape, state_shape = jax.eval_shape(step)

            def skipped() -> tuple[PyTree, Any]:
                zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), updates_shape)
                kept = jax.tree.map(lambda x, s: x.astype(s.dtype), state.base_state, state_shape)
                return zeros, kept

            return choose_branch(ok, step, skipped)

        if inner is None:
            return direction, BSAMState(count, count_skip(state.num_skipped, ok), ())

        if step_from == "params":

            def step_params() -> tuple[PyTree, Any]:
                return inner.update(
                    direction, state.base_state, params, value_fn=value_fn, **extra_args
                )

            base_updates, base_state = step_params() if static else guarded(step_params)
            return base_updates, BSAMState(count, count_skip(state.num_skipped, ok), base_state)

        # "min_point": the shift is applied here, outside any guard around base, so the
        # step is taken only when both the shift and d are finite (and ρ valid)
        shift = mean_over_shards(to_min, axis_name)
        ok = ok & tree_all_finite(direction) & tree_all_finite(shift)

        def step_min_point() -> tuple[PyTree, Any]:
            min_point = jax.tree.map(
                lambda w, s: (w.astype(accumulation_dtype(w.dtype)) + s).astype(w.dtype),
                params,
                shift,
            )
            base_updates, base_state = inner.update(
                direction, state.base_state, min_point, value_fn=value_fn, **extra_args
            )

            def total(w: jax.Array, w_min: jax.Array, u: jax.Array) -> jax.Array:
                acc = accumulation_dtype(w.dtype)
                moved = (w_min.astype(acc) - w.astype(acc)) + u.astype(acc)
                return moved.astype(u.dtype)

            return jax.tree.map(total, params, min_point, base_updates), base_state

        final, base_state = guarded(step_min_point)
        return final, BSAMState(count, count_skip(state.num_skipped, ok), base_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
