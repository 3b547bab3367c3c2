"""Smoothing matrices Σ (agsopt.covariance) against dense d×d matrices built in the test.

Every parametrization acts on pytrees without forming Σ. Here the dense matrix is built
independently of the library (numpy, float64, on the ``ravel_pytree`` ordering of the
parameters) and ``apply(u)`` / ``solve_transpose(u)`` are compared with ``Σu`` and
``Σ^{-T}u`` for several ``u``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from agsopt import covariance

# A dict pytree with leaves of different ranks: d = 6 + 3 + 1 = 10.
SHAPES = {"a": (2, 3), "b": (3,), "c": ()}
LEAF_ORDER = ("a", "b", "c")  # ravel_pytree flattens dicts in sorted key order
DIM = 10
RTOL, ATOL = 2e-5, 2e-6  # float32 arithmetic on O(1) numbers, d = 10


def make_tree(rng: np.random.Generator, positive: bool = False) -> dict:
    tree = {}
    for name, shape in SHAPES.items():
        values = rng.uniform(0.5, 2.0, shape) if positive else rng.standard_normal(shape)
        tree[name] = jnp.asarray(values, jnp.float32)
    return tree


def flat64(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def unravel(vector: np.ndarray) -> dict:
    """Inverse of ``flat64`` written out by hand (sorted keys, row-major leaves)."""
    out, start = {}, 0
    for name in LEAF_ORDER:
        size = int(np.prod(SHAPES[name], dtype=int))
        out[name] = jnp.asarray(vector[start : start + size].reshape(SHAPES[name]), jnp.float32)
        start += size
    return out


def leaf_indicator(name: str) -> np.ndarray:
    """The 0/1 vector selecting the entries of leaf ``name`` in the flat ordering."""
    out, start = np.zeros(DIM), 0
    for leaf in LEAF_ORDER:
        size = int(np.prod(SHAPES[leaf], dtype=int))
        if leaf == name:
            out[start : start + size] = 1.0
        start += size
    return out


def test_flat_ordering_matches_ravel_pytree():
    rng = np.random.default_rng(0)
    tree = make_tree(rng)
    np.testing.assert_array_equal(flat64(unravel(flat64(tree))), flat64(tree))
    manual = np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in LEAF_ORDER])
    np.testing.assert_array_equal(flat64(tree), manual)


def check_against_dense(matrix, dense: np.ndarray, num_vectors: int = 3, seed: int = 1) -> None:
    """``apply`` = Σu and ``solve_transpose`` = Σ^{-T}u for random u."""
    assert dense.shape == (DIM, DIM)
    inverse_transpose = np.linalg.inv(dense).T
    rng = np.random.default_rng(seed)
    vectors = [make_tree(rng) for _ in range(num_vectors)]
    for u in vectors:
        np.testing.assert_allclose(flat64(matrix.apply(u)), dense @ flat64(u), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(
            flat64(matrix.solve_transpose(u)), inverse_transpose @ flat64(u), rtol=RTOL, atol=ATOL
        )


def orthonormal_columns(rng: np.random.Generator, k: int) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((DIM, k)))
    return q


def stack_directions(columns: np.ndarray) -> dict:
    """k flat columns → a pytree like the parameters with a leading axis of size k."""
    trees = [unravel(columns[:, j]) for j in range(columns.shape[1])]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


# ----------------------------------------------------------------------------- Diagonal


def test_diagonal_scalar_scale():
    check_against_dense(covariance.Diagonal(jnp.float32(0.7)), 0.7 * np.eye(DIM))


def test_isotropic_is_sigma_identity():
    check_against_dense(covariance.isotropic(1.3), 1.3 * np.eye(DIM))


def test_diagonal_per_leaf_scale():
    scale = {"a": 0.5, "b": 2.0, "c": 1.5}
    diagonal = sum(scale[k] * leaf_indicator(k) for k in LEAF_ORDER)
    check_against_dense(covariance.Diagonal(scale), np.diag(diagonal))
    check_against_dense(covariance.isotropic(scale), np.diag(diagonal))


def test_diagonal_full_tree_scale():
    scale = make_tree(np.random.default_rng(2), positive=True)
    check_against_dense(covariance.Diagonal(scale), np.diag(flat64(scale)))


# ------------------------------------------------------------------------ LowRankUpdate


def test_low_rank_update_matches_dense():
    rng = np.random.default_rng(3)
    columns = orthonormal_columns(rng, 2)
    coefficients = np.array([1.5, -0.6])  # 1 + c_j ≠ 0: Σ invertible (one eigenvalue < 1)
    dense = np.eye(DIM) + columns @ np.diag(coefficients) @ columns.T
    matrix = covariance.LowRankUpdate(
        stack_directions(columns), jnp.asarray(coefficients, jnp.float32)
    )
    check_against_dense(matrix, dense)


def test_low_rank_update_zero_direction_is_identity():
    rng = np.random.default_rng(4)
    zero = covariance.LowRankUpdate(
        stack_directions(np.zeros((DIM, 2))), jnp.asarray([3.0, -0.5], jnp.float32)
    )
    check_against_dense(zero, np.eye(DIM))
    # A zero direction next to a real one contributes nothing.
    columns = np.concatenate([orthonormal_columns(rng, 1), np.zeros((DIM, 1))], axis=1)
    mixed = covariance.LowRankUpdate(stack_directions(columns), jnp.asarray([2.0, 5.0]))
    check_against_dense(mixed, np.eye(DIM) + 2.0 * np.outer(columns[:, 0], columns[:, 0]))


# ---------------------------------------------------------------------- gradient_aligned


@pytest.mark.parametrize("ratio", [3.0, 0.4])
def test_gradient_aligned_matches_dense(ratio):
    rng = np.random.default_rng(5)
    v = orthonormal_columns(rng, 1)[:, 0]
    sigma = 0.8
    # Σ = σ⊥ I + (σ∥ − σ⊥) v vᵀ with σ∥ = κ σ⊥.
    dense = sigma * np.eye(DIM) + (ratio * sigma - sigma) * np.outer(v, v)
    matrix = covariance.gradient_aligned(sigma, ratio, unravel(v))
    check_against_dense(matrix, dense)
    # The inverse formula quoted in the docstring: Σ^{-1}u = u/σ⊥ + (1/σ∥ − 1/σ⊥)(v·u)v.
    inverse = np.eye(DIM) / sigma + (1 / (ratio * sigma) - 1 / sigma) * np.outer(v, v)
    np.testing.assert_allclose(inverse, np.linalg.inv(dense), rtol=1e-10, atol=1e-12)
    # Radius σ∥ along v, σ⊥ across it.
    np.testing.assert_allclose(flat64(matrix.apply(unravel(v))), ratio * sigma * v, rtol=RTOL)


def test_gradient_aligned_per_leaf_sigma_is_product_diag_times_rank_one():
    """A per-leaf σ⊥ gives Σ = D (I + (κ−1) v vᵀ): not symmetric, Σ^{-T} = D^{-1} R^{-1}."""
    rng = np.random.default_rng(6)
    v = orthonormal_columns(rng, 1)[:, 0]
    sigma = {"a": 0.5, "b": 2.0, "c": 1.0}
    ratio = 2.5
    diag = np.diag(sum(sigma[k] * leaf_indicator(k) for k in LEAF_ORDER))
    dense = diag @ (np.eye(DIM) + (ratio - 1) * np.outer(v, v))
    assert not np.allclose(dense, dense.T)
    check_against_dense(covariance.gradient_aligned(sigma, ratio, unravel(v)), dense)


def test_gradient_aligned_zero_direction_is_isotropic():
    matrix = covariance.gradient_aligned(0.3, 5.0, unravel(np.zeros(DIM)))
    check_against_dense(matrix, 0.3 * np.eye(DIM))


# ------------------------------------------------------------------------ Dense, Product


def nonsymmetric_dense(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dense = np.eye(DIM) + 0.4 * rng.standard_normal((DIM, DIM))
    assert np.linalg.cond(dense) < 50
    return dense


def test_dense_nonsymmetric_uses_inverse_transpose():
    dense = nonsymmetric_dense(7)
    matrix = covariance.Dense(jnp.asarray(dense, jnp.float32))
    check_against_dense(matrix, dense)
    # Σ^{-T}u differs from Σ^{-1}u by a clear margin for a non-symmetric Σ.
    u = make_tree(np.random.default_rng(8))
    got = flat64(matrix.solve_transpose(u))
    wrong = np.linalg.solve(dense, flat64(u))
    assert np.linalg.norm(got - wrong) > 0.1 * np.linalg.norm(wrong)


def test_product_of_dense_and_diagonal():
    dense = nonsymmetric_dense(9)
    scale = make_tree(np.random.default_rng(10), positive=True)
    matrix = covariance.Product(
        covariance.Diagonal(scale), covariance.Dense(jnp.asarray(dense, jnp.float32))
    )
    expected = np.diag(flat64(scale)) @ dense  # Σ = outer · inner
    check_against_dense(matrix, expected)
    reversed_order = covariance.Product(
        covariance.Dense(jnp.asarray(dense, jnp.float32)), covariance.Diagonal(scale)
    )
    check_against_dense(reversed_order, dense @ np.diag(flat64(scale)))


def test_product_of_per_leaf_scale_and_low_rank():
    rng = np.random.default_rng(11)
    columns = orthonormal_columns(rng, 2)
    coefficients = np.array([0.7, 2.0])
    low_rank = np.eye(DIM) + columns @ np.diag(coefficients) @ columns.T
    scale = {"a": 1.5, "b": 0.25, "c": 3.0}
    diag = np.diag(sum(scale[k] * leaf_indicator(k) for k in LEAF_ORDER))
    matrix = covariance.Product(
        covariance.LowRankUpdate(stack_directions(columns), jnp.asarray(coefficients)),
        covariance.Diagonal(scale),
    )
    check_against_dense(matrix, low_rank @ diag)


def test_matrices_are_pytrees_under_jit_and_vmap():
    """Σ can sit in optimizer state: it passes through jit as an argument, vmap over u works."""
    rng = np.random.default_rng(13)
    dense = nonsymmetric_dense(12)
    v = orthonormal_columns(rng, 1)[:, 0]
    sigma = {"a": 0.5, "b": 2.0, "c": 1.0}
    matrix = covariance.Product(
        covariance.Dense(jnp.asarray(dense, jnp.float32)),
        covariance.gradient_aligned(sigma, 3.0, unravel(v)),
    )
    diag = np.diag(sum(sigma[k] * leaf_indicator(k) for k in LEAF_ORDER))
    expected = dense @ diag @ (np.eye(DIM) + 2.0 * np.outer(v, v))
    leaves, treedef = jax.tree.flatten(matrix)
    rebuilt = jax.tree.unflatten(treedef, leaves)
    vectors = [make_tree(rng) for _ in range(3)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *vectors)

    @jax.jit
    def both(m, u):
        return jax.vmap(m.apply)(u), jax.vmap(m.solve_transpose)(u)

    applied, solved = both(rebuilt, stacked)
    for i, u in enumerate(vectors):
        row = lambda tree, i=i: flat64(jax.tree.map(lambda x: x[i], tree))
        np.testing.assert_allclose(row(applied), expected @ flat64(u), rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(
            row(solved), np.linalg.solve(expected.T, flat64(u)), rtol=RTOL, atol=ATOL
        )
