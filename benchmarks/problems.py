"""The functions the benchmarks smooth: Rastrigin, Ackley, cos(aᵀx) and a Flax MLP's loss."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from agsopt.tree_utils import tree_size


@dataclass(frozen=True)
class Problem:
    """A scalar function ``fun(params)``, the point where it is smoothed and the scale σ."""

    name: str
    fun: Callable[[Any], jax.Array]
    params: Any
    sigma: float

    @property
    def dim(self) -> int:
        return tree_size(self.params)


def rastrigin(x: jax.Array) -> jax.Array:
    """``10 d + Σ_i (x_i² − 10 cos(2π x_i))``, minimum 0 at the origin."""
    return 10.0 * x.size + jnp.sum(x * x - 10.0 * jnp.cos(2.0 * jnp.pi * x))


def ackley(x: jax.Array) -> jax.Array:
    """``−20 exp(−0.2 √(‖x‖²/d)) − exp(Σ_i cos(2π x_i)/d) + 20 + e``, minimum 0 at 0."""
    mean_square = jnp.mean(x * x)
    mean_cos = jnp.mean(jnp.cos(2.0 * jnp.pi * x))
    return -20.0 * jnp.exp(-0.2 * jnp.sqrt(mean_square)) - jnp.exp(mean_cos) + 20.0 + math.e


TEST_FUNCTIONS = {"rastrigin": (rastrigin, 5.12), "ackley": (ackley, 32.768)}


def test_function_problem(name: str, dim: int, sigma: float = 0.1, seed: int = 0) -> Problem:
    """``name`` at a point drawn uniformly from its usual domain ``[−b, b]^d``."""
    fun, bound = TEST_FUNCTIONS[name]
    x = jax.random.uniform(jax.random.key(seed), (dim,), jnp.float32, -bound, bound)
    return Problem(f"{name} d={dim:.0e}".replace("e+0", "e"), fun, x, sigma)


class MLP(nnx.Module):
    """``din → hidden → hidden → classes`` with ReLU."""

    def __init__(self, din: int, hidden: int, classes: int, *, rngs: nnx.Rngs):
        self.layer1 = nnx.Linear(din, hidden, rngs=rngs)
        self.layer2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.layer3 = nnx.Linear(hidden, classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.layer1(x))
        x = jax.nn.relu(self.layer2(x))
        return self.layer3(x)


def mlp_problem(quick: bool, sigma: float = 0.01, seed: int = 0) -> Problem:
    """The mean cross-entropy of a Flax (nnx) MLP on one fixed random batch.

    Full: 128 → 256 → 256 → 10 (101,386 parameters), batch 128. Quick: 16 → 32 → 32 → 10,
    batch 16. The parameters are the ``nnx.State`` of its ``nnx.Param`` variables, a pytree.
    """
    din, hidden, batch = (16, 32, 16) if quick else (128, 256, 128)
    classes = 10
    model = MLP(din, hidden, classes, rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)
    inputs_key, labels_key = jax.random.split(jax.random.key(seed + 1))
    inputs = jax.random.normal(inputs_key, (batch, din))
    labels = jax.random.randint(labels_key, (batch,), 0, classes)

    def loss(p: Any) -> jax.Array:
        logits = nnx.merge(graphdef, p)(inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    size = tree_size(params)
    return Problem(f"MLP {din}-{hidden}-{hidden}-{classes} ({size:,} params)", loss, params, sigma)


def cos_problem(dim: int, sigma: float, seed: int = 0) -> tuple[Problem, jax.Array]:
    """``f(x) = cos(aᵀx)`` and its exact smoothed gradient at x, for ``Σ = σI``.

    ``∇f_Σ(x) = −sin(aᵀx) exp(−‖Σᵀa‖²/2) a`` (ALGORITHMS.md §1). ``a`` has norm 2 and x is
    placed so that ``aᵀx = 1`` (so neither sin nor cos vanishes).
    """
    a_key, x_key = jax.random.split(jax.random.key(seed))
    a = jax.random.normal(a_key, (dim,))
    a = 2.0 * a / jnp.linalg.norm(a)
    x = jax.random.normal(x_key, (dim,))
    x = x - (jnp.dot(a, x) - 1.0) * a / jnp.dot(a, a)

    def fun(y: jax.Array) -> jax.Array:
        return jnp.cos(jnp.dot(a, y))

    exact = -jnp.sin(jnp.dot(a, x)) * jnp.exp(-0.5 * sigma**2 * jnp.dot(a, a)) * a
    return Problem(f"cos(aᵀx) d={dim}", fun, x, sigma), exact
