"""Argument checks shared by the constructors: clear errors that name the argument.

Checks run on concrete values only. Under ``optax.inject_hyperparams`` the constructors are
re-called with traced arrays inside ``update``; those cannot be inspected and are skipped.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


def is_concrete(value: Any) -> bool:
    """True for Python numbers and concrete arrays, False for tracers and callables."""
    if callable(value) or isinstance(value, jax.core.Tracer):
        return False
    try:
        np.asarray(value)
    except Exception:  # noqa: BLE001 - anything that is not array-like is not concrete
        return False
    return True


def _concrete_leaves(value: Any) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(value) if is_concrete(x)]


def _real_leaves(name: str, value: Any) -> list[np.ndarray]:
    """The concrete leaves of ``value``, each checked to be a real number (not bool)."""
    if value is None:
        raise TypeError(f"{name} must be a real number, got None")
    leaves = _concrete_leaves(value)
    for leaf in leaves:
        if not np.issubdtype(leaf.dtype, np.number) or np.iscomplexobj(leaf):
            raise TypeError(f"{name} must be a real number, got dtype {leaf.dtype}")
    return leaves


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """Every concrete entry of ``value`` (a number, array or pytree) is > 0 (or ≥ 0)."""
    for leaf in _real_leaves(name, value):
        bad = ~np.isfinite(leaf) | ((leaf < 0) if allow_zero else (leaf <= 0))
        if np.any(bad):
            bound = "non-negative" if allow_zero else "positive"
            first_bad = leaf.ravel()[bad.ravel()][0]
            raise ValueError(f"{name} must be finite and {bound}, got {first_bad}")


def check_scalar(name: str, value: Any) -> None:
    """A concrete ``value`` is a single number (shape ``()``), not an array or a list."""
    if value is None or isinstance(value, str | bytes):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if is_concrete(value) and np.ndim(value) != 0:
        raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")


def check_int(
    name: str, value: Any, *, minimum: int, maximum: int | None = None, why: str = ""
) -> int:
    """``value`` is a Python/NumPy integer in ``[minimum, maximum]``; returns it as ``int``.
    ``why`` (the reason for ``maximum``) is appended to the error.

    A JAX array here is almost always ``optax.inject_hyperparams`` without ``static_args``
    (it turns every numeric argument into an array): the error says so.
    """
    if isinstance(value, jax.Array):
        raise TypeError(
            f"{name} must be a Python int, got a JAX array ({value.dtype}): "
            "optax.inject_hyperparams turns numeric arguments into arrays; mark the integer "
            f"ones static, e.g. optax.inject_hyperparams(factory, static_args=({name!r},)) "
            "with the factory's other integer arguments too (its docstring lists them)"
        )
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        reason = f": {why}" if why else ""
        raise ValueError(f"{name} must be <= {maximum}, got {value}{reason}")
    return int(value)


def check_fraction(name: str, value: Any) -> None:
    """A concrete ``value`` lies in the half-open interval (0, 1]."""
    for leaf in _real_leaves(name, value):
        if not np.all((leaf > 0) & (leaf <= 1)):
            raise ValueError(f"{name} must lie in (0, 1], got {leaf}")


def check_decay(name: str, value: Any) -> None:
    """A concrete ``value`` (a moment decay, a momentum) lies in [0, 1)."""
    for leaf in _real_leaves(name, value):
        if not np.all((leaf >= 0) & (leaf < 1)):
            raise ValueError(f"{name} must lie in [0, 1), got {leaf}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` is one of the strings in ``choices``."""
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid choices: {', '.join(choices)}")
    return value


def require_value_fn(value_fn: Callable[..., Any] | None, owner: str) -> Callable[..., Any]:
    """The loss must reach ``update`` as the keyword extra argument ``value_fn``."""
    if value_fn is None:
        raise TypeError(
            f"{owner}: update() needs the loss as the keyword argument "
            "value_fn=lambda params: loss(params, batch) (the Optax extra-args convention)"
        )
    if not callable(value_fn):
        raise TypeError(f"{owner}: value_fn must be callable, got {type(value_fn).__name__}")
    return _explain_value_fn_errors(value_fn, owner)


def _is_nnx_state(tree: Any) -> bool:
    """Is ``tree`` a Flax ``nnx.State``? (by type name: Flax is not imported)"""
    kind = type(tree)
    return kind.__name__ == "State" and kind.__module__.startswith("flax.")


