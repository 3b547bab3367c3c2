"""Transformations inside ``optax.masked`` / ``optax.multi_transform``: filling in the hidden
parameters for ``value_fn``.

Under ``optax.masked(inner, mask)`` (and in each group of ``optax.multi_transform``)
``inner`` sees the parameters with ``optax.MaskedNode`` in place of the leaves of the other
groups. The SAM family and the smoothing transformations evaluate ``value_fn`` at perturbed
copies of that tree, so the loss must be :func:`fill_masked_params` of the loss and of this
step's full parameters, which fills those leaves in; :func:`check_masked_value_fn` makes
anything else a ``TypeError`` before ``value_fn`` is called (a loss given ``MaskedNode``
leaves fails with an unrelated error or, casting one with ``jnp.asarray``, an empty array,
silently computes something else), and a filler built from other parameters (e.g. once
before the training loop, so that the hidden leaves stay at their first values) a
``ValueError``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

PyTree = Any

__all__ = ["check_filler", "check_masked_value_fn", "fill_masked_params", "has_masked_nodes"]


def is_masked_node(x: Any) -> bool:
    """Is ``x`` an ``optax.MaskedNode`` (a leaf that ``optax.masked`` hid)?"""
    return isinstance(x, optax.MaskedNode)


def has_masked_nodes(params: PyTree) -> bool:
    """Does ``params`` hold ``optax.MaskedNode`` leaves (the tree ``optax.masked`` passes)?"""
    return any(is_masked_node(x) for x in jax.tree.leaves(params, is_leaf=is_masked_node))


def check_masked_value_fn(
    value_fn: Callable[[PyTree], jax.Array], params: PyTree, owner: str
) -> None:
    """Where ``params`` hold ``MaskedNode`` leaves, ``value_fn`` must be
    :func:`fill_masked_params` of this step's parameters (:func:`check_filler`)."""
    if has_masked_nodes(params):
        check_filler(value_fn, params, owner)


class _FilledLoss:
    """What :func:`fill_masked_params` returns: the loss, called on full parameter trees."""

    def __init__(self, value_fn: Callable[[PyTree], jax.Array], params: PyTree) -> None:
        self.value_fn = value_fn
        self.params = params

    def __call__(self, partial: PyTree) -> jax.Array:
        full = jax.tree.map(
            lambda part, leaf: leaf if is_masked_node(part) else part,
            partial,
            self.params,
            is_leaf=is_masked_node,
        )
        return self.value_fn(full)


def _same_leaf(current: Any, stored: Any) -> bool:
    """May ``stored`` (the filler's) be ``current`` (this update's)? The same object; equal
    concrete arrays; or two tracers (undecidable at trace time, accepted). A concrete
    stored leaf against a traced current one was built outside the step."""
    if current is stored:
        return True
    current_traced = isinstance(current, jax.core.Tracer)
    stored_traced = isinstance(stored, jax.core.Tracer)
    if current_traced or stored_traced:
        return current_traced and stored_traced
    return bool(np.array_equal(np.asarray(current), np.asarray(stored), equal_nan=True))


def check_filler(
    value_fn: Callable[[PyTree], jax.Array], params: PyTree, owner: str = "agsopt"
) -> None:
    """``value_fn`` is :func:`fill_masked_params` of parameters whose visible leaves are
    ``params``' (see the module doc). Looks through the error-explaining
    wrapper of :func:`agsopt._validation.require_value_fn` (``__wrapped__``)."""
    value_fn = inspect.unwrap(value_fn)
    if not isinstance(value_fn, _FilledLoss):
        raise TypeError(
            f"{owner}: value_fn received parameters with optax.MaskedNode leaves: this "
            "transformation runs inside optax.masked or optax.multi_transform, which hide "
            "the other groups' parameters. Pass "
            "value_fn=agsopt.fill_masked_params(loss, params) built in each step from the "
            "params given to update (it fills them in from the full parameters), or chain "
            "the transformation in front of multi_transform."
        )
    try:
        same = jax.tree.map(
            lambda part, leaf: True if is_masked_node(part) else _same_leaf(part, leaf),
            params,
            value_fn.params,
            is_leaf=is_masked_node,
        )
    except ValueError as err:
        raise ValueError(
            "value_fn was made by agsopt.fill_masked_params from a parameter tree of another "
            f"structure than this update's: {err}"
        ) from err
    if not all(jax.tree.leaves(same)):
        raise ValueError(
            "value_fn was made by agsopt.fill_masked_params from other parameters than this "
            "update's (e.g. built once before the training loop): the leaves it fills in "
            "would stay at their old values. Build it in every step from the params passed "
            "to update: value_fn=agsopt.fill_masked_params(loss, params)."
        )


def fill_masked_params(
    value_fn: Callable[[PyTree], jax.Array], params: PyTree
) -> Callable[[PyTree], jax.Array]:
    """``value_fn`` made to accept parameter trees in which ``optax.masked`` hid leaves.

    Under ``optax.masked(inner, mask)`` (and so in each group of ``optax.multi_transform``)
    ``inner`` sees the parameters with ``optax.MaskedNode`` in place of the unselected
    leaves, and the SAM family and the smoothing transformations evaluate ``value_fn`` at such a
    (perturbed) tree. The
    returned function replaces every ``MaskedNode`` by the corresponding leaves of the full
    ``params`` and calls ``value_fn`` on the full tree; a tree without ``MaskedNode``
    passes through unchanged, so the same function serves every group. It holds ``params``:
    build it in every step from the parameters passed to ``update`` (inside the jitted
    step)::

        opt = optax.multi_transform(
            {"sam": optax.chain(agsopt.sam(0.05), optax.sgd(0.1)), "plain": optax.adam(1e-3)},
            labels)
        updates, state = opt.update(grads, state, params,
                                    value_fn=agsopt.fill_masked_params(loss, params))

    One built once before the loop would evaluate the hidden leaves at their first values
    while the other groups move them: every agsopt transformation refuses it
    (``ValueError``), as it refuses a plain loss under masking (``TypeError``).

    The selected group then gets SAM's gradient with ε on its own leaves only (the norm
    over those leaves), or the smoothed gradient over its own leaves, the other leaves held
    at ``w``; gradients are taken with respect to the selected leaves only.
    """
    if not callable(value_fn):
        raise TypeError(f"fill_masked_params: value_fn must be callable, got {value_fn!r}")
    return _FilledLoss(value_fn, params)
