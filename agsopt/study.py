"""Convergence studies: optimizers × test functions × random starts × iterations.

A study runs every optimizer of a registry (:data:`OPTIMIZERS`) on every test function of
:mod:`agsopt.functions` from the same random starts (uniform in the function's box) and
records, every ``record_every`` iterations, ``f(x_t) − f*`` (or ``f(x_t)`` where the minimum
is not known) and the distance ``‖x_t − x*‖`` to the minimizer (where known). The starts
run in parallel under ``vmap``; the iterations run in ``lax.scan`` chunks, with a tqdm
progress bar between chunks. Each start has its own PRNG stream for the stochastic
optimizers: the optimizer's state is initialized per start and its ``key`` field (see
:class:`agsopt.AGSState`) replaced by that start's key with ``optax.tree.set``.

Quick start::

    from agsopt import study
    result = study.run_study(["rastrigin", "ackley"], ["ags-gd", "igs-gd", "gd"],
                             dim=10, starts=10, iterations=1000)
    print(result.final_table())            # median final f − f* (25–75 % in brackets)
    study.write_results(result, "results/study")   # CSV, JSON, PNG

or from the shell, ``python -m agsopt study`` (see ``python -m agsopt study --help``).

Cost convention
---------------
Methods are also compared at equal *function evaluations*. One evaluation of f counts 1 and
one gradient ∇f counts 1 as well (an oracle call; reverse mode costs a small constant
multiple of f, which we do not charge). So GD and Adam cost 1 per step, SAM 2, a
zero-order AGS/IGS step with N antithetic directions ``2N``, and a first-order one
(``method="first_order"``, gradients at the N sample points) ``N``. The evaluations of
``f(x_t)`` that the study records for its own curves are not counted.

Seeds
-----
From the study seed ``s`` and a key implementation (``key_impl``, default threefry, the
fastest on CPU, see :func:`profile_step`): the starts of function ``name`` are drawn from
``fold_in(fold_in(key(s), 0), crc32(name))`` and start ``i``'s noise key is the ``i``-th
key of ``split(fold_in(key(s), 1), starts)``. Every optimizer therefore sees the same
starts and the same per-start noise keys (common random numbers), and adding or removing
a function or optimizer changes no other run.

Adding an optimizer is one registry entry: a name and a factory
``(dim, function) -> OptimizerSpec``, e.g.::

    OPTIMIZERS["sam"] = lambda d, fn: gradient_spec(
        optax.chain(agsopt.sam(0.05), optax.sgd(gd_learning_rate(fn))), 2, "SAM, ρ=0.05")
"""

from __future__ import annotations

import contextvars
import dataclasses
import json
import math
import os
import platform
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agsopt import functions as fns
from agsopt.smoothing import ags_adam, ags_gd
from agsopt.smoothing.estimator import evaluations_per_estimate

__all__ = [
    "OPTIMIZERS",
    "PRESETS",
    "OptimizerSpec",
    "RunResult",
    "StudyConfig",
    "StudyResult",
    "ags_spec",
    "build_optimizer",
    "compare_rules",
    "function_names",
    "gradient_spec",
    "optimizer_names",
    "profile_step",
    "read_results",
    "run_starts",
    "rule_registry",
    "rule_table",
    "run_study",
    "write_results",
]

