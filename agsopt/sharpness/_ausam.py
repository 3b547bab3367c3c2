"""AUSAM: SAM on an adaptively sampled subset of each batch (arXiv:2406.08001).

AUSAM (reference code github.com/ajiaaa/AUSAM, read, not copied) speeds SAM
(arXiv:2010.01412) up by running both of its passes on only ``k = ⌊α B⌋`` of the ``B``
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
return a params-shaped gradient; only the taken branch runs. ``B`` is read from
``ids.shape[0]`` at trace time.

Phase hint (``full_batch``, a static Python bool; default None). XLA:CPU compiles a
``lax.cond`` branch apart from the main program and runs a convolution's gradient there far
slower (≈ 20× on a small conv net; matrix products are not affected), so on CPU a conv net
pays for the ``cond`` itself. Passing ``full_batch=True`` during the full-batch epochs and
``full_batch=False`` after them compiles a program whose step is straight-line code (one
program per phase: make it a ``static_argnames`` argument of ``jax.jit``); a sampled step
then really costs two passes over ``k`` examples. The hint never changes the result: the
program checks it against the state's epoch and, if it is wrong, also runs the other branch
(inside a ``lax.cond`` skipped when the hint is right) and returns that. Without a hint (or
with ``full_batch_epochs=0``, or ``k = B``) there is one program. On accelerators the
hinted program is the same straight-line code. See the training-loops guide.

The state (:class:`AUSAMState`) holds the sharpness record of every training example (the
sum and number of its DLP observations; ``ADLP = sum/count``, see :func:`ausam_adlp`), the
step count, the PRNG key (split every step), a counter of out-of-range ids and the mean
unperturbed loss of the last step's subset (for logging; AUSAM never sees the full-batch
loss).

Subset size: ``k = max(1, int(α·B))`` with ``α·B`` the double-precision product, exactly the
reference's ``int(alpha * len(batch))``: α = 0.5, B = 128 gives 64, and α = 0.29, B = 100
gives 28 (0.29·100 = 28.999…). See :func:`ausam_subset_size`.

Unseen examples (no recorded DLP yet: in the reference only examples a ``drop_last``
loader skipped in epoch 0, or any example with ``full_batch_epochs=0``) are sampled as if
they had the largest ADLP among the seen examples of the batch, i.e. with the top score
``f_max(t)``; with no seen example in the batch the draw is uniform.

Out-of-range ids (outside ``[0, num_examples)``): when ``ids`` is concrete (``update``
called outside ``jit``) they raise ``ValueError``. Under ``jit`` values cannot be checked;
such ids are then treated as unseen examples for sampling, still used for the gradient,
never written to the record nor read from another example's record (the range test runs
in the ids' own dtype, so under x64 the id 2³²+5 is out of range, not example 5), and
counted in ``state.num_invalid_ids`` (check it from the host now and then). Pass ids of
an integer dtype that holds them: without x64, JAX converts int64 arguments of a jitted
function to int32 before AUSAM sees them.

Precision: the records (``dlp_sum``, ``loss``) have the parameters' float dtype promoted
with float32 (float64 for float64 parameters under x64), fixed at ``init``; the DLP
``|ℓ_after − ℓ_before|`` is taken in the losses' dtype promoted with float32, so float64
losses are subtracted in float64. Every state field keeps its dtype and shape across steps
(``lax.scan`` carries it).

Non-finite losses: a DLP that is not finite (the loss is NaN/inf at ``w`` or ``w + ε`` for
that example) is not recorded, so the example's record keeps its finite history; the
returned ``g_s`` is whatever the gradient is (NaN included), for the caller to see, e.g.
with ``optax.apply_if_finite`` around the base optimizer.

``rho`` may be a schedule ``count -> ρ`` (called with the number of steps taken before the
current one, the Optax convention). A scheduled or injected ρ is checked at every step: a
step at which it is not finite and ≥ 0 is skipped (zero update, records and ``loss`` kept;
the subset's passes still run, no ``lax.cond`` around them) and counted in
``state.num_skipped``. ``update`` checks at trace time that the state was made
for this configuration (``num_examples`` entries in the record, the key's shape) and raises
``ValueError`` otherwise, e.g. for a checkpoint of ``ausam(100, ...)`` restored into
``ausam(200, ...)``.

Example — a complete training loop (plain-JAX MLP; the data loader yields dataset ids)::

    import functools

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

    @functools.partial(jax.jit, static_argnames="full_batch")
    def train_step(params, opt_state, x, y, ids, full_batch):
        def per_example_loss_fn(p, positions):
            logits = mlp(p, x[positions])  # gather first: only len(positions) examples run
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[positions])

        updates, opt_state = opt.update(
            None,
            opt_state,
            params,
            per_example_loss_fn=per_example_loss_fn,
            ids=ids,
            full_batch=full_batch,  # the phase hint: one compiled program per phase
        )
        return optax.apply_updates(params, updates), opt_state

    for epoch in range(6):
        order = rng.permutation(n)  # the loader shuffles and hands out the dataset ids
        for s in range(steps_per_epoch):
            ids = order[s * batch : (s + 1) * batch]
            params, opt_state = train_step(
                params, opt_state, x_all[ids], y_all[ids], ids, full_batch=epoch < 1
            )
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
  uniform. With the reference's settings (``full_batch_epochs=1``, every example in each
  epoch) no example is unseen after epoch 0, and both agree.
- *Degenerate scores*: when ``max a = min a`` the reference divides 0 by 0 (NaN
  probabilities); we draw uniformly. The reference adds 1e-9 to ``f_max(t)``; we do not.
- *Sampling*: Gumbel-top-k, which draws exactly the distribution of the reference's
  ``torch.multinomial(p, k, replacement=False)`` (successive draws ∝ p among the rest).
- *k* = ``max(1, int(α·B))``; the reference has no ``max(1, ·)`` (k = 0 would train on an
  empty subset).
- ``full_batch_epochs`` (default 1, the reference) generalizes "first epoch: all of B";
  0 samples from the first step on (unseen examples then draw uniformly).
- ``axis_name`` (m-sharpness under ``shard_map``/``pmap``, not in the reference): each shard
  samples its own subset (key folded with the shard index) and perturbs with its own ĝ;
  ``g_s`` is averaged over shards; ids and DLPs are all-gathered so that every shard's
  record stays identical.
- The perturbed pass needs the per-example losses as well as the gradient, so it calls
  ``jax.value_and_grad(..., has_aux=True)`` at ``w + ε`` instead of
  :func:`agsopt.sharpness.perturbed_gradient` (which returns the gradient only).
- *ρ*: the reference builds a ρ scheduler but never calls it (ρ stays 0.1); a schedule may
  be passed here.

The update is a short glue of pure kernels, each usable and testable on its own:
:func:`ausam_valid_ids` (range test), :func:`ausam_select_subset` (sharpness-driven draw,
from :func:`ausam_f_max`, :func:`ausam_sampling_probs`, :func:`ausam_sample_subset`),
:func:`ausam_sam_on_subset` (the two passes and the DLPs) and :func:`ausam_record` (the
running-mean record update).
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
from agsopt._control_flow import choose_branch
from agsopt.sharpness._hinted import check_phase_hint, run_hinted_branch
from agsopt.sharpness._perturbation import (
    Radius,
    check_radius,
    mean_over_shards,
    radius_at,
    sam_perturbation,
)
from agsopt.sharpness._sam import count_skip, radius_is_static, radius_is_valid
from agsopt.tree_utils import key_for_state, split_state_key, statistics_dtype, tree_add_scaled

PyTree = Any

__all__ = [
    "AUSAMState",
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
]


class AUSAMState(NamedTuple):
    """State of :func:`ausam`.

    Float fields have the *statistics dtype* fixed at ``init``: the parameters' float dtypes
    promoted with float32 (float64 for float64 parameters under x64, float32 for
    float32/bfloat16/float16 parameters); every update keeps every field's dtype and shape.

    Attributes:
      count: steps taken (int32 scalar).
      key: raw PRNG key data (``jax.random.key_data``), split every step.
      dlp_sum: float[num_examples], sum of the recorded DLPs of each training example.
      dlp_count: int32[num_examples], number of recorded DLPs of each example.
      num_invalid_ids: int32 scalar, ids outside ``[0, num_examples)`` seen under ``jit``
        (saturates at the int32 maximum).
      loss: float scalar, mean unperturbed per-example loss over the last step's subset.
      num_skipped: int32 scalar, steps skipped because a scheduled or injected ρ was not
        finite and ≥ 0: zero update, records and ``loss`` kept (saturating).
    """

    count: jax.Array
    key: jax.Array
    dlp_sum: jax.Array
    dlp_count: jax.Array
    num_invalid_ids: jax.Array
    loss: jax.Array
    num_skipped: jax.Array


def _saturating_add(counter: jax.Array, amount: jax.Array) -> jax.Array:
    """``counter + amount`` for non-negative int32 counters, stopping at the int32 maximum."""
    amount = jnp.asarray(amount, counter.dtype)
    return counter + jnp.minimum(amount, jnp.iinfo(counter.dtype).max - counter)


def ausam_subset_size(alpha: float, batch_size: int) -> int:
    """``k = max(1, int(α·B))``: the reference's ``int(alpha * len(batch))`` (static).

    ``α·B`` is the double-precision product, exactly as in the reference, so α = 0.29 and
    B = 100 give 28 (0.29·100 = 28.999…); the ``max(1, ·)`` (not in the reference) keeps
    a tiny α from asking for an empty subset.
    """
    return max(1, min(batch_size, int(float(alpha) * int(batch_size))))


def _adlp(dlp_sum: jax.Array, dlp_count: jax.Array) -> tuple[jax.Array, jax.Array]:
    return dlp_sum / jnp.maximum(dlp_count, 1).astype(dlp_sum.dtype), dlp_count > 0


def ausam_adlp(state: AUSAMState) -> tuple[jax.Array, jax.Array]:
    """``(ADLP, seen)``: the running mean ``dlp_sum/dlp_count`` of each example's DLPs
    (0 where nothing is recorded), and whether the example has any record."""
    return _adlp(state.dlp_sum, state.dlp_count)


def ausam_f_max(
    epoch: jax.Array | int,
    f_min: float | jax.Array,
    f_max: float | jax.Array,
    trans_epoch: int,
) -> jax.Array:
    """``f_max(e) = f_min + (f_max − f_min)·min(e/trans_epoch, 1)``; ``f_max`` if trans is 0."""
    dtype = jnp.result_type(float, f_min, f_max)
    epoch = jnp.asarray(epoch, dtype)
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
    Computed in the scores' dtype promoted with float32.
    """
    scores = jnp.asarray(scores)
    a = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
    if seen is not None:
        any_seen = jnp.any(seen)
        top = jnp.max(jnp.where(seen, a, -jnp.inf))
        a = jnp.where(seen, a, jnp.where(any_seen, top, 0.0))
    lo, hi = jnp.min(a), jnp.max(a)
    spread = hi - lo
    unit = jnp.where(spread > 0, (a - lo) / jnp.where(spread > 0, spread, 1.0), 0.0)
    s = (f_min + (f_max_t - f_min) * unit).astype(a.dtype)
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


