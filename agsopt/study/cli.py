"""Command line: ``python -m agsopt [--version] study|rules|profile [options]``.

``python -m agsopt study`` with no arguments runs the default study (see
:data:`agsopt.study.PRESETS`), writes each run to ``results/study/runs/`` as it finishes,
then CSV, JSON, a Markdown table and PNG plots to ``results/study/``, and prints the final
medians and where the files went. An existing output folder is refused unless
``--overwrite`` (replace its study outputs) or ``--resume`` (skip the runs it already
holds); on Ctrl-C the finished runs are kept and the command to resume is printed. A
second study cannot write a folder while one does (:func:`~agsopt.study.output.lock_folder`);
an unusable file or an unwritable disk ends the command with one line naming the file and
what to do.
``python -m agsopt rules`` compares AGS covariance rules against IGS at equal evaluations
(same folder handling); ``python -m agsopt profile`` times one AGS step against its
evaluations and random numbers.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence

from agsopt.smoothing.covariance_rules import RULES
from agsopt.study import blackbox_cli
from agsopt.study.config import KEY_IMPLS, MAX_SEED, PRESETS, StudyConfig
from agsopt.study.output import (
    OutputExistsError,
    lock_folder,
    prepare_folder,
    save_run,
    write_results,
)
from agsopt.study.plotting import require_matplotlib
from agsopt.study.profile import profile_step
from agsopt.study.registry import (
    OPTIMIZERS,
    function_names,
    is_tuned,
    resolve_function,
    rule_registry,
)
from agsopt.study.results import StudyResult, _replace_atomically
from agsopt.study.rules import DEFAULT_RULES, RULE_FUNCTIONS, rule_table
from agsopt.study.runner import run_study

__all__ = ["main"]

INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""

IO_FAILED = 1
"""Exit status when a file cannot be written (full or read-only disk)."""


class _WriteFailed(Exception):
    """An OSError while writing the output folder, with the message to print."""


def _version() -> str:
    from agsopt import __version__

    return __version__


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _preset(text: str) -> str:
    if text == "paper":
        raise argparse.ArgumentTypeError("'paper' was renamed 'd100' in agsopt 0.2.0")
    return text


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(
            f"must be in [0, 2**32 - 1] = [0, {MAX_SEED}] (larger seeds would repeat the "
            f"streams of smaller ones), got {value}"
        )
    return value


def _add_output_options(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--out", default=None, help=f"output folder (default {default_out})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the study outputs already in --out (other files stay)",
    )
    mode.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted study in --out with the same options: finished runs "
        "(--out/runs/) are kept and skipped",
    )
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m agsopt",
        description="Convergence studies of the agsopt optimizers on standard test functions.",
    )
    parser.add_argument("--version", action="version", version=f"agsopt {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "study",
        help="run a convergence study (optimizers × functions × random starts)",
        description=(
            "Run every optimizer on every function from the same random starts; write each "
            "finished run to --out/runs/, then results.csv, summary.csv, results.json, "
            "final.md, study.json (the settings) and study_*.png to --out. Options "
            "override the chosen --preset."
        ),
    )
    run.add_argument(
        "--preset",
        type=_preset,
        choices=sorted(PRESETS),
        default="default",
        help=(
            "default: d=10, 10 starts, 1000 iterations on rastrigin, ackley, "
            "levy; d100: d=100, 20 starts, 3000 iterations on rastrigin, "
            "ackley, griewank, levy, michalewicz"
        ),
    )
    run.add_argument(
        "--functions",
        type=_names,
        help="comma-separated test-function names, or module:attribute for your own "
        "agsopt.functions.TestFunction in an importable module (its settings are derived "
        "from its box, not tuned)",
    )
    run.add_argument("--optimizers", type=_names, help="comma-separated optimizer names")
    run.add_argument("--dim", type=int, help="dimension d (preset: 10 or 100)")
    run.add_argument("--starts", type=int, help="random starts per function (preset: 10 or 20)")
    run.add_argument("--iterations", type=int, help="optimizer steps (preset: 1000 or 3000)")
    run.add_argument("--seed", type=_seed, help="study seed, 0 <= seed < 2**32 (0)")
    run.add_argument("--record-every", type=int, help="record every this many steps (the preset's)")
    run.add_argument("--key-impl", choices=KEY_IMPLS, help="PRNG implementation (threefry2x32)")
    _add_output_options(run, "results/<preset>, results/study for the default preset")
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
        default=DEFAULT_RULES,
        help=(
            "comma-separated rule names, the first the baseline ("
            + ", ".join(DEFAULT_RULES)
            + "); all: "
            + ", ".join(RULES)
        ),
    )
    rules.add_argument(
        "--form", choices=("adam", "gd"), default="adam", help="AGS's base optimizer (adam)"
    )
    rules.add_argument(
        "--functions",
        type=_names,
        default=RULE_FUNCTIONS,
        help=f"comma-separated test functions ({', '.join(RULE_FUNCTIONS)})",
    )
    rules.add_argument("--dim", type=int, default=100, help="dimension d (100)")
    rules.add_argument("--starts", type=int, default=20, help="random starts (20)")
    rules.add_argument("--iterations", type=int, default=3000, help="iterations (3000)")
    rules.add_argument("--seed", type=_seed, default=0, help="study seed, 0 <= seed < 2**32")
    _add_output_options(rules, "results/rules")
    prof = commands.add_parser(
        "profile",
        help="time one AGS-GD step against its function evaluations and random numbers",
        description=(
            "Time one jitted AGS-GD step (vmapped over the starts) against its parts, the "
            "function evaluations alone and the random directions alone, for each PRNG "
            "implementation, and print the table: is a step limited by f or by the draws?"
        ),
    )
    prof.add_argument("--function", default="rastrigin", help="test function (rastrigin)")
    prof.add_argument("--dim", type=int, default=100, help="dimension d (100)")
    prof.add_argument("--num-samples", type=int, default=128, help="directions N per step (128)")
    prof.add_argument("--starts", type=int, default=20, help="starts vmapped together (20)")
    blackbox_cli.add_parser(commands)  # python -m agsopt blackbox (agsopt/study/blackbox_cli.py)
    return parser


def output_folder(args: argparse.Namespace) -> str:
    """The folder a ``study`` or ``rules`` command writes: ``--out``, else ``results/study``
    for the default preset, ``results/<preset>`` for another, ``results/rules``."""
    if args.out:
        return args.out
    if args.command == "rules":
        return os.path.join("results", "rules")
    return os.path.join("results", "study" if args.preset == "default" else args.preset)


def _resume_command(argv: Sequence[str]) -> str:
    args = [a for a in argv if a != "--overwrite"]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(["python", "-m", "agsopt", *args])


def _run_in_folder(
    args: argparse.Namespace,
    argv: Sequence[str],
    out: str,
    config: StudyConfig,
    run: Callable[..., StudyResult],
    extra: Callable[[StudyResult, dict[str, str]], None] | None = None,
) -> tuple[StudyResult, dict[str, str]] | None:
    """Check the plot dependency, lock and prepare ``out``, run with one file per finished
    run, write the results (and ``extra``'s files) while still holding the lock.

    Returns the result and the written paths, or None after Ctrl-C (the finished runs stay
    in ``out/runs/``, the command to resume is printed). An OSError while writing becomes
    :class:`_WriteFailed` with one line naming the file and what to do.
    """
    if not args.no_plots:
        require_matplotlib()
    total = len(config.functions) * len(config.optimizers)
    done = 0
    try:
        with lock_folder(out):
            completed = prepare_folder(out, config, overwrite=args.overwrite, resume=args.resume)
            if completed:
                print(f"resuming in {out}: {len(completed)} of {total} runs already finished")
            done = len(completed)

            def on_run(result) -> None:
                nonlocal done
                save_run(out, result, config)
                done += 1

            try:
                result = run(completed=completed, on_run=on_run, progress=not args.no_progress)
            except KeyboardInterrupt:
                print(
                    f"\ninterrupted: {done} of {total} runs finished and kept in "
                    f"{os.path.join(out, 'runs')}; resume with\n  {_resume_command(argv)}",
                    file=sys.stderr,
                )
                return None
            paths = write_results(result, out, plots=not args.no_plots)
            if extra is not None:
                extra(result, paths)
            return result, paths
    except OutputExistsError:
        raise
    except OSError as error:
        target = error.filename or out
        kept = f"the {done} finished runs stay in {os.path.join(out, 'runs')}; " if done else ""
        fix = "make room on the disk (or choose a writable --out)"
        if os.path.exists(out) and not os.path.isdir(out):
            fix = f"--out {out} is a file, not a folder: choose a folder"
        raise _WriteFailed(
            f"cannot write {target}: {error.strerror or error}; {kept}{fix} and run again"
            + (f": {_resume_command(argv)}" if done else "")
        ) from None


def _print_paths(result: StudyResult, paths: dict[str, str]) -> None:
    print(f"\nwall time {result.metadata['wall_seconds']:.1f} s")
    for kind, path in paths.items():
        print(f"{kind:>17}: {path}")


def _note_untuned(config: StudyConfig) -> None:
    """Say which functions run with settings derived from their box (not tuned)."""
    untuned = [n for n in config.functions if not is_tuned(resolve_function(n, config.dim))]
    if untuned:
        print(
            f"note: {', '.join(untuned)}: no tuned settings; GD forms use lr = 1/L̂ (the "
            "largest curvature seen on random lines through the box), Adam forms lr and σ "
            "in proportion to the box width (see agsopt.study.registry)",
            file=sys.stderr,
        )


def _study(args: argparse.Namespace, argv: Sequence[str]) -> int:
    if args.list:
        print("functions:", ", ".join(function_names()))
        print("optimizers:")
        for name in OPTIMIZERS:
            print(f"  {name}")
        print("presets:", ", ".join(sorted(PRESETS)))
        return 0
    config = PRESETS[args.preset].override(
        functions=args.functions,
        optimizers=args.optimizers,
        dim=args.dim,
        starts=args.starts,
        iterations=args.iterations,
        seed=args.seed,
        record_every=args.record_every,
        key_impl=args.key_impl,
    )
    try:
        config.validate()
    except TypeError as error:  # --functions module:attribute that is not a TestFunction
        raise ValueError(str(error)) from None
    _note_untuned(config)
    out = output_folder(args)
    done = _run_in_folder(args, argv, out, config, lambda **kw: run_study(config=config, **kw))
    if done is None:
        return INTERRUPTED
    result, paths = done
    cfg = result.config
    print(
        f"\nd = {cfg.dim}, {cfg.starts} starts, {cfg.iterations} iterations: median final "
        "f − f* [25 %, 75 %] ((f) where f* is unknown)"
    )
    print(result.final_table())
    _print_paths(result, paths)
    return 0


def _rules(args: argparse.Namespace, argv: Sequence[str]) -> int:
    registry = rule_registry(args.rules, args.form)
    config = StudyConfig(
        functions=tuple(args.functions),
        optimizers=tuple(registry),
        dim=args.dim,
        starts=args.starts,
        iterations=args.iterations,
        seed=args.seed,
    ).validate(registry)
    out = output_folder(args)

    def write_table(result: StudyResult, paths: dict[str, str]) -> None:
        paths["rules"] = os.path.join(out, "rules.md")
        _replace_atomically(paths["rules"], rule_table(result) + "\n")

    done = _run_in_folder(
        args,
        argv,
        out,
        config,
        lambda **kw: run_study(config=config, registry=registry, **kw),
        write_table,
    )
    if done is None:
        return INTERRUPTED
    result, paths = done
    table = rule_table(result)
    print(
        f"\nAGS-{args.form} by covariance rule, d = {args.dim}, {args.starts} starts, "
        f"{args.iterations} iterations: median final f − f* [25 %, 75 %]"
    )
    print(table)
    _print_paths(result, paths)
    return 0


def _profile(args: argparse.Namespace) -> int:
    timings = profile_step(args.function, args.dim, args.num_samples, args.starts)
    print(
        f"{args.function}, d = {args.dim}, N = {args.num_samples} antithetic directions "
        f"({2 * args.num_samples} evaluations), {args.starts} starts under vmap; ms per step:"
    )
    for name, ms in timings.items():
        print(f"  {name:28s} {ms:8.3f}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 with a message for bad arguments, a refused
    or locked output folder or an unusable file in it; 1 when a file cannot be written;
    130 after Ctrl-C with the finished runs kept)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "study":
            return _study(args, argv)
        if args.command == "rules":
            return _rules(args, argv)
        if args.command == "blackbox":
            return blackbox_cli.run(args)
        return _profile(args)
    except (ValueError, ImportError, OutputExistsError) as error:
        parser.exit(2, f"python -m agsopt {args.command}: error: {error}\n")
    except _WriteFailed as error:
        parser.exit(IO_FAILED, f"python -m agsopt {args.command}: error: {error}\n")
