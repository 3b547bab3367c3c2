"""The gradient estimators compared, each built for a :class:`~benchmarks.problems.Problem`.

At equal function evaluations per step E (E even):

- agsopt: :func:`agsopt.smoothed_value_and_grad`; antithetic with N = E/2 directions,
  forward with N = E − 1 (plus f(x)), plain with N = E, first-order with E gradients.
- ``optax.perturbations.make_perturbed_fun(fun, num_samples, sigma, noise=Normal())``
  differentiated with ``jax.grad``. Its returned function is the mean over samples of
  ``box(z)·f(x + σz) + (1 − box(z))·f(x)`` with the "magic box" ``box = exp(l − stop_grad(l))``,
  ``l = −½‖z‖²`` (z recomputed as ``(stop_grad(x + σz) − x)/σ``), so box = 1 in value and
  ``∇_x box = z/σ``: ``jax.grad`` gives ``(1/M) Σ_m [f(x + σz_m) − f(x)] z_m/σ``, exactly the
  forward (baseline) Gaussian-smoothing estimator, for any scalar f, at M + 1 evaluations.
  We use M = E − 1 (checked numerically against the formula by :func:`check_optax_formula`).
- evosax's OpenAI-ES (``Open_ES``, evosax ≥ 0.2): one ``ask`` (E antithetic points),
  a ``vmap``ped evaluation, one ``tell``. Its update direction is
  ``fitnessᵀ (population − mean)/σ / (E σ)``, which, with the fitness shaping turned off
  (identity) and antithetic pairs, is the antithetic estimator with N = E/2; its default
  centered-rank shaping gives a rescaled, biased direction instead.
- a plain Python loop: for each of N = E/2 directions, draw u with a jitted draw, evaluate a
  jitted f at x + σu and x − σu (the adds run eagerly) and accumulate ``(f₊ − f₋) u``.
- the limits: the bare ``jit(vmap(fun))`` over E precomputed perturbed points (no random
  numbers drawn, no gradient assembled), and agsopt's own draws plus the evaluations at
  them, in the same chunks, without the gradient assembly (:func:`draw_and_evaluate`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
import optax.perturbations
from jax.flatten_util import ravel_pytree

from agsopt import covariance
from agsopt.smoothing import default_chunk_size, sample_directions, smoothed_value_and_grad
from agsopt.tree_utils import tree_normalize, tree_unflatten_vector

from .problems import Problem

PyTree = Any


def evosax_status() -> tuple[bool, str]:
    """Whether evosax's ``Open_ES`` (the evosax ≥ 0.2 API) can be used, and why not."""
    if importlib.util.find_spec("evosax") is None:
        return False, "evosax not installed (pip install evosax): its rows are skipped"
    version = importlib.metadata.version("evosax")
    try:
        from evosax.algorithms import Open_ES  # noqa: F401
    except ImportError:
        return False, f"evosax {version} lacks evosax.algorithms.Open_ES (needs evosax >= 0.2)"
    return True, f"evosax {version} (evosax.algorithms.Open_ES, ask/tell API)"


# --------------------------------------------------------------------------- agsopt


def agsopt_grad(
    problem: Problem,
    evaluations: int,
    *,
    method: str = "antithetic",
    orthogonal: bool = False,
    chunk_size: int | None = None,
    matrix: Any = None,
    noise_table: jax.Array | None = None,
) -> Callable[[PyTree, jax.Array], PyTree]:
    """A jitted ``(params, key) -> gradient estimate`` spending ``evaluations`` per call
    (with ``noise_table``, the table is passed to the compiled function on every call)."""
    num_samples = {"antithetic": evaluations // 2, "forward": evaluations - 1}.get(
        method, evaluations
    )
    if matrix is None:
        matrix = covariance.isotropic(problem.sigma)

    def grad(params: PyTree, key: jax.Array, table: jax.Array | None = None) -> PyTree:
        return smoothed_value_and_grad(
            problem.fun,
            params,
            key,
            matrix,
            num_samples=num_samples,
            method=method,
            orthogonal=orthogonal,
            chunk_size=chunk_size,
            noise_table=table,
        ).grad

    if noise_table is None:
        return jax.jit(grad)
    with_table = jax.jit(grad)
    return lambda params, key: with_table(params, key, noise_table)


