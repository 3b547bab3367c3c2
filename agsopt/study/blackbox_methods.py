"""The methods of the black-box benchmark (:mod:`agsopt.study.blackbox`): a registry.

A :class:`Method` is either

- **an Optax transformation** built by ``factory(lower, upper, dim, key)`` from the box
  ``[lower, upper]^dim`` the user states and a PRNG key, and driven by the protocol's
  jitted loop as ``updates, state = tx.update(g, state, x, value_fn=f)``,
  ``x = optax.apply_updates(x, updates)`` (``g = ∇f(x)`` for a method flagged
  ``gradient``, zeros otherwise); or
- **an external peer**, ``runner(function, x0, seed, budget, succeeded) -> PeerTrace``,
  which runs one start in its own loop (pycma's CMA-ES) and counts every call of f itself.

``library`` is true for agsopt's own methods and false for peers (plain GD/Adam, CMA-ES).
The transformation's state is read by name (``optax.tree.get``, chains included):
``num_evaluations`` (every call of f so far; required unless the method is a gradient method,
which is charged 1 evaluation per gradient on top), ``best_value``/``best_params`` (the best
point seen; where absent the protocol monitors f at the iterate **outside the count**, which
favours that method) and ``stop`` (a bool; the start ends when it is true).

The presets here are baselines, not tuned per function: every setting is derived from the
box (``w = upper − lower``) and the dimension only. Adding a method is one entry::

    METHODS["my-preset"] = Method("my-preset", "…", library=True, factory=my_factory)
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agsopt import functions as fns
from agsopt.smoothing import ags_adam, dgs_blackbox, igs_adam, igs_gd

__all__ = [
    "ASGF_CMA_SIGMA0",
    "DEFAULT_METHODS",
    "METHODS",
    "Method",
    "PeerTrace",
    "TransformationFactory",
    "box_adam",
    "box_gd",
    "cma_population_size",
    "cma_sigma0",
    "dgs_preset",
    "evosax_cma_es",
    "method_names",
    "pycma_cma_es",
    "resolve_methods",
    "smoothing_preset",
]

TransformationFactory = Callable[[float, float, int, jax.Array], optax.GradientTransformation]
"""``(lower, upper, dim, key) -> transformation`` (an ``optax.GradientTransformationExtraArgs``
that takes ``value_fn``)."""


class PeerTrace(NamedTuple):
    """One start of an external peer, one entry per generation (or step).

    Attributes:
      evaluations: calls of f so far after each generation, non-decreasing integers.
      best: the best value of f seen so far after each generation.
      best_params: the best point seen, shape ``(d,)``.
      stopped: whether the peer stopped by its own termination criteria.
    """

    evaluations: np.ndarray
    best: np.ndarray
    best_params: np.ndarray
    stopped: bool


PeerRunner = Callable[[fns.TestFunction, np.ndarray, int, int, Callable[[float], bool]], PeerTrace]
"""``(function, x0, seed, budget, succeeded) -> PeerTrace``; ``succeeded(best)`` says whether
the protocol's criterion holds, so that the peer may stop there."""


