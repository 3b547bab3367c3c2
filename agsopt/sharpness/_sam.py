"""Sharpness-aware minimization (SAM, arXiv:2010.01412) and its adaptive form (ASAM,
arXiv:2102.11600) as an Optax gradient transformation.

SAM minimizes ``max_{‖ε‖≤ρ} L(w + ε)``. Its one-step approximation of the inner maximum is

    ε = ρ g / (‖g‖ + eps),        g = ∇L(w)                       (SAM)
    ε = ρ T_w² g / (‖T_w g‖ + eps),  T_w = |w| + η  elementwise     (ASAM)

and the gradient handed to the base optimizer is ``g_s = ∇L(w + ε)``, which then steps
the *original* ``w``. The perturbation uses the minibatch of ``g``: the caller's
``value_fn`` closes over it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from agsopt import _validation as validation
from agsopt.sharpness._perturbation import mean_over_shards, perturbed_gradient, sam_perturbation

PyTree = Any


class SAMState(NamedTuple):
    """State of :func:`sam`: the number of steps taken."""

    count: jax.Array


def sam(
    rho: float | jax.Array = 0.05,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SAM (Foret et al., arXiv:2010.01412); ``adaptive=True`` gives ASAM (arXiv:2102.11600).

    Chain it in front of any Optax optimizer::

        opt = optax.chain(agsopt.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
        grads = jax.grad(loss)(params, batch)
        updates, state = opt.update(grads, state, params,
                                    value_fn=lambda p: loss(p, batch))

    ``update`` receives ``g = ∇L(w)`` as its updates and returns ``∇L(w + ε)`` (see
    :func:`sam_perturbation`). Clipping belongs *after* this transformation (clipping ``g``
    has no effect once it is normalized).

    Args:
      rho: radius of the ascent step (≥ 0). ρ = 0 returns the plain gradient
        (with one extra gradient evaluation).
      adaptive: use ASAM's scale-invariant ascent ``T_w = |w| + η``.
      eta: ASAM's offset η (ignored unless ``adaptive``).
      eps: added to the norm, so a zero gradient gives a finite update.
      axis_name: m-sharpness under ``shard_map``/``pmap``: each shard perturbs with its own
        ĝ (so pass the *local*, un-reduced gradient) and the perturbed gradients are
        averaged over ``axis_name``.

    BatchNorm-style state: make ``value_fn`` a function of the parameters only, closing
    over the statistics of the first (unperturbed) pass and discarding those of the
    second; see the README.
    """
    validation.check_positive("rho", rho, allow_zero=True)
    validation.check_positive("eta", eta, allow_zero=True)
    validation.check_positive("eps", eps)

    def init_fn(params: PyTree) -> SAMState:
        del params
        return SAMState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del extra_args
        value_fn = validation.require_value_fn(value_fn, "agsopt.sam")
        if params is None:
            raise TypeError("agsopt.sam: update() needs params")
        perturbation = sam_perturbation(updates, params, rho, adaptive=adaptive, eta=eta, eps=eps)
        sharp_grads = perturbed_gradient(value_fn, params, perturbation)
        sharp_grads = mean_over_shards(sharp_grads, axis_name)
        return sharp_grads, SAMState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
