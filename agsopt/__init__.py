"""agsopt: anisotropic Gaussian smoothing and sharpness-aware optimizers for Optax.

Two families, each in its own subpackage, every public name re-exported here:

- :mod:`agsopt.smoothing` — Gaussian smoothing (AGS, arXiv:2411.11747, and its isotropic
  baseline IGS): the Monte Carlo estimator (:mod:`agsopt.smoothing.estimator`, also
  importable as :mod:`agsopt.estimator`), the smoothing matrices
  (:mod:`agsopt.covariance`), the rules that adapt them (:mod:`agsopt.covariance_rules`),
  and :func:`ags` with the aliases ``ags_gd``, ``ags_sgd``, ``ags_adam``, ``igs_*``.
- :mod:`agsopt.sharpness` — the SAM family: :func:`sam` (ASAM with ``adaptive=True``),
  Bilateral SAM :func:`bsam`, and the sampled variants :func:`ausam` and :func:`vsam`.

Test functions for convergence studies: :mod:`agsopt.functions`.
"""

from agsopt import functions, sharpness, smoothing, tree_utils
from agsopt.sharpness import (
    AUSAMState,
    BSAMState,
    SAMState,
    VSAMState,
    ausam,
    bsam,
    bsam_reference_schedules,
    bsam_rho_min_schedule,
    fill_masked_params,
    sam,
    sam_perturbation,
    vsam,
)
from agsopt.smoothing import (
    AGSState,
    AskTell,
    CovarianceRule,
    SmoothedEstimate,
    ags,
    ags_adam,
    ags_gd,
    ags_sgd,
    ask_tell,
    covariance,
    covariance_rules,
    estimator,
    igs_adam,
    igs_gd,
    igs_sgd,
    smoothed_grad,
    smoothed_value_and_grad,
)

__version__ = "0.1.0"

__all__ = [
    "AGSState",
    "AUSAMState",
    "AskTell",
    "BSAMState",
    "CovarianceRule",
    "SAMState",
    "SmoothedEstimate",
    "VSAMState",
    "__version__",
    "ags",
    "ags_adam",
    "ags_gd",
    "ags_sgd",
    "ask_tell",
    "ausam",
    "bsam",
    "bsam_reference_schedules",
    "bsam_rho_min_schedule",
    "covariance",
    "covariance_rules",
    "estimator",
    "fill_masked_params",
    "functions",
    "igs_adam",
    "igs_gd",
    "igs_sgd",
    "sam",
    "sam_perturbation",
    "sharpness",
    "smoothed_grad",
    "smoothed_value_and_grad",
    "smoothing",
    "tree_utils",
    "vsam",
]
