"""A caller's static hint for a two-way choice, so the hinted branch runs outside ``lax.cond``.

AUSAM (full-batch or sampled step) and vSAM (SAM or reuse step) choose between two
computations from their state. Under ``jit`` the default is ``lax.cond``, which runs only
the taken branch; but XLA:CPU compiles a branch body separately from the main program, and a
convolution's gradient inside one runs far slower than outside (measured ≈ 20× on a small
conv net: the backward convolutions are not rewritten to the fast library kernel there).
A static hint lets a training loop compile one program per branch (two programs, chosen on
the host) with the hinted branch as straight-line code.

A hint never changes the result: :func:`run_hinted_branch` computes the hinted branch
unconditionally and, when the state says the other branch is due (a wrong hint), computes
that one too, inside a ``lax.cond`` that is skipped when the hint is right, and returns it.

Outside any trace (``update`` called eagerly, e.g. in a debugging loop) the state is
concrete, and :func:`run_hinted_branch` (like :func:`agsopt._control_flow.choose_branch`
for the plain choice) picks the branch in Python:
a ``lax.cond`` called eagerly traces and compiles both branches anew at every call (≈ 0.5 s
a step for vSAM and AUSAM on a small model, against a few ms for SAM).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PyTree = Any

__all__ = ["check_phase_hint", "run_hinted_branch"]


def check_phase_hint(name: str, hint: Any, owner: str) -> bool | None:
    """``hint`` as a Python bool, or None; ``TypeError`` for anything not static."""
    if hint is None:
        return None
    if isinstance(hint, (bool, np.bool_)):
        return bool(hint)
    raise TypeError(
        f"{owner}: {name} must be None or a static Python bool (a hint that picks which "
        f"program is compiled, e.g. a static_argnames argument of jax.jit), got "
        f"{type(hint).__name__}"
    )


def run_hinted_branch(
    hint_right: jax.Array,
    hinted: Callable[[None], PyTree],
    other: Callable[[None], PyTree],
) -> PyTree:
    """``hinted(None)`` where ``hint_right`` holds, ``other(None)`` where it does not.

    ``hinted`` runs outside any ``lax.cond`` (it is what the caller expects this step to
    cost); ``other`` runs inside a ``lax.cond`` that is skipped when ``hint_right`` is
    True, so a right hint costs one branch and a wrong one both. Both branches must return
    pytrees of the same structure, shapes and dtypes. The result is selected leaf by leaf
    (``jnp.where``), so it equals the taken branch's output exactly.
    """
    if not isinstance(hint_right, jax.core.Tracer):  # eager: only the taken branch runs
        return hinted(None) if bool(hint_right) else other(None)
    result = hinted(None)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(jnp.shape(x), jnp.result_type(x)), result)

    def skipped(_: None) -> PyTree:
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

    fallback = jax.lax.cond(hint_right, skipped, other, None)
    return jax.tree.map(lambda h, f: jnp.where(hint_right, h, f), result, fallback)
