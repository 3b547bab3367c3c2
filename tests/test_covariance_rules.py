"""Covariance rules (agsopt.covariance_rules): the Σ each rule produces, against formulas
computed in the test (numpy, float64) from the same sequence of gradient estimates."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from agsopt import covariance_rules

TEMPLATE = {"k": jnp.zeros((2, 3), jnp.float32), "b": jnp.zeros(4, jnp.float32)}
DIM = 10
LEAF_SLICES = {"b": slice(0, 4), "k": slice(4, 10)}  # ravel_pytree: sorted keys
_, UNRAVEL = ravel_pytree(TEMPLATE)
RTOL, ATOL = 2e-5, 1e-6


def flat64(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def dense(matrix) -> np.ndarray:
    """The d×d matrix of Σ: apply it to the basis vectors (one vmapped call)."""
    basis = jax.vmap(UNRAVEL)(jnp.eye(DIM, dtype=jnp.float32))
    columns = jax.vmap(matrix.apply)(basis)
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(columns), np.float64).T


def gradients(num: int, seed: int, spread=None) -> list[np.ndarray]:
    """Random flat gradient estimates; ``spread`` scales each coordinate's fluctuation."""
    rng = np.random.default_rng(seed)
    spread = np.ones(DIM) if spread is None else spread
    offset = rng.standard_normal(DIM)
    return [offset + spread * rng.standard_normal(DIM) for _ in range(num)]


def run_rule(rule, grads: list[np.ndarray]):
    state = rule.init(TEMPLATE)
    for g in grads:
        state = rule.update(state, UNRAVEL(jnp.asarray(g, jnp.float32)))
    return state


def per_leaf_diag(sigma: dict) -> np.ndarray:
    out = np.zeros(DIM)
    for name, s in sigma.items():
        out[LEAF_SLICES[name]] = s
    return np.diag(out)


def test_leaf_slices_match_ravel_pytree():
    tree = {"k": jnp.full((2, 3), 2.0), "b": jnp.full(4, 1.0)}
    np.testing.assert_array_equal(flat64(tree)[LEAF_SLICES["b"]], 1.0)
    np.testing.assert_array_equal(flat64(tree)[LEAF_SLICES["k"]], 2.0)


# ------------------------------------------------------------------------ isotropic
def test_isotropic_rule_is_sigma_identity_and_stateless():
    rule = covariance_rules.isotropic()
    state = run_rule(rule, gradients(3, seed=0))
    assert state == covariance_rules.EmptyRuleState()
    np.testing.assert_allclose(dense(rule.matrix(state, 0.7)), 0.7 * np.eye(DIM), rtol=RTOL)
    sigma = {"k": 0.5, "b": 2.0}
    np.testing.assert_allclose(dense(rule.matrix(state, sigma)), per_leaf_diag(sigma), rtol=RTOL)


def test_fixed_diagonal_rule():
    scale_flat = np.linspace(0.5, 2.0, DIM)
    rule = covariance_rules.fixed_diagonal(UNRAVEL(jnp.asarray(scale_flat, jnp.float32)))
    state = run_rule(rule, gradients(2, seed=1))
    np.testing.assert_allclose(
        dense(rule.matrix(state, 0.3)), 0.3 * np.diag(scale_flat), rtol=RTOL, atol=ATOL
    )
    with pytest.raises(ValueError, match="scale"):
        covariance_rules.fixed_diagonal({"k": jnp.ones((2, 3)), "b": -jnp.ones(4)})


# ----------------------------------------------------------------- gradient_aligned
def ema(grads: list[np.ndarray], decay: float) -> np.ndarray:
    m = np.zeros(DIM)
    for g in grads:
        m = decay * m + (1 - decay) * g
    return m


def test_gradient_aligned_starts_isotropic():
    rule = covariance_rules.gradient_aligned(ratio=3.0, decay=0.8)
    state = rule.init(TEMPLATE)
    np.testing.assert_array_equal(flat64(state.momentum), np.zeros(DIM))
    np.testing.assert_allclose(dense(rule.matrix(state, 0.4)), 0.4 * np.eye(DIM), rtol=RTOL)


