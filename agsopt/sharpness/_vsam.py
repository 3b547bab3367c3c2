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
``‖·‖_last`` is the Euclidean norm over the last ``last_layer`` leaves of the gradient pytree
in ``jax.tree.leaves`` order (all leaves if ``last_layer`` is None). The reference takes the
last ``last_layer`` tensors of ``model.parameters()``, i.e. the layers nearest the output;
``jax.tree.leaves`` sorts dict keys, so name layers so that the output side sorts last
(``layer_09`` not ``layer_9``), or use a list of layers. The ratio ``‖psf‖/‖g‖`` and the
norms of the records are these last-layer norms; ``ĝ`` in ``ε`` uses the whole pytree.

Histories (fixed-size float32 arrays of length ``K = window``, oldest first, zero before the
first ``K`` SAM steps), pushed on every SAM step:

    h_ratio  ← ratio;   h_psf ← ‖psf‖_last;
    h_var    ← mean_{b<w_w} var_unbiased( sort(h_psf)[b·m : (b+1)·m] ),   m = K // w_w

(the variance of ‖psf‖ within ``w_w = var_blocks`` blocks of the *sorted* last K values,
computed after pushing the new norm, as the reference does).

Control, at the start of every window of ``K`` steps after the warm-up::

    Δrel(h)  = clip( mean_{i: h_i > 0} (h_{i+1} − h_i)/h_i , −1, 1 )      (i = 0 … K−2)
    base_sr ← clip( base_sr · (1 + a1·Δrel(h_ratio) + a2·Δrel(h_var)), 1, floor(K·max_p) )
    n        = floor(base_sr);  the window's SAM steps: a uniformly random subset of n of
               its K positions (``permutation(K) < n``, a static-shape boolean schedule)

``base_sr`` starts at 1. The first ``warmup_steps`` steps are all SAM steps. Under ``jit`` the
SAM/other choice is a ``lax.cond``: only the taken branch runs, so an other step costs one
gradient (the caller's) and never calls ``value_fn``; the records are computed inside the
SAM branch and the window's control inside a ``lax.cond`` on its first step, so an other
step does little besides ``g + r_w·psf``. The state (:class:`VSAMState`) is a
NamedTuple of fixed-size arrays and the stored PSF (a params-shaped pytree); it exposes
``num_sam_steps``, ``base_sr``, the current window's ``schedule`` and ``last_was_sam``.

Example — a complete training loop::

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from agsopt import vsam

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
        vsam(rho=0.05, window=50, warmup_steps=3 * steps_per_epoch, last_layer=2, key=0),
        optax.add_decayed_weights(1e-3),
        optax.sgd(0.05, momentum=0.9),
    )
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = opt.update(
            grads, opt_state, params, value_fn=lambda p: loss_fn(p, x, y)
        )
        return optax.apply_updates(params, updates), opt_state, loss

    for epoch in range(20):
        order = rng.permutation(len(x_all))
        for s in range(steps_per_epoch):
            idx = order[s * batch : (s + 1) * batch]
            params, opt_state, loss = train_step(params, opt_state, x_all[idx], y_all[idx])
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
- *Warm-up length.* The reference runs 3 epochs of SAM steps; steps per epoch are unknown
  to a gradient transformation, so ``warmup_steps`` is in steps. The default
  ``2·window`` is the shortest warm-up that fills ``h_ratio``, ``h_psf`` and ``h_var`` with
  values computed from full histories; pass ``3 * steps_per_epoch`` to match the reference.
- *Zero entries.* The reference divides by zero-initialized history entries when fewer than
  ``K`` SAM steps have been recorded; ``Δrel`` averages only over pairs with ``h_i > 0``
  (0 if there is none). The ratio ``‖psf‖/‖g‖`` gets ``+ eps`` in its denominator.
- *r_w > β⁶* is evaluated with an integer counter of reuse steps (``reuse_count < R``), equal
  in exact arithmetic and immune to the rounding of ``β·β·…`` against ``β⁶``.
- ``reuse_steps`` (R, default 6) and ``axis_name`` are additions. With ``axis_name``
  (m-sharpness under ``shard_map``/``pmap``) each shard perturbs with its own ĝ; ``g_s``
  and ``g`` are averaged over the axis, so the PSF, the records and every output are
  identical on all shards, and so is the SAM schedule (the key is not folded per shard).
