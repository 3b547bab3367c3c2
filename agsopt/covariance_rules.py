"""Alias of :mod:`agsopt.smoothing.covariance_rules`, importable as before."""

from agsopt.smoothing import covariance_rules as _module
from agsopt.smoothing.covariance_rules import *  # noqa: F403
from agsopt.smoothing.covariance_rules import __all__  # noqa: F401

__doc__ = _module.__doc__
del _module
