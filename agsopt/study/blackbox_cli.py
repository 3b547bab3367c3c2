"""``python -m agsopt blackbox``: the black-box benchmark protocol from the command line.

::

    python -m agsopt blackbox --functions ackley,levy --dim 10 --starts 20 --budget 50000 \\
        [--methods igs-adam,cma-es] [--out DIR] [--seed S] [--no-plots] [--list]

Runs :func:`agsopt.study.blackbox.run_blackbox` and writes ``DIR/blackbox.json`` (the list
of records), ``blackbox.csv``, ``blackbox.md`` and ``blackbox.png`` (success rate against
evaluations) to ``DIR`` (default ``results/blackbox``), replacing those four files if they
exist. Without ``--methods`` it runs the library's recommended black-box presets
(:data:`~agsopt.study.blackbox_methods.DEFAULT_METHODS`). A peer whose optional package is
missing (``cma``, ``evosax``) is skipped with a note.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

__all__ = ["add_parser", "run"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the ``blackbox`` subcommand to ``commands`` (an argparse subparsers object)."""
    from agsopt.study.blackbox_methods import DEFAULT_METHODS
    from agsopt.study.cli import _names, _seed  # the study's parsers (cli imports this module)

    parser = commands.add_parser(
        "blackbox",
        help="the black-box benchmark protocol (ASGF paper): success rate and evaluations",
        description=(
            "Run each method from the same uniform random starts in each function's box until "
            "|f(x_best) - f*| / |f(x0) - f(x_best)| < 1e-4, it stops, or the budget of "
            "function evaluations is spent; write blackbox.json/.csv/.md/.png to --out."
        ),
    )
    parser.add_argument(
        "--functions",
        type=_names,
        default=("sphere", "ackley", "levy", "rastrigin"),
        help="comma-separated test-function names (sphere,ackley,levy,rastrigin), or "
        "module:attribute for your own agsopt.functions.TestFunction with a known minimum",
    )
    parser.add_argument("--dim", type=_positive, default=10, help="dimension d (10)")
    parser.add_argument("--starts", type=_positive, default=20, help="random starts (20)")
    parser.add_argument(
        "--budget",
        type=_positive,
        default=None,
        help="most evaluations per start (default 2000 d)",
    )
    parser.add_argument(
        "--methods",
        type=_names,
        default=None,
        help=f"comma-separated method names (default {','.join(DEFAULT_METHODS)}; see --list)",
    )
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the starts and keys (0)")
    parser.add_argument(
        "--out",
        default=os.path.join("results", "blackbox"),
        help="output folder; its blackbox.* files are replaced (results/blackbox)",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip blackbox.png")
    parser.add_argument("--list", action="store_true", help="list the methods and exit")
    return parser


def run(args: argparse.Namespace) -> int:
    """Run the ``blackbox`` subcommand; returns the exit status (ValueError and ImportError
    propagate to :func:`agsopt.study.cli.main`, which exits with status 2)."""
    from agsopt.study.blackbox import run_blackbox, skipped_methods
    from agsopt.study.blackbox_methods import METHODS
    from agsopt.study.blackbox_output import write_blackbox
    from agsopt.study.plotting import require_matplotlib
    from agsopt.study.registry import resolve_function

    if args.list:
        for name, method in METHODS.items():
            kind = "library" if method.library else "peer"
            reason = method.unavailable()
            state = "" if reason is None else f"  [not installed: {method.requires}]"
            print(f"{name:16s} {kind:8s} {method.description}{state}")
        return 0
    if not args.no_plots:
        require_matplotlib()
    budget = args.budget if args.budget is not None else 2000 * args.dim
    skipped = skipped_methods(args.methods)
    for reason in skipped.values():
        print(f"note: {reason}", file=sys.stderr)
    methods = [m for m in (args.methods or _default()) if m not in skipped]
    if not methods:
        raise ValueError("no method can run: " + "; ".join(skipped.values()))
    functions = [resolve_function(name, args.dim) for name in args.functions]  # errors first
    print(
        f"black-box protocol: d = {args.dim}, {args.starts} starts, budget {budget} "
        f"evaluations, seed {args.seed}"
    )

    def report(record: dict[str, Any]) -> None:
        mean = record["mean_evaluations"]
        print(
            f"  {record['function']:>12s} {record['method']:>16s}: "
            f"{100 * record['success_rate']:5.1f} % success, mean evaluations "
            f"{'—' if mean is None else f'{mean:.0f}'}, median final "
            f"{record['median_final']}",
            flush=True,
        )

    records = run_blackbox(
        functions, args.dim, args.starts, budget, methods, args.seed, on_record=report
    )
    notes = [f"Skipped: {reason}" for reason in skipped.values()]
    paths = write_blackbox(records, args.out, plots=not args.no_plots, notes=notes)
    for kind, path in paths.items():
        print(f"{kind:>5}: {path}")
    return 0


def _default() -> tuple[str, ...]:
    from agsopt.study.blackbox_methods import DEFAULT_METHODS

    return DEFAULT_METHODS