- ``warmup_steps``, ``window``, ``var_blocks``, ``last_layer`` and ``reuse_steps`` are
  static. ``var_blocks`` must leave at least 2 values per block (unbiased variance); as in
  the reference, ``K mod var_blocks`` largest values are left out of the blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from agsopt import _validation as validation
from agsopt.sharpness._perturbation import mean_over_shards, perturbed_gradient, sam_perturbation
from agsopt.tree_utils import (
    key_for_state,
    split_state_key,
    tree_add_scaled,
    tree_all_finite,
    tree_norm,
)

PyTree = Any

__all__ = [
    "VSAMState",
    "vsam",
    "vsam_block_variance",
    "vsam_control",
    "vsam_relative_change",
]


class VSAMState(NamedTuple):
    """State of :func:`vsam`.

    Attributes:
      count: steps taken (int32).
      key: raw PRNG key data (``jax.random.key_data``), split every step.
      psf: the last PSF ``g_s − g`` (params-shaped; zeros before the first SAM step).
      psf_weight: ``r_w`` of the last step (1 after a SAM step, then β, β², …).
      reuse_count: reuse steps since the last SAM step (``reuse_steps`` = no reuse left).
      base_sr: the controlled number of SAM steps per window (float32, in [1, K·max_p]).
      schedule: bool[K], the SAM positions of the current window.
      num_sam_steps: SAM steps taken so far, warm-up included (int32).
      last_was_sam: whether the last step was a SAM step.
      ratio_history: float32[K], ``‖psf‖/‖g‖`` of the last K SAM steps, oldest first.
      psf_norm_history: float32[K], ``‖psf‖`` of the last K SAM steps, oldest first.
      var_history: float32[K], block variance of ``psf_norm_history`` at the last K SAM
        steps, oldest first.
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


def vsam_block_variance(psf_norm_history: jax.Array, var_blocks: int) -> jax.Array:
    """Mean over ``var_blocks`` blocks of the unbiased variance of the sorted history.

    ``m = K // var_blocks`` values per block; block ``b`` holds ``sort(h)[b·m:(b+1)·m]``.
    """
    h = jnp.sort(jnp.asarray(psf_norm_history, jnp.float32))
    m = h.shape[0] // var_blocks
    blocks = h[: var_blocks * m].reshape(var_blocks, m)
    return jnp.mean(jnp.var(blocks, axis=1, ddof=1))


def vsam_relative_change(history: jax.Array) -> jax.Array:
    """``clip(mean_{i: h_i > 0} (h_{i+1} − h_i)/h_i, −1, 1)``; 0 if no ``h_i`` is positive."""
    h = jnp.asarray(history, jnp.float32)
    prev, nxt = h[:-1], h[1:]
    ok = prev > 0
    rel = jnp.where(ok, (nxt - prev) / jnp.where(ok, prev, 1.0), 0.0)
    mean = jnp.sum(rel) / jnp.maximum(jnp.sum(ok), 1).astype(jnp.float32)
    return jnp.clip(mean, -1.0, 1.0)


def vsam_control(
    base_sr: jax.Array,
    ratio_history: jax.Array,
    var_history: jax.Array,
    a1: float | jax.Array,
    a2: float | jax.Array,
    max_sr: float | jax.Array,
) -> jax.Array:
    """``clip(base_sr·(1 + a1·Δrel(h_ratio) + a2·Δrel(h_var)), 1, max_sr)``."""
    factor = 1.0 + a1 * vsam_relative_change(ratio_history) + a2 * vsam_relative_change(var_history)
    return jnp.clip(base_sr * factor, 1.0, max_sr).astype(jnp.float32)


def _push(history: jax.Array, value: jax.Array) -> jax.Array:
    return jnp.concatenate([history[1:], jnp.reshape(value, (1,)).astype(history.dtype)])


def vsam(
    rho: float | jax.Array = 0.05,
    *,
    window: int = 50,
    var_blocks: int = 5,
    max_p: float | jax.Array = 0.8,
    a1: float | jax.Array = 0.13,
    a2: float | jax.Array = 0.13,
    beta: float | jax.Array = 0.7,
    last_layer: int | None = 10,
    warmup_steps: int | None = None,
    reuse_steps: int = 6,
    key: int | jax.Array = 0,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """vSAM (arXiv:2403.08821): sampled SAM steps, PSF reuse in between.

    Chain it in front of any Optax optimizer; ``update(g, state, params, value_fn=...)``
    with ``g = ∇L(w)`` and ``value_fn = lambda p: L(p, batch)`` (called on SAM steps only).
    See the module docstring for the exact rule and a training loop.

    Args:
      rho: SAM radius ρ ≥ 0 (reference 0.05).
      window: K, steps per control window (reference 50).
      var_blocks: w_w, blocks of the variance of ‖psf‖ (reference 5); ``window //
        var_blocks`` must be ≥ 2.
      max_p: largest fraction of SAM steps per window, in (0, 1]; ``base_sr ≤
        floor(K·max_p)`` (reference 0.8).
      a1: gain on the relative change of ‖psf‖/‖g‖ (≥ 0, reference 0.13).
      a2: gain on the relative change of the variance of ‖psf‖ (≥ 0, reference 0.13).
      beta: decay β ∈ (0, 1] of the reuse weight r_w (reference 0.7).
      last_layer: number of trailing leaves (``jax.tree.leaves`` order) the recorded norms
        run over (reference 10); None for all leaves.
      warmup_steps: leading steps that are all SAM steps; default ``2·window``
        (the reference: 3 epochs).
      reuse_steps: R, the PSF is reused while ``r_w > β^R`` (reference 6).
      key: int seed or JAX PRNG key for the window schedules.
      eps: added to ‖g‖ in ĝ and in the ratio, so zero gradients stay finite.
      axis_name: m-sharpness over this mapped axis; pass the local, un-reduced gradient.

    Under ``optax.inject_hyperparams`` (e.g. to schedule ``rho``) name ``window``,
    ``var_blocks``, ``last_layer``, ``warmup_steps``, ``reuse_steps``, ``key`` and
    ``axis_name`` in ``static_args``.
    """
    window = validation.check_int("window", window, minimum=2)
    var_blocks = validation.check_int("var_blocks", var_blocks, minimum=1)
    if window // var_blocks < 2:
        raise ValueError(
            f"var_blocks must leave at least 2 values per block: window // var_blocks = "
            f"{window} // {var_blocks} < 2"
        )
    if last_layer is not None:
        last_layer = validation.check_int("last_layer", last_layer, minimum=1)
    warmup = 2 * window if warmup_steps is None else warmup_steps
    warmup = validation.check_int("warmup_steps", warmup, minimum=0)
    reuse_steps = validation.check_int("reuse_steps", reuse_steps, minimum=0)
    validation.check_positive("rho", rho, allow_zero=True)
    validation.check_fraction("max_p", max_p)
    if validation.is_concrete(max_p) and int(window * float(max_p) + 1e-9) < 1:
        raise ValueError(f"max_p must allow one SAM step per window: window·max_p < 1 ({max_p})")
    validation.check_positive("a1", a1, allow_zero=True)
    validation.check_positive("a2", a2, allow_zero=True)
    validation.check_fraction("beta", beta)
    validation.check_positive("eps", eps)
    init_key, key_impl = key_for_state(key)

    def last_leaves(tree: PyTree) -> list[jax.Array]:
        leaves = jax.tree.leaves(tree)
        return leaves if last_layer is None else leaves[-last_layer:]

    def init_fn(params: PyTree) -> VSAMState:
        zeros_k = jnp.zeros((window,), jnp.float32)
        return VSAMState(
            count=jnp.zeros((), jnp.int32),
            key=init_key,
            psf=jax.tree.map(jnp.zeros_like, params),
            psf_weight=jnp.zeros((), jnp.float32),
            reuse_count=jnp.asarray(reuse_steps, jnp.int32),
            base_sr=jnp.ones((), jnp.float32),
            schedule=jnp.zeros((window,), jnp.bool_),
            num_sam_steps=jnp.zeros((), jnp.int32),
            last_was_sam=jnp.zeros((), jnp.bool_),
            ratio_history=zeros_k,
            psf_norm_history=zeros_k,
            var_history=zeros_k,
        )

    def update_fn(
        updates: PyTree,
        state: VSAMState,
        params: PyTree = None,
        *,
        value_fn: Callable[[PyTree], jax.Array] | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, VSAMState]:
        del extra_args
        value_fn = validation.require_value_fn(value_fn, "agsopt.vsam")
        if params is None:
            raise TypeError("agsopt.vsam: update() needs params")

        # --- which step is this: warm-up, or position `pos` of a window --------------------
        next_key, schedule_key = split_state_key(state.key, key_impl)
        post = state.count - warmup
        in_warmup = post < 0
        pos = jnp.maximum(post, 0) % window
        window_start = jnp.logical_and(~in_warmup, pos == 0)
        max_sr = jnp.floor(window * jnp.asarray(max_p, jnp.float32) + 1e-6)

        def new_window(_: None) -> tuple[jax.Array, jax.Array]:
            base_sr = vsam_control(
                state.base_sr, state.ratio_history, state.var_history, a1, a2, max_sr
            )
            num_sam = jnp.floor(base_sr).astype(jnp.int32)
            return base_sr, jax.random.permutation(schedule_key, window) < num_sam

        base_sr, schedule = jax.lax.cond(
            window_start, new_window, lambda _: (state.base_sr, state.schedule), None
        )
        is_sam = jnp.logical_or(in_warmup, schedule[pos])

        # --- the step; records are pushed on SAM steps only ---------------------------------
        grads = mean_over_shards(updates, axis_name)
        can_reuse = state.reuse_count < reuse_steps
        reuse_weight = jnp.where(can_reuse, state.psf_weight * beta, 0.0).astype(jnp.float32)
        histories = (state.ratio_history, state.psf_norm_history, state.var_history)

        def as_dtypes(tree: PyTree, like: PyTree) -> PyTree:
            return jax.tree.map(lambda x, y: x.astype(y.dtype), tree, like)

        def sam_branch(_: None) -> tuple[PyTree, PyTree, tuple[jax.Array, ...]]:
            perturbation = sam_perturbation(updates, params, rho, eps=eps)
            sharp = mean_over_shards(perturbed_gradient(value_fn, params, perturbation), axis_name)
            psf = jax.tree.map(lambda s, g: s - g, sharp, grads)
            psf_norm = tree_norm(last_leaves(psf))
            ratio = psf_norm / (tree_norm(last_leaves(grads)) + eps)
            pushed_norms = _push(state.psf_norm_history, psf_norm)
            pushed_var = _push(state.var_history, vsam_block_variance(pushed_norms, var_blocks))
            records = (_push(state.ratio_history, ratio), pushed_norms, pushed_var)
            # A non-finite g_s (e.g. the loss is NaN at w + ε only) is passed on as the
            # update, but neither stored nor recorded: the state keeps its last good PSF.
            finite = tree_all_finite(psf) & jnp.isfinite(ratio)
            psf = jax.tree.map(lambda new, old: jnp.where(finite, new, old), psf, state.psf)
            records = jax.tree.map(lambda new, old: jnp.where(finite, new, old), records, histories)
            return as_dtypes(sharp, updates), as_dtypes(psf, state.psf), records

        def other_branch(_: None) -> tuple[PyTree, PyTree, tuple[jax.Array, ...]]:
            out = tree_add_scaled(grads, reuse_weight, state.psf)  # = g exactly when weight 0
            return as_dtypes(out, updates), state.psf, histories

        out, psf, (ratio_history, psf_norm_history, var_history) = jax.lax.cond(
            is_sam, sam_branch, other_branch, None
        )

        def on_sam(new: jax.Array, old: jax.Array) -> jax.Array:
            return jnp.where(is_sam, new, old)

        new_state = VSAMState(
            count=optax.safe_increment(state.count),
            key=next_key,
            psf=psf,
            psf_weight=on_sam(
                jnp.ones((), jnp.float32),
                jnp.where(can_reuse, reuse_weight, state.psf_weight),
            ),
            reuse_count=on_sam(
                jnp.zeros((), jnp.int32),
                jnp.where(can_reuse, state.reuse_count + 1, state.reuse_count),
            ),
            base_sr=base_sr,
            schedule=schedule,
            num_sam_steps=state.num_sam_steps + is_sam.astype(jnp.int32),
            last_was_sam=is_sam,
            ratio_history=ratio_history,
            psf_norm_history=psf_norm_history,
            var_history=var_history,
        )
        return out, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
