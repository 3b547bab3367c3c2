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


# --------------------------------------------------------------- curvature_diagonal
def curvature_ratios(curvatures, decay, power, min_ratio, max_ratio, mode="absolute", convert=True):
    """The docstring's formula, independently (numpy, float64): r = 1 at first; at each
    update h = c / r² (r of the state before it), m ← βm + (1−β)φ(h), φ = |h| or max(−h, 0),
    ρ = m^p; or ("fluctuation") m₁ ← βm₁ + (1−β)h, m₂ ← βm₂ + (1−β)h², b = 1 − β^k,
    ρ = (m₂/b − (m₁/b)²)^(p/2) from k = 2 on; r = clip(ρ / √mean(ρ²), min_ratio, max_ratio),
    r = 1 while every ρ is 0. ``convert=False``: h = c (a wrong formula, for power checks)."""
    m, m1, r = np.zeros(DIM), np.zeros(DIM), np.ones(DIM)
    for k, c in enumerate(curvatures, start=1):
        h = c / r**2 if convert else c
        phi = {"absolute": np.abs(h), "negative": np.maximum(-h, 0.0), "fluctuation": h * h}
        m = decay * m + (1 - decay) * phi[mode]
        m1 = decay * m1 + (1 - decay) * h
        if mode == "fluctuation":
            b = 1 - decay**k
            rho = np.maximum(m / b - (m1 / b) ** 2, 0.0) ** (power / 2)
            ready = k >= 2
        else:
            rho, ready = m**power, True
        mean_square = np.mean(rho**2)
        r = np.ones(DIM)
        if ready and mean_square > 0:
            r = np.clip(rho / np.sqrt(mean_square), min_ratio, max_ratio)
    return r


def run_curvature_rule(rule, curvatures, seed=8):
    state = rule.init(TEMPLATE)
    for g, c in zip(gradients(len(curvatures), seed), curvatures, strict=True):
        state = rule.update(
            state, UNRAVEL(jnp.asarray(g, jnp.float32)), UNRAVEL(jnp.asarray(c, jnp.float32))
        )
    return state


def curvature_inputs(num, seed, scales):
    rng = np.random.default_rng(seed)
    return [scales * (1.0 + 0.3 * rng.standard_normal(DIM)) for _ in range(num)]


def test_curvature_diagonal_starts_isotropic_and_needs_curvature():
    rule = covariance_rules.curvature_diagonal()
    assert rule.needs_curvature
    state = rule.init(TEMPLATE)
    np.testing.assert_allclose(dense(rule.matrix(state, 0.3)), 0.3 * np.eye(DIM), rtol=RTOL)
    assert isinstance(
        covariance_rules.get_rule("curvature_diagonal").init(TEMPLATE),
        covariance_rules.CurvatureDiagonalState,
    )


