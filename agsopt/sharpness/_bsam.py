"""Bilateral sharpness-aware minimization (BSAM, arXiv:2409.13173) as an Optax gradient
transformation.

BSAM adds *min-sharpness* (the loss minus the lowest loss around ``w``) to SAM's
max-sharpness. Per step, on one minibatch, with ``g = ∇L(w)`` and ``ĝ = g/(‖g‖ + eps)``:

    g_max = ∇L(w + ρ_max ĝ)                     (SAM's ascent point)
    g_min = ∇L(w − ρ_min ĝ)                     (the descent point reuses ĝ)
    d     = g_max + g − (‖g_max‖ / ‖g_min‖) g_min

and the base optimizer steps the *original* ``w`` with ``d``. The reference setting ties
``ρ_min`` to the learning rate (see :func:`bsam_rho_min_schedule`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from agsopt import _validation as validation
from agsopt.sharpness._perturbation import mean_over_shards, perturbed_gradient, sam_perturbation
from agsopt.tree_utils import accumulation_dtype, tree_norm, tree_scale

PyTree = Any
ScalarOrSchedule = float | jax.Array | Callable[[jax.Array], jax.Array]


class BSAMState(NamedTuple):
    """State of :func:`bsam`: the number of steps taken (the argument of ρ schedules)."""

    count: jax.Array


def _value_at(value: ScalarOrSchedule, count: jax.Array) -> jax.Array | float:
    """A constant, or a schedule ``count -> value`` evaluated at ``count``."""
    return value(count) if callable(value) else value


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

    so ρ_min moves in proportion to the learning rate: with the reference cosine schedule
    from ``lr_max = 0.05`` to ``lr_min = 0`` it decays from ``rho_hi = 0.05`` to
    ``rho_lo = 0``. Pass the same learning-rate schedule the base optimizer uses; the
    result is an Optax schedule ``count -> ρ_min`` for :func:`bsam`'s ``rho_min``. It stays
    in ``[min(ρ_lo, ρ_hi), max(ρ_lo, ρ_hi)]`` as long as ``lr(t)`` stays in
    ``[lr_min, lr_max]``.

    (The reference code updates ρ_min after each step from the previous step's learning
    rate, i.e. one step late, and uses ρ_min = 0 on the very first step. Here step ``t``
    uses ``lr(t)``, the learning rate of that same step.)

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
        lr = _value_at(learning_rate, count)
        return rho_lo + (rho_hi - rho_lo) * (lr - lr_min) / (lr_max - lr_min)

    return schedule


def bsam(
    rho_max: ScalarOrSchedule = 0.05,
    rho_min: ScalarOrSchedule = 0.05,
    *,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Bilateral SAM, BSAM (arXiv:2409.13173).

    ``update`` receives ``g = ∇L(w)`` as its updates, evaluates two more gradients of the
    keyword extra argument ``value_fn`` on the same minibatch, and returns::

        ĝ     = g / (‖g‖ + eps)
        g_max = ∇L(w + ρ_max ĝ)
        g_min = ∇L(w − ρ_min ĝ)
        d     = g_max + g − ‖g_max‖ / (‖g_min‖ + eps) · g_min

    Norms run over the whole pytree and are accumulated in float32; ``d`` is formed in
    float32 and cast back to the gradients' dtype. A zero gradient gives ``ĝ = 0`` and a
    finite ``d``. ``ρ_max = ρ_min = 0`` returns ``g`` (all three gradients coincide).

    Reference setting (the paper's CIFAR experiments and its public code): ``rho_max=0.05``
    constant; ``rho_min`` from 0.05 to 0 in proportion to a cosine learning rate
    (:func:`bsam_rho_min_schedule`); base optimizer SGD with lr 0.05, momentum 0.9 and
    weight decay 1e-3 (coupled, i.e. added to ``d`` by the base optimizer, not inside the
    perturbed losses); batch 128; BatchNorm statistics from the first (unperturbed) pass
    only. In Optax::

        lr = optax.cosine_decay_schedule(0.05, decay_steps=total_steps)
        opt = optax.chain(
            agsopt.bsam(rho_max=0.05, rho_min=bsam_rho_min_schedule(lr, 0.05)),
            optax.add_decayed_weights(1e-3),
            optax.sgd(lr, momentum=0.9),
        )
        grads = jax.grad(loss)(params, batch)
        updates, state = opt.update(grads, state, params,
                                    value_fn=lambda p: loss(p, batch))

    Args:
      rho_max: radius of the ascent point (≥ 0), a number or a schedule ``count -> ρ``.
      rho_min: radius of the descent point (≥ 0), a number or a schedule ``count -> ρ``
        (evaluated at this transformation's own step count, starting at 0).
      eps: added to ‖g‖ and to ‖g_min‖ so that zero gradients give finite updates.
      axis_name: m-sharpness under ``shard_map``/``pmap``/named ``vmap``. Pass the *local*
        (un-reduced) gradient: each shard normalizes its own ``g``, evaluates its own
        ``g_max`` and ``g_min`` and forms its own ``d`` with its own norm ratio
        ``‖g_max‖/‖g_min‖``; only the final ``d`` is averaged over ``axis_name``. This makes
        BSAM over ``n`` shards exactly the mean of ``n`` single-device BSAM steps on the
        shards' minibatches (the reference computes the ratio per minibatch as well), and
        costs one all-reduce per step.

    Raises:
      ValueError: a concrete ``rho_max``, ``rho_min`` or ``eps`` that is negative
        (``eps``: not positive) or not finite.
    """
    validation.check_positive("rho_max", rho_max, allow_zero=True)
    validation.check_positive("rho_min", rho_min, allow_zero=True)
    validation.check_positive("eps", eps)

    def init_fn(params: PyTree) -> BSAMState:
        del params
        return BSAMState(count=jnp.zeros((), jnp.int32))

    def update_fn(
        updates: PyTree,
        state: BSAMState,
        params: PyTree | None = None,
        *,
        value_fn: Callable[[PyTree], jax.Array] | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, BSAMState]:
        del extra_args
        value_fn = validation.require_value_fn(value_fn, "agsopt.bsam")
        if params is None:
            raise TypeError("agsopt.bsam: update() needs params")
        r_max = _value_at(rho_max, state.count)
        r_min = _value_at(rho_min, state.count)

        unit = sam_perturbation(updates, params, 1.0, eps=eps)  # ĝ, shared by both points
        g_max = perturbed_gradient(value_fn, params, tree_scale(r_max, unit))
        g_min = perturbed_gradient(value_fn, params, tree_scale(-r_min, unit))
        ratio = tree_norm(g_max) / (tree_norm(g_min) + eps)

        def combine(gmax: jax.Array, g: jax.Array, gmin: jax.Array) -> jax.Array:
            acc = accumulation_dtype(g.dtype)
            d = gmax.astype(acc) + g.astype(acc) - ratio * gmin.astype(acc)
            return d.astype(g.dtype)

        direction = jax.tree.map(combine, g_max, updates, g_min)
        direction = mean_over_shards(direction, axis_name)
        return direction, BSAMState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
