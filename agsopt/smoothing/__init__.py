"""Gaussian smoothing: the estimator, the smoothing matrices, the rules that adapt them,
and the ``ags`` transformation (AGS, arXiv:2411.11747; IGS is the isotropic case).

- :mod:`agsopt.smoothing.estimator`: Monte Carlo estimates of f_Σ and ∇f_Σ (pure functions).
- :mod:`agsopt.smoothing.directions`: the search directions the estimator draws.
- :mod:`agsopt.smoothing.directional`: directional Gaussian smoothing by Gauss–Hermite
  quadrature (DGS, arXiv:2002.03001), with per-direction Lipschitz and curvature estimates.
- :mod:`agsopt.smoothing.adaptation`: ASGF's radius, learning-rate and restart rules
  (arXiv:2006.10887) as pure functions.
- :mod:`agsopt.smoothing.covariance`: smoothing matrices Σ.
- :mod:`agsopt.smoothing.covariance_rules`: how Σ adapts from step to step.
- :func:`ags` and the aliases ``ags_gd``, ``ags_sgd``, ``ags_adam``, ``igs_*``.
- :func:`dgs` (adaptive directional smoothing, black-box) and :func:`dgs_blackbox`, the
  whole recipe from a box.
- :func:`ask_tell`: the same optimizers with an ask/tell interface, for a function evaluated
  outside JAX.
"""

from agsopt.smoothing import (
    adaptation,
    covariance,
    covariance_rules,
    directional,
    directions,
    estimator,
)
from agsopt.smoothing._ags import (
    DEFAULT_COVARIANCE,
    AGSState,
    ags,
    ags_adam,
    ags_gd,
    ags_sgd,
    igs_adam,
    igs_gd,
    igs_sgd,
)
from agsopt.smoothing._ask_tell import (
    AskTell,
    Ticket,
    ask_tell,
    dgs_ask_tell,
    dgs_blackbox_ask_tell,
)
from agsopt.smoothing._dgs import DGSState, dgs, dgs_blackbox
from agsopt.smoothing.covariance_rules import CovarianceRule
from agsopt.smoothing.directional import (
    DirectionalEstimate,
    directional_basis,
    directional_points,
    directional_value_and_grad,
)
from agsopt.smoothing.directions import make_noise_table, sample_directions
from agsopt.smoothing.estimator import (
    SmoothedEstimate,
    default_chunk_size,
    evaluations_per_estimate,
    smoothed_grad,
    smoothed_value_and_grad,
)

__all__ = [
    "DEFAULT_COVARIANCE",
    "AGSState",
    "AskTell",
    "CovarianceRule",
    "DGSState",
    "DirectionalEstimate",
    "SmoothedEstimate",
    "Ticket",
    "ags",
    "ags_adam",
    "ags_gd",
    "ags_sgd",
    "adaptation",
    "ask_tell",
    "covariance",
    "covariance_rules",
    "default_chunk_size",
    "dgs_ask_tell",
    "dgs_blackbox_ask_tell",
    "dgs",
    "dgs_blackbox",
    "directional",
    "directional_basis",
    "directional_points",
    "directional_value_and_grad",
    "directions",
    "estimator",
    "evaluations_per_estimate",
    "igs_adam",
    "igs_gd",
    "igs_sgd",
    "make_noise_table",
    "sample_directions",
    "smoothed_grad",
    "smoothed_value_and_grad",
]
