"""Flax NNX: a loss of the model as a loss of its parameters' ``nnx.State``.

With ``nnx.Optimizer(model, tx, wrt=nnx.Param)``, ``optimizer.update(model, grads,
value_fn=...)`` hands ``tx`` the parameters as an ``nnx.State`` θ, and every agsopt
transformation evaluates ``value_fn`` at perturbed copies of θ (SAM, arXiv:2010.01412:
``∇L(θ + ε)``; AGS, arXiv:2411.11747: ``L(θ + Σu)``). So ``value_fn`` must be a function of
the state, not of the model. :func:`state_loss` makes one from a loss of the model::

    value_fn(θ) = loss_fn(nnx.merge(graphdef, θ, rest))

where ``graphdef`` and ``rest`` (BatchNorm statistics, dropout RNG state: everything that
is not a parameter) are taken from the model when :func:`state_loss` is called.

Flax is imported only when :func:`state_loss` runs: ``agsopt`` itself does not need it
(``pip install "agsopt[nnx]"``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

__all__ = ["state_loss"]


def state_loss(
    loss_fn: Callable[[Any], jax.Array],
    model: Any,
    *states: Any,
    wrt: Any = None,
) -> Callable[[Any], jax.Array]:
    """A loss of an NNX model turned into a loss of its parameters' ``nnx.State``.

    Returns ``value_fn(θ) = loss_fn(nnx.merge(graphdef, θ, *rest, copy=True))``: the model
    rebuilt with the parameters θ it is given, ready for ``value_fn=``::

        @nnx.jit
        def train_step(model, optimizer, x, y):
            loss_of = lambda m: jnp.mean((m(x) - y) ** 2)
            value_fn = agsopt.nnx.state_loss(loss_of, model)  # before the first pass
            loss, grads = nnx.value_and_grad(loss_of)(model)
            optimizer.update(model, grads, value_fn=value_fn)
            return loss

    ``model`` is either

    - an ``nnx.Module``: it is split into ``graphdef``, the parameters (the ``wrt`` filter,
      ``nnx.Param`` by default: pass the filter the ``nnx.Optimizer`` was built with) and
      ``rest``, everything else, *copied now*. Call it before the first (unperturbed)
      pass, as above: the perturbed passes then see the pre-step BatchNorm statistics and
      dropout RNG state (the same dropout mask as the first pass), and their own
      statistics are discarded. The model itself is never modified by ``value_fn``.
    - an ``nnx.GraphDef`` from ``nnx.split(model, wrt, ...)``, followed by the states that
      came after the parameters (``graphdef, params, rest = nnx.split(model, nnx.Param,
      ...)``: ``state_loss(loss_fn, graphdef, rest)``), for functional training loops
      without ``nnx.Optimizer``.

    The merge copies its inputs (``copy=True``), so a train-mode pass inside ``value_fn``
    writes its statistics and RNG advance into a throw-away model.

    Args:
      loss_fn: the loss of the model, ``model -> scalar`` (close over the batch).
      model: the ``nnx.Module`` being trained, or its ``nnx.GraphDef``.
      *states: with a ``GraphDef`` only: the non-parameter states to merge after θ.
      wrt: with a module only: the filter of the parameters that ``value_fn`` receives
        (default ``nnx.Param``).

    Raises:
      TypeError: ``loss_fn`` not callable; ``model`` neither an ``nnx.Module`` nor an
        ``nnx.GraphDef``; extra states with a module, or ``wrt`` with a ``GraphDef``.
      ModuleNotFoundError: Flax is not installed.
    """
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (model -> loss), got {type(loss_fn).__name__}")
    try:
        from flax import nnx
    except ModuleNotFoundError as err:  # pragma: no cover - flax is in the test extras
        raise ModuleNotFoundError(
            'agsopt.nnx.state_loss needs Flax: pip install "agsopt[nnx]"'
        ) from err

    if isinstance(model, nnx.GraphDef):
        if wrt is not None:
            raise TypeError(
                "wrt is the filter used to split a module; with a GraphDef the split is "
                "already done: pass the states that followed the parameters instead"
            )
        graphdef, rest = model, states
    elif isinstance(model, nnx.Module):
        if states:
            raise TypeError(
                "states are taken from the module itself; pass them only with a GraphDef "
                "(state_loss(loss_fn, graphdef, rest))"
            )
        graphdef, _, rest = nnx.split(model, nnx.Param if wrt is None else wrt, ...)
        rest = (nnx.clone(rest),)  # a snapshot: split shares the model's variables
    else:
        raise TypeError(
            f"model must be an nnx.Module or the nnx.GraphDef of one, got {type(model).__name__}"
        )

    def value_fn(params: Any) -> jax.Array:
        return loss_fn(nnx.merge(graphdef, params, *rest, copy=True))

    return value_fn