# --------------------------------------------------------------------------------------
# Optimizer registry
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer as the study runs it.

    Attributes:
      transformation: the Optax transformation; its ``update`` is called as
        ``update(g, state, x, value_fn=f)`` with ``g = ∇f(x)`` if ``needs_gradient`` and
        zeros otherwise.
      evaluations_per_step: function evaluations (gradients count 1 each) per step.
      description: the hyperparameters, one line (goes to the JSON metadata and the legend).
      needs_gradient: whether ``update`` needs ``∇f(x)`` as its ``updates``.
    """

    transformation: optax.GradientTransformation
    evaluations_per_step: int
    description: str
    needs_gradient: bool = True


OptimizerFactory = Callable[[int, fns.TestFunction], OptimizerSpec]
"""``(dim, function) -> OptimizerSpec``: builds an optimizer for one function and dimension."""


def gradient_spec(
    transformation: optax.GradientTransformation, evaluations_per_step: int, description: str
) -> OptimizerSpec:
    """An :class:`OptimizerSpec` for a method that is handed ``∇f(x)`` (GD, Adam, SAM, ...)."""
    return OptimizerSpec(transformation, evaluations_per_step, description, needs_gradient=True)


_KEY_IMPL: contextvars.ContextVar[str] = contextvars.ContextVar("key_impl", default="threefry2x32")


def build_optimizer(
    name: str,
    dim: int,
    function: fns.TestFunction,
    *,
    key_impl: str = "threefry2x32",
    registry: Mapping[str, OptimizerFactory] | None = None,
) -> OptimizerSpec:
    """``registry[name](dim, function)`` with AGS keys of the PRNG implementation ``key_impl``.

    The study replaces each start's key by one of ``key_impl``; :func:`ags_spec` builds the
    transformation with a key of that implementation so that the two fit. ``registry``
    defaults to :data:`OPTIMIZERS`.
    """
    registry = OPTIMIZERS if registry is None else registry
    if name not in registry:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(registry)}")
    token = _KEY_IMPL.set(key_impl)
    try:
        return registry[name](dim, function)
    finally:
        _KEY_IMPL.reset(token)


def ags_spec(
    base: str,
    learning_rate: optax.ScalarOrSchedule,
    description: str,
    **ags_kwargs: Any,
) -> OptimizerSpec:
    """An :class:`OptimizerSpec` for AGS/IGS: ``base`` is ``"gd"`` or ``"adam"``.

    ``ags_kwargs`` go to :func:`agsopt.ags` (sigma, num_samples, covariance, method, ...);
    the evaluation count follows from ``method`` and ``num_samples``. The zero-order
    methods are not handed a gradient.
    """
    alias = {"gd": ags_gd, "adam": ags_adam}[base]
    ags_kwargs.setdefault("key", jax.random.key(0, impl=_KEY_IMPL.get()))
    method = ags_kwargs.get("method", "antithetic")
    num_samples = ags_kwargs.get("num_samples", 16)
    return OptimizerSpec(
        alias(learning_rate, **ags_kwargs),
        evaluations_per_estimate(method, num_samples),
        description,
        needs_gradient=False,
    )


# --------------------------------------------------------------------------------------
# The optimizers and their documented hyperparameters
# --------------------------------------------------------------------------------------

NUM_SAMPLES = 128
"""N, antithetic directions per AGS/IGS step (2N = 256 evaluations)."""

DECAY = 0.999
"""Per-step factor of the exponential decays of σ and of the AGS-Adam learning rate."""

AGS_COVARIANCE = "adaptive_gradient_aligned"
"""The covariance rule of the ``ags-*`` entries (``igs-*`` use ``"isotropic"``); chosen by
the rule comparison (``python -m agsopt rules``), see the README."""

GD_LEARNING_RATES: dict[str, float] = {
    "ackley": 0.1,
    "ellipsoid": 1e-7,
    "griewank": 10.0,
    "levy": 0.01,
    "michalewicz": 1e-5,
    "rastrigin": 1e-4,
    "rosenbrock": 1e-5,
    "schwefel": 0.1,
    "sphere": 0.01,
    "styblinski_tang": 0.01,
}
"""Plain GD: the best constant learning rate of the grid 10⁻⁸, 10⁻⁷, ..., 10² (median final
f over 20 starts, d = 100, 3000 steps; for Schwefel the best that keeps the iterates in the
box, since f is unbounded below outside it); ``rotated_<name>`` uses ``<name>``'s."""

ADAM_LEARNING_RATES: dict[str, float] = {
    "ackley": 1e-4,
    "ellipsoid": 3e-3,
    "griewank": 1e-3,
    "levy": 3e-2,
    "michalewicz": 3e-4,
    "rastrigin": 1e-4,
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
}
"""AGS-GD / IGS-GD ``(learning rate, σ)``, both constant, tuned on a small grid at d = 100
(5 starts). Elsewhere: plain GD's learning rate and σ = 0.05 × box width. σ is kept
constant in the GD form: a shrinking σ raises the estimator's variance (∝ 1/σ² for an
oscillating f) and the curvature of f_Σ, which a constant learning rate does not survive.
A constant σ keeps the minimizer of f_Σ where f has it only for functions that are even
about their minimizer (Rastrigin, Ackley, Griewank); elsewhere (Levy, Michalewicz) the GD
form stalls at the smoothing bias and the Adam form, whose σ decays, is the one to use."""

ADAM_SIGMA = 0.1
"""AGS-Adam / IGS-Adam: σ_t = 0.1 w · 0.999^t, w the box width (every function alike)."""

ADAM_LEARNING_RATE = 0.003
"""AGS-Adam / IGS-Adam: lr_t = 0.003 w · 0.999^t; σ and lr shrink 20-fold over 3000 steps.
The Adam form needs no per-function tuning: its steps do not scale with the gradient."""


def _base_name(function: fns.TestFunction) -> str:
    name = function.name
    return name[len(fns.ROTATED_PREFIX) :] if name.startswith(fns.ROTATED_PREFIX) else name


def _width(function: fns.TestFunction) -> float:
    lower, upper = function.domain
    return float(upper - lower)


def gd_learning_rate(function: fns.TestFunction) -> float:
    """Plain GD's documented learning rate for ``function`` (:data:`GD_LEARNING_RATES`)."""
    return GD_LEARNING_RATES.get(_base_name(function), 1e-3)


def adam_learning_rate(function: fns.TestFunction) -> float:
    """Plain Adam's documented learning rate for ``function`` (:data:`ADAM_LEARNING_RATES`)."""
    return ADAM_LEARNING_RATES.get(_base_name(function), 1e-3) * _width(function)


def _decay(value: float) -> optax.Schedule:
    return optax.exponential_decay(value, transition_steps=1, decay_rate=DECAY)


def smoothed_gd_factory(covariance: Any, label: str) -> OptimizerFactory:
    """Factory of AGS-GD with ``covariance`` (N = :data:`NUM_SAMPLES`, :data:`SMOOTHED_GD`)."""

    def factory(dim: int, function: fns.TestFunction) -> OptimizerSpec:
        del dim
        lr, sigma = SMOOTHED_GD.get(
            _base_name(function), (gd_learning_rate(function), 0.05 * _width(function))
        )
        text = f"{label}: GD on ∇f_Σ, lr={lr:g}, σ={sigma:g} constant, N={NUM_SAMPLES} antithetic"
        return ags_spec("gd", lr, text, sigma=sigma, num_samples=NUM_SAMPLES, covariance=covariance)

    return factory