def ausam_valid_ids(ids: jax.Array, num_examples: int) -> tuple[jax.Array, jax.Array]:
    """``(safe_ids, valid)``: which ids lie in ``[0, num_examples)``, and int32 ids with the
    others replaced by 0.

    The range test runs in the ids' own dtype, *before* any cast, so a 64-bit id such as
    2³²+5 is invalid, not wrapped to 5. Invalid ids are never recorded nor read as another
    example's record.
    """
    ids = jnp.asarray(ids)
    valid = (ids >= 0) & (ids < num_examples)
    return jnp.where(valid, ids, 0).astype(jnp.int32), valid


def ausam_select_subset(
    key: jax.Array,
    dlp_sum: jax.Array,
    dlp_count: jax.Array,
    ids: jax.Array,
    valid: jax.Array,
    k: int,
    f_min: float | jax.Array,
    f_max_t: float | jax.Array,
) -> jax.Array:
    """The ``k`` batch positions of a sampled step (int32[k], distinct).

    ``a_i = ADLP[ids_i]`` from the record ``(dlp_sum, dlp_count)``; examples without a record
    (and invalid ids) count as unseen; probabilities :func:`ausam_sampling_probs`, draw
    :func:`ausam_sample_subset`. ``ids`` must be safe (in range), e.g. from
    :func:`ausam_valid_ids`.
    """
    adlp, seen = _adlp(dlp_sum, dlp_count)
    probs = ausam_sampling_probs(adlp[ids], f_min, f_max_t, seen=seen[ids] & valid)
    return ausam_sample_subset(key, probs, k)


