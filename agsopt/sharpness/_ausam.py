"""AUSAM: SAM on an adaptively sampled subset of each batch (arXiv:2406.08001).

AUSAM (reference code github.com/ajiaaa/AUSAM, read, not copied) speeds SAM
(arXiv:2010.01412) up by running both of its passes on only ``k = floor(α B)`` of the ``B``
examples of each batch, drawn by each example's *historical sharpness*. Per step, with
dataset ids ``ids`` of the batch::

    first epoch:  S = all B batch positions
    later:        a_i   = ADLP[ids_i]                     (mean of past DLPs of example i)
                  s_i   = f_min + (f_max(t) − f_min)·(a_i − min a)/(max a − min a)
                  S     = k of the B positions, without replacement, p_i = s_i / Σ_j s_j
    ℓ_before = per-example loss at w on S;        g   = ∇ mean_S ℓ_before
    ε        = ρ g/(‖g‖ + eps);  ℓ_after = per-example loss at w + ε on S
    output     g_s = ∇ mean_S ℓ_after(w + ε)      (the base optimizer steps the original w)
    record     DLP_i = |ℓ_after,i − ℓ_before,i| into the running mean ADLP[ids_i], i ∈ S

``f_max(t) = f_min + (f_max − f_min)·min(e/trans_epoch, 1)`` with ``e`` the 0-based epoch
(``count // steps_per_epoch``), as in the reference, which changes it once per epoch.

Calling convention
------------------
AUSAM computes its own gradient, on the subset, so the **incoming updates are ignored**:
pass ``None`` (or ``params``) and do *not* compute a full-batch gradient first, which would
throw the saving away. The loss arrives as two keyword extra arguments::

    per_example_loss_fn(params, positions) -> losses    # positions: int32[m], losses: [m]
    ids                                                   # int[B]: dataset ids of the batch

``positions`` are indices into the current batch (``0 ≤ positions < B``); the function must
gather those examples *before* the forward pass (``x[positions]``), so that only ``m``
examples are evaluated. ``m`` is static: ``k`` in sampled steps, ``B`` in the first epoch.
Under ``jit`` the first-epoch/sampled choice is a ``lax.cond`` whose two branches both
return a params-shaped gradient; only the taken branch runs, so a sampled step really costs
two passes over ``k`` examples. ``B`` is read from ``ids.shape[0]`` at trace time.

The state (:class:`AUSAMState`) holds the sharpness record of every training example (the
sum and number of its DLP observations; ``ADLP = sum/count``, see :func:`ausam_adlp`), the
step count, the PRNG key (split every step), a counter of out-of-range ids and the mean
unperturbed loss of the last step's subset (for logging; AUSAM never sees the full-batch
loss).

Out-of-range ids (outside ``[0, num_examples)``): when ``ids`` is concrete (``update``
called outside ``jit``) they raise ``ValueError``. Under ``jit`` values cannot be checked;
such ids are then treated as unseen examples for sampling, never written to the record,
and counted in ``state.num_invalid_ids`` (check it from the host now and then).

Example — a complete training loop (plain-JAX MLP; the data loader yields dataset ids)::

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from agsopt import ausam

    n, dim, classes, batch = 2048, 16, 4, 128
    rng = np.random.default_rng(0)
    x_all = rng.normal(size=(n, dim)).astype(np.float32)
    y_all = np.argmax(x_all[:, :classes] + 0.3 * rng.normal(size=(n, classes)), 1)

    def init_mlp(key, sizes=(dim, 64, classes)):
        keys = jax.random.split(key, len(sizes) - 1)
        return [
            {"w": jax.random.normal(k, (i, o)) / np.sqrt(i), "b": jnp.zeros(o)}
            for k, i, o in zip(keys, sizes[:-1], sizes[1:])
        ]

    def mlp(params, x):
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    steps_per_epoch = n // batch
    opt = optax.chain(
        ausam(n, rho=0.1, alpha=0.5, steps_per_epoch=steps_per_epoch, trans_epoch=3, key=0),
        optax.add_decayed_weights(1e-3),
        optax.sgd(0.1, momentum=0.9),
    )
    params = init_mlp(jax.random.key(0))
    opt_state = opt.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y, ids):
        def per_example_loss_fn(p, positions):
            logits = mlp(p, x[positions])  # gather first: only len(positions) examples run
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[positions])

        updates, opt_state = opt.update(
            None, opt_state, params, per_example_loss_fn=per_example_loss_fn, ids=ids
        )
        return optax.apply_updates(params, updates), opt_state

    for epoch in range(6):
        order = rng.permutation(n)  # the loader shuffles and hands out the dataset ids
        for s in range(steps_per_epoch):
            ids = order[s * batch : (s + 1) * batch]
            params, opt_state = train_step(params, opt_state, x_all[ids], y_all[ids], ids)
        print(epoch, float(opt_state[0].loss))  # last subset's loss (biased to sharp ones)
    accuracy = np.mean(np.argmax(mlp(params, x_all), 1) == y_all)

BatchNorm-style model state: let ``per_example_loss_fn`` close over the statistics of the
unperturbed pass (both calls see the same closure; update running statistics outside).

Deviations from the reference, and why:

- *Record storage.* The reference keeps ``(sum, count, mean)`` per example, initialized to
  ones, and in epoch 0 overwrites the sum with the DLP. We keep ``sum`` and ``count``
  starting at zero; ``ADLP = sum/count`` is the same running mean (identical whenever an
  example is seen once in epoch 0) and scatter-adds are exact for duplicate ids.
- *Unseen examples* (count 0, or out-of-range ids) get the largest ADLP of the seen examples
  in the batch, hence the top score ``f_max(t)``; the reference gives them ADLP = 1, a value
  whose meaning depends on the loss scale. With no seen example in the batch the draw is
  uniform.
- *Degenerate scores*: when ``max a = min a`` the reference divides 0 by 0 (NaN
  probabilities); we draw uniformly. The reference adds 1e-9 to ``f_max(t)``; we do not.
- *Sampling*: Gumbel-top-k, which draws exactly the distribution of the reference's
  ``torch.multinomial(p, k, replacement=False)`` (successive draws ∝ p among the rest).
- *k* = ``max(1, floor(α B))``, with a 1e-9 tolerance so that e.g. α = 0.29, B = 100 gives
  29 (Python's ``int(0.29*100)`` is 28).
- ``full_batch_epochs`` (default 1, the reference) generalizes "first epoch: all of B";
  0 samples from the first step on (unseen examples then draw uniformly).
- ``axis_name`` (m-sharpness under ``shard_map``/``pmap``, not in the reference): each shard
  samples its own subset (key folded with the shard index) and perturbs with its own ĝ;
  ``g_s`` is averaged over shards; ids and DLPs are all-gathered so that every shard's
  record stays identical.
- The perturbed pass needs the per-example losses as well as the gradient, so it calls
  ``jax.value_and_grad(..., has_aux=True)`` at ``w + ε`` instead of
  :func:`agsopt.sharpness.perturbed_gradient` (which returns the gradient only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agsopt import _validation as validation
from agsopt.sharpness._perturbation import mean_over_shards, sam_perturbation
from agsopt.tree_utils import key_for_state, split_state_key, tree_add_scaled

PyTree = Any

__all__ = [
    "AUSAMState",
    "ausam",
    "ausam_adlp",
    "ausam_f_max",
    "ausam_sample_subset",
    "ausam_sampling_probs",
    "ausam_subset_size",
]


class AUSAMState(NamedTuple):
    """State of :func:`ausam`.

    Attributes:
      count: steps taken (int32 scalar).
      key: raw PRNG key data (``jax.random.key_data``), split every step.
      dlp_sum: float32[num_examples], sum of the recorded DLPs of each training example.
      dlp_count: int32[num_examples], number of recorded DLPs of each example.
      num_invalid_ids: int32 scalar, ids outside ``[0, num_examples)`` seen under ``jit``.
      loss: float32 scalar, mean unperturbed per-example loss over the last step's subset.
    """

    count: jax.Array
    key: jax.Array
    dlp_sum: jax.Array
    dlp_count: jax.Array
    num_invalid_ids: jax.Array
    loss: jax.Array


def ausam_subset_size(alpha: float, batch_size: int) -> int:
    """``k = max(1, floor(α B))`` (static), with a 1e-9 tolerance against float rounding."""
    return max(1, min(batch_size, int(math.floor(alpha * batch_size + 1e-9))))


def ausam_adlp(state: AUSAMState) -> tuple[jax.Array, jax.Array]:
    """``(ADLP, seen)``: the running mean of each example's DLPs, and whether it has any."""
    seen = state.dlp_count > 0
    return state.dlp_sum / jnp.maximum(state.dlp_count, 1).astype(jnp.float32), seen


