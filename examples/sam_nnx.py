"""A Flax NNX classifier trained with the SAM family: SAM, ASAM, BSAM, vSAM and AUSAM.

SAM, ASAM, BSAM and vSAM take the ordinary gradient as their incoming updates and the loss
on the same batch as the keyword ``value_fn``; with ``nnx.Optimizer`` the call is
``optimizer.update(model, grads, value_fn=value_fn)``, and ``value_fn`` receives the
parameters' ``nnx.State``: ``agsopt.nnx.state_loss(loss_of_model, model)`` turns the loss of
the model into that loss of the state (one line). AUSAM computes its own
gradient on a sampled subset of the batch, so it takes a per-example loss and the batch's
dataset ids instead (see ``train_ausam``). Both vSAM and AUSAM take a static phase hint
(``sam_step``, ``full_batch``) that compiles one program per phase; on an MLP it changes
little, on a conv net under XLA:CPU it is what saves compute (docs/training-loops.md).

The data: a 10-class problem labelled by a random teacher network, with 20 % of the training
labels replaced by random ones (the setting where SAM's flatter minima help).

    python examples/sam_nnx.py                 # all five methods, a few seconds each
    python examples/sam_nnx.py --method bsam   # one method
    python examples/sam_nnx.py --small         # the size the tests run (AGSOPT_EXAMPLE_SMALL=1)

Requires ``pip install -e ".[nnx]"``.
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import agsopt

METHODS = ("sam", "asam", "bsam", "vsam", "ausam")


class MLP(nnx.Module):
    def __init__(self, din: int, dhidden: int, dout: int, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(din, dhidden, rngs=rngs)
        self.out = nnx.Linear(dhidden, dout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(nnx.relu(self.hidden(x)))


def make_data(n_train: int, n_test: int, dim: int = 20, classes: int = 10, seed: int = 0):
    """Inputs ~ N(0, I); labels from a random teacher MLP; 20 % of training labels noisy."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(dim, 64)) / np.sqrt(dim)
    w2 = rng.normal(size=(64, classes)) / 8.0
    x = rng.normal(size=(n_train + n_test, dim)).astype(np.float32)
    y = np.argmax(np.maximum(x @ w1, 0.0) @ w2, axis=1)
    noisy = rng.random(n_train) < 0.2
    y_train = np.where(noisy, rng.integers(0, classes, n_train), y[:n_train])
    return (x[:n_train], y_train), (x[n_train:], y[n_train:])


