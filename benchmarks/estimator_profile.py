"""Where agsopt's estimator spends its time, next to the bare-evaluation limit.

The estimator does three things per step: draw N directions u_n (``fold_in(key, n)``, one
normal draw per parameter leaf), evaluate f at x ± Σu_n (the limit measures this part
alone, on precomputed points) and assemble Σ^{-T} Σ w_n u_n. We time each part separately,
the whole estimator under every PRNG implementation JAX offers (the estimator takes any
typed key), a flat draw (one normal vector per sample, unravelled into the leaves), a
noise-table prototype (directions sliced from one precomputed Gaussian table at random
offsets, as in OpenAI-ES; not part of agsopt) and the orthogonal variant with OpenBLAS
(which runs its QR on CPU) limited to one thread.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from agsopt.tree_utils import tree_random_normal

from . import common, peers
from .problems import Problem, mlp_problem, test_function_problem

LIMIT = "bare vmap(f) on E points (limit)"
AGSOPT = "agsopt estimator, threefry2x32 key (default)"
DRAWS = "draws only: agsopt's (fold_in per sample, normal per leaf), threefry2x32"
FLAT_DRAWS = "draws only: one flat normal per sample, unravelled, threefry2x32"
ASSEMBLY = "evaluations + assembly from precomputed directions (no RNG)"
TABLE = "noise-table prototype (slices of a precomputed table; not agsopt)"
ORTHOGONAL = "agsopt orthogonal, OpenBLAS default threads"
ORTHOGONAL_1 = "agsopt orthogonal, OpenBLAS limited to 1 thread (threadpoolctl)"
IMPLS = ("threefry4x32", "philox2x32", "philox4x32", "rbg", "unsafe_rbg")
# With JAX 0.10.2 on CPU, a vmapped jax.random.split of a threefry4x32 key into ≥ 2 keys did
# not finish in minutes (tree_random_normal splits one key per leaf), and rbg/unsafe_rbg
# are the slowest on CPU: a multi-leaf problem gets the short list.
MULTI_LEAF_IMPLS = ("philox2x32", "philox4x32", "rbg")
CHUNKED = "agsopt estimator, chunk_size=auto (max(1, min(N, 2¹⁶ // d)))"
PROTOTYPE = "prototype: chunk_size=auto + each chunk's flat directions stored once (inner scan)"
CHUNKED_PHILOX = "agsopt estimator, chunk_size=auto, philox4x32 key"
PROTOTYPE_PHILOX = "prototype (as above), philox4x32 key"


def agsopt_with_impl(impl: str) -> str:
    return f"agsopt estimator, {impl} key"


def draws_with_impl(impl: str) -> str:
    return f"draws only: agsopt's, {impl}"


def _draws(problem: Problem, num_samples: int):
    def draw(key: jax.Array) -> Any:
        return jax.vmap(lambda n: tree_random_normal(jax.random.fold_in(key, n), problem.params))(
            jnp.arange(num_samples)
        )

    return jax.jit(draw)


def _flat_draws(problem: Problem, num_samples: int):
    flat, unravel = ravel_pytree(problem.params)

    def draw(key: jax.Array) -> Any:
        def one(n: jax.Array) -> Any:
            return unravel(jax.random.normal(jax.random.fold_in(key, n), flat.shape, flat.dtype))

        return jax.vmap(one)(jnp.arange(num_samples))

    return jax.jit(draw)


def _assemble(problem: Problem, params: Any, directions: Any) -> Any:
    """The antithetic estimate from given directions (Σ = σI): evaluations + weighted sum."""
    sigma = problem.sigma

    def pair(u: Any) -> tuple[jax.Array, jax.Array]:
        plus = problem.fun(jax.tree.map(lambda x, v: x + sigma * v, params, u))
        minus = problem.fun(jax.tree.map(lambda x, v: x - sigma * v, params, u))
        return plus, minus

    plus, minus = jax.vmap(pair)(directions)
    weights = (plus - minus) / 2
    count = weights.shape[0]
    return jax.tree.map(lambda u: jnp.tensordot(weights, u, axes=1) / (count * sigma), directions)


def _noise_table(problem: Problem, num_samples: int):
    """Directions = d-long slices of one Gaussian table at random offsets (prototype)."""
    flat, unravel = ravel_pytree(problem.params)
    dim = flat.shape[0]
    table = jax.random.normal(jax.random.key(7), (max(1 << 22, 4 * dim),), flat.dtype)

    def grad(params: Any, key: jax.Array, table: jax.Array) -> Any:
        offsets = jax.random.randint(key, (num_samples,), 0, table.shape[0] - dim)
        rows = jax.vmap(lambda o: jax.lax.dynamic_slice(table, (o,), (dim,)))(offsets)
        return _assemble(problem, params, jax.vmap(unravel)(rows))

    return jax.jit(grad), table


def _prototype(problem: Problem, num_samples: int, chunk: int):
    """The proposed estimator layout (sketch, not agsopt): chunks of ``chunk`` directions;
    each chunk's directions are one flat normal draw per sample, produced by an inner
    ``lax.scan`` so that XLA stores them once instead of recomputing the normal transform in
    every consumer; the evaluations are ``vmap``ped over the chunk."""
    flat, unravel = ravel_pytree(problem.params)
    dim, sigma = flat.shape[0], problem.sigma

    def grad(params: Any, key: jax.Array) -> Any:
        def pair(u: jax.Array) -> tuple[jax.Array, jax.Array]:
            tree = unravel(u)
            plus = problem.fun(jax.tree.map(lambda x, v: x + sigma * v, params, tree))
            minus = problem.fun(jax.tree.map(lambda x, v: x - sigma * v, params, tree))
            return plus, minus

        def chunk_sum(start: jax.Array, count: int) -> jax.Array:
            def draw(carry: None, n: jax.Array) -> tuple[None, jax.Array]:
                return carry, jax.random.normal(jax.random.fold_in(key, n), (dim,), flat.dtype)

            _, directions = jax.lax.scan(draw, None, start + jnp.arange(count))
            plus, minus = jax.vmap(pair)(directions)
            return ((plus - minus) / 2) @ directions

        num_full, rest = divmod(num_samples, chunk)
        total, _ = jax.lax.scan(
            lambda acc, start: (acc + chunk_sum(start, chunk), None),
            jnp.zeros(dim, flat.dtype),
            chunk * jnp.arange(num_full),
        )
        if rest:
            total = total + chunk_sum(jnp.int32(num_full * chunk), rest)
        return unravel(total / (num_samples * sigma))

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
    draws = _draws(problem, num_samples)
    directions = _draws(problem, num_samples)(key)  # another jit: `draws` stays uncompiled
    cands: dict[str, Any] = {
        LIMIT: (
            peers.bare_evaluation(problem),
            (peers.perturbed_points(problem, evaluations, key),),
        ),
        AGSOPT: (peers.agsopt_grad(problem, evaluations), (params, key)),
    }
    multi_leaf = len(jax.tree.leaves(params)) > 1
    impls = ("philox4x32",) if quick else MULTI_LEAF_IMPLS if multi_leaf else IMPLS
    estimator = peers.agsopt_grad(problem, evaluations)
    for impl in impls:
        cands[agsopt_with_impl(impl)] = (estimator, (params, jax.random.key(0, impl=impl)))
    cands[DRAWS] = (draws, (key,))
    for impl in ("philox4x32",) if multi_leaf or quick else impls:
        cands[draws_with_impl(impl)] = (draws, (jax.random.key(0, impl=impl),))
    cands[FLAT_DRAWS] = (_flat_draws(problem, num_samples), (key,))
    cands[ASSEMBLY] = (
        jax.jit(lambda p, u: _assemble(problem, p, u)),
        (params, directions),
    )
    chunk = peers.auto_chunk(problem.dim, num_samples)
    cands[CHUNKED] = (peers.agsopt_grad(problem, evaluations, chunk_size=chunk), (params, key))
    prototype = _prototype(problem, num_samples, chunk)
    cands[PROTOTYPE] = (prototype, (params, key))
    philox = jax.random.key(0, impl="philox4x32")
    cands[CHUNKED_PHILOX] = (cands[CHUNKED][0], (params, philox))
    cands[PROTOTYPE_PHILOX] = (prototype, (params, philox))
    if not quick:
        table_grad, table = _noise_table(problem, num_samples)
        cands[TABLE] = (table_grad, (params, key, table))
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
        configs = [(test_function_problem("rastrigin", 10_000), 256), (mlp_problem(False), 256)]
        repeats, max_seconds = 9, 30.0
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
                    "× limit": s["median_s"] / limit,
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
            "agsopt / limit": ours / limit,
            "draws / agsopt": stats[DRAWS]["median_s"] / ours,
            "(draws + assembly) / agsopt": (stats[DRAWS]["median_s"] + stats[ASSEMBLY]["median_s"])
            / ours,
            "assembly / limit": stats[ASSEMBLY]["median_s"] / limit,
            "fastest key impl": best,
            "its agsopt / limit": impl_times[best] / limit,
            "flat / per-leaf draws (time)": stats[FLAT_DRAWS]["median_s"]
            / stats[DRAWS]["median_s"],
            "flat / per-leaf draws (first call)": stats[FLAT_DRAWS]["first_s"]
            / stats[DRAWS]["first_s"],
        }
        entry["chunk=auto / limit"] = stats[CHUNKED]["median_s"] / limit
        entry["prototype / limit"] = stats[PROTOTYPE]["median_s"] / limit
        entry["chunk=auto, philox / limit"] = stats[CHUNKED_PHILOX]["median_s"] / limit
        entry["prototype, philox / limit"] = stats[PROTOTYPE_PHILOX]["median_s"] / limit
        if TABLE in stats:
            entry["noise table / limit"] = stats[TABLE]["median_s"] / limit
        if ORTHOGONAL_1 in stats:
            entry["orthogonal: default / 1 BLAS thread"] = (
                stats[ORTHOGONAL]["median_s"] / stats[ORTHOGONAL_1]["median_s"]
            )
        summary.append(entry)

    summary_columns = [
        "problem",
        "E",
        "agsopt / limit",
        "draws / agsopt",
        "(draws + assembly) / agsopt",
        "assembly / limit",
        "fastest key impl",
        "its agsopt / limit",
        "flat / per-leaf draws (time)",
        "flat / per-leaf draws (first call)",
        "chunk=auto / limit",
        "prototype / limit",
        "chunk=auto, philox / limit",
        "prototype, philox / limit",
        "noise table / limit",
        "orthogonal: default / 1 BLAS thread",
    ]
    notes = [
        "× limit = median time / the bare jit(vmap(f)) over E precomputed points; share of "
        "agsopt = median time / the whole default estimator on the same problem. The parts "
        "are separate jitted programs, so their shares need not add up to 1: inside the "
        "estimator XLA fuses the draw into its consumers (on CPU it recomputes part of the "
        "normal transform in each consumer fusion rather than storing u once).",
        "first call s = compilation plus one run. The draws are compiled once per leaf: the "
        "MLP's 6 leaves make agsopt's per-leaf threefry draws the bulk of its compile time, "
        "which one flat draw per sample avoids.",
        "Key impls: jax.random.key(seed, impl=...) passed to smoothed_value_and_grad; the "
        "estimate changes (another stream) but not its distribution. Multi-leaf problems "
        "(the MLP) skip threefry4x32: with JAX 0.10.2 on CPU a vmapped split of such a key "
        "into ≥ 2 keys did not finish in minutes (single-leaf problems are fine), and "
        "unsafe_rbg, the slowest on CPU.",
        "chunk=auto: agsopt itself with chunk_size = max(1, min(N, 2¹⁶ // d)). prototype: "
        "the same chunks, but each chunk's directions drawn as one flat normal per sample "
        "inside an inner lax.scan, so they are stored once (a sketch of the proposal; not "
        "agsopt code). The limit evaluates all E points in one vmap, so a chunked estimator "
        "can beat it on CPU (its working set stays in cache).",
        "Noise table: a 2²²-float (or 4d) Gaussian table drawn once, outside the timing; each "
        "direction is a d-long slice at a random offset (Salimans et al. 2017). Directions "
        "overlap, so they are not independent: a speed bound, not a proposal as is.",
        "OpenBLAS: jaxlib runs QR on CPU through LAPACK (scipy's OpenBLAS); its worker threads "
        "compete with XLA's own thread pool. The last row limits it to one thread with "
        "threadpoolctl around the call (OPENBLAS_NUM_THREADS=1 in the environment does the "
        "same).",
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
                "× limit",
                "share of agsopt",
                "first call s (compile)",
            ],
            rows,
        ),
    ]
    return common.make_report(
        "estimator_profile",
        "Profile of agsopt's estimator against the bare-evaluation limit",
        __doc__.split("\n\n", 1)[1].strip(),
        tables=tables,
        notes=notes,
        data={"summary": summary},
    )