@pytest.mark.parametrize(
    ("power", "mode"),
    [(0.5, "absolute"), (0.25, "absolute"), (1.0, "negative"), (0.5, "fluctuation")],
)
def test_curvature_diagonal_unclipped_matches_formula(power, mode):
    """Bounds that never bind: Σ = σ diag(r) with r the formula's, and ‖Σ‖_F = σ√d. The
    inputs have mixed signs, so |h| and max(−h, 0) differ."""
    decay = 0.8
    rule = covariance_rules.curvature_diagonal(
        decay=decay, power=power, min_ratio=1e-4, max_ratio=1e4, mode=mode
    )
    scales = np.array([1.0, -2.0, 0.5, -4.0, 3.0, -0.3, 8.0, -1.0, 0.2, -6.0])
    curvatures = curvature_inputs(7, seed=9, scales=scales)
    state = run_curvature_rule(rule, curvatures)
    ratios = curvature_ratios(curvatures, decay, power, 1e-4, 1e4, mode)
    sigma = 0.7
    matrix = dense(rule.matrix(state, sigma))
    np.testing.assert_allclose(matrix, sigma * np.diag(ratios), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(matrix, "fro"), sigma * np.sqrt(DIM), rtol=1e-5)
    assert int(state.count) == 7
    # The EMAs themselves: after one update (r = 1 before it) m = (1 − β) φ(c), m₁ = (1 − β) c.
    one = run_curvature_rule(rule, curvatures[:1])
    c0 = curvatures[0]
    phi = {"absolute": np.abs(c0), "negative": np.maximum(-c0, 0), "fluctuation": c0 * c0}
    np.testing.assert_allclose(flat64(one.curvature), (1 - decay) * phi[mode], rtol=1e-6)
    np.testing.assert_allclose(flat64(one.mean), (1 - decay) * c0, rtol=1e-6)
    # The largest radius goes where the statistic is largest.
    assert np.argmax(np.diag(matrix)) == np.argmax(ratios)
    # Without the conversion to parameter coordinates (h = c, not c/r²) the radii differ:
    # the comparison can fail.
    naive = curvature_ratios(curvatures, decay, power, 1e-4, 1e4, mode, convert=False)
    assert np.max(np.abs(naive - ratios)) > 1e-2


def test_curvature_diagonal_clipped_and_converted_to_parameter_coordinates():
    """The bounds bind (default 0.25 and an upper bound of 2) and the result equals the
    clipped formula."""
    decay = 0.5
    rule = covariance_rules.curvature_diagonal(
        decay=decay, power=0.5, max_ratio=2.0, mode="absolute"
    )
    scales = np.ones(DIM)
    scales[2], scales[6] = 1e4, 1e-6
    curvatures = curvature_inputs(5, seed=10, scales=scales)
    state = run_curvature_rule(rule, curvatures)
    ratios = curvature_ratios(curvatures, decay, 0.5, 0.25, 2.0)
    m, r = np.zeros(DIM), np.ones(DIM)
    unclipped = None
    for c in curvatures:  # the unclipped values of the last step, to show both bounds bind
        m = decay * m + (1 - decay) * np.abs(c / r**2)
        unclipped = np.sqrt(m) / np.sqrt(np.mean(m))
        r = np.clip(unclipped, 0.25, 2.0)
    assert unclipped.max() > 2.0 and unclipped.min() < 0.25
    np.testing.assert_allclose(
        dense(rule.matrix(state, 0.4)), 0.4 * np.diag(ratios), rtol=1e-4, atol=1e-6
    )


def test_curvature_diagonal_defaults_are_fluctuation_quarter_power():
    """The registered rule (defaults) is the fluctuation statistic at p = 1/4, β = 0.9,
    r in [0.25, 4]: it equals the formula with those settings, not the absolute one."""
    rule = covariance_rules.get_rule("curvature_diagonal")
    scales = np.array([1.0, -2.0, 0.5, -4.0, 3.0, -0.3, 8.0, -1.0, 0.2, -6.0])
    curvatures = curvature_inputs(6, seed=15, scales=scales)
    state = run_curvature_rule(rule, curvatures)
    ratios = curvature_ratios(curvatures, 0.9, 0.25, 0.25, 4.0, "fluctuation")
    np.testing.assert_allclose(
        dense(rule.matrix(state, 0.3)), 0.3 * np.diag(ratios), rtol=1e-4, atol=1e-6
    )
    absolute = curvature_ratios(curvatures, 0.9, 0.25, 0.25, 4.0, "absolute")
    assert np.max(np.abs(absolute - ratios)) > 1e-2


def test_curvature_diagonal_negative_mode_on_convex_stays_isotropic():
    rule = covariance_rules.curvature_diagonal(mode="negative")
    state = run_curvature_rule(rule, curvature_inputs(4, seed=11, scales=np.full(DIM, 3.0)))
    np.testing.assert_allclose(dense(rule.matrix(state, 0.2)), 0.2 * np.eye(DIM), rtol=RTOL)


