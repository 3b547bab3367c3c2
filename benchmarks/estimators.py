"""Estimator throughput at equal function evaluations per step.

For each problem (Rastrigin and Ackley at several d, a Flax MLP's loss) every estimator
spends the same number E of function evaluations per gradient estimate (see
:mod:`benchmarks.peers`); we time one estimate (warm, ``block_until_ready``, median of
interleaved repeats) and report evaluations per second and two ratios: to the bare
``vmap``ped evaluation of E precomputed points (the limit) and to agsopt's default estimator.
"""

from __future__ import annotations

from typing import Any

import jax

from . import common, peers
from .problems import Problem, mlp_problem, test_function_problem

AGSOPT = "agsopt antithetic iid, Σ=σI"
AGSOPT_AUTO = "agsopt antithetic iid, Σ=σI, chunk_size=auto (proposal)"
LIMIT = "bare vmap(f) on E points (limit)"
PEERS = ("optax.perturbations (forward)", "evosax Open_ES ask+eval+tell", "Python loop")


def configurations(quick: bool) -> list[dict[str, Any]]:
    """The problems, each with E (evaluations per step), agsopt's chunk size and the rows.

    Quick mode keeps compilation short (seconds): Rastrigin at d = 100 with agsopt's
    default estimator, the peers and the limit. The MLP is left out of quick
    mode: its per-leaf random draws take seconds to compile on CPU (estimator_profile.md).
    """
    if quick:
        only = (LIMIT, AGSOPT, *PEERS)
        problem = test_function_problem("rastrigin", 100)
        return [{"problem": problem, "E": 16, "chunk": None, "only": only}]
    # d = 10⁶: E = 64 (N = 32 directions) and chunks of 8 directions bound the memory
    # (8 · 10⁶ floats per array); Rastrigin only, to keep the full run near 10 minutes.
    configs = []
    for dim in (100, 10_000):
        for name in ("rastrigin", "ackley"):
            configs.append({"problem": test_function_problem(name, dim), "E": 256, "chunk": None})
    configs.append({"problem": test_function_problem("rastrigin", 1_000_000), "E": 64, "chunk": 8})
    configs.append({"problem": mlp_problem(quick), "E": 256, "chunk": None})
    return configs


