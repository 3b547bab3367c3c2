"""The shared digits task: a small Flax NNX MLP on scikit-learn's digits, with label noise.

Data. ``sklearn.datasets.load_digits`` (1797 grey 8×8 images, 10 classes), pixels scaled
to [0, 1] (÷16), split 75 % / 25 % (1347 train, 450 test), stratified, with a fixed seed
(``data_seed``). A fraction ``noise`` (default 20 %) of the *training* labels, picked with
the same seed, is flipped to a different class drawn uniformly from the other nine (so
exactly that fraction is wrong); the test labels stay clean.

Models (``model=``). ``"mlp"`` (default): a Flax NNX MLP ``64 → hidden (×depth, ReLU) →
10`` (``nnx.Linear`` layers, default init). ``"cnn"``: a small conv net on the 8×8 images,
``conv 3×3 1 → 16, ReLU, conv 3×3 16 → 32, ReLU, flatten, dense 2048 → 10`` (``nnx.Conv``
with SAME padding, default init; 25 k parameters). The optimizers see the parameters as a
pure nested dict: ``graphdef, state = nnx.split(model, nnx.Param)``, ``params =
nnx.to_pure_dict(state)`` (see :func:`init_model` for why not the ``nnx.State``), and every
loss is ``nnx.merge(graphdef, params)(x)`` inside the jitted step. Leaves come in input to
output order with the output layer last (``hidden/0, …, output``; ``conv1, conv2,
output``), so vSAM's ``last_layer=2`` is the output layer. Loss: mean softmax cross-entropy
on the (noisy) labels.

Training. Epochs of shuffled minibatches (``batch_size``, the incomplete last batch is
dropped, so every step has one shape and is compiled once); the loader hands the dataset
ids to the jitted step, which gathers the batch on the device. Every method shares the base
optimizer of the reference code, scaled to this task:

===========  ==========================================================================
all          ``optax.chain(<method>, optax.add_decayed_weights(1e-3),
             optax.sgd(cosine_decay(lr, total_steps), momentum=0.9))`` — weight decay is
             applied by the base optimizer, outside the perturbations (coupled)
SGD          the chain without a method; lr 0.05
SAM          ``agsopt.sam(rho=0.05)``; lr 0.05 (Foret et al.)
BSAM         ``agsopt.bsam(rho_max=0.05, rho_min=bsam_rho_min_schedule(lr, 0.05))``:
             ρ_min follows the cosine lr from 0.05 to 0; lr 0.05 (BSAM reference)
AUSAM        ``agsopt.ausam(n_train, rho=0.1, alpha=0.5, steps_per_epoch, f_min=0.1,
             f_max=0.5, trans_epoch=max(1, round(0.15·epochs)))`` — the reference ramps
             over 30 of 200 epochs, i.e. 15 %; first epoch on the full batch; lr 0.1
vSAM         ``agsopt.vsam(rho=0.05, window=50, warmup_steps=3·steps_per_epoch,
             last_layer=2)``, other settings the reference's (β 0.7, a1 = a2 = 0.13,
             max_p 0.8, 5 variance blocks); lr 0.05
optax_sam    ``optax.contrib.sam(<base>, chain(normalize(), sgd(0.05)), sync_period=2,
             opaque_mode=True)`` with ``grad_fn = lambda p, _: jax.grad(loss)(p)``: the same
             SAM step as ``agsopt.sam`` (for the speed comparison)
===========  ==========================================================================

Training loop. AUSAM and vSAM run in the form the training-loops guide documents: the
jitted step takes a static phase hint (:func:`make_train_step`), so the training loop
compiles one program per phase and each step runs its branch outside ``lax.cond``
(AUSAM: ``full_batch = epoch < 1``; vSAM: ``sam_step`` from
:func:`agsopt.sharpness.vsam_sam_step_hint`); ``hints=False`` runs the one default program.

Defaults of :func:`train`: the MLP, hidden 64, depth 1, batch 64 (21 steps per epoch), 20
epochs (420 steps). :func:`train` returns the clean test accuracy, the wall time (with and without
compilation), the per-step wall times (each step ``block_until_ready``) and, for vSAM, the
fraction of SAM steps.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import agsopt

METHODS = ("sgd", "sam", "bsam", "ausam", "vsam")
MODELS = ("mlp", "cnn")
AUSAM_FULL_BATCH_EPOCHS = 1  # agsopt.ausam's default, the reference's
ALL_METHODS = (*METHODS, "optax_sam")
LABELS = {
    "sgd": "SGD",
    "sam": "SAM",
    "bsam": "BSAM",
    "ausam": "AUSAM",
    "vsam": "vSAM",
    "optax_sam": "optax.contrib.sam",
}
NUM_CLASSES = 10

PyTree = Any


# --------------------------------------------------------------------------- data


class DigitsData(NamedTuple):
    """The split digits data; ``y_train`` carries the label noise, ``y_test`` is clean."""

    x_train: np.ndarray  # float32[n_train, 64], in [0, 1]
    y_train: np.ndarray  # int32[n_train], noisy
    y_train_clean: np.ndarray  # int32[n_train]
    x_test: np.ndarray  # float32[n_test, 64]
    y_test: np.ndarray  # int32[n_test]

    @property
    def noisy(self) -> np.ndarray:
        return self.y_train != self.y_train_clean


def flip_labels(labels: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Flip ``round(fraction·n)`` labels, picked at random, to a different random class."""
    labels = np.asarray(labels).copy()
    n_flip = int(round(fraction * labels.size))
    picked = rng.choice(labels.size, size=n_flip, replace=False)
    shift = rng.integers(1, NUM_CLASSES, size=n_flip)  # never 0: the new class differs
    labels[picked] = (labels[picked] + shift) % NUM_CLASSES
    return labels