@pytest.mark.parametrize(("ratio", "decay"), [(3.0, 0.8), (0.5, 0.0)])
def test_gradient_aligned_direction_is_normalized_ema(ratio, decay):
    """m ← βm + (1−β)ĝ from m = 0; Σ = σ(I + (κ − 1) v vᵀ) with v = m/‖m‖."""
    rule = covariance_rules.gradient_aligned(ratio=ratio, decay=decay)
    grads = gradients(5, seed=2)
    state = run_rule(rule, grads)
    m = ema(grads, decay)
    np.testing.assert_allclose(flat64(state.momentum), m, rtol=RTOL, atol=ATOL)
    v = m / np.linalg.norm(m)
    sigma = 0.6
    expected = sigma * (np.eye(DIM) + (ratio - 1) * np.outer(v, v))
    np.testing.assert_allclose(dense(rule.matrix(state, sigma)), expected, rtol=RTOL, atol=ATOL)
    # Radius κσ along v, σ across it: the singular values of Σ.
    singular = np.sort(np.linalg.svd(dense(rule.matrix(state, sigma)), compute_uv=False))
    np.testing.assert_allclose(singular, np.sort([sigma] * (DIM - 1) + [ratio * sigma]), rtol=1e-4)
    # A per-leaf σ scales the blocks: Σ = diag(σ_leaf)(I + (κ − 1) v vᵀ).
    per_leaf = {"k": 0.5, "b": 2.0}
    expected = per_leaf_diag(per_leaf) @ (np.eye(DIM) + (ratio - 1) * np.outer(v, v))
    np.testing.assert_allclose(dense(rule.matrix(state, per_leaf)), expected, rtol=RTOL, atol=ATOL)


def test_gradient_aligned_update_under_jit():
    rule = covariance_rules.gradient_aligned()
    grads = gradients(3, seed=3)
    eager = run_rule(rule, grads)
    state = rule.init(TEMPLATE)
    update = jax.jit(rule.update)
    for g in grads:
        state = update(state, UNRAVEL(jnp.asarray(g, jnp.float32)))
    np.testing.assert_allclose(flat64(state.momentum), flat64(eager.momentum), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("kwargs", "name"), [({"ratio": 0.0}, "ratio"), ({"decay": 1.0}, "decay")])
def test_gradient_aligned_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        covariance_rules.gradient_aligned(**kwargs)


# ---------------------------------------------------------------- adaptive_diagonal
def adaptive_ratios(grads, decay, min_ratio, max_ratio, clip=True) -> np.ndarray:
    """The docstring's formula, independently: m ← βm + (1−β)g, v ← βv + (1−β)(g − m)²
    (from m = g₁, v = 0; bias-corrected by 1 − β^(k−1) after k estimates), ρ = √v,
    r = clip(ρ / √mean(ρ²), min_ratio, max_ratio); r = 1 before two estimates."""
    if len(grads) < 2:
        return np.ones(DIM)
    m, v = grads[0].copy(), np.zeros(DIM)
    for g in grads[1:]:
        m = decay * m + (1 - decay) * g
        v = decay * v + (1 - decay) * (g - m) ** 2
    rho = np.sqrt(v / (1 - decay ** (len(grads) - 1)))
    r = rho / np.sqrt(np.mean(rho**2))
    return np.clip(r, min_ratio, max_ratio) if clip else r


@pytest.mark.parametrize("num_updates", [0, 1])
def test_adaptive_diagonal_is_isotropic_before_two_estimates(num_updates):
    rule = covariance_rules.adaptive_diagonal()
    state = run_rule(rule, gradients(num_updates, seed=4))
    np.testing.assert_allclose(dense(rule.matrix(state, 0.3)), 0.3 * np.eye(DIM), rtol=RTOL)


