"""Plots of convergence studies; matplotlib is imported lazily.

``import agsopt.study`` does not need matplotlib; :func:`plot_study` imports it when called
(with the non-interactive Agg backend unless a backend is already chosen), so install
``agsopt[study]`` to use it. :func:`require_matplotlib` checks for it up front, so that a
study that is to be plotted fails before it runs, not after.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

import numpy as np

from agsopt.study.results import StudyResult

__all__ = ["FLOOR", "MATPLOTLIB_HINT", "plot_study", "require_matplotlib"]

MATPLOTLIB_HINT = (
    'the plots need matplotlib, which is not installed: pip install "agsopt[study]" '
    "(or run without plots: --no-plots / plots=False)"
)

FLOOR = 1e-16
"""Values of ``f − f*`` below this are drawn at it on the log scale (exact zeros included)."""

_STYLES = {
    "ags-gd": ("tab:red", "-", "o"),
    "igs-gd": ("tab:orange", "--", "s"),
    "gd": ("tab:gray", ":", "x"),
    "ags-adam": ("tab:blue", "-", "^"),
    "igs-adam": ("tab:cyan", "--", "v"),
    "adam": ("tab:green", "-.", "+"),
}
"""Colour, line style and marker of the registry's optimizers: no two share a style and a
marker, so that curves with equal values (GD and Adam stuck in the same local minimum)
stay visible."""

_MARKERS = "os^vDP*Xph<>"
_LINESTYLES = ("-", "--", "-.", ":")
_MARKS_PER_LINE = 8


def _save_atomically(fig: Any, path: str | os.PathLike[str]) -> None:
    """``fig.savefig(path)`` through a temporary file, removed if saving fails."""
    path = os.fspath(path)
    tmp = f"{path}.tmp"
    suffix = os.path.splitext(path)[1].lstrip(".") or None
    try:
        fig.savefig(tmp, dpi=110, format=suffix)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def require_matplotlib() -> None:
    """Raise ImportError with an install hint (:data:`MATPLOTLIB_HINT`) if matplotlib is
    missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as error:
        raise ImportError(MATPLOTLIB_HINT) from error


def _pyplot() -> Any:
    require_matplotlib()
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_study(
    result: StudyResult,
    path: str | os.PathLike[str] | None = None,
    *,
    x: str = "iterations",
    optimizers: list[str] | None = None,
    functions: list[str] | None = None,
    columns: int | None = None,
    title: str | None = None,
) -> Any:
    """Median over the starts with a 25–75 % band, one panel per function.

    Each optimizer has its own colour, line style and marker (markers at staggered steps),
    so curves with the same values stay distinguishable.

    The y axis shows ``f − f*`` on a log scale (floored at :data:`FLOOR`) where the
    minimum is known, else ``f`` on a linear scale.

    Args:
      result: a :class:`~agsopt.study.StudyResult`.
      path: where to save the PNG (None: do not save).
      x: ``"iterations"`` or ``"evaluations"`` (function evaluations, see
        :mod:`agsopt.study.registry` for the convention).
      optimizers, functions: subsets to draw (default: all, in the study's order).
      columns: panels per row (default: up to 3).
      title: the figure title (default: dimension, starts and iterations).

    Returns:
      The matplotlib Figure.
    """
    if x not in ("iterations", "evaluations"):
        raise ValueError(f"x must be 'iterations' or 'evaluations', got {x!r}")
    cfg = result.config
    functions = list(cfg.functions) if functions is None else list(functions)
    optimizers = list(cfg.optimizers) if optimizers is None else list(optimizers)
    plt = _pyplot()
    columns = columns or min(3, len(functions))
    rows = math.ceil(len(functions) / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(4.6 * columns, 3.6 * rows), squeeze=False, constrained_layout=True
    )
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, name in enumerate(functions):
        ax = axes[index // columns][index % columns]
        log = True
        for k, opt in enumerate(optimizers):
            run = result.run(name, opt)
            q25, q50, q75 = run.quantiles()
            log = run.gaps is not None
            if log:
                q25, q50, q75 = (np.maximum(q, FLOOR) for q in (q25, q50, q75))
            xs = run.iterations if x == "iterations" else run.evaluations
            if x == "evaluations":  # log axis: leave out step 0
                xs, q25, q50, q75 = xs[1:], q25[1:], q50[1:], q75[1:]
            color, style, marker = _STYLES.get(
                opt,
                (
                    palette[k % len(palette)],
                    _LINESTYLES[k % len(_LINESTYLES)],
                    _MARKERS[k % len(_MARKERS)],
                ),
            )
            # markers at staggered points, so that coinciding curves show every marker
            every = max(1, len(xs) // _MARKS_PER_LINE)
            start = (k * every) // max(1, len(optimizers)) % every
            ax.plot(
                xs,
                q50,
                linestyle=style,
                marker=marker,
                markevery=(start, every),
                markersize=5,
                color=color,
                lw=1.8,
                label=opt,
            )
            ax.fill_between(xs, q25, q75, color=color, alpha=0.18, lw=0)
        ax.set_yscale("log" if log else "linear")
        if x == "evaluations":
            ax.set_xscale("log")
        ax.set_title(name)
        ax.set_xlabel("iteration" if x == "iterations" else "function evaluations")
        ax.set_ylabel("f − f*" if log else "f")
        ax.grid(True, which="major", alpha=0.3)
    for index in range(len(functions), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6))
    fig.suptitle(title or f"d = {cfg.dim}, {cfg.starts} starts: median and 25–75 % band")
    if path is not None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        _save_atomically(fig, path)
        plt.close(fig)
    return fig