def cross_entropy(model: MLP, x: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def make_transformation(method: str, total_steps: int, lr: optax.Schedule):
    """The sharpness-aware piece; the base optimizer is chained after it."""
    if method == "sam":
        return agsopt.sam(rho=0.05)
    if method == "asam":
        return agsopt.sam(rho=0.5, adaptive=True)
    if method == "bsam":
        # rho_min follows the learning rate from 0.05 down to 0, as the reference does
        return agsopt.bsam(rho_max=0.05, rho_min=agsopt.bsam_rho_min_schedule(lr, lr_max=0.05))
    if method == "vsam":
        # SAM on every step of the warm-up, then on adaptively sampled steps only
        return agsopt.vsam(rho=0.05, window=10, warmup_steps=total_steps // 4, last_layer=2)
    raise ValueError(f"unknown method {method!r}")


def train(method: str, data, epochs: int, batch: int, seed: int = 0) -> tuple[float, int]:
    """SAM, ASAM, BSAM or vSAM through ``nnx.Optimizer``; returns test accuracy, SAM steps."""
    (x_train, y_train), (x_test, y_test) = data
    steps_per_epoch = len(x_train) // batch
    total_steps = epochs * steps_per_epoch
    lr = optax.cosine_decay_schedule(0.05, decay_steps=total_steps)
    tx = optax.chain(
        make_transformation(method, total_steps, lr),
        optax.add_decayed_weights(1e-4),  # weight decay belongs to the base optimizer
        optax.sgd(lr, momentum=0.9),
    )
    model = MLP(x_train.shape[1], 128, 10, nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit(static_argnames="phase")
    def train_step(model, optimizer, x, y, phase):
        loss_of = lambda m: cross_entropy(m, x, y)  # the loss of the model, same batch
        value_fn = agsopt.nnx.state_loss(loss_of, model)  # ... as a loss of its nnx.State
        loss, grads = nnx.value_and_grad(loss_of)(model)
        hint = {} if phase is None else {"sam_step": phase}  # vSAM's phase hint
        optimizer.update(model, grads, value_fn=value_fn, **hint)
        return loss

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(x_train))
        for s in range(steps_per_epoch):
            idx = order[s * batch : (s + 1) * batch]
            phase = None
            if method == "vsam":  # which program the next step needs (reads the state);
                # on CPU a conv net saves compute only with it (docs/training-loops.md)
                phase = agsopt.sharpness.vsam_sam_step_hint(
                    optimizer.opt_state[0], warmup_steps=total_steps // 4
                )
            train_step(model, optimizer, x_train[idx], y_train[idx], phase)
    accuracy = float(jnp.mean(jnp.argmax(model(x_test), axis=1) == y_test))
    sam_steps = total_steps
    if method == "vsam":  # the vSAM state is the first element of the chain's state
        sam_steps = int(jax.tree.leaves(optimizer.opt_state[0].num_sam_steps)[0])
    return accuracy, sam_steps


def train_ausam(data, epochs: int, batch: int, seed: int = 0) -> tuple[float, int]:
    """AUSAM: SAM on ⌊αB⌋ examples of each batch, drawn by their historical sharpness."""
    (x_train, y_train), (x_test, y_test) = data
    n = len(x_train)
    steps_per_epoch = n // batch
    lr = optax.cosine_decay_schedule(0.05, decay_steps=epochs * steps_per_epoch)
    tx = optax.chain(
        agsopt.ausam(n, rho=0.05, alpha=0.5, steps_per_epoch=steps_per_epoch, trans_epoch=2),
        optax.add_decayed_weights(1e-4),
        optax.sgd(lr, momentum=0.9),
    )
    graphdef, params = nnx.split(MLP(x_train.shape[1], 128, 10, nnx.Rngs(seed)), nnx.Param)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, static_argnames="full_batch")
    def train_step(params, opt_state, x, y, ids, full_batch):
        def per_example_loss_fn(p, positions):
            logits = nnx.merge(graphdef, p)(x[positions])  # only the chosen examples run
            return optax.softmax_cross_entropy_with_integer_labels(logits, y[positions])

        # AUSAM ignores the incoming updates: no full-batch gradient is computed
        updates, opt_state = tx.update(
            None,
            opt_state,
            params,
            per_example_loss_fn=per_example_loss_fn,
            ids=ids,
            full_batch=full_batch,  # the phase hint: one compiled program per phase
        )
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    for epoch in range(epochs):
        order = rng.permutation(n)  # the loader hands out the dataset ids with the batch
        for s in range(steps_per_epoch):
            ids = order[s * batch : (s + 1) * batch]
            params, opt_state = train_step(
                params, opt_state, x_train[ids], y_train[ids], ids, full_batch=epoch < 1
            )
    model = nnx.merge(graphdef, params)
    accuracy = float(jnp.mean(jnp.argmax(model(x_test), axis=1) == y_test))
    return accuracy, epochs * steps_per_epoch


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=(*METHODS, "all"), default="all")
    parser.add_argument(
        "--small",
        action="store_true",
        default=bool(os.environ.get("AGSOPT_EXAMPLE_SMALL")),
        help="a quick run (what the tests do)",
    )
    args = parser.parse_args(argv)
    n_train, epochs = (1024, 3) if args.small else (8192, 10)
    data = make_data(n_train, 2048)
    results = {}
    for method in METHODS if args.method == "all" else (args.method,):
        if method == "ausam":
            accuracy, steps = train_ausam(data, epochs, batch=128)
        else:
            accuracy, steps = train(method, data, epochs, batch=128)
        results[method] = accuracy
        print(f"{method:6s} test accuracy {accuracy:.3f}  ({steps} sharpness-aware steps)")
    return results


if __name__ == "__main__":
    main()
