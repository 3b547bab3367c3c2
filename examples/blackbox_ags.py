"""Black-box minimization with ``agsopt.ags_adam``: a function whose gradient is useless.

The objective is a staircase, ``f(x) = Σ_i floor(4 |x_i − c_i|) / 4``: it is piecewise
constant, so its gradient is zero almost everywhere and gradient descent never moves. AGS
estimates the gradient of the Gaussian-smoothed function ``f_Σ(x) = E_u f(x + Σu)``
(u ~ N(0, I)) from function values only, and ``ags_adam`` follows
it with Adam while σ and the learning rate decay.

The same function is then written as an opaque NumPy routine called through
``jax.pure_callback``: AGS never differentiates it, so a simulator or any other code JAX
cannot trace works the same way, and with the same random numbers it follows the same path.

    python examples/blackbox_ags.py            # d = 50
    python examples/blackbox_ags.py --small    # the size the tests run (AGSOPT_EXAMPLE_SMALL=1)
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

import agsopt


def make_problem(dim: int, seed: int = 0):
    center = np.random.default_rng(seed).uniform(-2.0, 2.0, dim).astype(np.float32)

    def staircase(x: jax.Array) -> jax.Array:  # minimum 0 wherever |x_i − c_i| < 1/4
        return jnp.sum(jnp.floor(4.0 * jnp.abs(x - center)) / 4.0)

    def staircase_numpy(x: np.ndarray) -> np.ndarray:  # the same, opaque to JAX
        return np.sum(np.floor(4.0 * np.abs(x - center)) / 4.0, axis=-1, dtype=np.float32)

    def black_box(x: jax.Array) -> jax.Array:
        out = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
        # vmap_method="expand_dims": under vmap NumPy receives a whole batch of points at once
        return jax.pure_callback(staircase_numpy, out, x, vmap_method="expand_dims")

    return staircase, black_box


def minimize(f, x0: jax.Array, steps: int, num_samples: int):
    schedule = optax.exponential_decay(1.0, transition_steps=steps, decay_rate=0.05)
    opt = agsopt.ags_adam(
        lambda t: 0.1 * schedule(t),  # learning rate
        sigma=lambda t: 0.5 * schedule(t),  # smoothing radius, any Optax schedule
        num_samples=num_samples,
        key=0,
    )

    def step(carry, _):
        x, state = carry
        # zero-order: the incoming updates are ignored, only f's values are used
        updates, state = opt.update(jnp.zeros_like(x), state, x, value_fn=f)
        x = optax.apply_updates(x, updates)
        return (x, state), f(x)

    (x, state), trace = jax.jit(lambda c: jax.lax.scan(step, c, length=steps))((x0, opt.init(x0)))
    return x, trace, int(state[0].num_evaluations)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--small",
        action="store_true",
        default=bool(os.environ.get("AGSOPT_EXAMPLE_SMALL")),
        help="a quick run (what the tests do)",
    )
    args = parser.parse_args(argv)
    dim, steps, num_samples = (10, 300, 16) if args.small else (50, 1000, 32)

    staircase, black_box = make_problem(dim)
    x0 = jnp.zeros(dim)
    print(f"d = {dim}: f(x0) = {float(staircase(x0)):.3f}, minimum 0")
    print(f"jax.grad at x0: max |∂f/∂x_i| = {float(jnp.max(jnp.abs(jax.grad(staircase)(x0))))}")

    x, trace, evaluations = minimize(staircase, x0, steps, num_samples)
    print(f"ags_adam on the jnp function:   f = {float(staircase(x)):.3f} after {steps} steps")
    print(f"  ({evaluations} evaluations; f every 100 steps: {np.round(trace[::100], 2)})")

    x_bb, _, _ = minimize(black_box, x0, steps, num_samples)
    gap = float(jnp.max(jnp.abs(x_bb - x)))
    print(f"ags_adam on the NumPy black box: f = {float(staircase(x_bb)):.3f} (max |Δx| {gap:.1e})")
    return {
        "f0": float(staircase(x0)),
        "f": float(staircase(x)),
        "f_black_box": float(staircase(x_bb)),
        "gap": gap,
        "evaluations": evaluations,
    }


if __name__ == "__main__":
    main()
