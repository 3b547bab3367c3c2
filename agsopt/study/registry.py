"""The optimizers a study runs: :class:`OptimizerSpec`, the factories and their settings.

An optimizer enters a study as a factory ``(dim, function, key) -> OptimizerSpec``. ``key``
is a typed PRNG key of the study's key implementation; a stochastic transformation (AGS,
IGS) must be built with it (:func:`ags_spec` does) so that the runner can replace it by
each start's own key of the same implementation. Deterministic optimizers ignore it.

Cost convention (also in the study's JSON): one evaluation of f counts 1 and one gradient
∇f counts 1 (an oracle call; reverse mode costs a small constant multiple of f, which is
not charged). GD and Adam cost 1 per step, SAM 2, a zero-order AGS/IGS step with N
antithetic directions ``2N`` and a first-order one ``N``
(:func:`agsopt.smoothing.evaluations_per_estimate`). Recording ``f(x_t)`` is not counted.

Adding an optimizer is one entry::

    OPTIMIZERS["sam"] = lambda d, fn, key: gradient_spec(
        optax.chain(agsopt.sam(0.05), optax.sgd(gd_learning_rate(fn))), 2, "SAM, ρ=0.05")
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agsopt import functions as fns
from agsopt.smoothing import (
    DEFAULT_COVARIANCE,
    ags,
    ags_adam,
    ags_gd,
    covariance_rules,
    evaluations_per_estimate,
)

__all__ = [
    "ADAM_LEARNING_RATE",
    "ADAM_LEARNING_RATES",
    "ADAM_SIGMA",
    "AGS_COVARIANCE",
    "DECAY",
    "FALLBACK_LEARNING_RATE",
    "GD_LEARNING_RATES",
    "NUM_SAMPLES",
    "OPTIMIZERS",
    "SMOOTHED_GD",
    "OptimizerFactory",
    "OptimizerSpec",
    "adam_learning_rate",
    "ags_spec",
    "build_optimizer",
    "curvature_estimate",
    "function_names",
    "gd_learning_rate",
    "gradient_spec",
    "is_tuned",
    "optimizer_names",
    "resolve_function",
    "rule_registry",
    "smoothed_adam_factory",
    "smoothed_gd_factory",
]


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer as the study runs it.

    Attributes:
      transformation: the Optax transformation; its ``update`` is called as
        ``update(g, state, x, value_fn=f)`` with ``g = ∇f(x)`` if ``needs_gradient`` and
        zeros otherwise.
      evaluations_per_step: function evaluations (gradients count 1 each) per step.
      description: the hyperparameters, one line (goes to the JSON metadata).
      needs_gradient: whether ``update`` needs ``∇f(x)`` as its ``updates``.
    """

    transformation: optax.GradientTransformation
    evaluations_per_step: int
    description: str
    needs_gradient: bool = True


OptimizerFactory = Callable[[int, fns.TestFunction, jax.Array], OptimizerSpec]
"""``(dim, function, key) -> OptimizerSpec`` (see the module doc for ``key``)."""


def gradient_spec(
    transformation: optax.GradientTransformation, evaluations_per_step: int, description: str
) -> OptimizerSpec:
    """An :class:`OptimizerSpec` for a method that is handed ``∇f(x)`` (GD, Adam, SAM, ...)."""
    return OptimizerSpec(transformation, evaluations_per_step, description, needs_gradient=True)


def _ags_default(name: str) -> Any:
    """The default of :func:`agsopt.ags`'s argument ``name`` (read, not copied)."""
    return inspect.signature(ags).parameters[name].default