def ausam_sam_on_subset(
    per_example_loss_fn: Callable[[PyTree, jax.Array], jax.Array],
    params: PyTree,
    positions: jax.Array,
    rho: float | jax.Array,
    *,
    eps: float = 1e-12,
) -> tuple[PyTree, jax.Array, jax.Array]:
    """SAM on the examples at ``positions``: ``(g_s, DLP, mean ℓ_before)``.

    ``ℓ_before = per_example_loss_fn(w, positions)``, ``g = ∇ mean ℓ_before``,
    ``ε = ρ g/(‖g‖ + eps)``, ``ℓ_after = per_example_loss_fn(w + ε, positions)``,
    ``g_s = ∇ mean ℓ_after`` and ``DLP = |ℓ_after − ℓ_before|`` per example. The difference
    is taken in the losses' dtype promoted with float32 (float64 losses stay float64).
    """

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
    acc = jnp.promote_types(jnp.promote_types(l_before.dtype, l_after.dtype), jnp.float32)
    dlp = jnp.abs(l_after.astype(acc) - l_before.astype(acc))
    return sharp, dlp, loss_before.astype(acc)


def ausam_record(
    dlp_sum: jax.Array,
    dlp_count: jax.Array,
    record_ids: jax.Array,
    dlp: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Add each finite ``dlp[j]`` to example ``record_ids[j]``'s record (sum and count).

    ``ADLP = sum/count`` is then the running mean of the example's DLPs; duplicate ids add
    up. Entries with a non-finite DLP or an id outside ``[0, len(dlp_sum))`` are left out
    (the record keeps its finite history). Returns ``(dlp_sum, dlp_count)`` in their dtypes.
    """
    dlp_sum, dlp_count, dlp = jnp.asarray(dlp_sum), jnp.asarray(dlp_count), jnp.asarray(dlp)
    num_examples = dlp_sum.shape[0]
    keep = jnp.isfinite(dlp) & (record_ids >= 0) & (record_ids < num_examples)
    rec = jnp.where(keep, record_ids, num_examples).astype(jnp.int32)
    new_sum = dlp_sum.at[rec].add(jnp.where(keep, dlp, 0).astype(dlp_sum.dtype), mode="drop")
    new_count = dlp_count.at[rec].add(jnp.ones_like(rec, dlp_count.dtype), mode="drop")
    return new_sum, new_count


def _check_call(per_example_loss_fn: Any, params: PyTree) -> None:
    if per_example_loss_fn is None:
        raise TypeError(
            "agsopt.ausam: update() needs the keyword argument per_example_loss_fn="
            "lambda params, positions: per-example losses of batch[positions]"
        )
    if not callable(per_example_loss_fn):
        raise TypeError("agsopt.ausam: per_example_loss_fn must be callable")
    if params is None:
        raise TypeError("agsopt.ausam: update() needs params")


def _check_ids(ids: Any, num_examples: int) -> jax.Array:
    if ids is None:
        raise TypeError("agsopt.ausam: update() needs ids=<int array of dataset ids, (B,)>")
    if validation.is_concrete(ids):
        ids_np = np.asarray(ids)
        if ids_np.ndim != 1 or not np.issubdtype(ids_np.dtype, np.integer):
            raise TypeError(f"ids must be a 1-D integer array, got {ids_np.dtype}{ids_np.shape}")
        bad = (ids_np < 0) | (ids_np >= num_examples)
        if np.any(bad):
            raise ValueError(
                f"ids must lie in [0, num_examples={num_examples}), got {ids_np[bad][0]}"
            )
    ids = jnp.asarray(ids)
    if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"ids must be a 1-D integer array, got {ids.dtype}{ids.shape}")
    if ids.shape[0] == 0:
        raise ValueError("ids must hold at least one example")
    return ids


def _check_state(state: AUSAMState, num_examples: int, key_shape: tuple[int, ...]) -> None:
    """Trace-time check that ``state`` was built for this configuration."""
    validation.check_state_fields(state, AUSAMState, "agsopt.ausam")
    for name, shape, arg in (
        ("dlp_sum", (num_examples,), f"num_examples={num_examples}"),
        ("dlp_count", (num_examples,), f"num_examples={num_examples}"),
        ("key", key_shape, "key"),
    ):
        got = tuple(jnp.shape(getattr(state, name)))
        if got != shape:
            raise ValueError(
                f"agsopt.ausam: state.{name} has shape {got}, but this ausam ({arg}) needs "
                f"{shape}: the state was made by a differently configured ausam (e.g. a "
                "checkpoint restored into a new configuration); re-initialize it or restore it "
                "into the configuration that wrote it"
            )


def ausam(
    num_examples: int,
    rho: Radius = 0.1,
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
    """AUSAM (arXiv:2406.08001): SAM on ``k = int(α B)`` examples sampled by sharpness.

    Chain it in front of the base optimizer and call ``update`` with the incoming updates
    ignored (``None``), ``per_example_loss_fn(params, positions) -> losses`` and the
    dataset ``ids`` of the batch; see the module docstring for the rule, the calling
    convention and a complete training loop. Returns ``g_s = ∇ mean_S ℓ(w + ε)``.

    Args:
      num_examples: size of the training set; ids must lie in ``[0, num_examples)``.
      rho: SAM radius ρ ≥ 0 (reference 0.1), or a schedule ``count -> ρ`` (an Optax
        schedule, called with the number of steps taken before this one).
      steps_per_epoch: steps per epoch; epochs drive the first-epoch rule and the ramp.
      alpha: sampled fraction α ∈ (0, 1], a static Python number (it fixes the shape ``k``).
      f_min: smallest score (> 0, so every example can be drawn); reference 0.1.
      f_max: largest score after the ramp (≥ f_min); reference 0.5.
      trans_epoch: epochs over which ``f_max(t)`` ramps from f_min to f_max (reference 30).
      full_batch_epochs: leading epochs that run SAM on the whole batch (reference 1).
      key: int seed or JAX PRNG key for the sampling.
      eps: added to ``‖g‖`` so a zero gradient gives ε = 0 and a finite update.
      axis_name: m-sharpness over this mapped axis (see the module docstring).

    ``update`` also takes the keyword ``full_batch`` (None, or a static bool: whether this
    step is in the ``full_batch_epochs``): a hint that compiles that branch outside
    ``lax.cond``, which XLA:CPU needs for conv nets to save compute; it never changes the
    result (see the module docstring).

    Under ``optax.inject_hyperparams`` (e.g. to schedule ``rho``) name ``num_examples``,
    ``steps_per_epoch``, ``alpha``, ``trans_epoch``, ``full_batch_epochs``, ``key`` and
    ``axis_name`` in ``static_args``.

    ``update`` raises ``ValueError`` (at trace time) when the state's record does not have
    ``num_examples`` entries, i.e. when a state from a differently configured ``ausam`` is
    passed in (a checkpoint restored into a new configuration).
    """
    num_examples = validation.check_int("num_examples", num_examples, minimum=1)
    if num_examples > np.iinfo(np.int32).max:
        raise ValueError(f"num_examples must fit in int32, got {num_examples}")
    steps_per_epoch = validation.check_int("steps_per_epoch", steps_per_epoch, minimum=1)
    trans_epoch = validation.check_int("trans_epoch", trans_epoch, minimum=0)
    full_batch_epochs = validation.check_int("full_batch_epochs", full_batch_epochs, minimum=0)
    for name, value in (
        ("steps_per_epoch", steps_per_epoch),
        ("trans_epoch", trans_epoch),
        ("full_batch_epochs", full_batch_epochs),
    ):
        if value > np.iinfo(np.int32).max:  # compared with the int32 step count
            raise ValueError(f"{name} must fit in int32 (≤ 2**31 - 1), got {value}")
    if isinstance(alpha, bool) or not validation.is_concrete(alpha) or np.ndim(alpha) != 0:
        raise TypeError(
            "alpha must be a static real number (it fixes the subset size k), got "
            f"{type(alpha).__name__}"
        )
    if not np.issubdtype(np.asarray(alpha).dtype, np.number) or np.iscomplexobj(alpha):
        raise TypeError(f"alpha must be a real number, got {np.asarray(alpha).dtype}")
    alpha = float(np.asarray(alpha))
    if not math.isfinite(alpha) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
    check_radius("rho", rho)
    rho_static = radius_is_static(rho)
    validation.check_positive("f_min", f_min)
    validation.check_positive("f_max", f_max)
    if validation.is_concrete(f_min) and validation.is_concrete(f_max):
        if np.any(np.asarray(f_max) < np.asarray(f_min)):
            raise ValueError(f"f_max must be >= f_min, got f_max={f_max}, f_min={f_min}")
    validation.check_positive("eps", eps)
    init_key, key_impl = key_for_state(key)
    key_shape = tuple(init_key.shape)

    def init_fn(params: PyTree) -> AUSAMState:
        dtype = statistics_dtype(params)
        return AUSAMState(
            count=jnp.zeros((), jnp.int32),
            key=jnp.array(init_key, copy=True),  # a donated state must not delete init_key
            dlp_sum=jnp.zeros((num_examples,), dtype),
            dlp_count=jnp.zeros((num_examples,), jnp.int32),
            num_invalid_ids=jnp.zeros((), jnp.int32),
            loss=jnp.zeros((), dtype),
            num_skipped=jnp.zeros((), jnp.int32),
        )

    def update_fn(
        updates: PyTree,
        state: AUSAMState,
        params: PyTree = None,
        *,
        per_example_loss_fn: Callable[[PyTree, jax.Array], jax.Array] | None = None,
        ids: jax.Array | None = None,
        full_batch: bool | None = None,
        **extra_args: Any,
    ) -> tuple[PyTree, AUSAMState]:
        del updates, extra_args  # AUSAM computes its own gradient on the subset
        full_batch = check_phase_hint("full_batch", full_batch, "agsopt.ausam")
        _check_call(per_example_loss_fn, params)
        ids, valid = ausam_valid_ids(_check_ids(ids, num_examples), num_examples)
        _check_state(state, num_examples, key_shape)
        state = jax.tree.map(jnp.asarray, state)  # e.g. NumPy leaves of a restored checkpoint
        batch = ids.shape[0]
        k = ausam_subset_size(alpha, batch)
        rho_t = radius_at(rho, state.count)
        next_key, sample_key = split_state_key(state.key, key_impl)
        if axis_name is not None:
            sample_key = jax.random.fold_in(sample_key, jax.lax.axis_index(axis_name))
        epoch = state.count // steps_per_epoch

        def full_branch(_: None) -> tuple[jax.Array, PyTree, jax.Array, jax.Array]:
            positions = jnp.arange(batch, dtype=jnp.int32)
            return positions, *ausam_sam_on_subset(
                per_example_loss_fn, params, positions, rho_t, eps=eps
            )

        def sampled_branch(_: None) -> tuple[jax.Array, PyTree, jax.Array, jax.Array]:
            f_max_t = ausam_f_max(epoch, f_min, f_max, trans_epoch)
            positions = ausam_select_subset(
                sample_key, state.dlp_sum, state.dlp_count, ids, valid, k, f_min, f_max_t
            )
            sharp, dlp, loss = ausam_sam_on_subset(
                per_example_loss_fn, params, positions, rho_t, eps=eps
            )
            pad = batch - k  # static; padded slots point past the batch and are not recorded
            positions = jnp.concatenate([positions, jnp.full((pad,), batch, jnp.int32)])
            return positions, sharp, jnp.concatenate([dlp, jnp.zeros((pad,), dlp.dtype)]), loss

        if k == batch:  # α B ≥ B: every step is a full-batch step, no sampling needed
            positions, sharp, dlp, loss = full_branch(None)
        elif full_batch_epochs == 0:
            positions, sharp, dlp, loss = sampled_branch(None)
        elif full_batch is None:
            positions, sharp, dlp, loss = choose_branch(
                epoch < full_batch_epochs, full_branch, sampled_branch, None
            )
        else:  # the caller's phase hint: that branch runs outside any lax.cond
            hinted, other = (
                (full_branch, sampled_branch) if full_batch else (sampled_branch, full_branch)
            )
            positions, sharp, dlp, loss = run_hinted_branch(
                (epoch < full_batch_epochs) == full_batch, hinted, other
            )

        sharp = mean_over_shards(sharp, axis_name)
        rho_ok = jnp.asarray(True) if rho_static else radius_is_valid(rho_t)
        if not rho_static:  # a skipped step: zero update, nothing recorded
            sharp = jax.tree.map(lambda g: jnp.where(rho_ok, g, jnp.zeros_like(g)), sharp)
            positions = jnp.where(rho_ok, positions, batch)
        num_invalid = jnp.sum(~valid).astype(jnp.int32)
        # the dataset ids of the evaluated positions; padding and invalid ids are not recorded
        taken = positions < batch
        pos_safe = jnp.where(taken, positions, 0)
        record_ids = jnp.where(taken & valid[pos_safe], ids[pos_safe], -1)
        if axis_name is not None:
            record_ids = jax.lax.all_gather(record_ids, axis_name, tiled=True)
            dlp = jax.lax.all_gather(dlp, axis_name, tiled=True)
            num_invalid = jax.lax.psum(num_invalid, axis_name)
            loss = jax.lax.pmean(loss, axis_name)
        dlp_sum, dlp_count = ausam_record(state.dlp_sum, state.dlp_count, record_ids, dlp)
        new_state = AUSAMState(
            count=optax.safe_increment(state.count),
            key=next_key,
            dlp_sum=dlp_sum,
            dlp_count=dlp_count,
            num_invalid_ids=_saturating_add(state.num_invalid_ids, num_invalid),
            loss=jnp.where(rho_ok, loss.astype(state.loss.dtype), state.loss),
            num_skipped=count_skip(state.num_skipped, rho_ok),
        )
        return sharp, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
