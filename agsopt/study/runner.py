"""Running a study: every optimizer on every function from a batch of random starts.

The starts run in parallel under ``vmap``; the iterations run in jitted ``lax.scan``
chunks, with a progress bar between chunks. Each start has its own PRNG stream: the
optimizer's state is initialized per start and its ``key`` field (see
:class:`agsopt.AGSState`) replaced by that start's key with ``optax.tree.set``. Seeds and
common random numbers: :mod:`agsopt.study.config`.

:func:`run_study` hands every finished run to ``on_run`` as soon as it ends (the command
line writes it to disk there) and skips the runs given as ``completed`` (resuming).
"""

from __future__ import annotations

import sys
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agsopt import functions as fns
from agsopt.study.config import StudyConfig
from agsopt.study.registry import (
    OptimizerFactory,
    OptimizerSpec,
    build_optimizer,
    resolve_function,
)
from agsopt.study.results import RunResult, StudyResult, study_metadata

__all__ = ["init_states", "noise_keys", "run_starts", "run_study", "starts_key"]

TQDM_HINT = 'tqdm is not installed: running without a progress bar (pip install "agsopt[study]")'


def _has_key(state: Any) -> bool:
    try:
        return optax.tree.get(state, "key", default=None) is not None
    except KeyError:  # pragma: no cover - several "key" fields: handled by set()
        return True


