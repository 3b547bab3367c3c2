"""The perturbation shared by the SAM family: the ascent step ε, the gradient at w + ε,
and the m-sharpness average over shards.

SAM (arXiv:2010.01412): ``ε = ρ g / (‖g‖ + eps)``; ASAM (arXiv:2102.11600):
``ε = ρ T² g / (‖T g‖ + eps)`` with ``T = |w| + η`` elementwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from agsopt.tree_utils import accumulation_dtype, tree_add_scaled, tree_norm, tree_scale

PyTree = Any

__all__ = ["mean_over_shards", "perturbed_gradient", "sam_perturbation"]


def sam_perturbation(
    grads: PyTree,
    params: PyTree,
    rho: float | jax.Array,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    eps: float = 1e-12,
) -> PyTree:
    """The ascent step ε of SAM (``adaptive=False``) or ASAM (``adaptive=True``).

    SAM: ``ε = ρ g / (‖g‖ + eps)``. ASAM (Kwon et al., arXiv:2102.11600):
    ``ε = ρ T² g / (‖T g‖ + eps)`` with ``T = |w| + η`` elementwise. A zero gradient gives
    ``ε = 0``. Norms are accumulated in float32; ``ε`` has the dtypes of ``grads``.
    """
    if not adaptive:
        return tree_scale(rho / (tree_norm(grads) + eps), grads)

    def _f32(x):
        return x.astype(accumulation_dtype(x.dtype))

    scaled = jax.tree.map(lambda g, w: (jnp.abs(_f32(w)) + eta) * _f32(g), grads, params)
    factor = rho / (tree_norm(scaled) + eps)
    return jax.tree.map(
        lambda s, w, g: (factor * (jnp.abs(_f32(w)) + eta) * s).astype(g.dtype),
        scaled,
        params,
        grads,
    )


def perturbed_gradient(
    value_fn: Callable[[PyTree], jax.Array], params: PyTree, perturbation: PyTree
) -> PyTree:
    """``∇L(w + ε)``: the gradient of ``value_fn`` at the perturbed parameters."""
    return jax.grad(value_fn)(tree_add_scaled(params, 1.0, perturbation))


def mean_over_shards(tree: PyTree, axis_name: str | None) -> PyTree:
    """``lax.pmean`` over ``axis_name`` (m-sharpness), or the identity when it is None."""
    if axis_name is None:
        return tree
    return jax.lax.pmean(tree, axis_name)
