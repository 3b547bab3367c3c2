"""Alias of :mod:`agsopt.study.plotting` (plots of convergence studies), kept so that
``agsopt.plotting.plot_study`` stays importable."""

from agsopt.study.plotting import FLOOR, MATPLOTLIB_HINT, plot_study, require_matplotlib

__all__ = ["FLOOR", "MATPLOTLIB_HINT", "plot_study", "require_matplotlib"]
