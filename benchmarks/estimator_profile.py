"""Where agsopt's estimator spends its time, next to the two limits.

The estimator does three things per chunk of directions: draw them (one normal vector of
length d per direction, ``fold_in(key, n)``, stored once), evaluate f at x ± Σu_n and add
up Σ_n w_n u_n (Σ^{-T} is applied once at the end). We time the whole estimator, its parts
as separate programs (the draws alone; the evaluations and the sum from precomputed
directions), the two limits of estimators.md, the estimator under other PRNG
implementations (the estimator takes any typed key), all samples in one ``vmap`` and the
orthogonal variant (staged Cholesky-QR: matmuls and small Cholesky factorizations, no QR or
triangular solve), with OpenBLAS's default threads and held to one thread (a check that
OpenBLAS's threads no longer matter).
"""

from __future__ import annotations

import importlib.util
from typing import Any

import jax
import jax.numpy as jnp

from agsopt.smoothing import default_chunk_size, sample_directions
from agsopt.tree_utils import tree_unflatten_vector

from . import common, peers
from .problems import Problem, mlp_problem, test_function_problem

LIMIT = "limit: bare vmap(f) on E precomputed points (evaluation only)"
LIMIT_DRAW = "limit: agsopt's draws + vmap(f), same chunks, no assembly (draw + evaluate)"
AGSOPT = "agsopt estimator, defaults (threefry2x32 key)"
ONE_VMAP = "agsopt estimator, chunk_size=N (one vmap)"
DRAWS = "draws only: N directions, threefry2x32"
DRAWS_PHILOX = "draws only: N directions, philox4x32"
ASSEMBLY = "evaluations + Σ w_n u_n from precomputed directions (no RNG, one vmap)"
ORTHOGONAL = "agsopt orthogonal, OpenBLAS default threads"
ORTHOGONAL_1 = "agsopt orthogonal, OpenBLAS limited to 1 thread (threadpoolctl)"
IMPLS = ("philox4x32", "rbg")


def agsopt_with_impl(impl: str) -> str:
    return f"agsopt estimator, defaults, {impl} key"


def _draws(problem: Problem, num_samples: int):
    return jax.jit(lambda key: sample_directions(key, problem.dim, 0, num_samples))


def _assemble(problem: Problem):
    """The antithetic estimate (Σ = σI) from given ``(N, d)`` directions."""
    sigma = problem.sigma

    def grad(params: Any, rows: jax.Array) -> Any:
        def pair(row: jax.Array) -> tuple[jax.Array, jax.Array]:
            u = tree_unflatten_vector(row, params)
            plus = problem.fun(jax.tree.map(lambda x, v: x + sigma * v, params, u))
            minus = problem.fun(jax.tree.map(lambda x, v: x - sigma * v, params, u))
            return plus, minus

        plus, minus = jax.vmap(pair)(rows)
        total = ((plus - minus) / 2) @ rows
        return tree_unflatten_vector(total / (rows.shape[0] * sigma), params)

    return jax.jit(grad)


def _blas_limited(fn: Any) -> Any:
    """``fn`` called (and waited for) with OpenBLAS held to one thread."""
    from threadpoolctl import threadpool_limits

    def call(*args: Any) -> Any:
        with threadpool_limits(limits=1, user_api="blas"):
            return jax.block_until_ready(fn(*args))

    return call


def candidates(problem: Problem, evaluations: int, quick: bool) -> dict[str, Any]:
    num_samples = evaluations // 2
    key = jax.random.key(0)
    params = problem.params
    estimator = peers.agsopt_grad(problem, evaluations)
    cands: dict[str, Any] = {
        LIMIT: (
            peers.bare_evaluation(problem),
            (peers.perturbed_points(problem, evaluations, key),),
        ),
        LIMIT_DRAW: (peers.draw_and_evaluate(problem, evaluations), (params, key)),
        AGSOPT: (estimator, (params, key)),
    }
    for impl in IMPLS[:1] if quick else IMPLS:
        cands[agsopt_with_impl(impl)] = (estimator, (params, jax.random.key(0, impl=impl)))
    if default_chunk_size(problem.dim, num_samples) < num_samples:
        one_vmap = peers.agsopt_grad(problem, evaluations, chunk_size=num_samples)
        cands[ONE_VMAP] = (one_vmap, (params, key))
    draws = _draws(problem, num_samples)
    cands[DRAWS] = (draws, (key,))
    cands[DRAWS_PHILOX] = (draws, (jax.random.key(0, impl="philox4x32"),))
    directions = jnp.asarray(_draws(problem, num_samples)(key))  # `draws` stays uncompiled
    cands[ASSEMBLY] = (_assemble(problem), (params, directions))
    if not quick:
        orthogonal = peers.agsopt_grad(problem, evaluations, orthogonal=True)
        cands[ORTHOGONAL] = (orthogonal, (params, key))
        if importlib.util.find_spec("threadpoolctl") is not None:
            cands[ORTHOGONAL_1] = (_blas_limited(orthogonal), (params, key))
    return cands


