"""Alias of :mod:`agsopt.smoothing.covariance`: ``agsopt.covariance`` stays importable."""

from agsopt.smoothing import covariance as _module
from agsopt.smoothing.covariance import *  # noqa: F403
from agsopt.smoothing.covariance import __all__  # noqa: F401

__doc__ = _module.__doc__
del _module