def ags_spec(
    base: str,
    learning_rate: optax.ScalarOrSchedule,
    description: str,
    *,
    key: jax.Array,
    **ags_kwargs: Any,
) -> OptimizerSpec:
    """An :class:`OptimizerSpec` for AGS/IGS: ``base`` is ``"gd"`` or ``"adam"``.

    ``key`` is the factory's key (a typed key of the study's implementation); the other
    ``ags_kwargs`` go to :func:`agsopt.ags` (sigma, num_samples, covariance, method, ...)
    with its own defaults for those left out. The evaluation count follows from ``method``
    and ``num_samples``. The zero-order methods are not handed a gradient.
    """
    if base not in ("gd", "adam"):
        raise ValueError(f"base must be 'gd' or 'adam', got {base!r}")
    alias = ags_gd if base == "gd" else ags_adam
    method = ags_kwargs.get("method", _ags_default("method"))
    num_samples = ags_kwargs.get("num_samples", _ags_default("num_samples"))
    return OptimizerSpec(
        alias(learning_rate, key=key, **ags_kwargs),
        evaluations_per_estimate(method, num_samples),
        description,
        needs_gradient=False,
    )


# --------------------------------------------------------------------------------------
# The optimizers and their documented hyperparameters
# --------------------------------------------------------------------------------------

NUM_SAMPLES = 128
"""N, antithetic directions per AGS/IGS step in the study (2N = 256 evaluations); larger
than :func:`agsopt.ags`'s default because the study's functions are multimodal."""

DECAY = 0.999
"""Per-step factor of the exponential decays of σ and of the AGS-Adam learning rate."""

AGS_COVARIANCE = DEFAULT_COVARIANCE
"""The covariance rule of the ``ags-*`` entries: :func:`agsopt.ags`'s default,
:data:`agsopt.smoothing.DEFAULT_COVARIANCE` (the ``igs-*`` entries use ``"isotropic"``)."""

GD_LEARNING_RATES: dict[str, float] = {
    "ackley": 0.1,
    "ellipsoid": 1e-7,
    "griewank": 10.0,
    "levy": 0.01,
    "michalewicz": 1e-5,
    "mixed_asymmetric": 1e-3,
    "rastrigin": 1e-4,
    "rastrigin_multifrequency": 1e-4,
    "rosenbrock": 1e-5,
    "schwefel": 0.1,
    "sphere": 0.01,
    "styblinski_tang": 0.01,
}
"""Plain GD: the best constant learning rate of the grid 10⁻⁸, 10⁻⁷, ..., 10² (median final
f over 20 starts, d = 100, 3000 steps; for Schwefel the best that keeps the iterates in the
box, since f is unbounded below outside it); ``rotated_<name>`` uses ``<name>``'s.
rastrigin_multifrequency and mixed_asymmetric were tuned the same way; their ties (equal
medians to 3 digits) went to the smallest rate."""

ADAM_LEARNING_RATES: dict[str, float] = {
    "ackley": 1e-4,
    "ellipsoid": 3e-3,
    "griewank": 1e-3,
    "levy": 3e-2,
    "michalewicz": 3e-4,
    "mixed_asymmetric": 1e-3,
    "rastrigin": 1e-4,
    "rastrigin_multifrequency": 1e-4,
    "rosenbrock": 3e-2,
    "schwefel": 3e-2,
    "sphere": 3e-3,
    "styblinski_tang": 3e-4,
}
"""Plain Adam: learning rate ÷ box width, the best of the grid 10⁻⁴, 3·10⁻⁴, ..., 3·10⁻²
(same protocol as :data:`GD_LEARNING_RATES`)."""

SMOOTHED_GD: dict[str, tuple[float, float]] = {
    "rastrigin": (0.005, 3.0),
    "ackley": (10.0, 3.0),
    "levy": (0.05, 2.0),
    "michalewicz": (0.01, 0.1),
    "rastrigin_multifrequency": (0.005, 3.0),
    "mixed_asymmetric": (0.005, 0.5),
}
"""AGS-GD / IGS-GD ``(learning rate, σ)``, both constant, tuned on a small grid at d = 100 (5
starts; rastrigin_multifrequency and mixed_asymmetric: lr ∈ {0.001, 0.005} × σ ∈ {0.5, 1.5, 3} at d
= 20, IGS, 500 steps — the σ that suits the rippled coordinates, 3, biases the exponential walls of
mixed_asymmetric until GD diverges, so it gets 0.5). Elsewhere: plain GD's learning rate and σ =
0.05 × box width. σ is kept constant in the GD form: a shrinking σ raises the estimator's variance
(∝ 1/σ² for an oscillating f) and the curvature of f_Σ, which a constant learning rate does not
survive. A constant σ keeps the minimizer of f_Σ where f has it only for functions that are even
about their minimizer (Rastrigin, Ackley, Griewank); elsewhere (Levy, Michalewicz) the GD form
stalls at the smoothing bias and the Adam form, whose σ decays, is the one to use."""

