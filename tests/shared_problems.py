"""Small problems and helpers shared by several test modules."""

from __future__ import annotations

import textwrap

import jax.numpy as jnp
import numpy as np

COEF = {"b": 2.0, "w": 0.5}


def quartic_loss(params):
    total = jnp.zeros((), jnp.float32)
    for name, c in COEF.items():
        x = params[name].astype(jnp.float32)
        total = total + jnp.sum(c / 4 * (x - 1) ** 4 + 0.5 * x**2)
    return total


def quartic_grad_np(params):
    return {k: COEF[k] * (np.asarray(v, np.float64) - 1) ** 3 + v for k, v in params.items()}


def np_norm(tree):
    return np.sqrt(sum(np.sum(np.asarray(v, np.float64) ** 2) for v in tree.values()))


def make_params(dtype=jnp.float32):
    return {
        "b": jnp.asarray([[0.3, -0.7], [1.5, 0.1]], dtype),
        "w": jnp.asarray([0.2, -1.1, 2.0], dtype),
    }


def to_np(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def docstring_example(module) -> str:
    doc = module.__doc__
    start = doc.index("::\n", doc.index("Example")) + 3
    lines = []
    for line in doc[start:].splitlines():
        if line and not line.startswith("    "):
            break
        lines.append(line)
    return textwrap.dedent("\n".join(lines))
