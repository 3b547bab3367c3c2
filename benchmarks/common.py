"""Shared pieces of the benchmark suite: the environment stamp, timing and the report writer.

A benchmark's ``run(quick)`` returns a report, a plain dict built by :func:`make_report`:

    {"name", "title", "description", "notes": [str], "tables": [table], "targets": [target]}

with ``table = {"title", "columns": [str], "rows": [dict], "notes": [str]}`` (a row maps
column names to numbers or strings; extra keys go to the JSON only) and
``target = {"target", "met": bool | None, "detail"}``. :func:`write_report` writes it as
``<name>.json`` and ``<name>.md``, stamped with :func:`environment`.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

# --------------------------------------------------------------------------- environment


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages (a record of contention on a shared machine)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict[str, Any]:
    """Where and when the numbers were taken."""
    device = jax.devices()[0]
    try:
        usable_cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cpus = os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": device.platform,
        "device": cpu_model() if device.platform == "cpu" else device.device_kind,
        "device_kind": device.device_kind,
        "cpu_model": cpu_model(),
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable_cpus,
        "load_average": load_average(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": package_version("jaxlib"),
        "optax": package_version("optax"),
        "flax": package_version("flax"),
        "evosax": package_version("evosax"),
        "agsopt": package_version("agsopt"),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "command": " ".join([Path(sys.executable).name, "-m", "benchmarks", *sys.argv[1:]]),
    }


def environment_line(env: dict[str, Any]) -> str:
    load = env.get("load_average")
    return (
        f"{env['device']} ({env['platform']}, {env['device_count']} device(s)), "
        f"os.cpu_count()={env['cpu_count']}, usable CPUs={env['usable_cpus']}, "
        f"load average at start {load}, JAX {env['jax']}, optax {env['optax']}, "
        f"flax {env['flax']}, evosax {env['evosax'] or 'not installed'}, {env['date']}"
    )


# --------------------------------------------------------------------------- timing


def block(tree: Any) -> Any:
    return jax.block_until_ready(tree)


def time_call(fn: Callable[..., Any], *args: Any, number: int = 1) -> float:
    """Mean wall time of ``number`` consecutive calls, each waited for."""
    start = time.perf_counter()
    for _ in range(number):
        block(fn(*args))
    return (time.perf_counter() - start) / number


def calls_per_sample(fn: Callable[..., Any], *args: Any, min_seconds: float) -> int:
    """How many calls make one timing sample last at least ``min_seconds`` (≥ 1)."""
    once = time_call(fn, *args)
    if once >= min_seconds:
        return 1
    once = min(once, *(time_call(fn, *args) for _ in range(2)))
    return max(1, math.ceil(min_seconds / max(once, 1e-7)))


def time_interleaved(
    candidates: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]],
    *,
    repeats: int,
    max_seconds: float = math.inf,
    min_repeats: int = 3,
    min_sample_seconds: float = 0.02,
) -> dict[str, dict[str, Any]]:
    """Median wall time of each ``fn(*args)``, warm-up (compilation) excluded.

    Every candidate is called once to compile and warm up (that call is reported as
    ``first_s``), then the candidates are timed round-robin, one sample each per round,
    ``block_until_ready`` on the outputs, so that a burst of load from other processes on a
    shared machine hits all of them alike rather than one. A sample is the mean over enough
    consecutive calls to last ``min_sample_seconds`` (sub-millisecond calls are otherwise
    at the mercy of the scheduler). Rounds stop after ``repeats``, or once ``max_seconds``
    have been spent and ``min_repeats`` rounds are done.
    """
    first = {name: time_call(fn, *args) for name, (fn, args) in candidates.items()}
    number = {
        name: calls_per_sample(fn, *args, min_seconds=min_sample_seconds)
        for name, (fn, args) in candidates.items()
    }
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    start = time.perf_counter()
    for round_index in range(repeats):
        for name, (fn, args) in candidates.items():
            samples[name].append(time_call(fn, *args, number=number[name]))
        if round_index + 1 >= min_repeats and time.perf_counter() - start > max_seconds:
            break
    return {
        name: timing_stats(times, first[name]) | {"calls_per_sample": number[name]}
        for name, times in samples.items()
    }


def timing_stats(times: list[float], first_s: float) -> dict[str, Any]:
    """Median, min and quartiles of repeated call times, with the warm-up call's time."""
    values = np.asarray(times)
    return {
        "median_s": float(np.median(values)),
        "min_s": float(np.min(values)),
        "q25_s": float(np.percentile(values, 25)),
        "q75_s": float(np.percentile(values, 75)),
        "repeats": len(times),
        "first_s": first_s,
    }


# --------------------------------------------------------------------------- formatting


def fmt(value: Any, digits: int = 3) -> str:
    """A compact cell: ``3`` significant digits, scientific for very large or small."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        value = float(value)
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return "0"
        if 1e-3 <= abs(value) < 1e5:
            return f"{value:.{digits}g}"
        return f"{value:.{digits - 1}e}"
    return str(value)


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return fmt(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------- reports


def make_report(
    name: str,
    title: str,
    description: str,
    *,
    tables: list[dict[str, Any]],
    notes: Sequence[str] = (),
    targets: Sequence[dict[str, Any]] = (),
    data: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "title": title,
        "description": description,
        "notes": list(notes),
        "tables": tables,
        "targets": list(targets),
        "data": data or {},
    }


def make_table(
    title: str, columns: Sequence[str], rows: list[dict[str, Any]], notes: Sequence[str] = ()
) -> dict[str, Any]:
    return {"title": title, "columns": list(columns), "rows": rows, "notes": list(notes)}


def target(description: str, met: bool | None, detail: str) -> dict[str, Any]:
    return {"target": description, "met": met, "detail": detail}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray | jax.Array):
        return np.asarray(value).tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def target_mark(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "n/a"}[met]


def report_markdown(report: dict[str, Any], env: dict[str, Any], mode: str) -> str:
    parts = [
        f"# {report['title']}",
        "",
        f"Mode: `{mode}`. Environment: {environment_line(env)}.",
        "",
        report["description"],
        "",
    ]
    if report["targets"]:
        parts += ["## Targets", ""]
        for t in report["targets"]:
            parts.append(f"- **{target_mark(t['met'])}**: {t['target']} — {t['detail']}")
        parts.append("")
    for table in report["tables"]:
        parts += [f"## {table['title']}", "", markdown_table(table["columns"], table["rows"]), ""]
        parts += [f"- {note}" for note in table["notes"]]
        if table["notes"]:
            parts.append("")
    if report["notes"]:
        parts += ["## Notes", ""]
        parts += [f"- {note}" for note in report["notes"]]
        parts.append("")
    return "\n".join(parts)


def write_report(
    report: dict[str, Any], out_dir: Path, env: dict[str, Any], mode: str, seconds: float
) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir``; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**env, "load_average_at_end": load_average(), "benchmark_seconds": round(seconds, 1)}
    payload = {"mode": mode, "environment": env, **report}
    json_path = out_dir / f"{report['name']}.json"
    md_path = out_dir / f"{report['name']}.md"
    json_path.write_text(json.dumps(_jsonable(payload), indent=2) + "\n", encoding="utf-8")
    md_path.write_text(report_markdown(report, env, mode), encoding="utf-8")
    return json_path, md_path