def load_data(*, noise: float = 0.2, data_seed: int = 0, test_size: float = 0.25) -> DigitsData:
    """Digits, scaled to [0, 1], split with ``data_seed`` and with ``noise`` of the training
    labels flipped (same seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_size, random_state=data_seed, stratify=y
    )
    rng = np.random.default_rng(data_seed)
    noisy = flip_labels(y_train, noise, rng).astype(np.int32)
    return DigitsData(x_train, noisy, y_train.astype(np.int32), x_test, y_test.astype(np.int32))


# --------------------------------------------------------------------------- model


class MLP(nnx.Module):
    """``din → hidden (×depth, ReLU) → dout``; leaves in input-to-output order."""

    def __init__(self, din: int, hidden: int, dout: int, *, depth: int, rngs: nnx.Rngs):
        sizes = [din] + [hidden] * depth
        self.hidden = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        )
        self.output = nnx.Linear(sizes[-1], dout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.output(x)


class CNN(nnx.Module):
    """Two 3×3 conv layers (16 and 32 channels, SAME, ReLU) and a dense output layer, on the
    8×8 digits given flat (``[B, 64]``)."""

    def __init__(self, dout: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 16, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(16, 32, (3, 3), padding="SAME", rngs=rngs)
        self.output = nnx.Linear(8 * 8 * 32, dout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], 8, 8, 1)
        x = jax.nn.relu(self.conv1(x))
        x = jax.nn.relu(self.conv2(x))
        return self.output(x.reshape(x.shape[0], -1))


def init_model(
    seed: int, *, hidden: int, depth: int, din: int = 64, model: str = "mlp"
) -> tuple[Any, PyTree]:
    """``(graphdef, params)`` of a fresh :class:`MLP` (``model="mlp"``; ``hidden``, ``depth``)
    or :class:`CNN` (``model="cnn"``; ``hidden`` and ``depth`` unused); ``params`` is a pure
    nested dict of arrays (``nnx.to_pure_dict`` of the ``nnx.Param`` state), which
    ``nnx.merge`` accepts.

    A pure dict rather than the ``nnx.State`` itself because every jitted step passes the
    parameters, the momentum and (vSAM) the stored PSF in and out, and flattening and
    rebuilding an ``nnx.State`` costs ≈ 0.1 ms per call on the 2-core test machine
    (identity ``jit``: 144 µs for the 4-leaf State against 33 µs for the same dict) — as much
    as a whole SGD step of the small model.
    """
    if model == "mlp":
        module: nnx.Module = MLP(din, hidden, NUM_CLASSES, depth=depth, rngs=nnx.Rngs(seed))
    elif model == "cnn":
        if din != 64:
            raise ValueError(f"the conv net takes the 8×8 digits (din=64), got din={din}")
        module = CNN(NUM_CLASSES, rngs=nnx.Rngs(seed))
    else:
        raise ValueError(f"unknown model {model!r}; expected one of {MODELS}")
    graphdef, state = nnx.split(module, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def make_losses(graphdef: Any) -> tuple[Callable, Callable]:
    """``(per_example_loss(params, x, y), loss(params, x, y))`` for the split model."""

    def per_example_loss(params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    def loss(params: PyTree, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean(per_example_loss(params, x, y))

    return per_example_loss, loss


def accuracy(graphdef: Any, params: PyTree, x: np.ndarray, y: np.ndarray) -> float:
    logits = nnx.merge(graphdef, params)(jnp.asarray(x))
    return float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y)))


# --------------------------------------------------------------------------- optimizers


@dataclasses.dataclass(frozen=True)
class HParams:
    """Reference-style hyperparameters scaled to digits (see the module docstring)."""

    lr: float = 0.05
    ausam_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-3
    rho: float = 0.05  # SAM, vSAM, optax_sam; BSAM's rho_max and rho_min at lr_max
    ausam_rho: float = 0.1
    alpha: float = 0.5
    f_min: float = 0.1
    f_max: float = 0.5
    trans_fraction: float = 0.15  # AUSAM's ramp: 30 of the reference's 200 epochs
    vsam_window: int = 50
    vsam_warmup_epochs: int = 3
    vsam_last_layer: int = 2


def base_learning_rate(method: str, hp: HParams) -> float:
    return hp.ausam_lr if method == "ausam" else hp.lr


def make_optimizer(
    method: str,
    *,
    steps_per_epoch: int,
    epochs: int,
    num_examples: int,
    hp: HParams = HParams(),
    seed: int = 0,
    vsam_warmup_steps: int | None = None,
) -> optax.GradientTransformationExtraArgs:
    """The optimizer of ``method`` (one of :data:`ALL_METHODS`) with a cosine learning rate
    over ``steps_per_epoch · epochs`` steps."""
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {ALL_METHODS}")
    lr_max = base_learning_rate(method, hp)
    total_steps = steps_per_epoch * epochs
    lr = optax.cosine_decay_schedule(lr_max, decay_steps=max(total_steps, 1))
    base = optax.chain(
        optax.add_decayed_weights(hp.weight_decay), optax.sgd(lr, momentum=hp.momentum)
    )
    if method == "sgd":
        return optax.with_extra_args_support(base)
    if method == "sam":
        return optax.chain(agsopt.sam(hp.rho), base)
    if method == "bsam":
        rho_min = agsopt.bsam_rho_min_schedule(lr, lr_max, rho_hi=hp.rho)
        return optax.chain(agsopt.bsam(rho_max=hp.rho, rho_min=rho_min), base)
    if method == "ausam":
        transform = agsopt.ausam(
            num_examples,
            hp.ausam_rho,
            steps_per_epoch=steps_per_epoch,
            alpha=hp.alpha,
            f_min=hp.f_min,
            f_max=hp.f_max,
            trans_epoch=max(1, round(hp.trans_fraction * epochs)),
            key=seed,
        )
        return optax.chain(transform, base)
    if method == "vsam":
        warmup = hp.vsam_warmup_epochs * steps_per_epoch
        transform = agsopt.vsam(
            hp.rho,
            window=hp.vsam_window,
            warmup_steps=warmup if vsam_warmup_steps is None else vsam_warmup_steps,
            last_layer=hp.vsam_last_layer,
            key=seed,
        )
        return optax.chain(transform, base)
    # optax_sam: one opaque update = one ascent (inside) + one descent step of `base`
    adversary = optax.chain(optax.contrib.normalize(), optax.sgd(hp.rho))
    return optax.contrib.sam(base, adversary, sync_period=2, opaque_mode=True)


def build(
    method: str,
    *,
    steps_per_epoch: int,
    epochs: int,
    num_examples: int,
    hidden: int,
    depth: int,
    hp: HParams = HParams(),
    seed: int = 0,
    vsam_warmup_steps: int | None = None,
    model: str = "mlp",
) -> tuple[Any, optax.GradientTransformationExtraArgs, Callable[..., Any]]:
    """``(graphdef, optimizer, jitted step)`` for one configuration, cached, so that callers
    asking for the same configuration (e.g. a benchmark timing the very steps it trains
    with) share one compilation. The parameters come from :func:`init_model`."""
    return _build(
        method,
        steps_per_epoch,
        epochs,
        num_examples,
        hidden,
        depth,
        hp,
        seed,
        vsam_warmup_steps,
        model,
    )


@functools.lru_cache(maxsize=64)
def _build(method, steps_per_epoch, epochs, num_examples, hidden, depth, hp, seed, warmup, model):
    graphdef, _ = init_model(0, hidden=hidden, depth=depth, model=model)  # the structure only
    opt = make_optimizer(
        method,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        num_examples=num_examples,
        hp=hp,
        seed=seed,
        vsam_warmup_steps=warmup,
    )
    return graphdef, opt, make_train_step(method, graphdef, opt)


def make_train_step(
    method: str, graphdef: Any, opt: optax.GradientTransformationExtraArgs
) -> Callable[..., tuple[PyTree, Any, jax.Array]]:
    """Jitted ``step(params, opt_state, x_all, y_all, ids, hint=None) -> (params, opt_state,
    loss)``.

    The batch is ``x_all[ids]``, gathered on the device. ``loss`` is the mean loss at the
    unperturbed parameters on the batch (AUSAM: on its sampled subset, the only loss it
    evaluates). ``hint`` is static (one compiled program per value): AUSAM's ``full_batch``
    or vSAM's ``sam_step`` phase hint, ignored by the other methods; None is the default
    single program. A hint never changes the result, only which branch runs outside
    ``lax.cond``.
    """
    per_example_loss, loss_fn = make_losses(graphdef)

    def step(params, opt_state, x_all, y_all, ids, hint=None):
        if method == "ausam":
            x_b, y_b = x_all[ids], y_all[ids]

            def per_example_loss_fn(p, positions):
                return per_example_loss(p, x_b[positions], y_b[positions])  # gather first

            updates, opt_state = opt.update(
                None,
                opt_state,
                params,
                per_example_loss_fn=per_example_loss_fn,
                ids=ids,
                full_batch=hint,
            )
            loss = opt_state[0].loss
        else:
            x, y = x_all[ids], y_all[ids]
            loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
            if method == "sgd":
                updates, opt_state = opt.update(grads, opt_state, params)
            elif method == "optax_sam":
                updates, opt_state = opt.update(
                    grads, opt_state, params, grad_fn=lambda p, _: jax.grad(loss_fn)(p, x, y)
                )
            elif method == "vsam":
                updates, opt_state = opt.update(
                    grads, opt_state, params, value_fn=lambda p: loss_fn(p, x, y), sam_step=hint
                )
            else:
                updates, opt_state = opt.update(
                    grads, opt_state, params, value_fn=lambda p: loss_fn(p, x, y)
                )
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, static_argnames="hint")


def phase_hint(method: str, opt_state: Any, epoch: int, hp: HParams, steps_per_epoch: int):
    """The static ``hint`` of the next step of ``method`` (see :func:`make_train_step`):
    AUSAM's ``full_batch = epoch < 1``, vSAM's :func:`agsopt.sharpness.vsam_sam_step_hint`
    (reads the state), None for the other methods."""
    if method == "ausam":
        return epoch < AUSAM_FULL_BATCH_EPOCHS
    if method == "vsam":
        warmup = hp.vsam_warmup_epochs * steps_per_epoch
        return agsopt.sharpness.vsam_sam_step_hint(opt_state[0], warmup_steps=warmup)
    return None


# --------------------------------------------------------------------------- training


@dataclasses.dataclass
class TrainResult:
    """What :func:`train` measured.

    ``total_s`` is the wall time of the whole training loop, compilation (the first step)
    included; ``steps_s`` the sum of the per-step wall times after the first step;
    ``step_times_s`` every step's wall time (each step ``block_until_ready``; index 0
    includes compilation). For vSAM ``sam_flags`` tells which steps were SAM steps and
    ``sam_fraction`` / ``sam_fraction_after_warmup`` their share of all / of the
    post-warm-up steps; None for the other methods.
    """

    method: str
    seed: int
    epochs: int
    steps: int
    test_accuracy: float
    train_accuracy_noisy: float
    train_accuracy_clean: float
    final_loss: float
    total_s: float
    compile_s: float
    steps_s: float
    step_times_s: np.ndarray
    sam_fraction: float | None = None
    sam_fraction_after_warmup: float | None = None
    sam_flags: np.ndarray | None = None

    @property
    def median_step_s(self) -> float:
        return float(np.median(self.step_times_s[1:]))

    def summary(self) -> dict[str, Any]:
        """JSON-friendly summary (no per-step arrays)."""
        out = dataclasses.asdict(self)
        del out["step_times_s"], out["sam_flags"]
        out["median_step_s"] = self.median_step_s
        return out


def train(
    method: str,
    *,
    seed: int = 0,
    epochs: int = 20,
    batch_size: int = 64,
    hidden: int = 64,
    depth: int = 1,
    noise: float = 0.2,
    data_seed: int = 0,
    hp: HParams = HParams(),
    data: DigitsData | None = None,
    model: str = "mlp",
    hints: bool = True,
) -> TrainResult:
    """Train ``model`` on noisy digits with ``method`` and evaluate on the clean test set.

    ``seed`` drives the initialization, the shuffling and the optimizers' own keys;
    ``data_seed`` the split and the label noise (pass ``data`` to reuse a loaded split).
    ``hints`` runs AUSAM and vSAM with their phase hints (one program per phase, the
    documented loop); False runs the default single program (same results).
    """
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {ALL_METHODS}")
    data = load_data(noise=noise, data_seed=data_seed) if data is None else data
    n_train = data.x_train.shape[0]
    steps_per_epoch = n_train // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch_size {batch_size} exceeds the training set ({n_train})")
    graphdef, params = init_model(seed, hidden=hidden, depth=depth, model=model)
    _, opt, step = build(
        method,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        num_examples=n_train,
        hidden=hidden,
        depth=depth,
        hp=hp,
        seed=seed,
        model=model,
    )
    opt_state = opt.init(params)
    x_all, y_all = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    rng = np.random.default_rng(seed)

    times: list[float] = []
    flags: list[bool] = []
    loss = jnp.zeros(())
    start = time.perf_counter()
    for epoch in range(epochs):
        order = rng.permutation(n_train).astype(np.int32)
        for s in range(steps_per_epoch):
            ids = order[s * batch_size : (s + 1) * batch_size]
            t0 = time.perf_counter()
            hint = phase_hint(method, opt_state, epoch, hp, steps_per_epoch) if hints else None
            params, opt_state, loss = jax.block_until_ready(
                step(params, opt_state, x_all, y_all, ids, hint=hint)
            )
            times.append(time.perf_counter() - t0)
            if method == "vsam":
                flags.append(bool(opt_state[0].last_was_sam))
    total_s = time.perf_counter() - start

    step_times = np.asarray(times)
    result = TrainResult(
        method=method,
        seed=seed,
        epochs=epochs,
        steps=len(times),
        test_accuracy=accuracy(graphdef, params, data.x_test, data.y_test),
        train_accuracy_noisy=accuracy(graphdef, params, data.x_train, data.y_train),
        train_accuracy_clean=accuracy(graphdef, params, data.x_train, data.y_train_clean),
        final_loss=float(loss),
        total_s=total_s,
        compile_s=float(step_times[0]),
        steps_s=float(step_times[1:].sum()),
        step_times_s=step_times,
    )
    if method == "vsam":
        sam_flags = np.asarray(flags)
        warmup = hp.vsam_warmup_epochs * steps_per_epoch
        assert int(opt_state[0].num_sam_steps) == int(sam_flags.sum())
        result.sam_flags = sam_flags
        result.sam_fraction = float(sam_flags.mean())
        after = sam_flags[warmup:]
        result.sam_fraction_after_warmup = float(after.mean()) if after.size else None
    return result
