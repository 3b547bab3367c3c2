"""Estimator throughput at equal function evaluations per step.

For each problem (Rastrigin and Ackley at several d, a Flax MLP's loss) every estimator
spends the same number E of function evaluations per gradient estimate (see
:mod:`benchmarks.peers`); we time one estimate (warm, ``block_until_ready``, median of
interleaved repeats) and report evaluations per second and three ratios: to the bare
``vmap``ped evaluation of E precomputed points (evaluation only), to the same evaluations
at agsopt's own freshly drawn points without the gradient assembly (draw + evaluate) and to
agsopt's default estimator.
"""

from __future__ import annotations

from typing import Any

import jax

from agsopt.estimator import default_chunk_size
from agsopt.smoothing.directions import make_noise_table

from . import common, peers
from .problems import Problem, mlp_problem, test_function_problem

AGSOPT = "agsopt antithetic iid, Σ=σI (defaults)"
AGSOPT_ONE_VMAP = "agsopt antithetic iid, Σ=σI, chunk_size=N (one vmap)"
LIMIT = "limit: bare vmap(f) on E precomputed points (evaluation only)"
LIMIT_DRAW = "limit: agsopt's draws + vmap(f), same chunks, no assembly (draw + evaluate)"
NOISE_TABLE = "agsopt antithetic, noise table (max(2²², 101d + 99) floats), Σ=σI"
PEERS = ("optax.perturbations (forward)", "evosax Open_ES ask+eval+tell", "Python loop")


def configurations(quick: bool) -> list[dict[str, Any]]:
    """The problems, each with E (evaluations per step), agsopt's chunk size and the rows.

    Quick mode keeps compilation short (seconds): Rastrigin at d = 100 with agsopt's
    default estimator, the peers and the limits. Every agsopt row runs with its default
    chunk size (agsopt.estimator.default_chunk_size) unless its name says otherwise.
    """
    if quick:
        only = (LIMIT, LIMIT_DRAW, AGSOPT, *PEERS)
        problem = test_function_problem("rastrigin", 100)
        return [{"problem": problem, "E": 16, "only": only}]
    # d = 10⁶: E = 64 (N = 32 directions), Rastrigin only, to keep the full run short.
    configs = []
    for dim in (100, 10_000):
        for name in ("rastrigin", "ackley"):
            configs.append({"problem": test_function_problem(name, dim), "E": 256})
    configs.append({"problem": test_function_problem("rastrigin", 1_000_000), "E": 64})
    configs.append({"problem": mlp_problem(quick), "E": 256})
    return configs


def candidates(
    problem: Problem,
    evaluations: int,
    with_evosax: bool,
    only: tuple[str, ...] | None = None,
) -> dict[str, tuple[Any, tuple[Any, ...]]]:
    """``name -> (function, arguments)`` for every estimator (or those in ``only``)."""
    key = jax.random.key(0)
    params = problem.params
    half = evaluations // 2
    noise_table = lambda: make_noise_table(jax.random.key(1), dim=problem.dim)
    builders = {
        LIMIT: lambda: (
            peers.bare_evaluation(problem),
            (peers.perturbed_points(problem, evaluations, key),),
        ),
        LIMIT_DRAW: lambda: (peers.draw_and_evaluate(problem, evaluations), (params, key)),
        AGSOPT: lambda: (peers.agsopt_grad(problem, evaluations), (params, key)),
        AGSOPT_ONE_VMAP: lambda: (
            peers.agsopt_grad(problem, evaluations, chunk_size=half),
            (params, key),
        ),
        "agsopt antithetic orthogonal, Σ=σI": lambda: (
            peers.agsopt_grad(problem, evaluations, orthogonal=True),
            (params, key),
        ),
        NOISE_TABLE: lambda: (
            peers.agsopt_grad(problem, evaluations, noise_table=noise_table()),
            (params, key),
        ),
        "agsopt antithetic iid, gradient-aligned Σ": lambda: (
            peers.agsopt_grad(problem, evaluations, matrix=peers.gradient_aligned_matrix(problem)),
            (params, key),
        ),
        "agsopt forward iid, Σ=σI": lambda: (
            peers.agsopt_grad(problem, evaluations, method="forward"),
            (params, key),
        ),
        PEERS[0]: lambda: (peers.optax_grad(problem, evaluations), (key, params)),
        PEERS[1]: lambda: _evosax_candidate(problem, evaluations, key),
        PEERS[2]: lambda: (peers.python_loop_grad(problem, evaluations), (params, key)),
    }
    if not with_evosax:
        del builders[PEERS[1]]
    if default_chunk_size(problem.dim, half) == half:  # the default is one vmap already
        del builders[AGSOPT_ONE_VMAP]
    return {name: build() for name, build in builders.items() if only is None or name in only}