def test_curvature_diagonal_nan_curvature_gives_nonfinite_state():
    """A NaN curvature (fewer than two finite samples) makes the new state non-finite, which
    ags drops (see test_curvature_rule_in_ags_nan_curvature_skips_the_rule)."""
    rule = covariance_rules.curvature_diagonal()
    state = run_curvature_rule(rule, curvature_inputs(2, seed=12, scales=np.ones(DIM)))
    nan = UNRAVEL(jnp.full(DIM, jnp.nan, jnp.float32))
    new = rule.update(state, UNRAVEL(jnp.zeros(DIM, jnp.float32)), nan)
    assert not np.all(np.isfinite(flat64(new.curvature)))


def test_curvature_diagonal_dtypes_stable_x64_and_scan():
    """Float64 parameters and curvature in x64 mode: the state keeps its dtypes and shapes
    through lax.scan (float32 statistics as for the other rules, int32 count)."""
    with jax.enable_x64(True):
        params = {"a": jnp.zeros(3, jnp.float64), "b": jnp.zeros(2, jnp.float32)}
        rule = covariance_rules.curvature_diagonal()
        state = rule.init(params)
        before = jax.tree.map(lambda x: (x.shape, x.dtype), state)

        def body(s, c):
            tree = {"a": c[:3], "b": c[3:].astype(jnp.float32)}
            return rule.update(s, tree, tree), None

        inputs = jnp.asarray(np.random.default_rng(13).standard_normal((6, 5)), jnp.float64)
        final, _ = jax.lax.scan(body, state, inputs)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), final) == before
        assert int(final.count) == 6
        # A NamedTuple of arrays: saved as numpy arrays and restored (a checkpoint), it gives
        # the same Σ and the same next state.
        leaves, treedef = jax.tree.flatten(final)
        restored = jax.tree.unflatten(treedef, [jnp.asarray(np.asarray(x)) for x in leaves])
        assert isinstance(restored, covariance_rules.CurvatureDiagonalState)
        tree = {"a": inputs[0, :3], "b": inputs[0, 3:].astype(jnp.float32)}
        jax.tree.map(
            np.testing.assert_array_equal,
            rule.update(restored, tree, tree),
            rule.update(final, tree, tree),
        )
        jax.tree.map(
            np.testing.assert_array_equal,
            rule.matrix(restored, 0.5).inner.scale,
            rule.matrix(final, 0.5).inner.scale,
        )


def test_scaled_passes_curvature_to_the_inner_rule():
    inner = covariance_rules.curvature_diagonal(decay=0.6)
    wrapped = covariance_rules.scaled(inner)
    assert wrapped.needs_curvature
    assert not covariance_rules.scaled("isotropic").needs_curvature
    curvatures = curvature_inputs(3, seed=14, scales=np.linspace(0.1, 5.0, DIM))
    state = run_curvature_rule(wrapped, curvatures)
    expected = run_curvature_rule(inner, curvatures)
    jax.tree.map(np.testing.assert_array_equal, state.inner, expected)
    # A wrapped gradient rule keeps the two-argument update.
    plain = covariance_rules.scaled("adaptive_gradient_aligned")
    plain.update(plain.init(TEMPLATE), UNRAVEL(jnp.ones(DIM, jnp.float32)))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"decay": 1.0}, "decay"),
        ({"power": 0.0}, "power"),
        ({"min_ratio": -1.0}, "min_ratio"),
        ({"max_ratio": 0.0}, "max_ratio"),
        ({"min_ratio": 3.0, "max_ratio": 2.0}, "min_ratio"),
        ({"mode": "signed"}, "mode"),
    ],
)
def test_curvature_diagonal_rejects_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        covariance_rules.curvature_diagonal(**kwargs)