def candidates(
    problem: Problem,
    evaluations: int,
    chunk: int | None,
    with_evosax: bool,
    only: tuple[str, ...] | None = None,
) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """``name -> (function, arguments)`` for every estimator (or those in ``only``)."""
    key = jax.random.key(0)
    params = problem.params
    auto = peers.auto_chunk(problem.dim, evaluations // 2)
    builders = {
        LIMIT: lambda: (
            peers.bare_evaluation(problem),
            (peers.perturbed_points(problem, evaluations, key),),
        ),
        AGSOPT: lambda: (peers.agsopt_grad(problem, evaluations, chunk_size=chunk), (params, key)),
        AGSOPT_AUTO: lambda: (
            peers.agsopt_grad(problem, evaluations, chunk_size=auto),
            (params, key),
        ),
        "agsopt antithetic orthogonal, Σ=σI": lambda: (
            peers.agsopt_grad(problem, evaluations, orthogonal=True, chunk_size=chunk),
            (params, key),
        ),
        "agsopt antithetic iid, gradient-aligned Σ": lambda: (
            peers.agsopt_grad(
                problem,
                evaluations,
                chunk_size=chunk,
                matrix=peers.gradient_aligned_matrix(problem),
            ),
            (params, key),
        ),
        "agsopt forward iid, Σ=σI": lambda: (
            peers.agsopt_grad(problem, evaluations, method="forward", chunk_size=chunk),
            (params, key),
        ),
        PEERS[0]: lambda: (peers.optax_grad(problem, evaluations), (key, params)),
        PEERS[1]: lambda: _evosax_candidate(problem, evaluations, key),
        PEERS[2]: lambda: (peers.python_loop_grad(problem, evaluations), (params, key)),
    }
    if not with_evosax:
        del builders[PEERS[1]]
    if auto == (chunk or evaluations // 2):  # the proposal changes nothing here
        del builders[AGSOPT_AUTO]
    return {name: build() for name, build in builders.items() if only is None or name in only}


def _evosax_candidate(problem: Problem, evaluations: int, key: jax.Array):
    step, state = peers.evosax_cycle(problem, evaluations)
    return step, (state, key)


def run(quick: bool) -> dict[str, Any]:
    with_evosax, evosax_note = peers.evosax_status()
    repeats, max_seconds = (3, 2.0) if quick else (9, 25.0)
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for config in configurations(quick):
        problem, evaluations, chunk = config["problem"], config["E"], config["chunk"]
        stats = common.time_interleaved(
            candidates(problem, evaluations, chunk, with_evosax, config.get("only")),
            repeats=repeats,
            max_seconds=max_seconds,
        )
        limit = stats[LIMIT]["median_s"]
        ours = stats[AGSOPT]["median_s"]
        for name, s in stats.items():
            rows.append(
                {
                    "problem": problem.name,
                    "d": problem.dim,
                    "E": evaluations,
                    "chunk": _chunk_of(name, chunk, problem, evaluations),
                    "estimator": name,
                    "median ms": 1e3 * s["median_s"],
                    "IQR ms": f"{1e3 * s['q25_s']:.3g}–{1e3 * s['q75_s']:.3g}",
                    "evals/s": evaluations / s["median_s"],
                    "× limit": s["median_s"] / limit,
                    "× agsopt": s["median_s"] / ours,
                    "first call s": s["first_s"],
                    "repeats": s["repeats"],
                    "stats": s,
                }
            )
        entry = {
            "problem": problem.name,
            "E": evaluations,
            "agsopt / limit": ours / limit,
            "agsopt chunk=auto / limit": (
                stats[AGSOPT_AUTO]["median_s"] / limit if AGSOPT_AUTO in stats else None
            ),
        }
        for peer in PEERS:
            entry[f"{peer} / agsopt"] = stats[peer]["median_s"] / ours if peer in stats else None
        best_ours = min(stats[n]["median_s"] for n in (AGSOPT, AGSOPT_AUTO) if n in stats)
        fastest = min((p for p in PEERS if p in stats), key=lambda p: stats[p]["median_s"])
        entry["fastest peer"] = fastest
        entry["fastest peer / best agsopt"] = stats[fastest]["median_s"] / best_ours
        summary.append(entry)

    targets = [
        _ahead_target(summary, with_evosax),
        _limit_target(summary),
    ]
    notes = [
        "E = function evaluations per gradient estimate, equal for every row of a problem: "
        "agsopt antithetic uses N = E/2 directions, agsopt forward N = E − 1 plus f(x), "
        "optax.perturbations M = E − 1 samples plus its baseline f(x) (its jax.grad is the "
        "forward estimator; see quality.md), evosax a population of E (E/2 antithetic "
        "pairs), the Python loop E/2 pairs.",
        "× limit = median time / median time of the bare jit(vmap(f)) over E precomputed "
        "points (no random numbers, no gradient assembly); × agsopt = median time / agsopt "
        "antithetic iid (isotropic Σ) on the same problem (> 1: agsopt is faster); best "
        "agsopt = the faster of the default and chunk_size=auto.",
        "evosax: one jitted ask + vmap(f) + tell with its defaults (centered-rank fitness "
        f"shaping, SGD) except the constant std σ. {evosax_note}.",
        "Python loop: for each direction a jitted draw, eager x ± σu, a jitted f per point "
        "and an eager accumulation: its cost at small d is dispatch overhead.",
        "Timing: one warm-up call per estimator (compilation, reported as 'first call s'), "
        "then interleaved rounds (one call of each estimator per round) so that bursts of "
        "load from other processes hit all rows alike; median of the rounds.",
        "At d = 10⁶ (Rastrigin only) agsopt runs with chunk_size = 8 (memory O(8·d) per "
        "chunk, see memory.md) and E is reduced to 64 to keep the full run near 10 minutes "
        "on 2 cores; the peers and the limit are unchunked.",
        "chunk_size=auto (proposal) = max(1, min(N, 2¹⁶ // d)): about 256 KiB of directions "
        "per chunk, so that a chunk's directions and points stay in cache (the rule "
        "estimator_profile.md proposes for CPU; rows only where it differs from the "
        "default). The limit is unchunked, so on CPU a chunked estimator can beat it.",
    ]
    tables = [
        common.make_table(
            "Summary: time ratios at equal evaluations (peer / agsopt > 1: agsopt faster)",
            [
                "problem",
                "E",
                "agsopt / limit",
                "agsopt chunk=auto / limit",
                *[f"{p} / agsopt" for p in PEERS],
                "fastest peer",
                "fastest peer / best agsopt",
            ],
            summary,
        ),
        common.make_table(
            "All estimators",
            [
                "problem",
                "E",
                "estimator",
                "chunk",
                "median ms",
                "IQR ms",
                "evals/s",
                "× limit",
                "× agsopt",
                "first call s",
                "repeats",
            ],
            rows,
        ),
    ]
    return common.make_report(
        "estimators",
        "Estimator throughput at equal function evaluations",
        __doc__.split("\n\n", 1)[1].strip(),
        tables=tables,
        notes=notes,
        targets=targets,
        data={"summary": summary},
    )


def _chunk_of(name: str, chunk: int | None, problem: Problem, evaluations: int) -> Any:
    if name == AGSOPT_AUTO:
        return peers.auto_chunk(problem.dim, evaluations // 2)
    return chunk if name.startswith("agsopt") else None


def _ahead_target(summary: list[dict[str, Any]], with_evosax: bool) -> dict[str, Any]:
    ratios = {
        peer: [s[f"{peer} / agsopt"] for s in summary if s[f"{peer} / agsopt"] is not None]
        for peer in PEERS
    }
    detail = "; ".join(
        f"{peer}: {min(r):.2f}×–{max(r):.2f}× agsopt's time" for peer, r in ratios.items() if r
    )
    met = all(min(r) > 1.0 for r in ratios.values() if r)
    if not with_evosax:
        detail += "; evosax not measured"
    return common.target("agsopt's estimator ahead of every peer at equal evaluations", met, detail)


def _limit_target(summary: list[dict[str, Any]]) -> dict[str, Any]:
    ratios = [s["agsopt / limit"] for s in summary]
    parts = []
    for s in summary:
        text = f"{s['problem']}: {s['agsopt / limit']:.2f}×"
        if s["agsopt chunk=auto / limit"] is not None:
            text += f" (chunk=auto {s['agsopt chunk=auto / limit']:.2f}×)"
        parts.append(text)
    return common.target(
        "agsopt within 1.3× of the bare-evaluation limit on CPU",
        max(ratios) <= 1.3,
        "default settings: "
        + ", ".join(parts)
        + " (see estimator_profile.md for where the rest goes)",
    )