def _evosax_candidate(problem: Problem, evaluations: int, key: jax.Array):
    step, state = peers.evosax_cycle(problem, evaluations)
    return step, (state, key)


def _chunk_of(name: str, problem: Problem, evaluations: int) -> Any:
    half = evaluations // 2
    if name == AGSOPT_ONE_VMAP:
        return half
    if name == LIMIT_DRAW or name.startswith("agsopt"):
        return default_chunk_size(problem.dim, half, orthogonal="orthogonal" in name)
    return None


def run(quick: bool) -> dict[str, Any]:
    with_evosax, evosax_note = peers.evosax_status()
    # Full mode: 21 rounds of ≥ 50 ms samples (sub-ms estimators at d = 100 had IQRs of
    # ±30 % with 11 rounds of 20 ms); the slow rows stop at max_seconds.
    repeats, max_seconds, sample_s = (3, 2.0, 0.02) if quick else (21, 25.0, 0.05)
    rows: list[dict[str, Any]] = []
    summary: list[dict[str, Any]] = []
    for config in configurations(quick):
        problem, evaluations = config["problem"], config["E"]
        stats = common.time_interleaved(
            candidates(problem, evaluations, with_evosax, config.get("only")),
            repeats=repeats,
            max_seconds=max_seconds,
            min_sample_seconds=sample_s,
        )
        limit = stats[LIMIT]["median_s"]
        limit_draw = stats[LIMIT_DRAW]["median_s"]
        ours = stats[AGSOPT]["median_s"]
        for name, s in stats.items():
            rows.append(
                {
                    "problem": problem.name,
                    "d": problem.dim,
                    "E": evaluations,
                    "chunk": _chunk_of(name, problem, evaluations),
                    "estimator": name,
                    "median ms": 1e3 * s["median_s"],
                    "IQR ms": f"{1e3 * s['q25_s']:.3g}–{1e3 * s['q75_s']:.3g}",
                    "evals/s": evaluations / s["median_s"],
                    "× evaluation only": s["median_s"] / limit,
                    "× draw + evaluate": s["median_s"] / limit_draw,
                    "× agsopt": s["median_s"] / ours,
                    "first call s": s["first_s"],
                    "repeats": s["repeats"],
                    "stats": s,
                }
            )
        entry = {
            "problem": problem.name,
            "E": evaluations,
            "chunk": _chunk_of(AGSOPT, problem, evaluations),
            "agsopt / (draw + evaluate)": ours / limit_draw,
            "agsopt / evaluation only": ours / limit,
            "(draw + evaluate) / evaluation only": limit_draw / limit,
        }
        for peer in PEERS:
            entry[f"{peer} / agsopt"] = stats[peer]["median_s"] / ours if peer in stats else None
        fastest = min((p for p in PEERS if p in stats), key=lambda p: stats[p]["median_s"])
        entry["fastest peer"] = fastest
        entry["fastest peer / agsopt"] = stats[fastest]["median_s"] / ours
        summary.append(entry)

    targets = [
        _ahead_target(summary, with_evosax),
        *_limit_targets(summary),
    ]
    notes = [
        "E = function evaluations per gradient estimate, equal for every row of a problem: "
        "agsopt antithetic uses N = E/2 directions, agsopt forward N = E − 1 plus f(x), "
        "optax.perturbations M = E − 1 samples plus its baseline f(x) (its jax.grad is the "
        "forward estimator; see quality.md), evosax a population of E (E/2 antithetic "
        "pairs), the Python loop E/2 pairs.",
        "Two limits. Evaluation only: the bare jit(vmap(f)) over the E points x ± σu_n, "
        "precomputed (no random numbers, no gradient assembly, one vmap), as the issue "
        "defines it. Draw + evaluate: the same evaluations at the same points, but drawn "
        "inside the timed call exactly as agsopt draws them (one normal vector per "
        "direction from fold_in(key, n), the same chunks, each chunk stored once), the "
        "values summed, no Σ w_n u_n. Every Monte Carlo estimator has to draw its points, "
        "so the second is the cost floor for agsopt's work; their ratio is the cost of the "
        "Gaussian draws (JAX's threefry bits and erfinv transform), which on cheap "
        "functions (Rastrigin, Ackley at d = 100) exceeds the evaluations themselves.",
        "× agsopt = median time / agsopt antithetic iid (isotropic Σ, default settings) on "
        "the same problem (> 1: agsopt is faster).",
        "Noise table: agsopt's antithetic estimator with noise_table = make_noise_table(key, "
        "dim=d) (max(2²², 101d + 99) floats, 16 MiB up to d = 41,526, drawn once outside the "
        "timed call): each direction is a slice at a random offset, one random integer "
        "instead of d normals (arXiv:1703.03864); the statistical price (a relative bias "
        "√((d + 1)/(L − d + 1)) ≤ 0.1 given the table, overlapping slices) is in quality.md "
        "and tests/test_directions.py. Not the "
        "default: the targets below are judged on the default estimator.",
        "Chunks: agsopt's default chunk_size (agsopt.estimator.default_chunk_size) is "
        "max(1, min(N, 2¹⁶ // d)) directions on CPU (orthogonal: at least min(d, N), whole "
        "blocks), so a chunk's directions and points stay in cache; the 'one vmap' row "
        "shows chunk_size = N. The evaluation-only limit and the peers evaluate all E "
        "points in one vmap, so on CPU a chunked estimator can beat that limit.",
        "evosax: one jitted ask + vmap(f) + tell with its defaults (centered-rank fitness "
        f"shaping, SGD) except the constant std σ. {evosax_note}.",
        "Python loop: for each direction a jitted draw, eager x ± σu, a jitted f per point "
        "and an eager accumulation: its cost at small d is dispatch overhead.",
        "Timing: one warm-up call per estimator (compilation, reported as 'first call s'), "
        "then interleaved rounds (one call of each estimator per round) so that bursts of "
        "load from other processes hit all rows alike; median of the rounds.",
        "At d = 10⁶ (Rastrigin only) E is 64 to keep the full run short on 2 cores.",
    ]
    tables = [
        common.make_table(
            "Summary: time ratios at equal evaluations (peer / agsopt > 1: agsopt faster)",
            [
                "problem",
                "E",
                "chunk",
                "agsopt / (draw + evaluate)",
                "agsopt / evaluation only",
                "(draw + evaluate) / evaluation only",
                *[f"{p} / agsopt" for p in PEERS],
                "fastest peer",
                "fastest peer / agsopt",
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
                "× evaluation only",
                "× draw + evaluate",
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


def _limit_targets(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for column, what in (
        ("agsopt / (draw + evaluate)", "the draw + evaluate limit (agsopt's own draws)"),
        ("agsopt / evaluation only", "the evaluation-only limit (precomputed points)"),
    ):
        ratios = [s[column] for s in summary]
        detail = ", ".join(f"{s['problem']}: {s[column]:.2f}×" for s in summary)
        out.append(
            common.target(f"agsopt within 1.3× of {what} on CPU", max(ratios) <= 1.3, detail)
        )
    return out