def ausam_f_max(
    epoch: jax.Array | int,
    f_min: float | jax.Array,
    f_max: float | jax.Array,
    trans_epoch: int,
) -> jax.Array:
    """``f_max(e) = f_min + (f_max − f_min)·min(e/trans_epoch, 1)``; ``f_max`` if trans is 0."""
    epoch = jnp.asarray(epoch, jnp.float32)
    ramp = jnp.minimum(epoch / trans_epoch, 1.0) if trans_epoch > 0 else jnp.ones_like(epoch)
    return f_min + (f_max - f_min) * ramp


def ausam_sampling_probs(
    scores: jax.Array,
    f_min: float | jax.Array,
    f_max_t: float | jax.Array,
    seen: jax.Array | None = None,
) -> jax.Array:
    """Selection probabilities ``p_i = s_i/Σ s`` of AUSAM (arXiv:2406.08001).

    ``s_i = f_min + (f_max_t − f_min)(a_i − min a)/(max a − min a)`` for the historical
    sharpness ``a = scores``. Entries with ``seen`` False are given the largest seen score
    first; if ``max a = min a`` (or nothing is seen) the probabilities are uniform.
    """
    a = jnp.asarray(scores, jnp.float32)
    if seen is not None:
        any_seen = jnp.any(seen)
        top = jnp.max(jnp.where(seen, a, -jnp.inf))
        a = jnp.where(seen, a, jnp.where(any_seen, top, 0.0))
    lo, hi = jnp.min(a), jnp.max(a)
    spread = hi - lo
    unit = jnp.where(spread > 0, (a - lo) / jnp.where(spread > 0, spread, 1.0), 0.0)
    s = f_min + (f_max_t - f_min) * unit
    return s / jnp.sum(s)