def smoothed_adam_factory(covariance: Any, label: str) -> OptimizerFactory:
    """Factory of AGS-Adam with ``covariance`` (the :data:`ADAM_SIGMA` recipe)."""

    def factory(dim: int, function: fns.TestFunction) -> OptimizerSpec:
        del dim
        w = _width(function)
        lr, sigma = ADAM_LEARNING_RATE * w, ADAM_SIGMA * w
        text = (
            f"{label}: Adam on ∇f_Σ, lr={lr:.4g}·{DECAY}^t, σ={sigma:.4g}·{DECAY}^t, "
            f"N={NUM_SAMPLES} antithetic"
        )
        return ags_spec(
            "adam",
            _decay(lr),
            text,
            sigma=_decay(sigma),
            num_samples=NUM_SAMPLES,
            covariance=covariance,
        )

    return factory


def _gd(dim: int, function: fns.TestFunction) -> OptimizerSpec:
    lr = gd_learning_rate(function)
    return gradient_spec(optax.sgd(lr), 1, f"GD, lr={lr:g}")


def _adam(dim: int, function: fns.TestFunction) -> OptimizerSpec:
    lr = adam_learning_rate(function)
    return gradient_spec(optax.adam(lr), 1, f"Adam, lr={lr:.4g}")


OPTIMIZERS: dict[str, OptimizerFactory] = {
    "ags-gd": smoothed_gd_factory(AGS_COVARIANCE, f"AGS-GD ({AGS_COVARIANCE})"),
    "igs-gd": smoothed_gd_factory("isotropic", "IGS-GD"),
    "gd": _gd,
    "ags-adam": smoothed_adam_factory(AGS_COVARIANCE, f"AGS-Adam ({AGS_COVARIANCE})"),
    "igs-adam": smoothed_adam_factory("isotropic", "IGS-Adam"),
    "adam": _adam,
}
"""name → factory ``(dim, function) -> OptimizerSpec``; add an optimizer with one entry."""


def optimizer_names() -> list[str]:
    """The registered optimizer names, in registry order."""
    return list(OPTIMIZERS)


def function_names() -> list[str]:
    """Every test-function name a study takes (``rotated_*`` included)."""
    return fns.names(include_rotated=True)


# --------------------------------------------------------------------------------------
# Running one optimizer on one function from a batch of starts
# --------------------------------------------------------------------------------------


def _has_key(state: Any) -> bool:
    try:
        return optax.tree.get(state, "key", default=None) is not None
    except KeyError:  # pragma: no cover - several "key" fields: handled by set()
        return True


def _init_states(
    transformation: optax.GradientTransformation, x0s: jax.Array, keys: jax.Array | None
) -> Any:
    """One optimizer state per start; the ``key`` field (if any) set to that start's key."""
    probe = transformation.init(x0s[0])
    if keys is None or not _has_key(probe):
        return jax.vmap(transformation.init)(x0s)
    key_data = (
        jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys
    )
    expected = jnp.shape(optax.tree.get(probe, "key"))
    if key_data.shape[1:] != expected:
        raise ValueError(
            f"the optimizer's key has shape {expected} but the study's keys have shape "
            f"{key_data.shape[1:]}: build the optimizer with a key of the study's key_impl"
        )
    return jax.vmap(lambda x0, k: optax.tree.set(transformation.init(x0), key=k))(x0s, key_data)


def _divisor_near(n: int, target: int) -> int:
    """The divisor of ``n`` closest to ``target`` (ties: the larger)."""
    divisors = [k for k in range(1, n + 1) if n % k == 0]
    return min(divisors, key=lambda k: (abs(k - target), -k))


