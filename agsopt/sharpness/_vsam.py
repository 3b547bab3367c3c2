"""vSAM: SAM with adaptively sampled SAM steps and PSF reuse (arXiv:2403.08821).

SAM's gradient (arXiv:2010.01412) is, to first order, ``g_s = ∇L(w + ρĝ) ≈ g + ρ H ĝ``: the
plain gradient plus the Projection of the Second-order matrix onto the First-order gradient
(PSF). vSAM (reference code github.com/ajiaaa/vSAM, read, not copied) computes the PSF as
the finite difference ``psf = g_s − g`` on sampled *SAM steps* only, reuses it with a decaying
weight on the steps in between, and adapts how many SAM steps it takes from how fast the PSF
changes. ``update`` receives ``g = ∇L(w)`` as its updates, like :func:`agsopt.sam`::

    SAM step:    ε = ρ g/(‖g‖ + eps);  g_s = ∇L(w + ε);  psf ← g_s − g;  output g_s;  r_w ← 1
                 record  ratio = ‖psf‖_last/(‖g‖_last + eps)  and  ‖psf‖_last
    other step:  if r_w > β^R  (R = reuse_steps = 6):  r_w ← β r_w;  output g + r_w·psf
                 else                                            output g

so after a SAM step the PSF is added with weights β, β², …, β⁶ and then dropped.
``‖·‖_last`` is the Euclidean norm over the leaves that ``last_layer`` selects
(:func:`vsam_record_leaves`). The reference takes the last 10 tensors of
``model.parameters()``, i.e. the layers nearest the output. An int ``last_layer = N``
(default 10) takes the last N leaves in ``jax.tree.leaves`` order, which for dicts is the
*sorted key order*, not the order the layers were defined or run in: ``{"conv": …,
"dense": …, "head": …}`` happens to end with the head, ``{"layer_9": …, "layer_10": …}``
ends with ``layer_9``. With dict pytrees either name layers so that the output side sorts
last, use a list of layers, or pass the leaves explicitly as a mask (Optax's convention: a
pytree of bools with the parameters' structure, or a prefix of it, or a callable ``params ->
mask``), e.g. ``last_layer={"body": False, "head": True}`` or ``last_layer=lambda p:
{"body": False, "head": True}``. ``last_layer=None`` uses every leaf. The ratio ``‖psf‖/‖g‖``
and the norms of the records are these norms; ``ĝ`` in ``ε`` uses the whole pytree.

Histories (fixed-size arrays of length ``K = window``, oldest first, zero before the first
``K`` SAM steps), pushed on every SAM step:

    h_ratio  ← ratio;   h_psf ← ‖psf‖_last;
    h_var    ← mean_{b<w_w} var_unbiased( sort(h_psf)[b·m : (b+1)·m] ),   m = K // w_w

(the variance of ‖psf‖ within ``w_w = var_blocks`` blocks of the *sorted* last K values,
computed after pushing the new norm, as the reference does).

Control, at the start of every window of ``K`` steps after the warm-up::

    Δrel(h)  = clip( mean_{i: h_i > 0} (h_{i+1} − h_i)/h_i , −1, 1 )      (i = 0 … K−2)
    base_sr ← clip( base_sr · (1 + a1·Δrel(h_ratio) + a2·Δrel(h_var)), 1, floor(K·max_p) )
    n        = floor(base_sr);  the window's SAM steps: a uniformly random subset of n of
               its K positions (``permutation(K) < n``, a static-shape boolean schedule)

``base_sr`` starts at 1. The warm-up steps are all SAM steps: as in the reference, 3
epochs, given as ``steps_per_epoch`` (with ``warmup_epochs=3``), or an explicit
``warmup_steps``; one of the two is required (there is no silent default). Under ``jit`` the
SAM/other choice is a ``lax.cond``: only the taken branch runs, so an other step costs one
gradient (the caller's) and never calls ``value_fn``; the records are computed inside the
SAM branch and the window's control inside a ``lax.cond`` on its first step, so an other
step does little besides ``g + r_w·psf``. The state (:class:`VSAMState`) is a
NamedTuple of fixed-size arrays and the stored PSF (a params-shaped pytree); it exposes
``num_sam_steps``, ``base_sr``, the current window's ``schedule`` and ``last_was_sam``.

SAM-step hint (``sam_step``, a static Python bool; default None). XLA:CPU compiles a
``lax.cond`` branch apart from the main program and runs a convolution's gradient there far
slower (≈ 20× on a small conv net), so on CPU a conv net's SAM steps (the whole warm-up
included) cost far more than SAM's. ``update(..., sam_step=True)`` compiles a program whose
SAM step is straight-line code; the other steps keep the default program, which never calls
``value_fn`` on them. :func:`vsam_sam_step_hint` tells the host, from the state, which
program the next step needs (True in the warm-up and at the window's scheduled SAM
positions); the training loop then makes ``sam_step`` a ``static_argnames`` argument of
``jax.jit`` (two programs). The hint never changes the result: with ``sam_step=True`` on a
step that is not a SAM step the program also runs the other branch (inside a ``lax.cond``
skipped when the hint is right) and returns it; ``sam_step=False`` is the default program.

Example — a complete training loop::

    import functools

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from agsopt import vsam
    from agsopt.sharpness import vsam_sam_step_hint

    rng = np.random.default_rng(0)
    x_all = rng.normal(size=(2048, 16)).astype(np.float32)
    y_all = np.argmax(x_all[:, :4] + 0.3 * rng.normal(size=(2048, 4)), 1)
    sizes = (16, 64, 4)
    keys = jax.random.split(jax.random.key(0), len(sizes) - 1)
    params = [  # a list of layers: jax.tree.leaves order is input → output
        {"b": jnp.zeros(o), "w": jax.random.normal(k, (i, o)) / np.sqrt(i)}
        for k, i, o in zip(keys, sizes[:-1], sizes[1:])
    ]

    def loss_fn(params, x, y):
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        logits = x @ params[-1]["w"] + params[-1]["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    batch, steps_per_epoch = 128, 16
    opt = optax.chain(
        vsam(rho=0.05, steps_per_epoch=steps_per_epoch, window=50, last_layer=2, key=0),
        optax.add_decayed_weights(1e-3),
        optax.sgd(0.05, momentum=0.9),
    )
    opt_state = opt.init(params)

    @functools.partial(jax.jit, static_argnames="sam_step")
    def train_step(params, opt_state, x, y, sam_step):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(
            grads, opt_state, params, value_fn=lambda p: loss_fn(p, x, y), sam_step=sam_step
        )
        return optax.apply_updates(params, updates), opt_state, loss

    for epoch in range(20):
        order = rng.permutation(len(x_all))
        for s in range(steps_per_epoch):
            idx = order[s * batch : (s + 1) * batch]
            # which program: reads the state (waits for the last step); warm-up = 3 epochs
            sam_step = vsam_sam_step_hint(opt_state[0], warmup_steps=3 * steps_per_epoch)
            params, opt_state, loss = train_step(
                params, opt_state, x_all[idx], y_all[idx], sam_step=sam_step
            )
    vstate = opt_state[0]
    print(int(vstate.num_sam_steps), "SAM steps of", int(vstate.count), float(loss))

Deviations from the reference, and why:

- *Placement of SAM steps.* The reference takes a SAM step with probability ``base_sr/K``
  while fewer than ``n`` were taken, and forces the remaining ones at the end of the
  window; we draw the ``n`` positions uniformly at the window start. Both give exactly
  ``n`` SAM steps per window; ours is a fixed-shape schedule that lives in the state.
- *First window.* In the reference the first ``K − 1`` steps after the warm-up take no SAM
  step at all (its window counter starts at 1 and its in-window counter is left at 1 by the
  warm-up); the first control update then uses the warm-up history. We apply that control
  update at the first post-warm-up step and start regular windows of ``K`` steps there.
- *Warm-up in steps.* The reference counts epochs (``epoch < 3``); a gradient
  transformation counts steps, so the warm-up is ``warmup_epochs·steps_per_epoch`` steps,
  the same schedule when every epoch has ``steps_per_epoch`` steps.
- *Zero entries.* The reference divides by zero-initialized history entries when fewer than
  ``K`` SAM steps have been recorded; ``Δrel`` averages only over pairs with ``h_i > 0``
  (0 if there is none). The ratio ``‖psf‖/‖g‖`` gets ``+ eps`` in its denominator.
- *r_w > β⁶* is evaluated with an integer counter of reuse steps (``reuse_count < R``), equal
  in exact arithmetic and immune to the rounding of ``β·β·…`` against ``β⁶``.
- ``reuse_steps`` (R, default 6) and ``axis_name`` are additions. With ``axis_name``
  (m-sharpness under ``shard_map``/``pmap``) each shard perturbs with its own ĝ; ``g_s``
  and ``g`` are averaged over the axis, so the PSF, the records and every output are
  identical on all shards, and so is the SAM schedule (the key is not folded per shard).
- ``steps_per_epoch``, ``warmup_epochs``, ``warmup_steps``, ``window``, ``var_blocks``,
  ``last_layer`` and ``reuse_steps`` are static. ``var_blocks`` must leave at least 2
  values per block (unbiased variance); as in the reference, ``K mod var_blocks`` largest
  values are left out of the blocks, and the cap is ``int(K·max_p)``.

Precision: ``psf_weight``, ``base_sr`` and the histories have the parameters' float dtype
promoted with float32 (float64 for float64 parameters under x64, as the reference's Python
floats), fixed at ``init``, so the reuse step ``g + r_w·psf`` is exact to the parameters'
precision; every state field keeps its dtype and shape across steps (``lax.scan`` carries
it).

A scheduled or injected ρ is checked at every step (as :func:`agsopt.sam` does): a SAM
step at which it is not finite and ≥ 0 is skipped (zero update; PSF, reuse weight and
records kept; not a SAM step in ``num_sam_steps``/``last_was_sam``) and counted in
``num_skipped``; reuse steps do not use ρ.

Non-finite values: on a SAM step whose ``g_s`` (or ratio) is not finite (the loss is
NaN/inf at ``w + ε``), the update ``g_s`` is passed on as computed, for the caller to see
(e.g. ``optax.apply_if_finite`` around the base optimizer), but neither the PSF nor the
records are changed: the state keeps its last finite PSF. A non-finite incoming ``g`` on
a reuse step gives a non-finite update and leaves the PSF untouched.

``rho`` may be a schedule ``count -> ρ`` (called with the number of steps taken before the
current one, the Optax convention). ``update`` checks at trace time that the state fits
this configuration (histories and schedule of length ``window``, the key's shape, a PSF
with the parameters' structure and shapes) and raises ``ValueError`` otherwise, e.g. for a
checkpoint restored into a differently configured ``vsam``.

The update is a short glue of pure kernels, each usable and testable on its own:
:func:`vsam_step_position` (warm-up and window position), :func:`vsam_window_control`
(:func:`vsam_control` and the window's schedule), :func:`vsam_sam_step` (the SAM branch:
``g_s``, the PSF and :func:`vsam_push_records`), :func:`vsam_reuse_step` (the other
branch) and :func:`vsam_record_leaves` (the leaves the records run over).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agsopt import _validation as validation
from agsopt._control_flow import choose_branch
from agsopt.sharpness._ausam import _saturating_add
from agsopt.sharpness._hinted import check_phase_hint, run_hinted_branch
from agsopt.sharpness._perturbation import (
    Radius,
    check_gradient_call,
    check_radius,
    mean_over_shards,
    perturbed_gradient,
    radius_at,
    sam_perturbation,
)
from agsopt.sharpness._sam import count_skip, radius_is_static, radius_is_valid
from agsopt.tree_utils import (
    key_for_state,
    split_state_key,
    statistics_dtype,
    tree_add_scaled,
    tree_all_finite,
    tree_norm,
)

PyTree = Any
LastLayer = int | None | PyTree | Callable[[PyTree], PyTree]
Histories = tuple[jax.Array, jax.Array, jax.Array]

__all__ = [
    "VSAMState",
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


class VSAMState(NamedTuple):
    """State of :func:`vsam`.

    Float scalars and histories have the *statistics dtype* fixed at ``init``: the
    parameters' float dtypes promoted with float32 (float64 for float64 parameters under
    x64); every update keeps every field's dtype and shape.

    Attributes:
      count: steps taken (int32).
      key: raw PRNG key data (``jax.random.key_data``), split every step.
      psf: the last PSF ``g_s − g`` (params-shaped; zeros before the first SAM step).
      psf_weight: ``r_w`` of the last step (1 after a SAM step, then β, β², …).
      reuse_count: reuse steps since the last SAM step (``reuse_steps`` = no reuse left).
      base_sr: the controlled number of SAM steps per window (in [1, K·max_p]).
      schedule: bool[K], the SAM positions of the current window.
      num_sam_steps: SAM steps taken so far, warm-up included (int32, saturating).
      last_was_sam: whether the last step was a SAM step.
      ratio_history: [K], ``‖psf‖/‖g‖`` of the last K SAM steps, oldest first.
      psf_norm_history: [K], ``‖psf‖`` of the last K SAM steps, oldest first.
      var_history: [K], block variance of ``psf_norm_history`` at the last K SAM steps,
        oldest first.
      num_skipped: SAM steps skipped because a scheduled or injected ρ was not finite and
        ≥ 0 (int32, saturating): zero update, PSF, weights and records kept.
    """

    count: jax.Array
    key: jax.Array
    psf: PyTree
    psf_weight: jax.Array
    reuse_count: jax.Array
    base_sr: jax.Array
    schedule: jax.Array
    num_sam_steps: jax.Array
    last_was_sam: jax.Array
    ratio_history: jax.Array
    psf_norm_history: jax.Array
    var_history: jax.Array
    num_skipped: jax.Array


def _float(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def vsam_block_variance(psf_norm_history: jax.Array, var_blocks: int) -> jax.Array:
    """Mean over ``var_blocks`` blocks of the unbiased variance of the sorted history.

    ``m = K // var_blocks`` values per block; block ``b`` holds ``sort(h)[b·m:(b+1)·m]``.
    """
    h = jnp.sort(_float(psf_norm_history))
    m = h.shape[0] // var_blocks
    blocks = h[: var_blocks * m].reshape(var_blocks, m)
    return jnp.mean(jnp.var(blocks, axis=1, ddof=1))


def vsam_relative_change(history: jax.Array) -> jax.Array:
    """``clip(mean_{i: h_i > 0} (h_{i+1} − h_i)/h_i, −1, 1)``; 0 if no ``h_i`` is positive."""
    h = _float(history)
    prev, nxt = h[:-1], h[1:]
    ok = prev > 0
    rel = jnp.where(ok, (nxt - prev) / jnp.where(ok, prev, 1.0), 0.0)
    mean = jnp.sum(rel) / jnp.maximum(jnp.sum(ok), 1).astype(h.dtype)
    return jnp.clip(mean, -1.0, 1.0)


def vsam_control(
    base_sr: jax.Array,
    ratio_history: jax.Array,
    var_history: jax.Array,
    a1: float | jax.Array,
    a2: float | jax.Array,
    max_sr: float | jax.Array,
) -> jax.Array:
    """``clip(base_sr·(1 + a1·Δrel(h_ratio) + a2·Δrel(h_var)), 1, max_sr)``, in base_sr's
    dtype (promoted with float32)."""
    base_sr = _float(base_sr)
    factor = 1.0 + a1 * vsam_relative_change(ratio_history) + a2 * vsam_relative_change(var_history)
    return jnp.clip(base_sr * factor, 1.0, max_sr).astype(base_sr.dtype)


def vsam_step_position(
    count: jax.Array, warmup_steps: int, window: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(in_warmup, pos, window_start)`` of step ``count`` (0-based).

    ``in_warmup = count < warmup_steps``; after the warm-up, windows of ``window`` steps
    start at ``warmup_steps``: ``pos = (count − warmup_steps) mod window`` (0 in the
    warm-up) and ``window_start = ¬in_warmup ∧ pos = 0``.
    """
    post = count - warmup_steps
    in_warmup = post < 0
    pos = jnp.maximum(post, 0) % window
    return in_warmup, pos, jnp.logical_and(~in_warmup, pos == 0)


