"""Alias of :mod:`agsopt.smoothing.estimator`: ``agsopt.estimator`` stays importable."""

from agsopt.smoothing import estimator as _module
from agsopt.smoothing.estimator import *  # noqa: F403
from agsopt.smoothing.estimator import __all__  # noqa: F401

__doc__ = _module.__doc__
del _module
