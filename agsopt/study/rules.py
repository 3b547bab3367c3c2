"""Covariance rules against each other: AGS with each rule at equal evaluations.

:func:`compare_rules` is a study over :func:`agsopt.study.registry.rule_registry`
(optimizers that differ only in the covariance rule); :func:`rule_table` turns its result
into a Markdown table of ratios to the first rule (the baseline, e.g. IGS).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from agsopt import functions as fns
from agsopt.study.registry import rule_registry
from agsopt.study.results import RunResult, StudyResult, format_value
from agsopt.study.runner import run_study

__all__ = [
    "DEFAULT_RULES",
    "RULE_FUNCTIONS",
    "compare_rules",
    "equal_evaluation_baselines",
    "rule_table",
]

RULE_FUNCTIONS = (
    *fns.names(),
    "rotated_ellipsoid",
    "rotated_mixed_asymmetric",
    "rotated_rastrigin",
    "rotated_rastrigin_multifrequency",
    "rotated_rosenbrock",
)
"""The functions of the rule comparison: every plain one (the direction-dependent
``rastrigin_multifrequency`` and ``mixed_asymmetric`` included) and five rotated ones."""

DEFAULT_RULES = (
    "isotropic",
    "gradient_aligned",
    "adaptive_gradient_aligned",
    "scaled_isotropic",
    "scaled_adaptive_gradient_aligned",
)
"""The rules :func:`compare_rules` compares by default, IGS (the baseline) first: the shape
rules and the σ-scale rule (:func:`agsopt.covariance_rules.scaled`) on IGS and on the
default shape."""


def compare_rules(
    functions: Sequence[str] = RULE_FUNCTIONS,
    rules: Sequence[str] = DEFAULT_RULES,
    *,
    form: str = "adam",
    dim: int = 100,
    starts: int = 20,
    iterations: int = 3000,
    seed: int = 0,
    progress: bool = True,
    completed: Mapping[tuple[str, str], RunResult] | None = None,
    on_run: Callable[[RunResult], None] | None = None,
) -> StudyResult:
    """AGS with each covariance rule in ``rules`` (the first is the baseline) on ``functions``.

    A study over :func:`~agsopt.study.registry.rule_registry` (optimizer names
    ``"<form>:<rule>"``); ``completed`` and ``on_run`` as in :func:`run_study`.
    :func:`rule_table` turns it into Markdown.
    """
    registry = rule_registry(rules, form)
    return run_study(
        functions,
        list(registry),
        dim=dim,
        starts=starts,
        iterations=iterations,
        seed=seed,
        registry=registry,
        progress=progress,
        completed=completed,
        on_run=on_run,
    )


def equal_evaluation_baselines(
    result: StudyResult,
    optimizers: Sequence[str] = ("gd", "adam"),
    *,
    progress: bool = False,
) -> StudyResult:
    """The gradient methods ``optimizers`` (names of :data:`agsopt.study.OPTIMIZERS`) on
    ``result``'s functions, dimension, starts and seed, given as many evaluations as the
    first rule of ``result`` spent: ``iterations × evaluations per AGS step`` steps of one
    evaluation each (a gradient counts 1). Pass it to :func:`rule_table` as ``baselines``.
    """
    config = result.config
    first = result.run(config.functions[0], config.optimizers[0])
    budget = int(first.evaluations[-1])
    return run_study(
        config.functions,
        list(optimizers),
        dim=config.dim,
        starts=config.starts,
        iterations=budget,
        seed=config.seed,
        key_impl=config.key_impl,
        progress=progress,
    )


def rule_table(
    result: StudyResult, *, iqr: bool = True, baselines: StudyResult | None = None
) -> str:
    """Markdown: median final f − f* [25 %, 75 %] per rule and the ratio to the first rule.

    The last columns divide each rule's median by the first optimizer's (the baseline,
    e.g. IGS): below 1 is better, written with 3 significant digits (scientific notation
    outside [10⁻³, 10⁴), as :func:`~agsopt.study.results.format_value`). Where f* is
    unknown the table shows f and the difference ``median − baseline median`` instead
    (negative is better). ``baselines`` (from :func:`equal_evaluation_baselines`) adds a
    column per gradient method, at the same number of evaluations as the rules' last step
    (ValueError if the budgets differ).
    """
    names = list(result.config.optimizers)
    base = names[0]
    extra = [] if baselines is None else list(baselines.config.optimizers)
    header = [f"function (d = {result.config.dim})"] + names
    header += [f"{n} (equal evaluations)" for n in extra]
    header += [f"{n.split(':')[-1]} / {base.split(':')[-1]}" for n in names[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for function in result.config.functions:
        runs = [result.run(function, n) for n in names]
        finals = [run.final() for run in runs]
        cells = []
        for name in extra:
            run = baselines.run(function, name)
            if int(run.evaluations[-1]) != int(runs[0].evaluations[-1]):
                raise ValueError(
                    f"baselines: {name} on {function} spent {int(run.evaluations[-1])} "
                    f"evaluations, the rules {int(runs[0].evaluations[-1])}"
                )
        for median, q25, q75 in finals + [baselines.run(function, n).final() for n in extra]:
            cells.append(
                format_value(median)
                + (f" [{format_value(q25)}, {format_value(q75)}]" if iqr else "")
            )
        known = result.run(function, base).gaps is not None
        for median, _, _ in finals[1:]:
            if not known:
                cells.append(f"{median - finals[0][0]:+.3g} (f diff.)")
            elif finals[0][0] > 0:
                cells.append(format_value(median / finals[0][0]))
            else:
                cells.append("=" if median == 0 else "inf")
        lines.append(f"| {function}{'' if known else ' (f)'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
