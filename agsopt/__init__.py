"""agsopt: anisotropic Gaussian smoothing and sharpness-aware optimizers for Optax.

Two families, each in its own subpackage, every public name re-exported here:

- :mod:`agsopt.smoothing` — Gaussian smoothing (AGS, arXiv:2411.11747, and its isotropic
  baseline IGS): the Monte Carlo estimator (:mod:`agsopt.smoothing.estimator`, also
  importable as :mod:`agsopt.estimator`), the smoothing matrices
  (:mod:`agsopt.covariance`), the rules that adapt them (:mod:`agsopt.covariance_rules`),
  and :func:`ags` with the aliases ``ags_gd``, ``ags_sgd``, ``ags_adam``, ``igs_*``; for
  black-box problems, directional smoothing by Gauss–Hermite quadrature
  (:mod:`agsopt.smoothing.directional`, DGS arXiv:2002.03001) adapted as ASGF does
  (arXiv:2006.10887): :func:`dgs` and the recipe from a box, :func:`dgs_blackbox`.
- :mod:`agsopt.sharpness` — the SAM family: :func:`sam` (ASAM with ``adaptive=True``),
  Bilateral SAM :func:`bsam`, and the sampled variants :func:`ausam` and :func:`vsam`.

Test functions for convergence studies: :mod:`agsopt.functions`. Flax NNX models:
:func:`agsopt.nnx.state_loss` turns a loss of the model into the loss of its parameters'
``nnx.State`` that ``value_fn`` must be (Flax is imported only when it is called).
"""

from agsopt import functions, masking, nnx, sharpness, smoothing, tree_utils
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
    DGSState,
    SmoothedEstimate,
    ags,
    ags_adam,
    ags_gd,
    ags_sgd,
    ask_tell,
    covariance,
    covariance_rules,
    dgs,
    dgs_ask_tell,
    dgs_blackbox,
    dgs_blackbox_ask_tell,
    directional_value_and_grad,
    estimator,
    igs_adam,
    igs_gd,
    igs_sgd,
    smoothed_grad,
    smoothed_value_and_grad,
)

__version__ = "0.2.0"

__all__ = [
    "AGSState",
    "AUSAMState",
    "AskTell",
    "BSAMState",
    "CovarianceRule",
    "DGSState",
    "SAMState",
    "SmoothedEstimate",
    "VSAMState",
    "__version__",
    "ags",
    "ags_adam",
    "ags_gd",
    "ags_sgd",
    "ask_tell",
    "dgs_ask_tell",
    "dgs_blackbox_ask_tell",
    "ausam",
    "bsam",
    "bsam_reference_schedules",
    "bsam_rho_min_schedule",
    "covariance",
    "covariance_rules",
    "dgs",
    "dgs_blackbox",
    "directional_value_and_grad",
    "estimator",
    "fill_masked_params",
    "functions",
    "igs_adam",
    "igs_gd",
    "igs_sgd",
    "masking",
    "nnx",
    "sam",
    "sam_perturbation",
    "sharpness",
    "smoothed_grad",
    "smoothed_value_and_grad",
    "smoothing",
    "tree_utils",
    "vsam",
]