def gradient_aligned_matrix(problem: Problem) -> Any:
    """An anisotropic Σ: σ⊥ = σ across a fixed unit direction, σ∥ = 3σ along it."""
    direction = tree_normalize(jax.tree.map(jnp.ones_like, problem.params))
    return covariance.gradient_aligned(problem.sigma, 3.0, direction)


# --------------------------------------------------------------------------- optax


def optax_grad(problem: Problem, evaluations: int, *, use_baseline: bool = True):
    """``jax.grad`` of optax's perturbed function; ``evaluations`` = M + 1 (baseline) or M."""
    num_samples = evaluations - 1 if use_baseline else evaluations
    perturbed = optax.perturbations.make_perturbed_fun(
        problem.fun,
        num_samples=num_samples,
        sigma=problem.sigma,
        noise=optax.perturbations.Normal(),
        use_baseline=use_baseline,
    )
    return jax.jit(jax.grad(perturbed, argnums=1))


def check_optax_formula(problem: Problem, num_samples: int = 7) -> float:
    """Max relative gap between optax's gradient and the forward formula on its own draws.

    optax draws ``z_m`` with ``optax.tree.random_like(split(key, M)[m], x, Normal().sample)``;
    we redraw them the same way and evaluate ``(1/M) Σ [f(x + σz_m) − f(x)] z_m/σ``.
    """
    key = jax.random.key(42)
    params, sigma = problem.params, problem.sigma
    perturbed = optax.perturbations.make_perturbed_fun(
        problem.fun, num_samples, sigma, noise=optax.perturbations.Normal()
    )

    def term(k: jax.Array) -> PyTree:
        z = optax.tree.random_like(k, params, sampler=optax.perturbations.Normal().sample)
        shifted = jax.tree.map(lambda x, u: x + sigma * u, params, z)
        weight = problem.fun(shifted) - problem.fun(params)
        return jax.tree.map(lambda x, s: weight * (s - x) / sigma**2, params, shifted)

    @jax.jit
    def both(key: jax.Array) -> tuple[PyTree, PyTree]:
        terms = jax.vmap(term)(jax.random.split(key, num_samples))
        formula = jax.tree.map(lambda t: jnp.mean(t, axis=0), terms)
        return jax.grad(perturbed, argnums=1)(key, params), formula

    optax_estimate, formula = both(key)
    gaps = [
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
        for a, b in zip(jax.tree.leaves(optax_estimate), jax.tree.leaves(formula), strict=True)
    ]
    return max(gaps)


# --------------------------------------------------------------------------- evosax


def evosax_strategy(
    problem: Problem, evaluations: int, *, identity_shaping: bool = False, learning_rate=1e-3
):
    """``Open_ES`` with population E (antithetic) and constant std σ."""
    from evosax.algorithms import Open_ES
    from evosax.core.fitness_shaping import identity_fitness_shaping_fn

    kwargs: dict[str, Any] = {
        "population_size": evaluations,
        "solution": problem.params,
        "use_antithetic_sampling": True,
        "optimizer": optax.sgd(learning_rate),
        "std_schedule": optax.constant_schedule(problem.sigma),
    }
    if identity_shaping:
        kwargs["fitness_shaping_fn"] = identity_fitness_shaping_fn
    return Open_ES(**kwargs)


def evosax_cycle(problem: Problem, evaluations: int):
    """``(jitted step(state, key) -> state, initial state)``: one ask + evaluate + tell.

    evosax's defaults (centered-rank fitness shaping, SGD) except σ; the whole cycle is one
    ``jit`` (evosax's ``ask``/``tell`` are jitted methods; nesting them costs nothing).
    """
    strategy = evosax_strategy(problem, evaluations)
    es_params = strategy.default_params
    state = strategy.init(jax.random.key(0), problem.params, es_params)

    def step(state: Any, key: jax.Array) -> Any:
        ask_key, tell_key = jax.random.split(key)
        population, state = strategy.ask(ask_key, state, es_params)
        fitness = jax.vmap(problem.fun)(population)
        state, _ = strategy.tell(tell_key, population, fitness, state, es_params)
        return state

    return jax.jit(step), state