def test_adaptive_diagonal_unclipped_ratios_and_frobenius_norm():
    """With bounds that never bind, r is the normalized running spread and ‖Σ‖_F = σ√d."""
    decay = 0.7
    rule = covariance_rules.adaptive_diagonal(decay=decay, min_ratio=1e-3, max_ratio=1e3)
    spread = np.linspace(0.2, 3.0, DIM)
    grads = gradients(12, seed=5, spread=spread)
    state = run_rule(rule, grads)
    ratios = adaptive_ratios(grads, decay, 1e-3, 1e3, clip=False)
    assert ratios.min() > 1e-3 and ratios.max() < 1e3
    sigma = 0.4
    matrix = dense(rule.matrix(state, sigma))
    np.testing.assert_allclose(matrix, sigma * np.diag(ratios), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(matrix, "fro"), sigma * np.sqrt(DIM), rtol=1e-5)
    # The shape follows the fluctuation: the noisiest coordinate is smoothed the most.
    assert np.argmax(np.diag(matrix)) == np.argmax(ratios)
    # The count is the number of estimates seen.
    assert int(state.count) == 12


def test_adaptive_diagonal_clipped_ratios():
    """One coordinate fluctuates 100× more, one 100× less: the bounds bind (the lower one
    at its default 0.25; an upper bound of 2, since r ≤ √d = 3.2 after normalization), and
    the result equals the clipped formula (‖Σ‖_F then differs from σ√d)."""
    decay = 0.9
    rule = covariance_rules.adaptive_diagonal(decay=decay, max_ratio=2.0)
    spread = np.ones(DIM)
    spread[3] = 100.0
    spread[7] = 0.01
    grads = gradients(8, seed=6, spread=spread)
    state = run_rule(rule, grads)
    ratios = adaptive_ratios(grads, decay, 0.25, 2.0)
    unclipped = adaptive_ratios(grads, decay, 0.25, 2.0, clip=False)
    assert unclipped.max() > 2.0 and unclipped.min() < 0.25  # both bounds bind
    sigma = 0.5
    matrix = dense(rule.matrix(state, sigma))
    np.testing.assert_allclose(matrix, sigma * np.diag(ratios), rtol=1e-4, atol=1e-6)
    assert abs(np.linalg.norm(matrix, "fro") - sigma * np.sqrt(DIM)) > 0.1


def test_adaptive_diagonal_constant_gradient_stays_isotropic():
    """No fluctuation at all (the same estimate three times): the running spread is
    mathematically zero in every coordinate, so no direction may be preferred and r = 1
    (the rule's own ``mean_square > 0`` guard intends this). Float32 rounding in the mean's
    EMA (0.9·g + 0.1·g ≠ g by one ulp in a few entries) must not turn into a full-scale
    anisotropy; before the fix it gives r = 2.83 on one entry and 0.25 on most."""
    rule = covariance_rules.adaptive_diagonal()
    g = gradients(1, seed=7)[0]
    state = run_rule(rule, [g, g, g])
    np.testing.assert_allclose(dense(rule.matrix(state, 0.2)), 0.2 * np.eye(DIM), rtol=RTOL)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"decay": -0.1}, "decay"),
        ({"min_ratio": 0.0}, "min_ratio"),
        ({"max_ratio": -1.0}, "max_ratio"),
        ({"min_ratio": 2.0, "max_ratio": 1.0}, "min_ratio"),
    ],
)
def test_adaptive_diagonal_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        covariance_rules.adaptive_diagonal(**kwargs)


# -------------------------------------------------------------------------- get_rule
def test_get_rule():
    assert covariance_rules.get_rule("isotropic").init(TEMPLATE) == (
        covariance_rules.EmptyRuleState()
    )
    assert isinstance(
        covariance_rules.get_rule("gradient_aligned").init(TEMPLATE),
        covariance_rules.GradientAlignedState,
    )
    assert isinstance(
        covariance_rules.get_rule("adaptive_diagonal").init(TEMPLATE),
        covariance_rules.AdaptiveDiagonalState,
    )
    custom = covariance_rules.gradient_aligned(ratio=5.0)
    assert covariance_rules.get_rule(custom) is custom
    with pytest.raises(ValueError, match="covariance"):
        covariance_rules.get_rule("diagonal")
    with pytest.raises(TypeError, match="covariance"):
        covariance_rules.get_rule(3)