def vsam_window_control(
    key: jax.Array,
    base_sr: jax.Array,
    ratio_history: jax.Array,
    var_history: jax.Array,
    a1: float | jax.Array,
    a2: float | jax.Array,
    max_sr: float | jax.Array,
    window: int,
) -> tuple[jax.Array, jax.Array]:
    """A new window: ``(base_sr', schedule)``.

    ``base_sr' = vsam_control(base_sr, …)`` and ``schedule`` a bool[window] with exactly
    ``n = floor(base_sr')`` True entries at uniformly random positions
    (``permutation(window) < n``).
    """
    new_sr = vsam_control(base_sr, ratio_history, var_history, a1, a2, max_sr)
    num_sam = jnp.floor(new_sr).astype(jnp.int32)
    return new_sr, jax.random.permutation(key, window) < num_sam


def _push(history: jax.Array, value: jax.Array) -> jax.Array:
    return jnp.concatenate([history[1:], jnp.reshape(value, (1,)).astype(history.dtype)])


def vsam_push_records(
    histories: Histories,
    psf_norm: jax.Array,
    grad_norm: jax.Array,
    var_blocks: int,
    eps: float = 1e-12,
) -> Histories:
    """Push one SAM step's records onto ``(h_ratio, h_psf, h_var)`` (oldest first):

    ``h_ratio ← ‖psf‖/(‖g‖ + eps)``, ``h_psf ← ‖psf‖`` and ``h_var ← vsam_block_variance``
    of the *pushed* ``h_psf``, each dropping its oldest entry; dtypes are kept.
    """
    ratio_history, norm_history, var_history = histories
    pushed_norms = _push(norm_history, psf_norm)
    return (
        _push(ratio_history, _float(psf_norm) / (_float(grad_norm) + eps)),
        pushed_norms,
        _push(var_history, vsam_block_variance(pushed_norms, var_blocks)),
    )


