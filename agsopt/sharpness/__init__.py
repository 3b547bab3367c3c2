"""Sharpness-aware minimization: the SAM family as Optax gradient transformations.

- :func:`sam`: SAM (Foret et al., arXiv:2010.01412) and, with ``adaptive=True``, ASAM
  (Kwon et al., arXiv:2102.11600).
- :func:`bsam`: Bilateral SAM (arXiv:2409.13173).
- :func:`ausam`: SAM on an adaptively sampled subset of each batch (arXiv:2406.08001).
- :func:`vsam`: SAM steps sampled by the change of the PSF, reused in between
  (arXiv:2403.08821).

Each rewrites the incoming gradient ``g = ∇L(w)`` into the gradient the base optimizer
should step with; the loss reaches it as the keyword argument ``value_fn``. The shared
ascent step lives in :func:`sam_perturbation`.
"""

from agsopt.masking import fill_masked_params
from agsopt.sharpness._ausam import (
    AUSAMState,
    ausam,
    ausam_adlp,
    ausam_f_max,
    ausam_record,
    ausam_sam_on_subset,
    ausam_sample_subset,
    ausam_sampling_probs,
    ausam_select_subset,
    ausam_subset_size,
    ausam_valid_ids,
)
from agsopt.sharpness._bsam import (
    BSAMState,
    bsam,
    bsam_reference_schedules,
    bsam_rho_min_schedule,
)
from agsopt.sharpness._perturbation import (
    mean_over_shards,
    perturbed_gradient,
    sam_perturbation,
)
from agsopt.sharpness._sam import SAMState, asam_weight_mask, sam
from agsopt.sharpness._vsam import (
    VSAMState,
    vsam,
    vsam_block_variance,
    vsam_control,
    vsam_push_records,
    vsam_record_leaves,
    vsam_relative_change,
    vsam_reuse_step,
    vsam_sam_step,
    vsam_sam_step_hint,
    vsam_step_position,
    vsam_window_control,
)

__all__ = [
    "AUSAMState",
    "BSAMState",
    "SAMState",
    "VSAMState",
    "asam_weight_mask",
    "ausam",
    "ausam_adlp",
    "ausam_f_max",
    "ausam_record",
    "ausam_sam_on_subset",
    "ausam_sample_subset",
    "ausam_sampling_probs",
    "ausam_select_subset",
    "ausam_subset_size",
    "ausam_valid_ids",
    "bsam",
    "bsam_reference_schedules",
    "bsam_rho_min_schedule",
    "fill_masked_params",
    "mean_over_shards",
    "perturbed_gradient",
    "sam",
    "sam_perturbation",
    "vsam",
    "vsam_block_variance",
    "vsam_control",
    "vsam_push_records",
    "vsam_record_leaves",
    "vsam_relative_change",
    "vsam_reuse_step",
    "vsam_sam_step",
    "vsam_sam_step_hint",
    "vsam_step_position",
    "vsam_window_control",
]