def run_starts(
    function: fns.TestFunction | Callable[[jax.Array], jax.Array],
    spec: OptimizerSpec,
    x0s: jax.Array,
    keys: jax.Array | None,
    iterations: int,
    *,
    record_every: int = 1,
    minimum: float | None = None,
    minimizer: np.ndarray | None = None,
    chunks: int = 20,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run ``spec`` from each row of ``x0s`` (in parallel) for ``iterations`` steps.

    Args:
      function: ``x -> f(x)``.
      spec: the optimizer.
      x0s: starts, shape ``(starts, dim)``.
      keys: one PRNG key per start (typed keys or raw key data), or None to keep the
        optimizer's own key in every start.
      iterations: steps; a multiple of ``record_every``.
      record_every: record every this many steps (and at step 0).
      minimum: f*, subtracted from the recorded values if given.
      minimizer: x*, for the recorded distances (NaN if None).
      chunks: about this many jitted ``lax.scan`` calls (progress updates).
      progress: called with the number of steps done after each chunk.

    Returns:
      ``(values, distances)``, each of shape ``(starts, iterations // record_every + 1)``:
      ``f(x_t) − f*`` and ``‖x_t − x*‖`` at ``t = 0, record_every, 2·record_every, ...``.
    """
    if iterations % record_every:
        raise ValueError(
            f"iterations ({iterations}) must be a multiple of record_every ({record_every})"
        )
    x0s = jnp.asarray(x0s)
    opt = optax.with_extra_args_support(spec.transformation)
    offset = 0.0 if minimum is None else float(minimum)
    target = None if minimizer is None else jnp.asarray(minimizer, x0s.dtype)

    def measure(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        value = function(x) - offset
        distance = jnp.nan if target is None else jnp.linalg.norm(x - target)
        return value.astype(jnp.float32), jnp.asarray(distance, jnp.float32)

    def step(carry, _):
        x, state = carry
        grad = jax.grad(function)(x) if spec.needs_gradient else jnp.zeros_like(x)
        updates, state = opt.update(grad, state, x, value_fn=function)
        return (optax.apply_updates(x, updates), state), None

    def record(carry, _):
        carry, _ = jax.lax.scan(step, carry, None, length=record_every)
        return carry, measure(carry[0])

    num_records = iterations // record_every
    per_chunk = _divisor_near(num_records, max(1, round(num_records / chunks)))

    @jax.jit
    def run_chunk(x, state):
        def one_start(x, state):
            return jax.lax.scan(record, (x, state), None, length=per_chunk)

        return jax.vmap(one_start)(x, state)

    states = _init_states(opt, x0s, keys)
    first = jax.vmap(measure)(x0s)
    values, distances = [np.asarray(first[0])[:, None]], [np.asarray(first[1])[:, None]]
    carry = (x0s, states)
    for _ in range(num_records // per_chunk):
        carry, (v, d) = run_chunk(*carry)
        values.append(np.asarray(v))
        distances.append(np.asarray(d))
        if progress is not None:
            progress(per_chunk * record_every)
    return np.concatenate(values, axis=1), np.concatenate(distances, axis=1)


# --------------------------------------------------------------------------------------
# Study configuration and results
# --------------------------------------------------------------------------------------

KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
MAX_RECORDS = 100
"""Without an explicit ``record_every``, about this many records per run (plus step 0)."""


def default_record_every(iterations: int) -> int:
    """The largest divisor of ``iterations`` that is at most ``ceil(iterations / MAX_RECORDS)``."""
    target = max(1, math.ceil(iterations / MAX_RECORDS))
    return max(k for k in range(1, target + 1) if iterations % k == 0)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """What a study runs (validated by :meth:`validate`).

    Attributes:
      functions: test-function names (:func:`agsopt.functions.names`, ``rotated_*`` too).
      optimizers: names in :data:`OPTIMIZERS`.
      dim: the dimension d ≥ 1.
      starts: random starts per function, uniform in its box.
      iterations: optimizer steps per start.
      seed: the study seed (see the module doc).
      record_every: record every this many steps; None picks :func:`default_record_every`.
      key_impl: the PRNG implementation of the starts' noise keys (and of the AGS keys).
    """

    functions: tuple[str, ...] = ("rastrigin", "ackley", "rotated_ellipsoid")
    optimizers: tuple[str, ...] = ("ags-gd", "igs-gd", "gd", "ags-adam", "igs-adam", "adam")
    dim: int = 10
    starts: int = 10
    iterations: int = 1000
    seed: int = 0
    record_every: int | None = None
    key_impl: str = "threefry2x32"

    def validate(self, registry: Mapping[str, OptimizerFactory] | None = None) -> StudyConfig:
        """Check every field; ValueError (listing the valid names where there are some).

        ``registry`` (default :data:`OPTIMIZERS`) holds the valid optimizer names.
        """
        registry = OPTIMIZERS if registry is None else registry
        for field in ("dim", "starts", "iterations"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        if not self.functions:
            raise ValueError(f"no functions given; valid names: {', '.join(function_names())}")
        if not self.optimizers:
            raise ValueError(f"no optimizers given; valid names: {', '.join(registry)}")
        for name in self.functions:
            _check_function_name(name)
        for name in self.optimizers:
            if name not in registry:
                raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(registry)}")
        for label, names in (("function", self.functions), ("optimizer", self.optimizers)):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{label}s given twice: {', '.join(duplicates)}")
        if self.record_every is not None:
            if (
                isinstance(self.record_every, bool)
                or not isinstance(self.record_every, int)
                or self.record_every < 1
                or self.iterations % self.record_every
            ):
                raise ValueError(
                    f"record_every must be a positive divisor of iterations ({self.iterations}),"
                    f" got {self.record_every!r}"
                )
        if self.key_impl not in KEY_IMPLS:
            raise ValueError(
                f"unknown key_impl {self.key_impl!r}; valid choices: {', '.join(KEY_IMPLS)}"
            )
        return self

    @property
    def recording_interval(self) -> int:
        """``record_every``, or its default for ``iterations``."""
        if self.record_every is None:
            return default_record_every(self.iterations)
        return self.record_every


PRESETS: dict[str, StudyConfig] = {
    "default": StudyConfig(),
    "paper": StudyConfig(
        functions=("rastrigin", "ackley", "griewank", "levy", "michalewicz"),
        optimizers=("ags-gd", "igs-gd", "gd", "ags-adam", "igs-adam", "adam"),
        dim=100,
        starts=20,
        iterations=3000,
    ),
}
"""Named study settings. ``default`` (the README's ``python -m agsopt study``): d = 10,
10 starts, 1000 steps on Rastrigin, Ackley and the rotated ellipsoid, all six optimizers.
``paper``: the AGS paper's setting, d = 100, 20 starts, 3000 steps on the multimodal
functions (Schwefel left out: its minimizer lies near the box's corner and f is unbounded
below outside the box, so unconstrained methods are judged by how far they leave it)."""


def _check_function_name(name: str) -> None:
    if name not in function_names():
        raise ValueError(f"unknown function {name!r}; valid names: {', '.join(function_names())}")


@dataclasses.dataclass
class RunResult:
    """One optimizer on one function, all starts.

    Attributes:
      function, optimizer: the names.
      description: the optimizer's hyperparameters.
      evaluations_per_step: its cost per step (see the module doc).
      iterations: the recorded steps, shape ``(R,)``.
      values: ``f(x_t)``, shape ``(starts, R)``.
      gaps: ``f(x_t) − f*`` (None where f* is not known for this d).
      distances: ``‖x_t − x*‖`` (None where x* is not known).
      seconds: wall time of the run, compilation included.
    """

    function: str
    optimizer: str
    description: str
    evaluations_per_step: int
    iterations: np.ndarray
    values: np.ndarray
    gaps: np.ndarray | None
    distances: np.ndarray | None
    seconds: float

    @property
    def evaluations(self) -> np.ndarray:
        """Function evaluations spent up to each recorded step."""
        return self.iterations * self.evaluations_per_step

    @property
    def objective(self) -> np.ndarray:
        """What the plots and tables show: ``f − f*`` where f* is known, else ``f``."""
        return self.values if self.gaps is None else self.gaps

    def quantiles(self, qs: Sequence[float] = (25.0, 50.0, 75.0)) -> np.ndarray:
        """Percentiles over the starts of :attr:`objective`, shape ``(len(qs), R)``."""
        return np.percentile(self.objective, qs, axis=0)

    def final(self) -> tuple[float, float, float]:
        """(median, 25 %, 75 %) of :attr:`objective` at the last step."""
        q25, q50, q75 = np.percentile(self.objective[:, -1], (25.0, 50.0, 75.0))
        return float(q50), float(q25), float(q75)


@dataclasses.dataclass
class StudyResult:
    """All runs of a study, with its configuration and metadata (see :func:`run_study`)."""

    config: StudyConfig
    runs: list[RunResult]
    metadata: dict[str, Any]

    def run(self, function: str, optimizer: str) -> RunResult:
        """The run of ``optimizer`` on ``function``."""
        for r in self.runs:
            if r.function == function and r.optimizer == optimizer:
                return r
        raise KeyError(f"no run of {optimizer!r} on {function!r}")

    def final_table(self, *, iqr: bool = True) -> str:
        """A Markdown table: functions × optimizers, median final ``f − f*`` (f if f* unknown).

        With ``iqr``, the 25–75 % range follows in brackets.
        """
        optimizers = list(self.config.optimizers)
        header = f"| function (d = {self.config.dim}) | " + " | ".join(optimizers) + " |"
        lines = [header, "|" + "---|" * (len(optimizers) + 1)]
        for name in self.config.functions:
            cells = []
            for opt in optimizers:
                median, q25, q75 = self.run(name, opt).final()
                cell = _fmt(median)
                if iqr:
                    cell += f" [{_fmt(q25)}, {_fmt(q75)}]"
                cells.append(cell)
            gap = self.run(name, optimizers[0]).gaps is not None
            lines.append(f"| {name}{'' if gap else ' (f)'} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def rows(self) -> list[dict[str, Any]]:
        """The tidy records: one per (function, optimizer, start, recorded step)."""
        out = []
        for r in self.runs:
            for s in range(r.values.shape[0]):
                for j, it in enumerate(r.iterations):
                    out.append(
                        {
                            "function": r.function,
                            "optimizer": r.optimizer,
                            "dim": self.config.dim,
                            "start": s,
                            "iteration": int(it),
                            "evaluations": int(it) * r.evaluations_per_step,
                            "f": float(r.values[s, j]),
                            "f_gap": None if r.gaps is None else float(r.gaps[s, j]),
                            "distance": None if r.distances is None else float(r.distances[s, j]),
                        }
                    )
        return out


CSV_COLUMNS = (
    "function",
    "optimizer",
    "dim",
    "start",
    "iteration",
    "evaluations",
    "f",
    "f_gap",
    "distance",
)
"""Columns of the tidy ``results.csv``; ``f_gap`` = f − f* and ``distance`` = ‖x − x*‖ are
empty where f* or x* is not known."""

SUMMARY_COLUMNS = ("function", "optimizer", "iteration", "evaluations", "q25", "median", "q75")
"""Columns of ``summary.csv``: percentiles over the starts of f − f* (f where f* unknown)."""


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _starts_key(seed: int, impl: str, name: str) -> jax.Array:
    base = jax.random.fold_in(jax.random.key(seed, impl=impl), 0)
    return jax.random.fold_in(base, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def _noise_keys(seed: int, impl: str, starts: int) -> jax.Array:
    return jax.random.split(jax.random.fold_in(jax.random.key(seed, impl=impl), 1), starts)


def _environment() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
        "optax": optax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
    }


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - metadata only
        return None


class _Progress:
    """A tqdm bar over all steps of a study (a no-op without tqdm or when disabled)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is in the study extra
                return
            self.bar = tqdm(total=total, unit="step", dynamic_ncols=True)

    def label(self, text: str) -> None:
        if self.bar is not None:
            self.bar.set_description(text)

    def __call__(self, steps: int) -> None:
        if self.bar is not None:
            self.bar.update(steps)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_study(
    functions: Sequence[str] | None = None,
    optimizers: Sequence[str] | None = None,
    *,
    dim: int | None = None,
    starts: int | None = None,
    iterations: int | None = None,
    seed: int | None = None,
    record_every: int | None = None,
    key_impl: str | None = None,
    config: StudyConfig | None = None,
    registry: Mapping[str, OptimizerFactory] | None = None,
    progress: bool = True,
) -> StudyResult:
    """Run a convergence study; arguments left None come from ``config`` (or the defaults).

    Every optimizer runs on every function from the same ``starts`` random starts (uniform
    in the box, seeded) for ``iterations`` steps, all starts at once under ``vmap``, each
    with its own noise key. Unknown names or a bad dimension raise ValueError listing the
    valid choices. ``registry`` maps optimizer names to factories (default
    :data:`OPTIMIZERS`); ``progress`` shows a tqdm bar.

    Returns:
      A :class:`StudyResult`; write it with :func:`write_results`.
    """
    base = config if config is not None else StudyConfig()
    overrides = {
        "functions": None if functions is None else tuple(functions),
        "optimizers": None if optimizers is None else tuple(optimizers),
        "dim": dim,
        "starts": starts,
        "iterations": iterations,
        "seed": seed,
        "record_every": record_every,
        "key_impl": key_impl,
    }
    cfg = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    cfg.validate(registry)
    every = cfg.recording_interval
    recorded = np.arange(0, cfg.iterations + 1, every)
    keys = _noise_keys(cfg.seed, cfg.key_impl, cfg.starts)
    bar = _Progress(len(cfg.functions) * len(cfg.optimizers) * cfg.iterations, progress)
    runs: list[RunResult] = []
    wall = time.perf_counter()
    try:
        for name in cfg.functions:
            function = fns.get(name, dim=cfg.dim)
            x0s = fns.sample_starts(
                function, _starts_key(cfg.seed, cfg.key_impl, name), cfg.starts, cfg.dim
            )
            minimum = function.minimum(cfg.dim)
            minimizer = function.minimizer(cfg.dim)
            for opt_name in cfg.optimizers:
                spec = build_optimizer(
                    opt_name, cfg.dim, function, key_impl=cfg.key_impl, registry=registry
                )
                bar.label(f"{name}/{opt_name}")
                started = time.perf_counter()
                values, distances = run_starts(
                    function,
                    spec,
                    x0s,
                    keys,
                    cfg.iterations,
                    record_every=every,
                    minimizer=minimizer,
                    progress=bar,
                )
                seconds = time.perf_counter() - started
                runs.append(
                    RunResult(
                        function=name,
                        optimizer=opt_name,
                        description=spec.description,
                        evaluations_per_step=spec.evaluations_per_step,
                        iterations=recorded,
                        values=values,
                        gaps=None if minimum is None else values.astype(np.float64) - minimum,
                        distances=None if minimizer is None else distances,
                        seconds=seconds,
                    )
                )
    finally:
        bar.close()
    wall = time.perf_counter() - wall
    metadata = {
        "config": dataclasses.asdict(cfg),
        "record_every": every,
        "seeds": {
            "study_seed": cfg.seed,
            "key_impl": cfg.key_impl,
            "starts": "fold_in(fold_in(key(seed), 0), crc32(function name))",
            "noise": "split(fold_in(key(seed), 1), starts)[i] for start i, every optimizer",
        },
        "evaluation_convention": (
            "one f evaluation = 1, one gradient = 1; AGS/IGS antithetic: 2N per step, "
            "first_order: N; GD/Adam: 1; recording f(x_t) is not counted"
        ),
        "environment": _environment(),
        "wall_seconds": wall,
        "runs": [
            {
                "function": r.function,
                "optimizer": r.optimizer,
                "description": r.description,
                "evaluations_per_step": r.evaluations_per_step,
                "seconds": r.seconds,
                "final_median": r.final()[0],
                "final_q25": r.final()[1],
                "final_q75": r.final()[2],
                "objective": "f - f*" if r.gaps is not None else "f",
            }
            for r in runs
        ],
    }
    return StudyResult(cfg, runs, metadata)


# --------------------------------------------------------------------------------------
# Covariance rules against each other (AGS vs IGS at equal evaluations)
# --------------------------------------------------------------------------------------

RULE_FUNCTIONS = (*fns.names(), "rotated_ellipsoid", "rotated_rastrigin", "rotated_rosenbrock")
"""The functions of the rule comparison: the ten plain ones and three rotated ones."""


def rule_registry(rules: Sequence[str], form: str = "adam") -> dict[str, OptimizerFactory]:
    """Optimizers that differ only in the covariance rule, named ``"<form>:<rule>"``.

    Each is AGS in the GD or Adam form (``form``) with the settings of ``ags-<form>`` (same
    N, σ and learning-rate schedules); with the study's common random numbers the runs of
    different rules also share their starts and noise keys. ``rules`` are names of
    :data:`agsopt.covariance_rules.RULES`.
    """
    from agsopt.covariance_rules import RULES

    if form not in ("gd", "adam"):
        raise ValueError(f"form must be 'gd' or 'adam', got {form!r}")
    for rule in rules:
        if rule not in RULES:
            raise ValueError(f"unknown covariance rule {rule!r}; valid names: {', '.join(RULES)}")
    make = smoothed_gd_factory if form == "gd" else smoothed_adam_factory
    return {f"{form}:{rule}": make(rule, f"{form}:{rule}") for rule in rules}


def compare_rules(
    functions: Sequence[str] = RULE_FUNCTIONS,
    rules: Sequence[str] = ("isotropic", "gradient_aligned", "adaptive_gradient_aligned"),
    *,
    form: str = "adam",
    dim: int = 100,
    starts: int = 20,
    iterations: int = 3000,
    seed: int = 0,
    progress: bool = True,
) -> StudyResult:
    """AGS with each covariance rule in ``rules`` (the first is the baseline) on ``functions``.

    A study over :func:`rule_registry`; :func:`rule_table` turns it into Markdown.
    """
    registry = rule_registry(rules, form)
    return run_study(
        functions,
        list(registry),
        dim=dim,
        starts=starts,
        iterations=iterations,
        seed=seed,
        registry=registry,
        progress=progress,
    )


def rule_table(result: StudyResult, *, iqr: bool = True) -> str:
    """Markdown: median final f − f* [25 %, 75 %] per rule and the ratio to the first rule.

    The last columns divide each rule's median by the first optimizer's (the baseline,
    e.g. IGS): below 1 is better. Where f* is unknown the table shows f and the difference
    ``median − baseline median`` instead (negative is better).
    """
    names = list(result.config.optimizers)
    base = names[0]
    header = [f"function (d = {result.config.dim})"] + names
    header += [f"{n.split(':')[-1]} / {base.split(':')[-1]}" for n in names[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for function in result.config.functions:
        finals = [result.run(function, n).final() for n in names]
        cells = []
        for median, q25, q75 in finals:
            cells.append(_fmt(median) + (f" [{_fmt(q25)}, {_fmt(q75)}]" if iqr else ""))
        known = result.run(function, base).gaps is not None
        for median, _, _ in finals[1:]:
            if not known:
                cells.append(f"{median - finals[0][0]:+.3g} (f diff.)")
            elif finals[0][0] > 0:
                cells.append(f"{median / finals[0][0]:.2f}")
            else:
                cells.append("=" if median == 0 else "inf")
        lines.append(f"| {function}{'' if known else ' (f)'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# Writing results
# --------------------------------------------------------------------------------------


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def write_results(
    result: StudyResult, out_dir: str | os.PathLike[str], *, plots: bool = True
) -> dict[str, str]:
    """Write a study's results into ``out_dir`` (created if needed).

    Files: ``results.csv`` (tidy, columns :data:`CSV_COLUMNS`), ``summary.csv``
    (percentiles, :data:`SUMMARY_COLUMNS`), ``results.json`` (settings, seeds, versions,
    device, timings, final medians), ``final.md`` (the :meth:`StudyResult.final_table`) and,
    with ``plots`` (needs matplotlib), ``study_iterations.png`` and
    ``study_evaluations.png`` (median with a 25–75 % band, one panel per function).

    Returns:
      The written paths by kind: ``csv``, ``summary``, ``json``, ``table`` and the plots.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "csv": os.path.join(out_dir, "results.csv"),
        "summary": os.path.join(out_dir, "summary.csv"),
        "json": os.path.join(out_dir, "results.json"),
        "table": os.path.join(out_dir, "final.md"),
    }
    with open(paths["csv"], "w", encoding="utf-8") as f:
        f.write(",".join(CSV_COLUMNS) + "\n")
        for row in result.rows():
            f.write(",".join(_csv_cell(row[c]) for c in CSV_COLUMNS) + "\n")
    with open(paths["summary"], "w", encoding="utf-8") as f:
        f.write(",".join(SUMMARY_COLUMNS) + "\n")
        for r in result.runs:
            q25, q50, q75 = r.quantiles()
            for j, it in enumerate(r.iterations):
                cells = (r.function, r.optimizer, int(it), int(r.evaluations[j]))
                cells += (float(q25[j]), float(q50[j]), float(q75[j]))
                f.write(",".join(_csv_cell(c) for c in cells) + "\n")
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(result.metadata, f, indent=2, default=str)
        f.write("\n")
    with open(paths["table"], "w", encoding="utf-8") as f:
        f.write(result.final_table() + "\n")
    if plots:
        from agsopt import plotting

        for axis in ("iterations", "evaluations"):
            path = os.path.join(out_dir, f"study_{axis}.png")
            plotting.plot_study(result, path, x=axis)
            paths[f"plot_{axis}"] = path
    return paths


def _grid(cells: list[str], where: tuple[np.ndarray, np.ndarray], shape: tuple[int, int]):
    """CSV cells into a ``(starts, records)`` array, or None if the column is empty."""
    if cells[0] == "":
        return None
    out = np.empty(shape)
    out[where] = np.asarray(cells, float)
    return out


def read_results(out_dir: str | os.PathLike[str]) -> StudyResult:
    """Load a study written by :func:`write_results` (``results.csv`` and ``results.json``).

    The result can be plotted or tabulated again without re-running the study.
    """
    with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as f:
        metadata = json.load(f)
    raw = dict(metadata["config"])
    for field in ("functions", "optimizers"):
        raw[field] = tuple(raw[field])
    cfg = StudyConfig(**raw)
    table: dict[tuple[str, str], dict[str, list]] = {}
    with open(os.path.join(out_dir, "results.csv"), encoding="utf-8") as f:
        header = f.readline().strip().split(",")
        for line in f:
            row = dict(zip(header, line.rstrip("\n").split(","), strict=True))
            entry = table.setdefault((row["function"], row["optimizer"]), {})
            for column in ("start", "iteration", "f", "f_gap", "distance"):
                entry.setdefault(column, []).append(row[column])
    info = {(r["function"], r["optimizer"]): r for r in metadata["runs"]}
    runs = []
    for (function, optimizer), entry in table.items():
        starts = np.asarray(entry["start"], int)
        iterations = np.asarray(entry["iteration"], int)
        recorded = np.unique(iterations)
        shape = (int(starts.max()) + 1, recorded.size)
        where = (starts, np.searchsorted(recorded, iterations))

        meta = info[(function, optimizer)]
        runs.append(
            RunResult(
                function=function,
                optimizer=optimizer,
                description=meta["description"],
                evaluations_per_step=int(meta["evaluations_per_step"]),
                iterations=recorded,
                values=_grid(entry["f"], where, shape),
                gaps=_grid(entry["f_gap"], where, shape),
                distances=_grid(entry["distance"], where, shape),
                seconds=float(meta["seconds"]),
            )
        )
    return StudyResult(cfg, runs, metadata)


# --------------------------------------------------------------------------------------
# Profiling: is a step limited by function evaluations or by random numbers?
# --------------------------------------------------------------------------------------


def _best_time(fn: Callable[..., Any], *args: Any, repeats: int, trials: int) -> float:
    jax.block_until_ready(fn(*args))
    best = math.inf
    for _ in range(trials):
        started = time.perf_counter()
        for _ in range(repeats):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - started) / repeats)
    return best


def profile_step(
    function: str = "rastrigin",
    dim: int = 100,
    num_samples: int = 128,
    starts: int = 20,
    *,
    key_impls: Sequence[str] = KEY_IMPLS,
    repeats: int = 20,
    trials: int = 5,
) -> dict[str, float]:
    """Time one jitted AGS-GD step against its parts, in milliseconds (best of ``trials``).

    For ``starts`` starts under ``vmap`` (as the study runs them) it times: one step of
    ``ags_gd(σ=1, num_samples=N)`` with the default covariance rule (``step[<impl>]``), the
    bare vmapped evaluation of the same ``2N`` points per start (``eval``), and the random
    numbers alone: ``jax.random.normal`` of ``N × d`` (``normal[<impl>]``) and the
    estimator's way, one ``fold_in`` key per sample (``normal_fold_in[<impl>]``), for each
    PRNG implementation in ``key_impls``.
    """
    fn = fns.get(function, dim=dim)
    x = fns.sample_starts(fn, jax.random.key(0), starts, dim)
    out: dict[str, float] = {}
    points = jax.random.normal(jax.random.key(1), (starts, 2 * num_samples, dim))
    evaluate = jax.jit(jax.vmap(jax.vmap(fn)))
    out["eval"] = 1e3 * _best_time(evaluate, points, repeats=repeats, trials=trials)
    for impl in key_impls:
        keys = jax.random.split(jax.random.key(0, impl=impl), starts)
        opt = ags_gd(1e-3, sigma=1.0, num_samples=num_samples, key=jax.random.key(0, impl=impl))
        spec = OptimizerSpec(opt, 2 * num_samples, "", needs_gradient=False)
        states = _init_states(optax.with_extra_args_support(spec.transformation), x, keys)

        def step(x, state, opt=opt):
            updates, state = opt.update(jnp.zeros_like(x), state, x, value_fn=fn)
            return x + updates, state

        vstep = jax.jit(jax.vmap(step))
        out[f"step[{impl}]"] = 1e3 * _best_time(vstep, x, states, repeats=repeats, trials=trials)
        normal = jax.jit(jax.vmap(lambda k: jax.random.normal(k, (num_samples, dim))))
        out[f"normal[{impl}]"] = 1e3 * _best_time(normal, keys, repeats=repeats, trials=trials)

        def per_sample(k):
            return jax.vmap(lambda n: jax.random.normal(jax.random.fold_in(k, n), (dim,)))(
                jnp.arange(num_samples)
            )

        folded = jax.jit(jax.vmap(per_sample))
        out[f"normal_fold_in[{impl}]"] = 1e3 * _best_time(
            folded, keys, repeats=repeats, trials=trials
        )
    return out