def ausam_sample_subset(key: jax.Array, probs: jax.Array, k: int) -> jax.Array:
    """``k`` distinct indices drawn without replacement, successively ∝ ``probs``.

    Gumbel-top-k: the indices of the ``k`` largest ``log p_i + G_i``, ``G_i`` i.i.d. Gumbel,
    which has the law of ``torch.multinomial(p, k, replacement=False)``. int32[k].
    """
    gumbel = jax.random.gumbel(key, probs.shape, jnp.float32)
    logits = jnp.log(jnp.maximum(probs.astype(jnp.float32), jnp.finfo(jnp.float32).tiny))
    _, idx = jax.lax.top_k(logits + gumbel, k)
    return idx.astype(jnp.int32)


def ausam(
    num_examples: int,
    rho: float | jax.Array = 0.1,
    *,
    steps_per_epoch: int,
    alpha: float = 0.5,
    f_min: float | jax.Array = 0.1,
    f_max: float | jax.Array = 0.5,
    trans_epoch: int = 30,
    full_batch_epochs: int = 1,
    key: int | jax.Array = 0,
    eps: float = 1e-12,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """AUSAM (arXiv:2406.08001): SAM on ``k = floor(α B)`` examples sampled by sharpness.

    Chain it in front of the base optimizer and call ``update`` with the incoming updates
    ignored (``None``), ``per_example_loss_fn(params, positions) -> losses`` and the
    dataset ``ids`` of the batch; see the module docstring for the rule, the calling
    convention and a complete training loop. Returns ``g_s = ∇ mean_S ℓ(w + ε)``.

    Args:
      num_examples: size of the training set; ids must lie in ``[0, num_examples)``.
      rho: SAM radius ρ ≥ 0 (reference 0.1).
      steps_per_epoch: steps per epoch; epochs drive the first-epoch rule and the ramp.
      alpha: sampled fraction α ∈ (0, 1], a static Python number (it fixes the shape ``k``).
      f_min: smallest score (> 0, so every example can be drawn); reference 0.1.
      f_max: largest score after the ramp (≥ f_min); reference 0.5.
      trans_epoch: epochs over which ``f_max(t)`` ramps from f_min to f_max (reference 30).
      full_batch_epochs: leading epochs that run SAM on the whole batch (reference 1).
      key: int seed or JAX PRNG key for the sampling.
      eps: added to ``‖g‖`` so a zero gradient gives ε = 0 and a finite update.
      axis_name: m-sharpness over this mapped axis (see the module docstring).

    Under ``optax.inject_hyperparams`` (e.g. to schedule ``rho``) name ``num_examples``,
    ``steps_per_epoch``, ``alpha``, ``trans_epoch``, ``full_batch_epochs``, ``key`` and
    ``axis_name`` in ``static_args``.
    """
    num_examples = validation.check_int("num_examples", num_examples, minimum=1)
    steps_per_epoch = validation.check_int("steps_per_epoch", steps_per_epoch, minimum=1)
    trans_epoch = validation.check_int("trans_epoch", trans_epoch, minimum=0)
    full_batch_epochs = validation.check_int("full_batch_epochs", full_batch_epochs, minimum=0)
    if isinstance(alpha, bool) or not validation.is_concrete(alpha) or np.ndim(alpha) != 0:
        raise TypeError(
            "alpha must be a static real number (it fixes the subset size k), got "
            f"{type(alpha).__name__}"
        )
    if not np.issubdtype(np.asarray(alpha).dtype, np.number) or np.iscomplexobj(alpha):
        raise TypeError(f"alpha must be a real number, got {np.asarray(alpha).dtype}")
    alpha = float(np.asarray(alpha))
    if not np.isfinite(alpha) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    validation.check_positive("rho", rho, allow_zero=True)
    validation.check_positive("f_min", f_min)
    validation.check_positive("f_max", f_max)
    if validation.is_concrete(f_min) and validation.is_concrete(f_max):
        if np.any(np.asarray(f_max) < np.asarray(f_min)):
            raise ValueError(f"f_max must be >= f_min, got f_max={f_max}, f_min={f_min}")
    validation.check_positive("eps", eps)
    init_key, key_impl = key_for_state(key)

    def init_fn(params: PyTree) -> AUSAMState:
        del params
        return AUSAMState(
            count=jnp.zeros((), jnp.int32),
            key=init_key,
            dlp_sum=jnp.zeros((num_examples,), jnp.float32),
            dlp_count=jnp.zeros((num_examples,), jnp.int32),
            num_invalid_ids=jnp.zeros((), jnp.int32),
            loss=jnp.zeros((), jnp.float32),
        )

    def update_fn(
        updates: PyTree,
        state: AUSAMState,
        params: PyTree = None,
        *,
        per_example_loss_fn: Callable[[PyTree, jax.Array], jax.Array] | None = None,
        ids: jax.Array | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, AUSAMState]:
        del updates, extra_args  # AUSAM computes its own gradient on the subset
        if per_example_loss_fn is None:
            raise TypeError(
                "agsopt.ausam: update() needs the keyword argument per_example_loss_fn="
                "lambda params, positions: per-example losses of batch[positions]"
            )
        if not callable(per_example_loss_fn):
            raise TypeError("agsopt.ausam: per_example_loss_fn must be callable")
        if params is None:
            raise TypeError("agsopt.ausam: update() needs params")
        if ids is None:
            raise TypeError("agsopt.ausam: update() needs ids=<int array of dataset ids, (B,)>")
        if validation.is_concrete(ids):
            ids_np = np.asarray(ids)
            if ids_np.ndim != 1 or not np.issubdtype(ids_np.dtype, np.integer):
                raise TypeError(f"ids must be a 1-D integer array, got {ids_np.dtype}")
            bad = (ids_np < 0) | (ids_np >= num_examples)
            if np.any(bad):
                raise ValueError(
                    f"ids must lie in [0, num_examples={num_examples}), got {ids_np[bad][0]}"
                )
        ids = jnp.asarray(ids)
        if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise TypeError(f"ids must be a 1-D integer array, got {ids.dtype}{ids.shape}")
        batch = ids.shape[0]
        if batch == 0:
            raise ValueError("ids must hold at least one example")
        k = ausam_subset_size(alpha, batch)

        ids = ids.astype(jnp.int32)
        valid = (ids >= 0) & (ids < num_examples)
        safe_ids = jnp.where(valid, ids, 0)
        next_key, sample_key = split_state_key(state.key, key_impl)
        if axis_name is not None:
            sample_key = jax.random.fold_in(sample_key, jax.lax.axis_index(axis_name))
        epoch = state.count // steps_per_epoch

        def sam_on(positions: jax.Array) -> tuple[PyTree, jax.Array, jax.Array]:
            def mean_loss(p: PyTree) -> tuple[jax.Array, jax.Array]:
                losses = per_example_loss_fn(p, positions)
                if jnp.shape(losses) != positions.shape:
                    raise ValueError(
                        f"per_example_loss_fn must return one loss per position, shape "
                        f"{positions.shape}, got {jnp.shape(losses)}"
                    )
                return jnp.mean(losses), losses

            (loss_before, l_before), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
            perturbation = sam_perturbation(grads, params, rho, eps=eps)
            (_, l_after), sharp = jax.value_and_grad(mean_loss, has_aux=True)(
                tree_add_scaled(params, 1.0, perturbation)
            )
            dlp = jnp.abs(l_after.astype(jnp.float32) - l_before.astype(jnp.float32))
            return sharp, dlp, loss_before.astype(jnp.float32)

        def full_branch(_: None) -> tuple[PyTree, jax.Array, jax.Array, jax.Array]:
            positions = jnp.arange(batch, dtype=jnp.int32)
            sharp, dlp, loss = sam_on(positions)
            return sharp, positions, dlp, loss

        def sampled_branch(_: None) -> tuple[PyTree, jax.Array, jax.Array, jax.Array]:
            adlp, seen = ausam_adlp(state)
            scores = adlp[safe_ids]
            f_max_t = ausam_f_max(epoch, f_min, f_max, trans_epoch)
            probs = ausam_sampling_probs(scores, f_min, f_max_t, seen=seen[safe_ids] & valid)
            positions = ausam_sample_subset(sample_key, probs, k)
            sharp, dlp, loss = sam_on(positions)
            pad = batch - k  # static; padded slots point past the batch and are dropped
            positions = jnp.concatenate([positions, jnp.full((pad,), batch, jnp.int32)])
            dlp = jnp.concatenate([dlp, jnp.zeros((pad,), jnp.float32)])
            return sharp, positions, dlp, loss

        if k == batch:  # α B ≥ B: every step is a full-batch step, no sampling needed
            sharp, positions, dlp, loss = full_branch(None)
        elif full_batch_epochs == 0:
            sharp, positions, dlp, loss = sampled_branch(None)
        else:
            sharp, positions, dlp, loss = jax.lax.cond(
                epoch < full_batch_epochs, full_branch, sampled_branch, None
            )

        sharp = mean_over_shards(sharp, axis_name)
        num_invalid = jnp.sum(~valid).astype(jnp.int32)
        # record: the ids of the evaluated positions (out-of-range ids and padding dropped)
        taken = positions < batch
        pos_safe = jnp.where(taken, positions, 0)
        rec_ids = jnp.where(taken & valid[pos_safe], ids[pos_safe], num_examples)
        if axis_name is not None:
            rec_ids = jax.lax.all_gather(rec_ids, axis_name, tiled=True)
            dlp = jax.lax.all_gather(dlp, axis_name, tiled=True)
            num_invalid = jax.lax.psum(num_invalid, axis_name)
            loss = jax.lax.pmean(loss, axis_name)
        # A DLP that is not finite (the loss is NaN/inf at w or w + ε for that example) is
        # not recorded: the example's running mean keeps its finite history.
        rec_ids = jnp.where(jnp.isfinite(dlp), rec_ids, num_examples)
        dlp_sum = state.dlp_sum.at[rec_ids].add(dlp, mode="drop")
        dlp_count = state.dlp_count.at[rec_ids].add(1, mode="drop")
        new_state = AUSAMState(
            count=optax.safe_increment(state.count),
            key=next_key,
            dlp_sum=dlp_sum,
            dlp_count=dlp_count,
            num_invalid_ids=state.num_invalid_ids + num_invalid,
            loss=loss,
        )
        return sharp, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
