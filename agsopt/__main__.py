"""Command line: ``python -m agsopt study|rules|profile [options]``.

``python -m agsopt study`` with no arguments runs the default study (see
:data:`agsopt.study.PRESETS`), writes CSV, JSON, a Markdown table and PNG plots to
``results/study/`` and prints the final medians and where the files went.
``python -m agsopt rules`` compares AGS covariance rules against IGS at equal evaluations;
``python -m agsopt profile`` times one AGS step against its evaluations and random numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from agsopt import study


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agsopt",
        description="Convergence studies of the agsopt optimizers on standard test functions.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "study",
        help="run a convergence study (optimizers × functions × random starts)",
        description=(
            "Run every optimizer on every function from the same random starts; write "
            "results.csv, summary.csv, results.json, final.md and study_*.png to --out. "
            "Options override the chosen --preset."
        ),
    )
    run.add_argument(
        "--preset",
        choices=sorted(study.PRESETS),
        default="default",
        help=(
            "default: d=10, 10 starts, 1000 iterations on rastrigin, ackley, "
            "rotated_ellipsoid (under two minutes); paper: d=100, 20 starts, 3000 "
            "iterations on the multimodal functions"
        ),
    )
    run.add_argument("--functions", type=_names, help="comma-separated test-function names")
    run.add_argument("--optimizers", type=_names, help="comma-separated optimizer names")
    run.add_argument("--dim", type=int, help="dimension d")
    run.add_argument("--starts", type=int, help="random starts per function")
    run.add_argument("--iterations", type=int, help="optimizer steps")
    run.add_argument("--seed", type=int, help="study seed")
    run.add_argument("--record-every", type=int, help="record every this many steps")
    run.add_argument(
        "--key-impl", choices=study.KEY_IMPLS, help="PRNG implementation (default threefry2x32)"
    )
    run.add_argument("--out", default=None, help="output folder (default results/<preset>)")
    run.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument(
        "--list", action="store_true", help="list the functions and optimizers and exit"
    )
    rules = commands.add_parser(
        "rules",
        help="AGS with different covariance rules (IGS first) at equal evaluations",
        description=(
            "Run AGS in the GD or Adam form with each covariance rule (same N, σ and "
            "learning-rate schedules, starts and noise keys; only the rule differs) and "
            "write the study files plus rules.md, the Markdown comparison table."
        ),
    )
    rules.add_argument(
        "--rules",
        type=_names,
        default=("isotropic", "gradient_aligned", "adaptive_gradient_aligned"),
        help="comma-separated rule names; the first is the baseline",
    )
    rules.add_argument("--form", choices=("adam", "gd"), default="adam")
    rules.add_argument("--functions", type=_names, default=study.RULE_FUNCTIONS)
    rules.add_argument("--dim", type=int, default=100)
    rules.add_argument("--starts", type=int, default=20)
    rules.add_argument("--iterations", type=int, default=3000)
    rules.add_argument("--seed", type=int, default=0)
    rules.add_argument("--out", default="results/rules")
    rules.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    rules.add_argument("--no-progress", action="store_true", help="no progress bar")
    prof = commands.add_parser(
        "profile",
        help="time one AGS-GD step against its function evaluations and random numbers",
    )
    prof.add_argument("--function", default="rastrigin")
    prof.add_argument("--dim", type=int, default=100)
    prof.add_argument("--num-samples", type=int, default=128)
    prof.add_argument("--starts", type=int, default=20)
    return parser


def _study(args: argparse.Namespace) -> int:
    if args.list:
        print("functions:", ", ".join(study.function_names()))
        print("optimizers:")
        for name in study.OPTIMIZERS:
            print(f"  {name}")
        print("presets:", ", ".join(sorted(study.PRESETS)))
        return 0
    preset = study.PRESETS[args.preset]
    out = args.out or f"results/{'study' if args.preset == 'default' else args.preset}"
    result = study.run_study(
        args.functions,
        args.optimizers,
        dim=args.dim,
        starts=args.starts,
        iterations=args.iterations,
        seed=args.seed,
        record_every=args.record_every,
        key_impl=args.key_impl,
        config=preset,
        progress=not args.no_progress,
    )
    paths = study.write_results(result, out, plots=not args.no_plots)
    cfg = result.config
    print(
        f"\nd = {cfg.dim}, {cfg.starts} starts, {cfg.iterations} iterations: median final "
        "f − f* [25 %, 75 %] ((f) where f* is unknown)"
    )
    print(result.final_table())
    print(f"\nwall time {result.metadata['wall_seconds']:.1f} s")
    for kind, path in paths.items():
        print(f"{kind:>17}: {path}")
    return 0


def _rules(args: argparse.Namespace) -> int:
    result = study.compare_rules(
        args.functions,
        args.rules,
        form=args.form,
        dim=args.dim,
        starts=args.starts,
        iterations=args.iterations,
        seed=args.seed,
        progress=not args.no_progress,
    )
    paths = study.write_results(result, args.out, plots=not args.no_plots)
    table = study.rule_table(result)
    paths["rules"] = os.path.join(args.out, "rules.md")
    with open(paths["rules"], "w", encoding="utf-8") as f:
        f.write(table + "\n")
    print(
        f"\nAGS-{args.form} by covariance rule, d = {args.dim}, {args.starts} starts, "
        f"{args.iterations} iterations: median final f − f* [25 %, 75 %]"
    )
    print(table)
    print(f"\nwall time {result.metadata['wall_seconds']:.1f} s")
    for kind, path in paths.items():
        print(f"{kind:>17}: {path}")
    return 0


def _profile(args: argparse.Namespace) -> int:
    timings = study.profile_step(args.function, args.dim, args.num_samples, args.starts)
    print(
        f"{args.function}, d = {args.dim}, N = {args.num_samples} antithetic directions "
        f"({2 * args.num_samples} evaluations), {args.starts} starts under vmap; ms per step:"
    )
    for name, ms in timings.items():
        print(f"  {name:28s} {ms:8.3f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a message for bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "study":
            return _study(args)
        if args.command == "rules":
            return _rules(args)
        return _profile(args)
    except ValueError as error:
        parser.exit(2, f"python -m agsopt {args.command}: error: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