def vsam_record_leaves(tree: PyTree, last_layer: LastLayer, params: PyTree = None) -> list:
    """The leaves of ``tree`` the recorded norms run over.

    ``last_layer``: an int N, the last N leaves in ``jax.tree.leaves`` order (the
    reference's last N tensors of ``model.parameters()``); None, every leaf; or a mask in
    Optax's convention, a pytree of bools with the structure of the parameters (or a prefix
    of it) or a callable ``params -> such a pytree``, selecting the True leaves. ``params``
    (default ``tree``) is what a callable mask is called with.
    """
    leaves = jax.tree.leaves(tree)
    if last_layer is None:
        return leaves
    if isinstance(last_layer, int) and not isinstance(last_layer, bool):
        return leaves[-last_layer:]
    mask = last_layer(tree if params is None else params) if callable(last_layer) else last_layer
    for m in jax.tree.leaves(mask):
        if not isinstance(m, (bool, np.bool_)):
            raise TypeError(
                f"last_layer: a mask must hold Python/NumPy bools (static), got {type(m).__name__}"
            )
    try:
        full = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: bool(m), sub), mask, tree)
    except ValueError as err:
        raise ValueError(
            "last_layer: the mask must have the structure of the parameters (or a prefix of "
            f"it); mask {jax.tree.structure(mask)} vs parameters {jax.tree.structure(tree)}"
        ) from err
    chosen = [leaf for m, leaf in zip(jax.tree.leaves(full), leaves, strict=True) if m]
    if not chosen:
        raise ValueError("last_layer: the mask selects no leaf")
    return chosen