@dataclasses.dataclass(frozen=True)
class Method:
    """A method of the black-box benchmark.

    Attributes:
      name: the registry name.
      description: its settings, one line (goes to the records).
      library: true for agsopt's own methods, false for peers.
      factory: ``(lower, upper, dim, key) -> transformation`` for a transformation.
      runner: an external peer's :data:`PeerRunner` (exactly one of factory and runner).
      gradient: the transformation is handed ``∇f(x)`` (1 evaluation per step, counted).
      requires: the optional module the method needs (e.g. ``"cma"``;
        ``"evosax.algorithms"``, the API of evosax ≥ 0.2), or None.
      extra: the agsopt extra that installs it (``"blackbox"``), for the hint.
    """

    name: str
    description: str
    library: bool
    factory: TransformationFactory | None = None
    runner: PeerRunner | None = None
    gradient: bool = False
    requires: str | None = None
    extra: str | None = None

    def __post_init__(self) -> None:
        if (self.factory is None) == (self.runner is None):
            raise ValueError(f"method {self.name!r}: give exactly one of factory and runner")
        if self.runner is not None and self.gradient:
            raise ValueError(f"method {self.name!r}: an external runner cannot take gradients")

    def unavailable(self) -> str | None:
        """None if the method can run here, else why not: its optional module is missing or
        fails to import (it is imported here, so a broken install is skipped up front
        instead of ending the run after the other methods)."""
        if self.requires is None:
            return None
        try:
            importlib.import_module(self.requires)
        except Exception as error:  # noqa: BLE001 - any import failure makes it unusable
            problem = (
                "is not installed"
                if isinstance(error, ModuleNotFoundError)
                else f"fails to import ({type(error).__name__}: {error})"
            )
        else:
            return None
        hint = f"pip install -U {self.requires.split('.')[0]}"
        if self.extra is not None:
            hint = f'pip install "agsopt[{self.extra}]" or {hint}'
        return (
            f"{self.name} needs the optional module {self.requires!r}, which {problem} "
            f"({hint}); skipped"
        )


# --------------------------------------------------------------------------------------
# agsopt's smoothing baselines: every setting from the box and d
# --------------------------------------------------------------------------------------

DECAY = 0.995
"""Per-step factor of the σ and learning-rate decays of the smoothing baselines."""

FLOOR = 1e-6
"""The decays stop at this fraction of their initial values (without a floor σ underflows
to 0 in float32 after about 2·10⁴ steps and AGS then skips every step)."""


def _width(lower: float, upper: float) -> float:
    width = float(upper) - float(lower)
    if not math.isfinite(width) or width <= 0:
        raise ValueError(f"the box needs lower < upper, got lower={lower}, upper={upper}")
    return width


def smoothing_preset(kind: str) -> TransformationFactory:
    """An AGS/IGS baseline from the box: ``kind`` is ``"ags-adam"``, ``"igs-adam"`` or
    ``"igs-gd"``.

    σ_k = σ_0 γ^k with σ_0 = w/10 per coordinate (``w`` the box width) and γ = 0.995, down to
    10⁻⁶ σ_0;
    N = d antithetic directions (2d evaluations per step). The Adam forms take
    η_k = (w/20) γ^k down to 10⁻⁶ η_0 (Adam's steps are about η per coordinate, so η is a
    length); the GD form takes the fixed η = 0.01 (a GD step has the units of f, which the
    box does not give).
    Baselines, not tuned per function.
    """
    builders = {"ags-adam": ags_adam, "igs-adam": igs_adam, "igs-gd": igs_gd}
    if kind not in builders:
        raise ValueError(f"kind must be one of {sorted(builders)}, got {kind!r}")

    def factory(lower: float, upper: float, dim: int, key: jax.Array):
        width = _width(lower, upper)
        sigma = optax.exponential_decay(width / 10, 1, DECAY, end_value=width * FLOOR / 10)
        if kind == "igs-gd":
            learning_rate: optax.ScalarOrSchedule = 0.01
        else:
            learning_rate = optax.exponential_decay(
                width / 20, 1, DECAY, end_value=width * FLOOR / 20
            )
        return builders[kind](learning_rate, sigma=sigma, num_samples=int(dim), key=key)

    return factory


def dgs_preset(**recipe_kwargs: Any) -> TransformationFactory:
    """:func:`agsopt.dgs_blackbox` from the box (scalars: the same interval in every
    coordinate), with ``recipe_kwargs`` (its keywords: ``anisotropic``, ``step``, …). One
    setting for every function and dimension."""

    def factory(lower: float, upper: float, dim: int, key: jax.Array):
        del dim  # the box recipe reads d at init
        _width(lower, upper)
        return dgs_blackbox(lower, upper, key=key, **recipe_kwargs)

    return factory


# --------------------------------------------------------------------------------------
# Plain gradient methods (peers that use ∇f)
# --------------------------------------------------------------------------------------