# ------------------------------------------------------- curvature rules inside ags
AGS_PARAMS = {"v": jnp.asarray([0.3, -0.2, 0.5], jnp.float32), "w": jnp.asarray([0.1, -0.4])}
AGS_ZEROS = jax.tree.map(jnp.zeros_like, AGS_PARAMS)


def _rastrigin(p):
    x = ravel_pytree(p)[0]
    return jnp.sum(x**2 + 10.0 * (1.0 - jnp.cos(2.0 * jnp.pi * x)))


def test_curvature_rule_in_ags_gets_the_estimators_curvature():
    """One step of ags with curvature_diagonal: the rule state equals rule.update applied to
    the estimator's gradient and curvature at the step key and at the rule's Σ."""
    import agsopt
    from agsopt.tree_utils import key_for_state, split_state_key

    rule = covariance_rules.curvature_diagonal()
    opt = agsopt.ags(0.3, 8, covariance=rule, key=4)
    state = opt.init(AGS_PARAMS)
    _, new = jax.jit(lambda s: opt.update(AGS_ZEROS, s, AGS_PARAMS, value_fn=_rastrigin))(state)
    _, step_key = split_state_key(*key_for_state(4))
    est = agsopt.smoothed_value_and_grad(
        _rastrigin,
        AGS_PARAMS,
        step_key,
        rule.matrix(rule.init(AGS_PARAMS), 0.3),
        num_samples=8,
        curvature=True,
    )
    expected = rule.update(rule.init(AGS_PARAMS), est.grad, est.curvature)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        new.rule_state,
        expected,
    )
    assert np.any(flat64(new.rule_state.curvature) != 0)


def test_three_field_user_rule_keeps_working_in_ags():
    """A rule built the old way, CovarianceRule(init, matrix, update) with a two-argument
    update, has needs_curvature False and is called as update(state, grad)."""
    import agsopt

    calls = []

    def update(state, grad):
        calls.append(jax.tree.structure(grad))
        return state

    rule = covariance_rules.CovarianceRule(
        lambda p: covariance_rules.EmptyRuleState(),
        lambda s, sigma: agsopt.covariance.isotropic(sigma),
        update,
    )
    assert rule.needs_curvature is False
    opt = agsopt.ags(0.3, 4, covariance=rule)
    updates, _ = opt.update(AGS_ZEROS, opt.init(AGS_PARAMS), AGS_PARAMS, value_fn=_rastrigin)
    assert calls == [jax.tree.structure(AGS_PARAMS)]
    assert np.all(np.isfinite(flat64(updates)))


def test_curvature_rule_in_ags_nan_curvature_skips_the_rule():
    """Plain method, N = 2, f NaN above x_0 = 0.3: a key with exactly one finite sample
    gives a gradient step (from that sample) and a NaN curvature; the rule's state is kept
    and num_rule_skipped counts it."""
    import agsopt

    def fun(p):
        x = ravel_pytree(p)[0]
        return jnp.where(x[0] > 0.3, jnp.nan, _rastrigin(p))

    rule = covariance_rules.curvature_diagonal()
    found = False
    for seed in range(30):
        opt = agsopt.ags(0.3, 2, covariance=rule, key=seed, method="plain")
        state = opt.init(AGS_PARAMS)
        updates, new = opt.update(AGS_ZEROS, state, AGS_PARAMS, value_fn=fun)
        if int(new.num_nonfinite) != 1:
            continue
        found = True
        assert int(new.num_skipped) == 0 and int(new.num_rule_skipped) == 1
        assert np.any(flat64(updates) != 0)
        jax.tree.map(np.testing.assert_array_equal, new.rule_state, state.rule_state)
        break
    assert found


def test_ags_rejects_curvature_rule_without_zero_order_samples():
    import agsopt

    with pytest.raises(ValueError, match="curvature"):
        agsopt.ags(0.3, 8, covariance="curvature_diagonal", method="first_order")
    with pytest.raises(ValueError, match="num_samples"):
        agsopt.ags(0.3, 1, covariance="curvature_diagonal")