def vsam_sam_step(
    value_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    local_grads: PyTree,
    grads: PyTree,
    psf: PyTree,
    histories: Histories,
    rho: float | jax.Array,
    *,
    last_layer: LastLayer = None,
    var_blocks: int = 5,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> tuple[PyTree, PyTree, Histories]:
    """A SAM step of vSAM: ``(g_s, psf', histories')``.

    ``ε = ρ g_loc/(‖g_loc‖ + eps)`` from the (shard-local) gradient, ``g_s = ∇L(w + ε)``
    (averaged over ``axis_name``), ``psf' = g_s − g`` with ``g = grads`` the (averaged)
    gradient, and the histories pushed by :func:`vsam_push_records` with the norms over
    :func:`vsam_record_leaves`. If ``psf'`` or the ratio is not finite (the loss is NaN/inf
    at ``w + ε``), ``psf`` and ``histories`` are returned unchanged; ``g_s`` is returned as
    computed. Every output has the dtypes of its input counterpart.
    """
    perturbation = sam_perturbation(local_grads, params, rho, eps=eps)
    sharp = mean_over_shards(perturbed_gradient(value_fn, params, perturbation), axis_name)
    new_psf = jax.tree.map(lambda s, g: s - g, sharp, grads)
    psf_norm = tree_norm(vsam_record_leaves(new_psf, last_layer, params))
    grad_norm = tree_norm(vsam_record_leaves(grads, last_layer, params))
    records = vsam_push_records(histories, psf_norm, grad_norm, var_blocks, eps)
    finite = tree_all_finite(new_psf) & jnp.isfinite(records[0][-1])
    keep = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old).astype(old.dtype),
        (new_psf, records),
        (psf, histories),
    )
    sharp = jax.tree.map(lambda s, g: s.astype(g.dtype), sharp, local_grads)
    return sharp, keep[0], keep[1]