ADAM_SIGMA = 0.1
"""AGS-Adam / IGS-Adam: σ_t = 0.1 w · 0.999^t, w the box width (every function alike)."""

ADAM_LEARNING_RATE = 0.003
"""AGS-Adam / IGS-Adam: lr_t = 0.003 w · 0.999^t; σ and lr shrink 20-fold over 3000 steps.
The Adam form needs no per-function tuning: its steps do not scale with the gradient."""


FALLBACK_LEARNING_RATE = 1e-3
"""GD's learning rate where :func:`curvature_estimate` finds no finite positive curvature
(a linear or nowhere-finite function)."""

_PROBE_POINTS, _PROBE_DIRECTIONS, _PROBE_STEP = 32, 8, 0.01


def _base_name(function: fns.TestFunction) -> str:
    name = function.name
    return name[len(fns.ROTATED_PREFIX) :] if name.startswith(fns.ROTATED_PREFIX) else name


def is_tuned(function: fns.TestFunction) -> bool:
    """Whether ``function`` is one of :mod:`agsopt.functions` (or a rotated copy of one),
    whose settings were tuned (:data:`GD_LEARNING_RATES`, ...). A user's function is not,
    whatever its name: its settings are derived from its box (:func:`gd_learning_rate`)."""
    base = fns.REGISTRY.get(_base_name(function))
    if base is None:
        return False
    if function.name.startswith(fns.ROTATED_PREFIX):
        return function.rotation is not None and function.domain == base.domain
    return function is base


def _width(function: fns.TestFunction) -> float:
    lower, upper = function.domain
    return float(upper - lower)


def curvature_estimate(function: fns.TestFunction, dim: int) -> float:
    """L̂, the largest curvature of ``function`` seen along random lines through its box.

    ``max |f(x + hv) − 2f(x) + f(x − hv)| / h²`` over 32 points ``x`` uniform in the box
    and 8 random unit directions ``v`` at each (``key(0)``), with ``h = 0.01 w`` (``w`` the
    box width): the central second difference, exact for a quadratic, ``vᵀ∇²f v`` up to
    O(h²) otherwise, and needing only values of f (a black box works). It bounds the
    Lipschitz constant L of ∇f from below: along an eigenvector direction that random lines
    miss (a strongly ill-conditioned f) it can fall short of L. NaN where no finite positive
    value was seen.
    """
    lower, upper = function.domain
    h = _PROBE_STEP * (upper - lower)
    kx, kv = jax.random.split(jax.random.key(0))
    x = fns.sample_starts(function, kx, _PROBE_POINTS, dim)
    v = jax.random.normal(kv, (_PROBE_POINTS, _PROBE_DIRECTIONS, dim), x.dtype)
    v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    batch = jax.vmap(jax.vmap(function))
    center = jax.vmap(function)(x)[:, None]
    ahead, behind = batch(x[:, None, :] + h * v), batch(x[:, None, :] - h * v)
    curvature = np.abs(np.asarray(ahead - 2 * center + behind, np.float64)) / h**2
    curvature = curvature[np.isfinite(curvature) & (curvature > 0)]
    return float(curvature.max()) if curvature.size else float("nan")


def gd_learning_rate(function: fns.TestFunction, dim: int | None = None) -> float:
    """Plain GD's learning rate for ``function``.

    A library function (:func:`is_tuned`) has its documented rate
    (:data:`GD_LEARNING_RATES`). Any other gets the classical step ``1 / L̂`` of GD on an
    L-smooth function, with L̂ = :func:`curvature_estimate` of ``function`` in dimension
    ``dim`` (default ``function.dim``), or :data:`FALLBACK_LEARNING_RATE` where no curvature
    is found: derived from the function on its stated box, not tuned.
    """
    if is_tuned(function) and _base_name(function) in GD_LEARNING_RATES:
        return GD_LEARNING_RATES[_base_name(function)]
    dim = function.dim if dim is None else dim
    if dim is None:
        raise ValueError(
            f"gd_learning_rate: {function.name!r} has no tuned rate; pass dim to derive one"
        )
    curvature = curvature_estimate(function, dim)
    return 1.0 / curvature if np.isfinite(curvature) else FALLBACK_LEARNING_RATE