# ---------------------------------------------------------------- curvature_metric


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0])


def test_curvature_metric_is_dgs_metric_step_on_the_estimators_curvature():
    """One update: R² of the last curvature (in parameter coordinates, times a²) against
    this one, then adaptation.metric_step; Σ = σ diag(a)."""
    from agsopt.smoothing import adaptation

    rule = covariance_rules.curvature_metric()
    params = {"a": jnp.zeros(2), "b": jnp.zeros((1, 2))}
    state = rule.init(params)
    c1 = {"a": jnp.asarray([4.0, 1.0]), "b": jnp.asarray([[16.0, 0.5]])}
    c2 = {"a": jnp.asarray([4.2, 0.9]), "b": jnp.asarray([[15.0, 0.6]])}
    state = rule.update(state, None, c1)  # no earlier curvature: R² = 0, a relaxes (stays 1)
    np.testing.assert_allclose(flat(state.scales), np.ones(4))
    np.testing.assert_allclose(flat(state.curvature), flat(c1))
    new = rule.update(state, None, c2)
    a, last = jnp.ones(4), jnp.asarray(flat(c1), jnp.float32)
    r2 = adaptation.r_squared(jnp.asarray(flat(c2)), last * a**2)
    expected = adaptation.metric_step(a, last, state.fit, jnp.asarray(flat(c2)), r2, True)
    np.testing.assert_allclose(flat(new.scales), expected[0], rtol=1e-6)
    np.testing.assert_allclose(float(new.fit), float(expected[2]), rtol=1e-6)
    assert float(new.fit) > 0.1 and flat(new.scales)[2] < 1 < flat(new.scales)[3]
    u = {"a": jnp.asarray([1.0, -2.0]), "b": jnp.asarray([[0.5, 3.0]])}
    np.testing.assert_allclose(
        flat(rule.matrix(new, 0.5).apply(u)), 0.5 * flat(new.scales) * flat(u), rtol=1e-6
    )
    # A NaN curvature (fewer than two finite samples) keeps the state.
    kept = rule.update(new, None, jax.tree.map(lambda c: c * jnp.nan, c2))
    np.testing.assert_array_equal(flat(kept.scales), flat(new.scales))


def test_curvature_metric_learns_an_ill_conditioned_quadratic_with_many_samples():
    """With N ≫ d the Stein curvature is precise enough for the gate: on Σ_j 10^j x_j²/2
    a moves towards h^{-1/2} (clipped to [1/10, 10]; the gate, R² ≈ 0.7 here, holds it short
    of the target) and AGS-Adam ends lower than with Σ = σI."""
    import optax

    import agsopt

    weights = jnp.asarray(10.0 ** np.arange(6))

    def f(x):
        return 0.5 * jnp.sum(weights * x * x)

    finals = {}
    for cov in ("isotropic", "curvature_metric"):
        tx = agsopt.ags_adam(0.05, sigma=0.2, num_samples=256, covariance=cov, key=0)
        x = jnp.ones(6)
        state = tx.init(x)
        step = jax.jit(lambda s, p: tx.update(jnp.zeros_like(p), s, p, value_fn=f))  # noqa: B023
        for _ in range(300):
            updates, state = step(state, x)
            x = optax.apply_updates(x, updates)
        finals[cov] = float(f(x))
    rule_state = state[0].rule_state
    target = np.asarray(weights) ** -0.5
    target = np.clip(target / np.exp(np.mean(np.log(target))), 0.1, 10.0)
    assert float(rule_state.fit) > 0.5
    log_a = np.log(flat(rule_state.scales))
    assert np.all(np.diff(log_a) < 0) and log_a[0] - log_a[-1] > np.log(20.0)  # target: 100
    assert np.corrcoef(log_a, np.log(target))[0, 1] > 0.95
    assert finals["curvature_metric"] < 0.75 * finals["isotropic"]
