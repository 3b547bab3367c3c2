"""``agsopt.ags`` in a real Optax pipeline, checkpointed and resumed on the same trajectory.

The pipeline, in order::

    ags (σ injected)  →  clip_by_global_norm  →  adam (learning-rate schedule injected)

- ``ags`` replaces the incoming gradient by the smoothed-gradient estimate; clipping acts on
  that estimate (place it after the estimator, as after any gradient rewrite).
- ``optax.inject_hyperparams`` keeps σ in the optimizer state, so it can be changed mid-run
  (here: halved after a third of the steps) and is saved with the checkpoint. ``num_samples``
  fixes array shapes, so it is static. The base optimizer is injected separately: the
  ``ags_*`` aliases take ``**kwargs``, which ``static_args`` cannot name.
- The learning rate is an Optax schedule (warm-up, then cosine decay).
- Every optimizer state is a NamedTuple of arrays (the PRNG key as raw ``uint32`` data), so
  ``flax.serialization`` writes it to bytes. The run is split in two at a checkpoint written
  to disk and restored into a fresh process state; the resumed run's parameters and losses
  are bit-for-bit those of the uninterrupted run.

    python examples/ags_checkpoint.py                    # d = 100 Ackley
    python examples/ags_checkpoint.py --small            # the tests' size (AGSOPT_EXAMPLE_SMALL=1)
    python examples/ags_checkpoint.py --dir /tmp/ckpt    # where the checkpoint goes

Requires ``pip install -e ".[nnx]"`` (for ``flax.serialization``).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax

import agsopt


def make_optimizer(steps: int, num_samples: int) -> optax.GradientTransformationExtraArgs:
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=0.05, warmup_steps=steps // 10, decay_steps=steps
    )
    return optax.chain(
        optax.inject_hyperparams(agsopt.ags, static_args=("num_samples",))(
            sigma=1.0, num_samples=num_samples, key=0
        ),
        optax.clip_by_global_norm(1.0),
        optax.inject_hyperparams(optax.adam)(learning_rate=schedule),
    )


def make_step(opt, f):
    @jax.jit
    def step(params, opt_state):
        updates, opt_state = opt.update(jnp.zeros_like(params), opt_state, params, value_fn=f)
        params = optax.apply_updates(params, updates)
        return params, opt_state, f(params)

    return step


def run(step, params, opt_state, first: int, last: int, sigma_step: int):
    """Steps ``first … last − 1``; σ is halved at step ``sigma_step`` (stored in the state)."""
    losses = []
    for t in range(first, last):
        if t == sigma_step:  # change an injected hyperparameter mid-run
            opt_state[0].hyperparams["sigma"] = 0.5 * opt_state[0].hyperparams["sigma"]
        params, opt_state, loss = step(params, opt_state)
        losses.append(loss)
    return params, opt_state, np.asarray(losses)


def save(path: Path, params, opt_state) -> None:
    path.write_bytes(flax.serialization.to_bytes({"params": params, "opt_state": opt_state}))


def restore(path: Path, params_template, opt) -> tuple[jax.Array, optax.OptState]:
    """Restore into a template with the same structure: fresh parameters and ``opt.init``."""
    template = {"params": params_template, "opt_state": opt.init(params_template)}
    restored = flax.serialization.from_bytes(template, path.read_bytes())
    return restored["params"], restored["opt_state"]


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small",
        action="store_true",
        default=bool(os.environ.get("AGSOPT_EXAMPLE_SMALL")),
        help="a quick run (what the tests do)",
    )
    parser.add_argument("--dir", default=None, help="checkpoint folder (default: a temp dir)")
    args = parser.parse_args(argv)
    dim, steps, num_samples = (10, 60, 8) if args.small else (100, 600, 64)
    sigma_step = steps // 3

    f = agsopt.functions.ackley
    params0 = jnp.full((dim,), 2.5)
    opt = make_optimizer(steps, num_samples)
    step = make_step(opt, f)

    # the uninterrupted run
    params, opt_state, losses = run(step, params0, opt.init(params0), 0, steps, sigma_step)

    # the same run, stopped halfway, checkpointed to disk, restored and finished
    half = steps // 2
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.dir or tmp) / "checkpoint.msgpack"
        path.parent.mkdir(parents=True, exist_ok=True)
        p, s, first_losses = run(step, params0, opt.init(params0), 0, half, sigma_step)
        save(path, p, s)
        del p, s  # a new process would start here
        p, s = restore(path, jnp.zeros(dim), opt)
        p, s, second_losses = run(step, p, s, half, steps, sigma_step)
        size = path.stat().st_size
    resumed_losses = np.concatenate([first_losses, second_losses])

    identical = bool(np.array_equal(np.asarray(p), np.asarray(params))) and bool(
        np.array_equal(resumed_losses, losses)
    )
    sigma = float(s[0].hyperparams["sigma"])
    lr = float(s[2].hyperparams["learning_rate"])
    print(
        f"Ackley d = {dim}: f {float(f(params0)):.3f} -> {float(losses[-1]):.4f} in {steps} steps"
    )
    print(f"checkpoint at step {half}: {size} bytes; final sigma {sigma}, learning rate {lr:.2e}")
    print(f"resumed run identical to the uninterrupted one (params and every loss): {identical}")
    return {"f0": float(f(params0)), "f": float(losses[-1]), "identical": identical}


if __name__ == "__main__":
    main()
