"""Memory of the estimator as num_samples grows, chunked vs unchunked.

XLA's compiled memory analysis (``jax.jit(f).lower(...).compile().memory_analysis()``) gives
the bytes a compiled computation allocates besides its arguments and outputs
(``temp_size_in_bytes``, the scratch buffers: perturbations, directions, per-sample values);
it works on CPU and needs no run. We compile agsopt's antithetic estimator on Rastrigin for
growing N with ``chunk_size=N`` (one ``vmap`` over all N directions), with its default
chunk (``agsopt.estimator.default_chunk_size``) and with a fixed chunk (a ``lax.scan`` over
chunks), and the peers at the same evaluations (2N) for reference.
"""

from __future__ import annotations

from typing import Any

import jax

from agsopt.estimator import default_chunk_size

from . import common, peers
from .problems import test_function_problem


def memory_of(fn: Any, *args: Any) -> dict[str, int]:
    """Compiled memory analysis of ``fn(*args)`` (``fn`` jitted); bytes."""
    analysis = fn.lower(*args).compile().memory_analysis()
    fields = (
        "temp_size_in_bytes",
        "argument_size_in_bytes",
        "output_size_in_bytes",
        "alias_size_in_bytes",
        "generated_code_size_in_bytes",
        "peak_memory_in_bytes",
    )
    return {name: int(getattr(analysis, name, -1)) for name in fields}


def run(quick: bool) -> dict[str, Any]:
    if quick:
        dim, sample_counts, chunk = 100, [16, 64], 8
    else:
        dim, sample_counts, chunk = 10_000, [32, 128, 512, 2048, 8192], 16
    with_evosax, evosax_note = peers.evosax_status()
    problem = test_function_problem("rastrigin", dim)
    key = jax.random.key(0)
    default = default_chunk_size(dim, max(sample_counts))
    variants: dict[str, Any] = {
        "agsopt antithetic iid, chunk_size=N (one vmap)": lambda n: (
            peers.agsopt_grad(problem, 2 * n, chunk_size=n),
            (problem.params, key),
        ),
        f"agsopt antithetic iid, default chunk_size ({default})": lambda n: (
            peers.agsopt_grad(problem, 2 * n),
            (problem.params, key),
        ),
        f"agsopt antithetic iid, chunk_size={chunk}": lambda n: (
            peers.agsopt_grad(problem, 2 * n, chunk_size=chunk),
            (problem.params, key),
        ),
        f"agsopt antithetic orthogonal, chunk_size={chunk}": lambda n: (
            peers.agsopt_grad(problem, 2 * n, orthogonal=True, chunk_size=chunk),
            (problem.params, key),
        ),
        "optax.perturbations (forward, 2N − 1 samples)": lambda n: (
            peers.optax_grad(problem, 2 * n),
            (key, problem.params),
        ),
    }
    if quick:  # keep the compilations few: agsopt's chunkings only
        del variants[f"agsopt antithetic orthogonal, chunk_size={chunk}"]
        del variants["optax.perturbations (forward, 2N − 1 samples)"]
    if with_evosax and not quick:

        def evosax_variant(n: int):
            step, state = peers.evosax_cycle(problem, 2 * n)
            return step, (state, key)

        variants["evosax Open_ES ask+eval+tell (population 2N)"] = evosax_variant

    # The rows whose every compile is a scan over ≥ 2 chunks (the default is one vmap at small d).
    scanned = [
        name
        for name in variants
        if f"chunk_size={chunk}" in name
        or (name.startswith("agsopt") and default < min(sample_counts) and "default" in name)
    ]
    measurements: dict[str, dict[int, dict[str, int]]] = {}
    for name, build in variants.items():
        measurements[name] = {}
        for n in sample_counts:
            fn, args = build(n)
            measurements[name][n] = memory_of(fn, *args)

    columns = ["estimator", *[f"N={n}" for n in sample_counts], "max / min"]
    rows = []
    for name, by_n in measurements.items():
        temps = [by_n[n]["temp_size_in_bytes"] for n in sample_counts]
        row: dict[str, Any] = {"estimator": name, "max / min": max(temps) / max(min(temps), 1)}
        row.update({f"N={n}": by_n[n]["temp_size_in_bytes"] / 2**20 for n in sample_counts})
        rows.append(row)

    # Every N is at least two chunks, so every chunked compile is a scan over chunks: the
    # scratch memory must not grow with N (up to XLA's bookkeeping, 5 %).
    chunked = [r for r in rows if r["estimator"] in scanned]
    flat = all(r["max / min"] <= 1.05 for r in chunked)
    unchunked = rows[0]
    targets = [
        common.target(
            "memory flat in num_samples when chunked",
            flat,
            "; ".join(f"{r['estimator']}: max/min temp = {r['max / min']:.3f}" for r in chunked)
            + f" over N = {sample_counts[0]}…{sample_counts[-1]} (unchunked: "
            f"{unchunked['max / min']:.1f}×)",
        )
    ]
    notes = [
        f"Problem: Rastrigin, d = {dim:,}, float32; N directions = 2N evaluations; the "
        "argument (x) and output (the gradient) are d floats each and not counted.",
        "Cells: temp_size_in_bytes in MiB (XLA's scratch buffers of the compiled step). "
        "Unchunked, it grows like N·d (the N perturbations and directions are live at once); "
        f"chunked, only one chunk of {chunk} (or the default {default}) directions is live, "
        "so it stays flat.",
        "peak_memory_in_bytes is also in the JSON, but XLA's CPU client reports a "
        "placeholder there (not the real peak), so it is not used.",
        evosax_note + ".",
    ]
    table = common.make_table(
        f"Scratch memory (temp_size_in_bytes, MiB) vs N, Rastrigin d={dim:,}", columns, rows
    )
    return common.make_report(
        "memory",
        "Estimator memory vs num_samples, chunked and unchunked",
        __doc__.split("\n\n", 1)[1].strip(),
        tables=[table],
        notes=notes,
        targets=targets,
        data={"dim": dim, "chunk_size": chunk, "bytes": measurements},
    )
