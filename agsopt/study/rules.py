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

__all__ = ["DEFAULT_RULES", "RULE_FUNCTIONS", "compare_rules", "rule_table"]

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


def rule_table(result: StudyResult, *, iqr: bool = True) -> str:
    """Markdown: median final f − f* [25 %, 75 %] per rule and the ratio to the first rule.

    The last columns divide each rule's median by the first optimizer's (the baseline,
    e.g. IGS): below 1 is better. Where f* is unknown the table shows f and the difference
    ``median − baseline median`` instead (negative is better).
    """
    names = list(result.config.optimizers)
    base = names[0]
    header = [f"function (d = {result.config.dim})"] + names
    header += [f"{n.split(':')[-1]} / {base.split(':')[-1]}" for n in names[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for function in result.config.functions:
        finals = [result.run(function, n).final() for n in names]
        cells = []
        for median, q25, q75 in finals:
            cells.append(
                format_value(median)
                + (f" [{format_value(q25)}, {format_value(q75)}]" if iqr else "")
            )
        known = result.run(function, base).gaps is not None
        for median, _, _ in finals[1:]:
            if not known:
                cells.append(f"{median - finals[0][0]:+.3g} (f diff.)")
            elif finals[0][0] > 0:
                cells.append(f"{median / finals[0][0]:.2f}")
            else:
                cells.append("=" if median == 0 else "inf")
        lines.append(f"| {function}{'' if known else ' (f)'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