def evosax_grad(problem: Problem, evaluations: int):
    """evosax's own gradient estimate, read off its update: ``(params, key) -> gradient``.

    With identity fitness shaping and ``optax.sgd(1.0)``, ``tell`` moves the mean by exactly
    minus its gradient estimate, so the estimate is ``mean_before − mean_after``.
    """
    strategy = evosax_strategy(problem, evaluations, identity_shaping=True, learning_rate=1.0)
    es_params = strategy.default_params
    _, unravel = ravel_pytree(problem.params)

    def grad(params: PyTree, key: jax.Array) -> PyTree:
        init_key, ask_key, tell_key = jax.random.split(key, 3)
        state = strategy.init(init_key, params, es_params)
        population, state = strategy.ask(ask_key, state, es_params)
        fitness = jax.vmap(problem.fun)(population)
        new_state, _ = strategy.tell(tell_key, population, fitness, state, es_params)
        return unravel(state.mean - new_state.mean)

    return jax.jit(grad)


# --------------------------------------------------------------------------- Python loop


def python_loop_grad(problem: Problem, evaluations: int):
    """The naive estimator: a Python ``for`` over N = E/2 directions, jitted f per point."""
    num_samples = evaluations // 2
    sigma = problem.sigma
    fun = jax.jit(problem.fun)

    @jax.jit
    def draw(key: jax.Array, n: int) -> PyTree:
        return tree_unflatten_vector(sample_directions(key, problem.dim, n, 1)[0], problem.params)

    def grad(params: PyTree, key: jax.Array) -> PyTree:
        total = jax.tree.map(jnp.zeros_like, params)
        for n in range(num_samples):
            u = draw(key, n)
            plus = fun(jax.tree.map(lambda x, v: x + sigma * v, params, u))
            minus = fun(jax.tree.map(lambda x, v: x - sigma * v, params, u))
            weight = plus - minus
            total = jax.tree.map(lambda t, v, w=weight: t + w * v, total, u)
        return jax.tree.map(lambda t: t / (2 * num_samples * sigma), total)

    return grad


# --------------------------------------------------------------------------- the limit


def perturbed_points(problem: Problem, evaluations: int, key: jax.Array) -> PyTree:
    """E points ``x ± σu`` (antithetic pairs, agsopt's directions), stacked on a leading axis."""
    half = evaluations // 2
    rows = sample_directions(key, problem.dim, 0, half)
    directions = jax.vmap(lambda row: tree_unflatten_vector(row, problem.params))(rows)
    return jax.tree.map(
        lambda x, u: jnp.concatenate([x + problem.sigma * u, x - problem.sigma * u]),
        problem.params,
        directions,
    )


def bare_evaluation(problem: Problem):
    """``jit(vmap(fun))``: the cost of the evaluations alone."""
    return jax.jit(jax.vmap(problem.fun))


def draw_and_evaluate(problem: Problem, evaluations: int, chunk_size: int | None = None):
    """``(params, key) -> Σ values``: agsopt's work without the gradient assembly.

    The same directions as agsopt's antithetic estimator (same rule, same chunks, each
    chunk's draws stored once), f evaluated at x ± σu and the values summed; no
    ``Σ w_n u_n``, no Σ^{-T}, no bookkeeping. The limit for an estimator that must draw
    its own points.
    """
    num_samples = evaluations // 2
    dim, sigma = problem.dim, problem.sigma
    chunk = default_chunk_size(dim, num_samples) if chunk_size is None else chunk_size
    num_full, rest = divmod(num_samples, chunk)

    def chunk_total(params: PyTree, key: jax.Array, start: jax.Array, count: int):
        rows = jax.lax.optimization_barrier(sample_directions(key, dim, start, count))

        def pair(row: jax.Array) -> jax.Array:
            u = tree_unflatten_vector(row, params)
            plus = jax.tree.map(lambda x, v: x + sigma * v, params, u)
            minus = jax.tree.map(lambda x, v: x - sigma * v, params, u)
            return problem.fun(plus) + problem.fun(minus)

        return jnp.sum(jax.vmap(pair)(rows))

    def total(params: PyTree, key: jax.Array) -> jax.Array:
        body = lambda acc, s: (acc + chunk_total(params, key, s, chunk), None)
        acc, _ = jax.lax.scan(body, jnp.float32(0), chunk * jnp.arange(num_full))
        if rest:
            acc = acc + chunk_total(params, key, jnp.int32(num_full * chunk), rest)
        return acc

    return jax.jit(total)
