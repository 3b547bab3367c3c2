"""Files of the black-box benchmark: ``blackbox.json``, ``.csv``, ``.md`` and ``.png``.

:func:`write_blackbox` writes the records of :func:`agsopt.study.blackbox.run_blackbox` to a
folder: the JSON list of records as they are, a CSV and a Markdown table of the summary
columns (:data:`COLUMNS`), and the success rate against evaluations (the fraction of starts
that have succeeded within E evaluations, one panel per function and dimension, one line per
method; ASGF's mean evaluations from issue 17 marked where known). Only these four files
are written (replaced if present); matplotlib is imported only for the plot.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from agsopt.study.blackbox import ASGF_REFERENCE
from agsopt.study.plotting import _pyplot

__all__ = ["COLUMNS", "FILES", "markdown_table", "plot_success", "write_blackbox"]

FILES = ("blackbox.json", "blackbox.csv", "blackbox.md", "blackbox.png")
"""The files :func:`write_blackbox` writes."""

COLUMNS = (
    "function",
    "dim",
    "method",
    "library",
    "gradient",
    "starts",
    "budget",
    "success_rate",
    "mean_evaluations",
    "median_evaluations",
    "median_final",
    "stopped",
    "best_monitored",
)
"""The summary columns of the CSV and Markdown tables."""


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if value == int(value) and abs(value) < 1e7:
            return str(int(value))
        return f"{value:.3g}" if 1e-3 <= abs(value) < 1e5 else f"{value:.2e}"
    return str(value)


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """The summary columns as a Markdown table, success rate in percent, with the ASGF
    reference (issue 17) where the function and dimension have one."""
    header = [
        "function",
        "d",
        "method",
        "library",
        "success",
        "mean evals",
        "median evals",
        "median final f",
        "budget",
        "ASGF ref. evals",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for r in records:
        reference = ASGF_REFERENCE.get((r["function"], r["dim"]), {}).get("asgf")
        method = r["method"] + (" (∇f)" if r.get("gradient") else "")
        cells = [
            r["function"],
            _cell(r["dim"]),
            method,
            _cell(r["library"]),
            f"{100 * r['success_rate']:.0f} %",
            _cell(r["mean_evaluations"]),
            _cell(r["median_evaluations"]),
            _cell(r["median_final"]),
            _cell(r["budget"]),
            _cell(None if reference is None else float(reference)),
        ]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def _write_markdown(records: Sequence[dict[str, Any]], path: str, notes: Sequence[str]) -> None:
    lines = [
        "# Black-box benchmark (ASGF protocol, arXiv:2006.10887)",
        "",
        "Success: |f(x_best) − f*| / |f(x_0) − f(x_best)| < 1e-4 within the budget; every call "
        "of f counted (a gradient counts 1, marked ∇f). Mean and median evaluations are over "
        "the successful starts, at the first step where the criterion holds. ASGF ref.: the "
        "mean evaluations of the ASGF authors' code quoted from issue 17 (not re-measured; "
        "counted at its termination, distinct points only).",
        "",
        markdown_table(records),
    ]
    monitored = sorted({r["method"] for r in records if r.get("best_monitored")})
    if monitored:
        lines += [
            "",
            "Best value tracked by the protocol outside the count (favours the method): "
            + ", ".join(monitored)
            + ".",
        ]
    for note in notes:
        lines += ["", note]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")


def _write_csv(records: Sequence[dict[str, Any]], path: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for record in records:
            writer.writerow({c: "" if record[c] is None else record[c] for c in COLUMNS})


def success_curve(record: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """``(E, rate)``: the fraction of starts that succeeded within E evaluations, as a step
    function through the evaluations to success (sorted), ending at the budget."""
    reached = np.sort([e for e in record["evaluations_to_success"] if e is not None])
    starts = record["starts"]
    evaluations = np.concatenate([[1], reached, [record["budget"]]]).astype(float)
    rates = np.concatenate([[0], np.arange(1, len(reached) + 1) / starts, [len(reached) / starts]])
    return evaluations, rates


def plot_success(records: Sequence[dict[str, Any]], path: str) -> None:
    """Success rate against evaluations, one panel per (function, d), log-scale x."""
    plt = _pyplot()
    panels = list(dict.fromkeys((r["function"], r["dim"]) for r in records))
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, dim) in zip(axes.flat, panels, strict=False):
        for r in records:
            if (r["function"], r["dim"]) != (name, dim):
                continue
            evaluations, rates = success_curve(r)
            style = "-" if r["library"] else "--"
            label = r["method"] + (" (∇f)" if r.get("gradient") else "")
            ax.step(evaluations, rates, where="post", linestyle=style, label=label)
        reference = ASGF_REFERENCE.get((name, dim), {}).get("asgf")
        if reference is not None:
            ax.plot([reference], [1.0], "k*", markersize=10, label="ASGF (issue 17)")
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{name}, d = {dim}")
        ax.set_xlabel("evaluations of f")
        ax.set_ylabel("success rate")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_blackbox(
    records: Sequence[dict[str, Any]],
    out: str | os.PathLike,
    *,
    plots: bool = True,
    notes: Sequence[str] = (),
) -> dict[str, str]:
    """Write :data:`FILES` (the plot only if ``plots``) into ``out``; return their paths by
    kind. ``notes`` (e.g. skipped peers) go to the end of the Markdown file."""
    if not records:
        raise ValueError("records is empty: nothing ran (are all methods unavailable?)")
    os.makedirs(out, exist_ok=True)
    paths = {kind: os.path.join(out, f"blackbox.{kind}") for kind in ("json", "csv", "md")}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(list(records), f, indent=1)
        f.write("\n")
    _write_csv(records, paths["csv"])
    _write_markdown(records, paths["md"], notes)
    if plots:
        paths["png"] = os.path.join(out, "blackbox.png")
        plot_success(records, paths["png"])
    return paths
