"""Smoothing matrices Σ for Gaussian smoothing, applied to pytrees without forming d×d.

Convention (used throughout agsopt): ``u ~ N(0, I)`` and the perturbation is ``Σu``, so

    f_Σ(x) = E_u f(x + Σu),      ∇f_Σ(x) = E_u[f(x + Σu) Σ^{-T} u] = E_u[∇f(x + Σu)].

Σ is the *square root* of the perturbation covariance ``ΣΣᵀ``. The AGS paper
(arXiv:2411.11747) writes the density as ``π^{-d/2} e^{-‖u‖²}``, i.e. ``u ~ N(0, I/2)``, so
its Σ is √2 times ours: ``Σ_agsopt = Σ_paper / √2`` (a paper σ of 1 is our σ ≈ 0.707).

Each parametrization is a NamedTuple (so a pytree: it can sit in optimizer state, be traced
and ``vmap``ped) with two methods:

- ``apply(u)``: ``Σu``;
- ``solve_transpose(u)``: ``Σ^{-T}u`` (exact, not a dense solve, except for :class:`Dense`).

``u`` is a pytree shaped like the parameters. Parametrizations compose with
:class:`Product`, e.g. a per-leaf scale times a gradient-aligned rank-one correction.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

PyTree = Any

__all__ = [
    "Dense",
    "Diagonal",
    "LowRankUpdate",
    "Product",
    "SmoothingMatrix",
    "gradient_aligned",
    "isotropic",
    "map_with_prefix",
]


class SmoothingMatrix(Protocol):
    """What the estimator needs of Σ."""

    def apply(self, u: PyTree) -> PyTree:
        """``Σu``."""
        ...

    def solve_transpose(self, u: PyTree) -> PyTree:
        """``Σ^{-T}u``."""
        ...


def map_with_prefix(fn: Callable[[Any, jax.Array], jax.Array], prefix: PyTree, tree: PyTree):
    """Map ``fn(p, leaf)`` where ``p`` comes from ``prefix``, a prefix tree of ``tree``.

    A bare scalar is a prefix of every tree (one σ for all), a tree of per-leaf scalars is a
    prefix of the parameters (one σ per leaf), and a tree like the parameters is its own prefix.
    """
    return jax.tree.map(lambda p, sub: jax.tree.map(lambda x: fn(p, x), sub), prefix, tree)


class Diagonal(NamedTuple):
    """``Σ = diag(scale)``; ``scale`` is a scalar, one scalar per leaf, or a tree like ``u``.

    The isotropic smoothing of IGS is ``Diagonal(σ)`` with a scalar σ.
    """

    scale: PyTree

    def apply(self, u: PyTree) -> PyTree:
        return map_with_prefix(lambda s, x: s * x, self.scale, u)

    def solve_transpose(self, u: PyTree) -> PyTree:
        return map_with_prefix(lambda s, x: x / s, self.scale, u)


def _project(directions: PyTree, u: PyTree) -> jax.Array:
    """``[v_j · u]_j`` for directions stacked along each leaf's leading axis (k of them)."""
    parts = [
        jnp.tensordot(v.reshape(v.shape[0], -1), x.reshape(-1), axes=1)
        for v, x in zip(jax.tree.leaves(directions), jax.tree.leaves(u), strict=True)
    ]
    return sum(parts[1:], parts[0])


def _combine(directions: PyTree, weights: jax.Array, u: PyTree) -> PyTree:
    """``u + Σ_j weights_j v_j``."""
    return jax.tree.map(
        lambda v, x: x + jnp.tensordot(weights, v, axes=1).astype(x.dtype), directions, u
    )


class LowRankUpdate(NamedTuple):
    """``Σ = I + Σ_j c_j v_j v_jᵀ`` with orthonormal directions ``v_j`` (or zero ones).

    ``directions`` is a pytree like the parameters with an extra leading axis of size k;
    ``coefficients`` has shape ``(k,)`` and needs ``1 + c_j ≠ 0``. Σ is symmetric and

        Σ^{-1} u = u + Σ_j (1/(1 + c_j) − 1)(v_j·u) v_j.

    A zero direction contributes nothing, so an uninitialized direction is the identity.
    """

    directions: PyTree
    coefficients: jax.Array

    def apply(self, u: PyTree) -> PyTree:
        return _combine(self.directions, self.coefficients * _project(self.directions, u), u)

    def solve_transpose(self, u: PyTree) -> PyTree:
        inverse_coefficients = 1.0 / (1.0 + self.coefficients) - 1.0
        return _combine(self.directions, inverse_coefficients * _project(self.directions, u), u)


class Product(NamedTuple):
    """``Σ = outer · inner``; ``Σ^{-T} = outer^{-T} inner^{-T}``."""

    outer: Any
    inner: Any

    def apply(self, u: PyTree) -> PyTree:
        return self.outer.apply(self.inner.apply(u))

    def solve_transpose(self, u: PyTree) -> PyTree:
        return self.outer.solve_transpose(self.inner.solve_transpose(u))


class Dense(NamedTuple):
    """A full matrix acting on the flattened parameters (``jax.flatten_util.ravel_pytree``).

    For small problems and tests only: it stores d² numbers and solves with a d×d LU per
    call. Σ need not be symmetric; ``solve_transpose`` uses ``Σᵀ``.
    """

    matrix: jax.Array

    def apply(self, u: PyTree) -> PyTree:
        flat, unravel = ravel_pytree(u)
        return unravel(self.matrix @ flat)

    def solve_transpose(self, u: PyTree) -> PyTree:
        flat, unravel = ravel_pytree(u)
        return unravel(jnp.linalg.solve(self.matrix.T, flat))


def isotropic(sigma: PyTree) -> Diagonal:
    """IGS: ``Σ = σI`` (σ a scalar, or one per leaf)."""
    return Diagonal(sigma)


def gradient_aligned(sigma_perp: PyTree, sigma_par_ratio: jax.Array, direction: PyTree) -> Product:
    """``Σ = σ⊥ (I + (κ − 1) v vᵀ)`` for a unit (or zero) pytree ``v``, with ``κ = σ∥/σ⊥``.

    With a scalar σ⊥ this is ``σ⊥ I + (σ∥ − σ⊥) v vᵀ``: smoothing radius σ∥ along ``v`` and
    σ⊥ across it, so ``Σu = σ⊥u + (σ∥ − σ⊥)(v·u)v`` and
    ``Σ^{-1}u = u/σ⊥ + (1/σ∥ − 1/σ⊥)(v·u)v``.
    """
    rank_one = LowRankUpdate(
        directions=jax.tree.map(lambda x: x[None], direction),
        coefficients=jnp.reshape(jnp.asarray(sigma_par_ratio, jnp.float32) - 1.0, (1,)),
    )
    return Product(Diagonal(sigma_perp), rank_one)