def box_gd(lower: float, upper: float, dim: int, key: jax.Array) -> optax.GradientTransformation:
    """Plain GD on ∇f with the fixed η = 0.01 (the box gives no scale for f)."""
    del lower, upper, dim, key
    return optax.sgd(0.01)


def box_adam(lower: float, upper: float, dim: int, key: jax.Array) -> optax.GradientTransformation:
    """Adam on ∇f with η_k = (w/20) γ^k, γ = 0.995, down to 10⁻⁶ η_0, as the smoothing
    baselines."""
    del dim, key
    width = _width(lower, upper)
    return optax.adam(optax.exponential_decay(width / 20, 1, DECAY, end_value=width * FLOOR / 20))


# --------------------------------------------------------------------------------------
# CMA-ES peers
# --------------------------------------------------------------------------------------

ASGF_CMA_SIGMA0 = {"ackley": 5.0, "levy": 4.0, "rastrigin": 5.0, "sphere": 1.0}
"""σ0 of CMA-ES in the ASGF paper's experiments (arXiv:2006.10887; the authors' driver
``optimize.py`` calls ``cma.fmin2(f, x0, σ0[f], {"tolx": 1e-6, "maxiter": 10000})`` with
pycma's default population and no restarts). Set per function there, not from the box."""

CMA_TOLX = 1e-6
"""pycma's ``tolx`` in the ASGF paper's runs."""


def cma_population_size(dim: int) -> int:
    """CMA-ES's default population λ = 4 + ⌊3 ln d⌋ (Hansen; pycma's and the paper's)."""
    return 4 + int(3 * math.log(dim))


def cma_sigma0(function: fns.TestFunction) -> float:
    """The initial step size of CMA-ES: the ASGF paper's σ0 (:data:`ASGF_CMA_SIGMA0`) for the
    functions it lists, else a quarter of the box width (pycma's recommendation)."""
    if function.name in ASGF_CMA_SIGMA0:
        return ASGF_CMA_SIGMA0[function.name]
    lower, upper = function.domain
    return 0.25 * _width(lower, upper)


def pycma_cma_es(
    function: fns.TestFunction,
    x0: np.ndarray,
    seed: int,
    budget: int,
    succeeded: Callable[[float], bool],
) -> PeerTrace:
    """One start of pycma's CMA-ES with the ASGF paper's settings (default population,
    :func:`cma_sigma0`, ``tolx = 1e-6``, no restarts), ask/tell until the criterion holds,
    pycma stops, or ``budget`` calls of f are spent (``maxfevals``). Every call of f is
    counted here (the population is evaluated in one jitted, vmapped call of f)."""
    import cma

    batched = jax.jit(jax.vmap(function.fn))
    options = {
        "tolx": CMA_TOLX,
        "maxfevals": int(budget),
        "seed": int(seed) + 1,  # pycma reads seed 0 as "draw one"
        "verbose": -9,
        "verb_log": 0,
        "verb_disp": 0,
    }
    es = cma.CMAEvolutionStrategy(np.asarray(x0, dtype=np.float64), cma_sigma0(function), options)
    count = 0
    best_value = math.inf
    best_params = np.asarray(x0, dtype=np.float64)
    evaluations: list[int] = []
    bests: list[float] = []
    while not es.stop():
        population = np.asarray(es.ask())
        values = np.asarray(batched(jnp.asarray(population, dtype=jnp.result_type(float))))
        values = values.astype(np.float64)
        count += population.shape[0]
        es.tell(list(population), list(values))
        index = int(np.argmin(np.where(np.isfinite(values), values, np.inf)))
        if values[index] < best_value:
            best_value, best_params = float(values[index]), population[index].copy()
        evaluations.append(count)
        bests.append(best_value)
        if succeeded(best_value) or count >= budget:
            break
    stopped = bool(es.stop()) and not succeeded(best_value) and count < budget
    return PeerTrace(np.asarray(evaluations, np.int64), np.asarray(bests), best_params, stopped)


