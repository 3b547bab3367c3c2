"""agsopt: anisotropic Gaussian smoothing and sharpness-aware optimizers for Optax.

Smoothing (arXiv:2411.11747): :func:`ags` and the aliases ``ags_gd``, ``ags_sgd``,
``ags_adam`` with their isotropic baselines ``igs_*``; the estimator lives in
:mod:`agsopt.estimator`, the smoothing matrices in :mod:`agsopt.covariance` and the rules
that adapt them in :mod:`agsopt.covariance_rules`.

Test functions for convergence studies: :mod:`agsopt.functions`.

Sharpness-aware minimization: :func:`sam` (and ASAM with ``adaptive=True``), Bilateral SAM
:func:`bsam`, and the sampled variants :func:`ausam` and :func:`vsam`.
"""

from agsopt import covariance, covariance_rules, estimator, functions, tree_utils
from agsopt.ags import (
    AGSState,
    ags,
    ags_adam,
    ags_gd,
    ags_sgd,
    igs_adam,
    igs_gd,
    igs_sgd,
)
from agsopt.ausam import AUSAMState, ausam
from agsopt.bsam import BSAMState, bsam, bsam_rho_min_schedule
from agsopt.covariance_rules import CovarianceRule
from agsopt.estimator import SmoothedEstimate, smoothed_grad, smoothed_value_and_grad
from agsopt.sam import SAMState, sam, sam_perturbation
from agsopt.vsam import VSAMState, vsam

__version__ = "0.1.0"

__all__ = [
    "AGSState",
    "AUSAMState",
    "BSAMState",
    "CovarianceRule",
    "SAMState",
    "SmoothedEstimate",
    "VSAMState",
    "ags",
    "ags_adam",
    "ags_gd",
    "ags_sgd",
    "ausam",
    "bsam",
    "bsam_rho_min_schedule",
    "covariance",
    "covariance_rules",
    "estimator",
    "functions",
    "igs_adam",
    "igs_gd",
    "igs_sgd",
    "sam",
    "sam_perturbation",
    "smoothed_grad",
    "smoothed_value_and_grad",
    "tree_utils",
    "vsam",
]