def vsam_reuse_step(
    grads: PyTree,
    psf: PyTree,
    psf_weight: jax.Array,
    reuse_count: jax.Array,
    beta: float | jax.Array,
    reuse_steps: int,
) -> tuple[PyTree, jax.Array, jax.Array]:
    """A non-SAM step of vSAM: ``(g + r·psf, r_w', reuse_count')``.

    While ``reuse_count < reuse_steps`` (the reference's ``r_w > β^R``): ``r = β·r_w``,
    ``r_w' = r``, ``reuse_count' = reuse_count + 1``; otherwise ``r = 0`` (the output is
    ``g`` exactly) and both are unchanged. ``r`` is computed in ``psf_weight``'s dtype.
    """
    can_reuse = reuse_count < reuse_steps
    weight = jnp.where(can_reuse, psf_weight * beta, 0.0).astype(psf_weight.dtype)
    out = tree_add_scaled(grads, weight, psf)
    return (
        out,
        jnp.where(can_reuse, weight, psf_weight),
        jnp.where(can_reuse, reuse_count + 1, reuse_count).astype(reuse_count.dtype),
    )


def vsam_sam_step_hint(state: VSAMState, *, warmup_steps: int) -> bool:
    """Host side: the ``sam_step`` hint for the next ``update`` (reads ``state``, so it waits
    for the last step to finish).

    True when ``state`` already says the next step is a SAM step: in the warm-up
    (``count < warmup_steps``) and at a SAM position of the current window's schedule.
    False otherwise, including the first step of each window, whose schedule that very
    step draws: it runs the default program, correct whichever it turns out to be. A hint
    only picks which program runs; see ``vsam``'s ``sam_step`` and the module docstring.

    Args:
      state: the :class:`VSAMState` (for a chain, its element, e.g. ``opt_state[0]``).
      warmup_steps: the warm-up of this ``vsam`` in steps (``warmup_epochs·steps_per_epoch``
        when it was given in epochs).
    """
    if not isinstance(state, VSAMState):
        raise TypeError(
            f"vsam_sam_step_hint: state must be a VSAMState (e.g. opt_state[0] of a chain), "
            f"got {type(state).__name__}"
        )
    warmup_steps = validation.check_int("warmup_steps", warmup_steps, minimum=0)
    count = int(np.asarray(state.count))
    if count < warmup_steps:
        return True
    schedule = np.asarray(state.schedule)
    pos = (count - warmup_steps) % schedule.shape[0]
    return pos != 0 and bool(schedule[pos])