class EvosaxCMAState(NamedTuple):
    """State of :func:`evosax_cma_es`: evosax's state, the key, and the protocol's fields."""

    strategy_state: Any
    key: jax.Array
    num_evaluations: jax.Array
    best_value: jax.Array
    best_params: jax.Array
    stop: jax.Array


def evosax_cma_es(
    lower: float, upper: float, dim: int, key: jax.Array
) -> optax.GradientTransformationExtraArgs:
    """evosax's CMA-ES (``evosax.algorithms.CMA_ES``, evosax ≥ 0.2) as a transformation.

    Each update is one generation: ``ask`` λ = 4 + ⌊3 ln d⌋ points around the current mean
    (the iterate), evaluate them with ``value_fn`` (λ evaluations, counted), ``tell``; the
    update moves the iterate to the new mean. σ0 = w/4 (the factory sees the box only, so the
    ASGF paper's per-function σ0 of pycma's peer is not available here). The state carries
    ``num_evaluations``, ``best_value``, ``best_params`` and ``stop``: true once every
    coordinate's standard deviation σ·√C_ii is below ``tolx = 1e-6`` (pycma's ``tolx``, as
    the paper set it; evosax itself has no stopping rule). Parameters must be one array of
    shape ``(dim,)``.
    """
    from evosax.algorithms import CMA_ES

    width = _width(lower, upper)
    population_size = cma_population_size(dim)
    strategy = CMA_ES(population_size=population_size, solution=jnp.zeros(dim))
    params = strategy.default_params.replace(std_init=jnp.asarray(width / 4))
    key_data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    impl = jax.random.key_impl(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else None

    def wrap(data: jax.Array) -> jax.Array:
        return jax.random.wrap_key_data(data, impl=impl) if impl is not None else data

    def init(x: jax.Array) -> EvosaxCMAState:
        init_key, next_key = jax.random.split(wrap(key_data))
        return EvosaxCMAState(
            strategy_state=strategy.init(init_key, x, params),
            key=jax.random.key_data(next_key),
            num_evaluations=jnp.zeros((), jnp.int32),
            best_value=jnp.asarray(jnp.inf, x.dtype),
            best_params=x,
            stop=jnp.asarray(False),
        )

    def update(updates, state, x=None, *, value_fn, **extra_args):
        del updates, extra_args
        next_key, ask_key, tell_key = jax.random.split(wrap(state.key), 3)
        population, es_state = strategy.ask(ask_key, state.strategy_state, params)
        values = jax.vmap(value_fn)(population)
        es_state, _ = strategy.tell(tell_key, population, values, es_state, params)
        index = jnp.argmin(jnp.where(jnp.isfinite(values), values, jnp.inf))
        better = values[index] < state.best_value
        new_state = EvosaxCMAState(
            strategy_state=es_state,
            key=jax.random.key_data(next_key),
            num_evaluations=state.num_evaluations + population_size,
            best_value=jnp.where(better, values[index], state.best_value).astype(x.dtype),
            best_params=jnp.where(better, population[index], state.best_params).astype(x.dtype),
            stop=es_state.std * jnp.sqrt(jnp.max(jnp.diag(es_state.C))) < CMA_TOLX,
        )
        return (es_state.mean - x).astype(x.dtype), new_state

    return optax.GradientTransformationExtraArgs(init, update)


# --------------------------------------------------------------------------------------
# The registry
# --------------------------------------------------------------------------------------

METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method(
            "dgs",
            "agsopt.dgs_blackbox: directional Gauss–Hermite smoothing along all d "
            "directions (the last gradient first, M = 5 nodes; 3 on the others), curvature "
            "step, ASGF's radius rule on the main direction's ratio |D_1|/L_1 and restarts, "
            "s0 = box diagonal/(10√2), the learned metric (anisotropic=True, metric='auto'): "
            "for d ≤ 128 Σ = s² A², A → Ĥ^(-1/2) from the better of a Hessian model (sketch "
            "and secant updates) and a diagonal fit; above, Σ = s² diag(a)², a → h^(-1/2)",
            library=True,
            factory=dgs_preset(),
        ),
        Method(
            "dgs-asgf",
            "dgs with ASGF's quadrature and radius rule: M = 5 nodes on every direction, the "
            "rule on the largest ratio max_i |D_i|/L_i (lateral_nodes=None, "
            "radius_ratio='all'; the recipe before 2026-12-05)",
            library=True,
            factory=dgs_preset(lateral_nodes=None, radius_ratio="all"),
        ),
        Method(
            "dgs-diagonal",
            "dgs with the diagonal metric Σ = s² diag(a)² at every d (metric='diagonal'; the "
            "recipe's metric until 2026-12-05)",
            library=True,
            factory=dgs_preset(metric="diagonal"),
        ),
        Method(
            "dgs-isotropic",
            "dgs with one radius for every direction (anisotropic=False, ASGF's smoothing)",
            library=True,
            factory=dgs_preset(anisotropic=False),
        ),
        Method(
            "dgs-lipschitz",
            "dgs with ASGF's Lipschitz step lr = √2 s/L̄ (L̄_0 = 1, no lr bounds) instead of "
            "the curvature step",
            library=True,
            factory=dgs_preset(step="lipschitz"),
        ),
        Method(
            "ags-adam",
            "AGS-Adam (default covariance rule), σ0 = w/10, η0 = w/20, both × 0.995^k, N = d",
            library=True,
            factory=smoothing_preset("ags-adam"),
        ),
        Method(
            "igs-adam",
            "IGS-Adam (Σ = σI), σ0 = w/10, η0 = w/20, both × 0.995^k, N = d",
            library=True,
            factory=smoothing_preset("igs-adam"),
        ),
        Method(
            "igs-gd",
            "IGS-GD (Σ = σI), σ0 = w/10 × 0.995^k, η = 0.01, N = d",
            library=True,
            factory=smoothing_preset("igs-gd"),
        ),
        Method("gd", "GD on ∇f, η = 0.01 (uses gradients)", False, box_gd, gradient=True),
        Method(
            "adam",
            "Adam on ∇f, η0 = w/20 × 0.995^k (uses gradients)",
            False,
            box_adam,
            gradient=True,
        ),
        Method(
            "cma-es",
            "pycma CMA-ES, ASGF paper settings: default λ, σ0 per function "
            "(sphere 1, ackley 5, levy 4, rastrigin 5; else w/4), tolx 1e-6, no restarts",
            False,
            runner=pycma_cma_es,
            requires="cma",
            extra="blackbox",
        ),
        Method(
            "cma-es-evosax",
            "evosax CMA_ES, λ = 4 + ⌊3 ln d⌋, σ0 = w/4, stops at tolx 1e-6",
            False,
            evosax_cma_es,
            requires="evosax.algorithms",
            extra="benchmarks",
        ),
    ]
}
"""The registered methods by name."""

DEFAULT_METHODS: tuple[str, ...] = ("dgs",)
"""What ``python -m agsopt blackbox`` runs without ``--methods``: the library's recommended
black-box presets."""


def method_names() -> list[str]:
    """The registered method names, in registry order."""
    return list(METHODS)


def resolve_methods(
    methods: str | Method | tuple[str | Method, ...] | list[str | Method] | None,
) -> list[Method]:
    """Registry names or :class:`Method` objects as a list of methods (``None``: the
    defaults); unknown names raise ValueError listing the valid ones."""
    if methods is None:
        methods = DEFAULT_METHODS
    if isinstance(methods, str | Method):
        methods = [methods]
    resolved = []
    for method in methods:
        if isinstance(method, Method):
            resolved.append(method)
        elif isinstance(method, str) and method in METHODS:
            resolved.append(METHODS[method])
        else:
            raise ValueError(
                f"unknown method {method!r} in methods; valid names are: "
                + ", ".join(method_names())
            )
    names = [m.name for m in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"methods has repeated names: {names}")
    if not resolved:
        raise ValueError("methods is empty")
    return resolved