def _explain_value_fn_errors(value_fn: Callable[..., Any], owner: str) -> Callable[..., Any]:
    """``value_fn`` with two common mistakes turned into errors that say what to do.

    - It receives the parameters as an ``nnx.State`` (``nnx.Optimizer`` passes them so) and
      uses them as a model (``'State' object is not callable``): the error names
      ``agsopt.nnx.state_loss``.
    - It returns ``(loss, aux)`` (a ``has_aux`` loss): the error says to pass the loss alone.
    """

    def checked(params: Any) -> Any:
        try:
            out = value_fn(params)
        except (TypeError, AttributeError) as err:
            if not (_is_nnx_state(params) and "'State' object" in str(err)):
                raise
            raise TypeError(
                f"{owner}: value_fn received the parameters as a flax nnx.State (what "
                "nnx.Optimizer passes) and failed using them as a model: "
                f"{type(err).__name__}: {err}. Make the loss of the model a loss of the "
                "state: value_fn=agsopt.nnx.state_loss(loss_fn, model), called before the "
                "first pass"
            ) from err
        if isinstance(out, tuple | list):
            raise TypeError(
                f"{owner}: value_fn must return a scalar, the loss alone; got a "
                f"{type(out).__name__} of {len(out)} (a loss with has_aux=True?). Pass "
                "value_fn=lambda p: loss_fn(p, batch)[0]: the auxiliary output of the "
                "perturbed evaluations is not used (keep the first pass's, as the README's "
                "BatchNorm recipe does)"
            )
        return out

    checked.__wrapped__ = value_fn  # what was passed (inspect.unwrap), e.g. a masked filler
    return checked


def check_bool(name: str, value: Any) -> bool:
    """``value`` is ``True`` or ``False`` (not a truthy string or number)."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_float_params(params: Any, owner: str, name: str = "params") -> None:
    """Every leaf of ``params`` is a real floating array and there is at least one entry.

    Integer leaves would be perturbed and updated after truncation, complex ones need the
    conjugate (Wirtinger) gradient that a real Gaussian estimate does not give: both are a
    ``TypeError`` naming the leaf (``jax.tree_util.keystr`` of its path).
    """
    leaves = jax.tree_util.tree_leaves_with_path(params)
    for path, leaf in leaves:
        dtype = jax.numpy.result_type(leaf)
        if not jax.numpy.issubdtype(dtype, jax.numpy.floating):
            raise TypeError(
                f"{owner}: every leaf of {name} must be a real floating array (float32, "
                f"bfloat16, float16, float64), got {dtype} at {name}{jax.tree_util.keystr(path)}"
            )
    if sum(int(np.size(leaf)) for _, leaf in leaves) == 0:
        raise ValueError(f"{owner}: {name} has no entries (an empty pytree); nothing to smooth")


def check_scalar_output(fun: Callable[..., Any], args: Any, owner: str, name: str) -> None:
    """``fun(args)`` returns a real scalar (shape ``()``), checked once by ``jax.eval_shape``
    (trace time only: nothing is evaluated)."""
    out = jax.eval_shape(fun, args)
    leaves = jax.tree.leaves(out)
    single = len(leaves) == 1 and leaves[0] is out  # an array, not a dict or list of one
    if single and getattr(out, "shape", None) == ():
        dtype = out.dtype
        if jax.numpy.issubdtype(dtype, jax.numpy.complexfloating) or not (
            jax.numpy.issubdtype(dtype, jax.numpy.number)
            or jax.numpy.issubdtype(dtype, jax.numpy.bool_)
        ):
            raise TypeError(f"{owner}: {name} must return a real scalar, got dtype {dtype}")
        return
    got = (
        f"shape {out.shape} {out.dtype}"
        if single
        else f"{type(out).__name__} with {len(leaves)} arrays"
    )
    raise TypeError(f"{owner}: {name} must return a scalar (shape ()), got {got}")


def check_state_fields(state: Any, kind: type, owner: str) -> None:
    """``state`` has the fields of the NamedTuple ``kind`` (e.g. not the state of another
    transformation, nor the tuple of a whole ``optax.chain``); else a ``TypeError``."""
    fields = getattr(type(state), "_fields", None)  # another NamedTuple: its own fields
    other = fields is not None and tuple(fields) != tuple(kind._fields)
    missing = [f for f in kind._fields if not hasattr(state, f)]
    if other or missing:
        detail = f"fields {tuple(fields)}" if other else f"no field {missing[0]!r}"
        raise TypeError(
            f"{owner}: state must be the {kind.__name__} that this transformation's init "
            f"returned, got {type(state).__name__} ({detail}): the state of another "
            "transformation, or of a whole optax.chain, was passed"
        )