def adam_learning_rate(function: fns.TestFunction) -> float:
    """Plain Adam's learning rate for ``function``: the documented one
    (:data:`ADAM_LEARNING_RATES`) for a library function (:func:`is_tuned`), else
    ``1e-3 w`` (``w`` the box width; Adam's steps have the size of its learning rate)."""
    base = _base_name(function) if is_tuned(function) else None
    return ADAM_LEARNING_RATES.get(base, 1e-3) * _width(function)


def _untuned(function: fns.TestFunction) -> str:
    return "" if is_tuned(function) else " (derived from the box, not tuned)"


def resolve_function(
    name: str, dim: int, custom: Mapping[str, fns.TestFunction] | None = None
) -> fns.TestFunction:
    """The :class:`~agsopt.functions.TestFunction` a study calls ``name``.

    ``custom[name]`` if given there (functions handed to :func:`agsopt.study.run_study` as
    objects); ``"module:attribute"`` imports ``module`` and takes its ``attribute``, which
    must be a TestFunction (the command line's ``--functions mymodule:my_function``);
    otherwise :func:`agsopt.functions.get` ``(name, dim=dim)``. ValueError naming
    ``functions`` if the module or attribute is missing, TypeError if it is not a
    TestFunction.
    """
    if custom and name in custom:
        return custom[name]
    if ":" not in name:
        return fns.get(name, dim=dim)
    module_name, _, attribute = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(
            f"functions: cannot import {module_name!r} for {name!r} ({error}); the module "
            "must be importable from here (the current folder or PYTHONPATH)"
        ) from None
    if not hasattr(module, attribute):
        raise ValueError(f"functions: module {module_name!r} has no attribute {attribute!r}")
    function = getattr(module, attribute)
    if not isinstance(function, fns.TestFunction):
        raise TypeError(
            f"functions: {name!r} is a {type(function).__name__}, not an "
            "agsopt.functions.TestFunction (wrap it: TestFunction(name, fn, domain, "
            "minimizer, minimum, description))"
        )
    return function


def _decay(value: float) -> optax.Schedule:
    return optax.exponential_decay(value, transition_steps=1, decay_rate=DECAY)


def smoothed_gd_factory(covariance: Any, label: str) -> OptimizerFactory:
    """Factory of AGS-GD with ``covariance`` (N = :data:`NUM_SAMPLES`, :data:`SMOOTHED_GD`)."""

    def factory(dim: int, function: fns.TestFunction, key: jax.Array) -> OptimizerSpec:
        tuned = SMOOTHED_GD.get(_base_name(function)) if is_tuned(function) else None
        lr, sigma = tuned or (gd_learning_rate(function, dim), 0.05 * _width(function))
        text = (
            f"{label}: GD on ∇f_Σ, lr={lr:g}, σ={sigma:g} constant, N={NUM_SAMPLES} "
            f"antithetic{_untuned(function)}"
        )
        return ags_spec(
            "gd",
            lr,
            text,
            key=key,
            sigma=sigma,
            num_samples=NUM_SAMPLES,
            covariance=covariance,
        )

    return factory


def smoothed_adam_factory(covariance: Any, label: str) -> OptimizerFactory:
    """Factory of AGS-Adam with ``covariance`` (the :data:`ADAM_SIGMA` recipe)."""

    def factory(dim: int, function: fns.TestFunction, key: jax.Array) -> OptimizerSpec:
        del dim
        w = _width(function)
        lr, sigma = ADAM_LEARNING_RATE * w, ADAM_SIGMA * w
        text = (
            f"{label}: Adam on ∇f_Σ, lr={lr:.4g}·{DECAY}^t, σ={sigma:.4g}·{DECAY}^t, "
            f"N={NUM_SAMPLES} antithetic{_untuned(function)}"
        )
        return ags_spec(
            "adam",
            _decay(lr),
            text,
            key=key,
            sigma=_decay(sigma),
            num_samples=NUM_SAMPLES,
            covariance=covariance,
        )

    return factory


