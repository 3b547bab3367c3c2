"""``python -m benchmarks [--quick|--full] [--out DIR] [--only NAME ...]``.

Runs the registered benchmarks and writes ``<name>.json`` and ``<name>.md`` for each, plus
``summary.json``/``summary.md`` (the targets and run times of this invocation), under
``--out`` (default ``benchmarks/results``). To add a benchmark, write a module with
``run(quick: bool) -> dict`` (a report from :func:`benchmarks.common.make_report`) and add it
to ``BENCHMARKS`` below.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import common

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

# name -> "module:function" (imported only when that benchmark runs) or the function itself;
# the function takes ``quick`` and returns a report.
BENCHMARKS: dict[str, str | Callable[[bool], dict[str, Any]]] = {
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
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(BENCHMARKS), metavar="NAME", help="benchmarks to run"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    quick = bool(args.quick)
    mode = "quick" if quick else "full"
    names = args.only or list(BENCHMARKS)
    env = common.environment()
    print(f"agsopt benchmarks ({mode}) on {common.environment_line(env)}", flush=True)
    summary: list[dict[str, Any]] = []
    for name in names:
        start = time.perf_counter()
        report = resolve(name)(quick)
        seconds = time.perf_counter() - start
        json_path, md_path = common.write_report(report, args.out, env, mode, seconds)
        print(f"  {name}: {seconds:.1f} s -> {json_path}, {md_path}", flush=True)
        for t in report["targets"]:
            print(f"    [{common.target_mark(t['met'])}] {t['target']}: {t['detail']}", flush=True)
        summary.append(
            {"benchmark": name, "seconds": round(seconds, 1), "targets": report["targets"]}
        )
    write_summary(summary, args.out, env, mode)
    return 0


def write_summary(summary: list[dict[str, Any]], out: Path, env: dict[str, Any], mode: str):
    out.mkdir(parents=True, exist_ok=True)
    payload = {"mode": mode, "environment": env, "benchmarks": summary}
    (out / "summary.json").write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    lines = [
        "# agsopt benchmark summary",
        "",
        f"Mode: `{mode}`. Environment: {common.environment_line(env)}.",
        "",
        "| benchmark | seconds | target | status | detail |",
        "|---|---|---|---|---|",
    ]
    for entry in summary:
        targets = entry["targets"] or [{"target": "—", "met": None, "detail": ""}]
        for t in targets:
            cells = [
                entry["benchmark"],
                f"{entry['seconds']:.1f}",
                t["target"],
                common.target_mark(t["met"]),
                t["detail"],
            ]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    (out / "summary.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