def run(quick: bool) -> dict[str, Any]:
    if quick:
        configs = [(test_function_problem("rastrigin", 100), 16)]
        repeats, max_seconds = 3, 2.0
    else:
        configs = [
            (test_function_problem("rastrigin", 100), 256),
            (test_function_problem("rastrigin", 10_000), 256),
            (mlp_problem(False), 256),
        ]
        repeats, max_seconds = 11, 30.0
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for problem, evaluations in configs:
        stats = common.time_interleaved(
            candidates(problem, evaluations, quick), repeats=repeats, max_seconds=max_seconds
        )
        ours = stats[AGSOPT]["median_s"]
        limit = stats[LIMIT]["median_s"]
        for name, s in stats.items():
            rows.append(
                {
                    "problem": problem.name,
                    "E": evaluations,
                    "part": name,
                    "median ms": 1e3 * s["median_s"],
                    "IQR ms": f"{1e3 * s['q25_s']:.3g}–{1e3 * s['q75_s']:.3g}",
                    "× evaluation only": s["median_s"] / limit,
                    "share of agsopt": s["median_s"] / ours,
                    "first call s (compile)": s["first_s"],
                    "stats": s,
                }
            )
        impl_times = {"threefry2x32": ours} | {
            impl: stats[agsopt_with_impl(impl)]["median_s"]
            for impl in IMPLS
            if agsopt_with_impl(impl) in stats
        }
        best = min(impl_times, key=impl_times.get)
        entry = {
            "problem": problem.name,
            "E": evaluations,
            "chunk": default_chunk_size(problem.dim, evaluations // 2),
            "agsopt / evaluation only": ours / limit,
            "agsopt / (draw + evaluate)": ours / stats[LIMIT_DRAW]["median_s"],
            "draws / evaluation only": stats[DRAWS]["median_s"] / limit,
            "draws / agsopt": stats[DRAWS]["median_s"] / ours,
            "(evaluations + assembly) / evaluation only": stats[ASSEMBLY]["median_s"] / limit,
            "one vmap / agsopt": stats[ONE_VMAP]["median_s"] / ours if ONE_VMAP in stats else None,
            "fastest key impl": best,
            "its agsopt / evaluation only": impl_times[best] / limit,
        }
        if ORTHOGONAL in stats:
            entry["orthogonal / agsopt"] = stats[ORTHOGONAL]["median_s"] / ours
        if ORTHOGONAL_1 in stats:
            entry["orthogonal: default / 1 BLAS thread"] = (
                stats[ORTHOGONAL]["median_s"] / stats[ORTHOGONAL_1]["median_s"]
            )
        summary.append(entry)

    summary_columns = [
        "problem",
        "E",
        "chunk",
        "agsopt / evaluation only",
        "agsopt / (draw + evaluate)",
        "draws / evaluation only",
        "draws / agsopt",
        "(evaluations + assembly) / evaluation only",
        "one vmap / agsopt",
        "fastest key impl",
        "its agsopt / evaluation only",
        "orthogonal / agsopt",
        "orthogonal: default / 1 BLAS thread",
    ]
    notes = [
        "× evaluation only = median time / the bare jit(vmap(f)) over E precomputed points; "
        "share of agsopt = median time / the whole default estimator on the same problem. "
        "The parts are separate jitted programs (the draws and the assembly unchunked), so "
        "their shares need not add up to 1.",
        "The draws: N = E/2 antithetic directions of d Gaussian floats each. On CPU JAX "
        "makes a normal from threefry bits through erfinv, a few ns per float; at d = 100 "
        "with Rastrigin that costs more than evaluating f at the 2N points.",
        "first call s = compilation plus one run.",
        "Key impls: jax.random.key(seed, impl=...) passed to smoothed_value_and_grad; the "
        "estimate changes (another stream) but not its distribution.",
        "one vmap: chunk_size = N. The default chunk on CPU (max(1, min(N, 2¹⁶ // d))) keeps "
        "a chunk's directions and points in cache; one vmap streams N × d arrays through "
        "memory several times.",
        "OpenBLAS: jaxlib runs LAPACK on CPU through scipy's OpenBLAS, whose worker threads "
        "compete with XLA's own thread pool; the orthogonal blocks used to go through its QR "
        "and triangular solves (0.4–47 ms for one 100 × 100 QR on a loaded machine) and now "
        "call only Cholesky factorizations of ≤ 128 rows (OpenBLAS's single-threaded path). "
        "The last row limits OpenBLAS to one thread with threadpoolctl around the call "
        "(OPENBLAS_NUM_THREADS=1 in the environment does the same): a ratio near 1 means its "
        "threads no longer matter.",
    ]
    tables = [
        common.make_table("Summary", summary_columns, summary),
        common.make_table(
            "Parts and variants",
            [
                "problem",
                "E",
                "part",
                "median ms",
                "IQR ms",
                "× evaluation only",
                "share of agsopt",
                "first call s (compile)",
            ],
            rows,
        ),
    ]
    return common.make_report(
        "estimator_profile",
        "Profile of agsopt's estimator against the limits",
        __doc__.split("\n\n", 1)[1].strip(),
        tables=tables,
        notes=notes,
        data={"summary": summary},
    )
