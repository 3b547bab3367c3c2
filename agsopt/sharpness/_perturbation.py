"""The perturbation shared by the SAM family: the ascent step ε, the gradient at w + ε,
and the m-sharpness average over shards.

SAM (arXiv:2010.01412): ``ε = ρ g / (‖g‖ + eps)``; ASAM (arXiv:2102.11600):
``ε = ρ T² g / (‖T g‖ + eps)`` with ``T = |w| + η`` elementwise on the leaves an
``adaptive_mask`` selects and ``T = 1`` on the others.

Radii may be schedules ``count -> ρ`` (Optax's convention); :func:`check_radius` validates
them at construction and :func:`radius_at` evaluates them in ``update``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from agsopt import _validation as validation
from agsopt.masking import check_masked_value_fn, has_masked_nodes
from agsopt.tree_utils import accumulation_dtype, tree_add_scaled, tree_norm, tree_scale

PyTree = Any
Radius = float | jax.Array | Callable[[jax.Array], jax.Array]
Mask = PyTree | Callable[[PyTree], PyTree]

__all__ = [
    "check_gradient_call",
    "check_radius",
    "mean_over_shards",
    "perturbed_gradient",
    "radius_at",
    "resolve_mask",
    "sam_perturbation",
]


def check_radius(name: str, value: Radius) -> None:
    """Validate a radius at construction: a finite scalar ≥ 0, or a schedule ``count -> ρ``.

    A schedule is called once at ``count = 0`` (Optax schedules are pure functions) and
    must return a finite scalar ≥ 0 there; later values are not inspected. Traced values
    (``optax.inject_hyperparams``) pass unchecked. Errors name the argument.
    """
    if callable(value):
        try:
            first = value(jnp.zeros((), jnp.int32))
        except Exception as err:  # noqa: BLE001 - re-raised with the argument's name
            raise TypeError(
                f"{name}: a schedule must be a function count -> radius; calling it at "
                f"count 0 failed with {type(err).__name__}: {err}"
            ) from err
        if jnp.ndim(first) != 0:
            raise ValueError(
                f"{name}: a schedule must return a scalar, got shape {jnp.shape(first)}"
            )
        validation.check_positive(f"{name}(0)", first, allow_zero=True)
        return
    if value is None or isinstance(value, (str, bytes, bool)):
        raise TypeError(f"{name} must be a number or a schedule count -> number, got {value!r}")
    validation.check_positive(name, value, allow_zero=True)
    if jnp.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {jnp.shape(value)}")


def radius_at(value: Radius, count: jax.Array) -> jax.Array | float:
    """A constant radius, or a schedule ``count -> ρ`` evaluated at the step ``count``."""
    return value(count) if callable(value) else value


def resolve_mask(name: str, mask: Mask | None, params: PyTree) -> PyTree:
    """A per-leaf tree of Python bools shaped like ``params`` (Optax's mask convention).

    ``mask`` is None (every leaf selected), a pytree of bools with the structure of
    ``params`` or a prefix of it (a bool covers its whole subtree), or a callable
    ``params -> such a pytree``. Leaves that ``optax.masked`` replaced by
    ``optax.MaskedNode`` stay ``MaskedNode``.
    """
    if mask is None:
        return jax.tree.map(lambda _: True, params)
    tree = mask(params) if callable(mask) else mask

    def check(m: Any) -> bool:
        if isinstance(m, (bool, np.bool_)):
            return bool(m)
        raise TypeError(
            f"{name}: mask leaves must be Python bools (Optax's convention), got {type(m).__name__}"
        )

    try:
        return jax.tree.map(lambda m, sub: jax.tree.map(lambda _: check(m), sub), tree, params)
    except ValueError as err:
        raise ValueError(
            f"{name} must have the structure of the parameters (or a prefix of it): {err}"
        ) from err


def sam_perturbation(
    grads: PyTree,
    params: PyTree,
    rho: float | jax.Array,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    eps: float = 1e-12,
    adaptive_mask: Mask | None = None,
) -> PyTree:
    """The ascent step ε of SAM (``adaptive=False``) or ASAM (``adaptive=True``).

    SAM: ``ε = ρ g / (‖g‖ + eps)``. ASAM (Kwon et al., arXiv:2102.11600):
    ``ε = ρ T² g / (‖T g‖ + eps)`` elementwise, with ``T = |w| + η`` on the leaves that
    ``adaptive_mask`` selects (all leaves when it is None) and ``T = 1`` on the others; the
    norm runs over every leaf. A zero gradient gives ``ε = 0``. Norms are accumulated in at
    least float32; ``ε`` has the dtypes of ``grads``. Leaves that ``optax.masked`` hides
    (``optax.MaskedNode``) carry no entries and take no part in the norm.
    """
    if not adaptive:
        return tree_scale(rho / (tree_norm(grads) + eps), grads)

    selected = resolve_mask("adaptive_mask", adaptive_mask, params)

    def _acc(x):
        return x.astype(accumulation_dtype(x.dtype))

    def scale_of(m: bool, w: jax.Array) -> jax.Array:
        return jnp.abs(_acc(w)) + eta if m else jnp.ones((), accumulation_dtype(w.dtype))

    scales = jax.tree.map(scale_of, selected, params)
    scaled = jax.tree.map(lambda t, g: t * _acc(g), scales, grads)
    factor = rho / (tree_norm(scaled) + eps)
    return jax.tree.map(lambda t, s, g: (factor * t * s).astype(g.dtype), scales, scaled, grads)


def check_gradient_call(
    updates: PyTree, params: PyTree, value_fn: Callable[[PyTree], jax.Array], owner: str
) -> None:
    """Trace-time checks of a SAM-family ``update``: ``updates`` is the gradient ``g = ∇L(w)``
    (leaves shaped like the parameters', not ``None``) and ``value_fn`` returns a scalar
    (unless the parameters hold ``optax.MaskedNode``: ``perturbed_gradient`` checks those)."""
    got = [tuple(jnp.shape(x)) for x in jax.tree.leaves(updates)]
    want = [tuple(jnp.shape(x)) for x in jax.tree.leaves(params)]
    if got != want:
        raise TypeError(
            f"{owner}: updates must be the gradient g = ∇L(w), a pytree shaped like params "
            f"(leaf shapes {want}); got {type(updates).__name__} with leaf shapes {got}"
        )
    if not has_masked_nodes(params):
        validation.check_scalar_output(value_fn, params, owner, "value_fn")


def perturbed_gradient(
    value_fn: Callable[[PyTree], jax.Array], params: PyTree, perturbation: PyTree
) -> PyTree:
    """``∇L(w + ε)``: the gradient of ``value_fn`` at the perturbed parameters.

    Under ``optax.masked`` / ``optax.multi_transform`` the parameters arrive with
    ``optax.MaskedNode`` in place of the leaves of other groups. ``value_fn`` must then be
    :func:`fill_masked_params` of the loss and of this step's parameters, which fills those
    leaves in; anything else is a ``TypeError`` before ``value_fn`` is called (a loss given
    ``MaskedNode`` leaves could fail with an unrelated error or, casting one with
    ``jnp.asarray``, an empty array, silently compute something else). A filler made from
    other parameters (e.g. built once before the training loop, so that the hidden leaves
    stay at their first values) is a ``ValueError``.
    """
    check_masked_value_fn(value_fn, params, "agsopt (SAM family)")
    point = tree_add_scaled(params, 1.0, perturbation)
    return jax.grad(value_fn)(point)


def mean_over_shards(tree: PyTree, axis_name: str | None) -> PyTree:
    """``lax.pmean`` over ``axis_name`` (m-sharpness), or the identity when it is None."""
    if axis_name is None:
        return tree
    return jax.lax.pmean(tree, axis_name)