def _check_last_layer(last_layer: LastLayer) -> LastLayer:
    if last_layer is None or callable(last_layer):
        return last_layer
    if isinstance(last_layer, bool):
        raise TypeError(
            "last_layer must be an int, None (all leaves), a mask pytree of bools or a "
            "callable params -> mask; got a bool"
        )
    if isinstance(last_layer, (int, np.integer)):
        return validation.check_int("last_layer", last_layer, minimum=1)
    leaves = jax.tree.leaves(last_layer)
    if not leaves or not all(isinstance(m, (bool, np.bool_)) for m in leaves):
        raise TypeError(
            "last_layer must be an int, None (all leaves), a mask pytree of bools or a "
            f"callable params -> mask; got {type(last_layer).__name__}"
        )
    if not any(bool(m) for m in leaves):
        raise ValueError("last_layer: the mask selects no leaf")
    return last_layer


def _max_sr(window: int, max_p: float | jax.Array, dtype: Any) -> jax.Array:
    """``int(K·max_p)`` as the reference (double precision) when max_p is concrete."""
    if validation.is_concrete(max_p):
        return jnp.asarray(float(int(window * float(np.asarray(max_p)))), dtype)
    return jnp.floor(window * jnp.asarray(max_p, dtype))


def _check_state(state: VSAMState, params: PyTree, window: int, key_shape: tuple[int, ...]) -> None:
    """Trace-time check that ``state`` was built for this configuration and these params."""
    validation.check_state_fields(state, VSAMState, "agsopt.vsam")
    for name in ("ratio_history", "psf_norm_history", "var_history", "schedule"):
        got = tuple(jnp.shape(getattr(state, name)))
        if got != (window,):
            raise ValueError(
                f"agsopt.vsam: state.{name} has shape {got}, but this vsam (window={window}) "
                f"needs ({window},): the state was made by a differently configured vsam "
                "(e.g. a checkpoint restored into a new configuration)"
            )
    if tuple(jnp.shape(state.key)) != key_shape:
        raise ValueError(
            f"agsopt.vsam: state.key has shape {tuple(jnp.shape(state.key))}, but this vsam's "
            f"key needs {key_shape}: the state was made by a differently configured vsam"
        )
    same = jax.tree.structure(state.psf) == jax.tree.structure(params) and all(
        jnp.shape(a) == jnp.shape(b)
        for a, b in zip(jax.tree.leaves(state.psf), jax.tree.leaves(params), strict=True)
    )
    if not same:
        raise ValueError(
            "agsopt.vsam: state.psf does not have the structure and shapes of params: the "
            "state was initialized for other parameters"
        )


