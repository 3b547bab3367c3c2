"""``python -m benchmarks [--quick|--full] [--out DIR | --commit-results] [--only NAME ...]``.

Runs the registered benchmarks and writes ``<name>.json`` and ``<name>.md`` for each, plus
``summary.json``/``summary.md`` (the targets of every report in that folder, each with its
own date: rebuilt after each run, also by ``--summarize``), under
``--out``: by default ``results/benchmarks/`` at the repository root, which git ignores.
The committed reports the README links (``benchmarks/results/``) are written only with
``--commit-results`` (full mode only: quick numbers never overwrite them).
``--device-suite`` is the accelerator check: ``estimators`` and ``sam_steps`` in full mode
into ``benchmarks/results/device/<device>/``; it refuses to run on CPU.

A run that seems stuck can be asked where it is: ``kill -USR1 <pid>`` prints every thread's
Python stack to stderr (``faulthandler``; POSIX only) and the run goes on.

To add a benchmark, write a module with ``run(quick: bool) -> dict`` (a report from
:func:`benchmarks.common.make_report`) and add it to ``BENCHMARKS`` below.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import json
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import common

COMMITTED_OUT = Path(__file__).resolve().parent / "results"  # the reports the README links
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "benchmarks"  # git-ignored
DEVICE_SUITE = ("estimators", "sam_steps")

# name -> "module:function" (imported only when that benchmark runs) or the function itself;
# the function takes ``quick`` and returns a report.
BENCHMARKS: dict[str, str | Callable[[bool], dict[str, Any]]] = {
    "blackbox": "benchmarks.blackbox:run",
    "estimators": "benchmarks.estimators:run",
    "estimator_profile": "benchmarks.estimator_profile:run",
    "memory": "benchmarks.memory:run",
    "quality": "benchmarks.quality:run",
    "sam_steps": "benchmarks.sam_steps:run",
    "scaling": "benchmarks.scaling:run",
}


def resolve(name: str) -> Callable[[bool], dict[str, Any]]:
    entry = BENCHMARKS[name]
    if callable(entry):
        return entry
    module_name, function_name = entry.split(":")
    return getattr(importlib.import_module(module_name), function_name)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="tiny sizes, seconds (CI)")
    mode.add_argument("--full", action="store_true", help="the real numbers (default)")
    parser.add_argument(
        "--out", type=Path, default=None, help="results folder (default: results/benchmarks/)"
    )
    parser.add_argument(
        "--commit-results",
        action="store_true",
        help="write into benchmarks/results/, the committed reports (full mode only)",
    )
    parser.add_argument(
        "--device-suite",
        action="store_true",
        help="estimators and sam_steps on a GPU/TPU, into benchmarks/results/device/<device>/",
    )
    parser.add_argument(
        "--summarize",
        action="store_true",
        help="only rebuild summary.json/summary.md from the reports in the folder",
    )
    parser.add_argument(
        "--only", nargs="+", choices=sorted(BENCHMARKS), metavar="NAME", help="benchmarks to run"
    )
    return parser.parse_args(argv)


def device_slug(device: str) -> str:
    """A folder name for a device, e.g. ``"NVIDIA H200"`` -> ``"nvidia-h200"``."""
    return "-".join("".join(c if c.isalnum() else " " for c in device.lower()).split()) or "device"


def output_folder(args: argparse.Namespace, env: dict[str, Any]) -> Path:
    """Where this invocation writes; raises ``ValueError`` for a request that would put
    quick numbers into the committed reports or mislabel a CPU run as a device run."""
    if args.device_suite:
        if env["platform"] == "cpu":
            raise ValueError("--device-suite needs a GPU or TPU; JAX found only the CPU")
        if args.commit_results:
            raise ValueError("--device-suite chooses its own folder; drop --commit-results")
        base = DEFAULT_OUT if args.quick else COMMITTED_OUT
        return args.out or base / "device" / device_slug(env["device"])
    if args.commit_results:
        if args.quick:
            raise ValueError("--commit-results writes the committed reports: full mode only")
        if args.out is not None and args.out.resolve() != COMMITTED_OUT:
            raise ValueError("--commit-results writes to benchmarks/results/; drop --out")
        return COMMITTED_OUT
    out = DEFAULT_OUT if args.out is None else args.out
    if args.quick and out.resolve() == COMMITTED_OUT:
        raise ValueError(
            "quick results would overwrite the committed reports in benchmarks/results/"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if hasattr(signal, "SIGUSR1"):  # kill -USR1 <pid>: every thread's stack, the run goes on
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    quick = bool(args.quick)
    mode = "quick" if quick else "full"
    env = common.environment()
    try:
        out = output_folder(args, env)
    except ValueError as error:
        print(f"python -m benchmarks: {error}", file=sys.stderr)
        return 2
    if args.summarize:
        write_summary(out)
        print(f"python -m benchmarks: rebuilt {out / 'summary.md'}")
        return 0
    names = args.only or list(DEVICE_SUITE if args.device_suite else BENCHMARKS)
    print(f"agsopt benchmarks ({mode}) on {common.environment_line(env)}", flush=True)
    for name in names:
        start = time.perf_counter()
        report = resolve(name)(quick)
        seconds = time.perf_counter() - start
        json_path, md_path = common.write_report(report, out, env, mode, seconds)
        print(f"  {name}: {seconds:.1f} s -> {json_path}, {md_path}", flush=True)
        for t in report["targets"]:
            print(f"    [{common.target_mark(t['met'])}] {t['target']}: {t['detail']}", flush=True)
    write_summary(out)
    return 0


def summary_from_reports(out: Path) -> list[dict[str, Any]]:
    """One entry per ``<name>.json`` report in ``out`` (in :data:`BENCHMARKS` order): its
    targets, mode, date and run time, as the report recorded them."""
    entries = []
    for name in BENCHMARKS:
        path = out / f"{name}.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text(encoding="utf-8"))
        env = report.get("environment", {})
        entries.append(
            {
                "benchmark": name,
                "mode": report.get("mode"),
                "measured": env.get("date"),
                "seconds": env.get("benchmark_seconds"),
                "targets": report.get("targets", []),
            }
        )
    return entries


def write_summary(out: Path) -> None:
    """``summary.json``/``summary.md`` of *every* report in ``out``, rebuilt after each run,
    so a folder written by several runs (``--only``) never keeps a stale row: each row
    carries its own report's date and mode."""
    summary = summary_from_reports(out)
    payload = {"benchmarks": summary}
    (out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    lines = [
        "# agsopt benchmark summary",
        "",
        "Every report in this folder, rebuilt after each run; each row's date, mode and run "
        "time are its own report's (the environment is in the report).",
        "",
        "| benchmark | measured | mode | seconds | target | status | detail |",
        "|---|---|---|---|---|---|---|",
    ]
    for entry in summary:
        targets = entry["targets"] or [{"target": "—", "met": None, "detail": ""}]
        seconds = "—" if entry["seconds"] is None else f"{entry['seconds']:.1f}"
        for t in targets:
            cells = [
                entry["benchmark"],
                str(entry["measured"] or "—")[:10],
                str(entry["mode"] or "—"),
                seconds,
                t["target"],
                common.target_mark(t["met"]),
                t["detail"],
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