def _gd(dim: int, function: fns.TestFunction, key: jax.Array) -> OptimizerSpec:
    del key
    lr = gd_learning_rate(function, dim)
    return gradient_spec(optax.sgd(lr), 1, f"GD, lr={lr:g}{_untuned(function)}")


def _adam(dim: int, function: fns.TestFunction, key: jax.Array) -> OptimizerSpec:
    del dim, key
    lr = adam_learning_rate(function)
    return gradient_spec(optax.adam(lr), 1, f"Adam, lr={lr:.4g}{_untuned(function)}")


OPTIMIZERS: dict[str, OptimizerFactory] = {
    "ags-gd": smoothed_gd_factory(AGS_COVARIANCE, f"AGS-GD ({AGS_COVARIANCE})"),
    "igs-gd": smoothed_gd_factory("isotropic", "IGS-GD"),
    "gd": _gd,
    "ags-adam": smoothed_adam_factory(AGS_COVARIANCE, f"AGS-Adam ({AGS_COVARIANCE})"),
    "igs-adam": smoothed_adam_factory("isotropic", "IGS-Adam"),
    "adam": _adam,
}
"""name → factory ``(dim, function, key) -> OptimizerSpec``; add an optimizer with one entry."""


def build_optimizer(
    name: str,
    dim: int,
    function: fns.TestFunction,
    *,
    key: jax.Array | None = None,
    registry: Mapping[str, OptimizerFactory] | None = None,
) -> OptimizerSpec:
    """``registry[name](dim, function, key)``; ``registry`` defaults to :data:`OPTIMIZERS`.

    ``key`` defaults to ``jax.random.key(0)`` (threefry); the study passes a key of its
    ``key_impl``.
    """
    registry = OPTIMIZERS if registry is None else registry
    if name not in registry:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(registry)}")
    key = jax.random.key(0) if key is None else key
    try:
        inspect.signature(registry[name]).bind(dim, function, key)
    except TypeError as err:  # a factory written for agsopt 0.1
        raise TypeError(
            f"optimizer {name!r}: a factory takes (dim, function, key) since agsopt 0.2.0 "
            "(it took (dim, function)); build a stochastic optimizer with that key, "
            f"e.g. lambda dim, fn, key: ags_spec(..., key=key) ({err})"
        ) from err
    except ValueError:  # no signature to inspect: call it as it is
        pass
    return registry[name](dim, function, key)


def optimizer_names() -> list[str]:
    """The registered optimizer names, in registry order."""
    return list(OPTIMIZERS)


def function_names() -> list[str]:
    """Every test-function name a study takes (``rotated_*`` included)."""
    return fns.names(include_rotated=True)


def rule_registry(rules: Sequence[str], form: str = "adam") -> dict[str, OptimizerFactory]:
    """Optimizers that differ only in the covariance rule, named ``"<form>:<rule>"``.

    Each is AGS in the GD or Adam form (``form``) with the settings of ``ags-<form>`` (same
    N, σ and learning-rate schedules); with the study's common random numbers the runs of
    different rules also share their starts and noise keys. ``rules`` are names of
    :data:`agsopt.smoothing.covariance_rules.RULES`.
    """
    if form not in ("gd", "adam"):
        raise ValueError(f"form must be 'gd' or 'adam', got {form!r}")
    valid = ", ".join(covariance_rules.RULES)
    if not rules:
        raise ValueError(f"no rules given; valid names: {valid}")
    repeated = sorted({rule for rule in rules if list(rules).count(rule) > 1})
    if repeated:
        raise ValueError(f"rules: {', '.join(repeated)} given more than once")
    for rule in rules:
        if rule not in covariance_rules.RULES:
            raise ValueError(f"unknown covariance rule {rule!r}; valid names: {valid}")
    make = smoothed_gd_factory if form == "gd" else smoothed_adam_factory
    return {f"{form}:{rule}": make(rule, f"{form}:{rule}") for rule in rules}