def vsam(
    rho: Radius = 0.05,
    *,
    steps_per_epoch: int | None = None,
    warmup_epochs: int = 3,
    warmup_steps: int | None = None,
    window: int = 50,
    var_blocks: int = 5,
    max_p: float | jax.Array = 0.8,
    a1: float | jax.Array = 0.13,
    a2: float | jax.Array = 0.13,
    beta: float | jax.Array = 0.7,
    last_layer: LastLayer = 10,
    reuse_steps: int = 6,
    key: int | jax.Array = 0,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """vSAM (arXiv:2403.08821): sampled SAM steps, PSF reuse in between.

    Chain it in front of any Optax optimizer; ``update(g, state, params, value_fn=...)``
    with ``g = ∇L(w)`` and ``value_fn = lambda p: L(p, batch)`` (called on SAM steps only).
    See the module docstring for the exact rule and a training loop.

    The warm-up (all SAM steps) is given either in the reference's terms,
    ``steps_per_epoch`` with ``warmup_epochs`` (default 3, the reference), or as an
    explicit ``warmup_steps``; one of ``steps_per_epoch`` and ``warmup_steps`` is required.

    Args:
      rho: SAM radius ρ ≥ 0 (reference 0.05), or a schedule ``count -> ρ`` (an Optax
        schedule, called with the number of steps taken before this one).
      steps_per_epoch: steps per epoch; the warm-up is ``warmup_epochs·steps_per_epoch``.
      warmup_epochs: epochs of warm-up with ``steps_per_epoch`` (reference 3).
      warmup_steps: the warm-up in steps, instead of ``steps_per_epoch``.
      window: K, steps per control window (reference 50).
      var_blocks: w_w, blocks of the variance of ‖psf‖ (reference 5); ``window //
        var_blocks`` must be ≥ 2.
      max_p: largest fraction of SAM steps per window, in (0, 1]; ``base_sr ≤
        int(K·max_p)`` (reference 0.8).
      a1: gain on the relative change of ‖psf‖/‖g‖ (≥ 0, reference 0.13).
      a2: gain on the relative change of the variance of ‖psf‖ (≥ 0, reference 0.13).
      beta: decay β ∈ (0, 1] of the reuse weight r_w (reference 0.7).
      last_layer: the leaves the recorded norms run over: an int N, the last N leaves in
        ``jax.tree.leaves`` order (reference 10; dict keys sort, see the module
        docstring); None, all leaves; or a mask (Optax convention: a pytree of bools like
        the parameters, or a callable ``params -> mask``) selecting the leaves.
      reuse_steps: R, the PSF is reused while ``r_w > β^R`` (reference 6).
      key: int seed or JAX PRNG key for the window schedules.
      eps: added to ‖g‖ in ĝ and in the ratio, so zero gradients stay finite.
      axis_name: m-sharpness over this mapped axis; pass the local, un-reduced gradient.

    ``update`` also takes the keyword ``sam_step`` (None, or a static bool, e.g. from
    :func:`vsam_sam_step_hint`): True compiles the SAM step outside ``lax.cond``, which
    XLA:CPU needs for conv nets to save compute; it never changes the result (see the
    module docstring).

    The warm-up and ``window`` must fit in the int32 step count (``ValueError`` otherwise,
    at construction).

    Under ``optax.inject_hyperparams`` (e.g. to schedule ``rho``) name ``steps_per_epoch``,
    ``warmup_epochs``, ``warmup_steps``, ``window``, ``var_blocks``, ``last_layer``,
    ``reuse_steps``, ``key`` and ``axis_name`` in ``static_args``.

    ``update`` raises ``ValueError`` (at trace time) when the state does not fit this
    configuration (histories of another ``window``, a PSF of other parameters), e.g. a
    checkpoint restored into a differently configured ``vsam``.
    """
    if warmup_steps is not None:
        if steps_per_epoch is not None:
            raise ValueError(
                "pass either warmup_steps or steps_per_epoch (warm-up = warmup_epochs · "
                "steps_per_epoch), not both"
            )
        warmup = validation.check_int("warmup_steps", warmup_steps, minimum=0)
    elif steps_per_epoch is not None:
        steps_per_epoch = validation.check_int("steps_per_epoch", steps_per_epoch, minimum=1)
        warmup_epochs = validation.check_int("warmup_epochs", warmup_epochs, minimum=0)
        warmup = warmup_epochs * steps_per_epoch
    else:
        raise ValueError(
            "vsam needs steps_per_epoch (the warm-up is warmup_epochs=3 epochs of SAM steps, "
            "as in the reference) or an explicit warmup_steps (changed in agsopt 0.2.0: the "
            "warm-up no longer defaults to 2 * window steps; warmup_steps=2 * window keeps it)"
        )
    int32_max = int(np.iinfo(np.int32).max)  # the step count is int32
    if warmup > int32_max:
        given = (
            f"warmup_steps={warmup}"
            if warmup_steps is not None
            else f"warmup_epochs·steps_per_epoch = {warmup_epochs}·{steps_per_epoch} = {warmup}"
        )
        raise ValueError(
            f"the warm-up must fit in the int32 step count (≤ 2**31 - 1 steps), got {given}"
        )
    window = validation.check_int("window", window, minimum=2)
    if window > int32_max:
        raise ValueError(f"window must fit in int32 (≤ 2**31 - 1), got {window}")
    var_blocks = validation.check_int("var_blocks", var_blocks, minimum=1)
    if window // var_blocks < 2:
        raise ValueError(
            f"var_blocks must leave at least 2 values per block: window // var_blocks = "
            f"{window} // {var_blocks} < 2"
        )
    last_layer = _check_last_layer(last_layer)
    reuse_steps = validation.check_int("reuse_steps", reuse_steps, minimum=0)
    check_radius("rho", rho)
    rho_static = radius_is_static(rho)
    validation.check_scalar("max_p", max_p)
    validation.check_fraction("max_p", max_p)
    if validation.is_concrete(max_p) and int(window * float(np.asarray(max_p))) < 1:
        raise ValueError(f"max_p must allow one SAM step per window: window·max_p < 1 ({max_p})")
    validation.check_positive("a1", a1, allow_zero=True)
    validation.check_positive("a2", a2, allow_zero=True)
    validation.check_fraction("beta", beta)
    validation.check_positive("eps", eps)
    init_key, key_impl = key_for_state(key)
    key_shape = tuple(init_key.shape)

    def init_fn(params: PyTree) -> VSAMState:
        dtype = statistics_dtype(params)
        zeros_k = lambda: jnp.zeros((window,), dtype)  # one buffer per field (donation)
        return VSAMState(
            count=jnp.zeros((), jnp.int32),
            key=jnp.array(init_key, copy=True),  # a donated state must not delete init_key
            psf=jax.tree.map(jnp.zeros_like, params),
            psf_weight=jnp.zeros((), dtype),
            reuse_count=jnp.asarray(reuse_steps, jnp.int32),
            base_sr=jnp.ones((), dtype),
            schedule=jnp.zeros((window,), jnp.bool_),
            num_sam_steps=jnp.zeros((), jnp.int32),
            last_was_sam=jnp.zeros((), jnp.bool_),
            ratio_history=zeros_k(),
            psf_norm_history=zeros_k(),
            var_history=zeros_k(),
            num_skipped=jnp.zeros((), jnp.int32),
        )

    def update_fn(
        updates: PyTree,
        state: VSAMState,
        params: PyTree = None,
        *,
        value_fn: Callable[[PyTree], jax.Array] | None = None,
        sam_step: bool | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, VSAMState]:
        del extra_args
        sam_step = check_phase_hint("sam_step", sam_step, "agsopt.vsam")
        value_fn = validation.require_value_fn(value_fn, "agsopt.vsam")
        if params is None:
            raise TypeError("agsopt.vsam: update() needs params")
        check_gradient_call(updates, params, value_fn, "agsopt.vsam")
        _check_state(state, params, window, key_shape)
        state = jax.tree.map(jnp.asarray, state)  # e.g. NumPy leaves of a restored checkpoint
        rho_t = radius_at(rho, state.count)
        next_key, schedule_key = split_state_key(state.key, key_impl)
        in_warmup, pos, window_start = vsam_step_position(state.count, warmup, window)
        max_sr = _max_sr(window, max_p, state.base_sr.dtype)
        base_sr, schedule = choose_branch(
            window_start,
            lambda: vsam_window_control(
                schedule_key,
                state.base_sr,
                state.ratio_history,
                state.var_history,
                a1,
                a2,
                max_sr,
                window,
            ),
            lambda: (state.base_sr, state.schedule),
        )
        due = jnp.logical_or(in_warmup, schedule[pos])  # the schedule's SAM step
        rho_ok = jnp.asarray(True) if rho_static else radius_is_valid(rho_t)
        is_sam = due & rho_ok  # at an invalid ρ the SAM step is skipped (below)
        grads = mean_over_shards(updates, axis_name)
        histories = (state.ratio_history, state.psf_norm_history, state.var_history)

        def sam_branch(_: None = None) -> tuple[PyTree, PyTree, Histories, jax.Array, jax.Array]:
            out, psf, records = vsam_sam_step(
                value_fn,
                params,
                updates,
                grads,
                state.psf,
                histories,
                rho_t,
                last_layer=last_layer,
                var_blocks=var_blocks,
                eps=eps,
                axis_name=axis_name,
            )
            one, zero = jnp.ones_like(state.psf_weight), jnp.zeros_like(state.reuse_count)
            return out, psf, records, one, zero

        def reuse_branch(_: None = None) -> tuple[PyTree, PyTree, Histories, jax.Array, jax.Array]:
            out, weight, count = vsam_reuse_step(
                grads, state.psf, state.psf_weight, state.reuse_count, beta, reuse_steps
            )
            out = jax.tree.map(lambda o, u: o.astype(u.dtype), out, updates)
            return out, state.psf, histories, weight, count

        if sam_step:  # the caller's hint: the SAM step runs outside any lax.cond
            branches = run_hinted_branch(is_sam, sam_branch, reuse_branch)
        else:
            branches = choose_branch(is_sam, sam_branch, reuse_branch)
        out, psf, records, psf_weight, reuse_count = branches
        skipped = due & ~rho_ok
        if not rho_static:  # a skipped SAM step: zero update, the reuse state kept
            out = jax.tree.map(lambda o: jnp.where(skipped, jnp.zeros_like(o), o), out)
            psf_weight = jnp.where(skipped, state.psf_weight, psf_weight)
            reuse_count = jnp.where(skipped, state.reuse_count, reuse_count)
        new_state = VSAMState(
            count=optax.safe_increment(state.count),
            key=next_key,
            psf=psf,
            psf_weight=psf_weight,
            reuse_count=reuse_count,
            base_sr=base_sr,
            schedule=schedule,
            num_sam_steps=_saturating_add(state.num_sam_steps, is_sam.astype(jnp.int32)),
            last_was_sam=is_sam,
            ratio_history=records[0],
            psf_norm_history=records[1],
            var_history=records[2],
            num_skipped=count_skip(state.num_skipped, ~skipped),
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
