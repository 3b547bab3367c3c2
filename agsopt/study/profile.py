"""Profiling: is an AGS step limited by function evaluations or by random numbers?"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from agsopt import functions as fns
from agsopt.smoothing import ags_gd
from agsopt.study.config import KEY_IMPLS
from agsopt.study.runner import init_states

__all__ = ["profile_step"]


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
    numbers alone: ``jax.random.normal`` of ``N × d`` (``normal[<impl>]``) and one
    ``fold_in`` key per sample (``normal_fold_in[<impl>]``), for each PRNG implementation
    in ``key_impls``.
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
        states = init_states(optax.with_extra_args_support(opt), x, keys)

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