def init_states(
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
            f"{key_data.shape[1:]}: build the optimizer with the key its factory is given"
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

    The scan carry ``(x, state)`` keeps ``x``'s dtype (float32, or float64 under
    ``JAX_ENABLE_X64``); the optimizer's state must keep its own dtypes across steps.

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
      ``(values, distances)``, each of shape ``(starts, iterations // record_every + 1)``
      in ``x0s``'s dtype: ``f(x_t) − f*`` and ``‖x_t − x*‖`` at
      ``t = 0, record_every, 2·record_every, ...``.
    """
    if iterations % record_every:
        raise ValueError(
            f"iterations ({iterations}) must be a multiple of record_every ({record_every})"
        )
    x0s = jnp.asarray(x0s)
    dtype = x0s.dtype
    opt = optax.with_extra_args_support(spec.transformation)
    offset = 0.0 if minimum is None else float(minimum)
    target = None if minimizer is None else jnp.asarray(minimizer, dtype)

    def measure(x: jax.Array) -> tuple[jax.Array, jax.Array]:
        value = function(x) - offset
        distance = jnp.nan if target is None else jnp.linalg.norm(x - target)
        return jnp.asarray(value, dtype), jnp.asarray(distance, dtype)

    def step(carry, _):
        x, state = carry
        grad = jax.grad(function)(x) if spec.needs_gradient else jnp.zeros_like(x)
        updates, state = opt.update(grad, state, x, value_fn=function)
        return (optax.apply_updates(x, updates).astype(dtype), state), None

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

    states = init_states(opt, x0s, keys)
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


def starts_key(seed: int, impl: str, name: str) -> jax.Array:
    """The key of function ``name``'s starts: ``fold_in(fold_in(key(seed), 0), crc32(name))``."""
    base = jax.random.fold_in(jax.random.key(seed, impl=impl), 0)
    return jax.random.fold_in(base, zlib.crc32(name.encode()) & 0x7FFFFFFF)


def noise_keys(seed: int, impl: str, starts: int) -> jax.Array:
    """One noise key per start: ``split(fold_in(key(seed), 1), starts)``."""
    return jax.random.split(jax.random.fold_in(jax.random.key(seed, impl=impl), 1), starts)


class _Progress:
    """A tqdm bar over all steps of a study (a no-op when disabled or without tqdm)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                print(TQDM_HINT, file=sys.stderr)
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


def _custom_functions(
    functions: Sequence[str | fns.TestFunction] | None,
) -> tuple[list[str] | None, dict[str, fns.TestFunction]]:
    """Split ``functions`` into the study's names and the user's TestFunction objects."""
    if functions is None:
        return None, {}
    if isinstance(functions, (str, fns.TestFunction)):
        functions = [functions]
    names, custom = [], {}
    for function in functions:
        if isinstance(function, fns.TestFunction):
            library = fns.REGISTRY.get(function.name)
            if library is not None and library is not function:
                raise ValueError(
                    f"functions: your TestFunction is called {function.name!r}, the name of "
                    "a library function: give it another name"
                )
            if ":" in function.name:
                raise ValueError(
                    f"functions: a TestFunction's name may not contain ':' (the form of "
                    f"module:attribute references), got {function.name!r}"
                )
            if function.name in custom and custom[function.name] is not function:
                raise ValueError(f"functions: two different functions are called {function.name!r}")
            custom[function.name] = function
            names.append(function.name)
        elif isinstance(function, str):
            names.append(function)
        else:
            raise TypeError(
                "functions: expected names or agsopt.functions.TestFunction objects, got "
                f"{type(function).__name__}"
            )
    return names, custom


def run_study(
    functions: Sequence[str | fns.TestFunction] | None = None,
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
    completed: Mapping[tuple[str, str], RunResult] | None = None,
    on_run: Callable[[RunResult], None] | None = None,
) -> StudyResult:
    """Run a convergence study; arguments left None come from ``config`` (or the defaults).

    ``functions`` are names of :mod:`agsopt.functions`, ``"module:attribute"`` references,
    or your own :class:`~agsopt.functions.TestFunction` objects (tables and files call them
    by their ``name``). A function that is not the library's gets settings derived from its
    box (:func:`~agsopt.study.registry.gd_learning_rate`; the descriptions say "not
    tuned").

    Every optimizer runs on every function from the same ``starts`` random starts (uniform
    in the box, seeded) for ``iterations`` steps, all starts at once under ``vmap``, each
    with its own noise key. Unknown names or a bad dimension or seed raise ValueError
    naming the argument. ``registry`` maps optimizer names to factories (default
    :data:`agsopt.study.OPTIMIZERS`); ``progress`` shows a tqdm bar (none, with a note,
    when tqdm is missing).

    Args:
      completed: runs already done, by ``(function, optimizer)``; they are taken as they
        are, not run again (what ``--resume`` passes). Since every run depends only on the
        seed, its function and its optimizer, the result equals an uninterrupted study's.
      on_run: called with each run as soon as it finishes (not for ``completed`` ones);
        the command line writes the run to disk there.

    Returns:
      A :class:`StudyResult`; write it with :func:`agsopt.study.write_results`.
    """
    functions, custom = _custom_functions(functions)
    cfg = (config if config is not None else StudyConfig()).override(
        functions=functions,
        optimizers=optimizers,
        dim=dim,
        starts=starts,
        iterations=iterations,
        seed=seed,
        record_every=record_every,
        key_impl=key_impl,
    )
    cfg.validate(registry, custom)
    completed = dict(completed or {})
    every = cfg.recording_interval
    recorded = np.arange(0, cfg.iterations + 1, every)
    keys = noise_keys(cfg.seed, cfg.key_impl, cfg.starts)
    todo = sum((name, opt) not in completed for name in cfg.functions for opt in cfg.optimizers)
    bar = _Progress(todo * cfg.iterations, progress)
    runs: list[RunResult] = []
    wall = time.perf_counter()
    try:
        for name in cfg.functions:
            function = resolve_function(name, cfg.dim, custom)
            x0s = None
            minimum = function.minimum(cfg.dim)
            minimizer = function.minimizer(cfg.dim)
            for opt_name in cfg.optimizers:
                if (name, opt_name) in completed:
                    runs.append(completed[(name, opt_name)])
                    continue
                if x0s is None:
                    x0s = fns.sample_starts(
                        function, starts_key(cfg.seed, cfg.key_impl, name), cfg.starts, cfg.dim
                    )
                spec = build_optimizer(
                    opt_name,
                    cfg.dim,
                    function,
                    key=jax.random.key(0, impl=cfg.key_impl),
                    registry=registry,
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
                values = values.astype(np.float64)
                run = RunResult(
                    function=name,
                    optimizer=opt_name,
                    description=spec.description,
                    evaluations_per_step=spec.evaluations_per_step,
                    iterations=recorded,
                    values=values,
                    gaps=None if minimum is None else values - minimum,
                    distances=None if minimizer is None else distances.astype(np.float64),
                    seconds=time.perf_counter() - started,
                )
                runs.append(run)
                if on_run is not None:
                    on_run(run)
    finally:
        bar.close()
    wall = time.perf_counter() - wall
    return StudyResult(cfg, runs, study_metadata(cfg, runs, wall, resumed_runs=len(completed)))
