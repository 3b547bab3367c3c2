"""agsopt.dgs (adaptive directional smoothing, arXiv:2002.03001 / arXiv:2006.10887).

Against written-out formulas: the gradient it returns (exact for a quadratic with k = d),
ASGF's radius rule and the Lipschitz learning rate on one step, the evaluation count,
best-point tracking, restarts, the stopping signal, non-finite values, and convergence on
the sphere from the box recipe.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import agsopt
from agsopt.smoothing import adaptation
from agsopt.smoothing.directional import directional_basis, directional_value_and_grad
from agsopt.tree_utils import split_state_key

DIM = 4
A = jnp.diag(jnp.asarray([1.0, 2.0, 3.0, 4.0]))
B = jnp.asarray([0.5, -1.0, 0.0, 2.0])


def quadratic(x):
    return 0.5 * x @ A @ x + B @ x


def _step(tx, state, x, fn):
    return jax.jit(lambda s, p: tx.update(jnp.zeros_like(p), s, p, value_fn=fn))(state, x)


def test_gradient_mode_returns_the_exact_gradient_of_a_quadratic():
    tx = agsopt.dgs(0.7, step="gradient", key=3)
    x = jnp.asarray([1.0, -2.0, 0.5, 3.0])
    updates, state = _step(tx, tx.init(x), x, quadratic)
    np.testing.assert_allclose(updates, A @ x + B, rtol=2e-5, atol=2e-5)
    assert int(state.num_evaluations) == DIM * 4 + 1
    np.testing.assert_allclose(state.value, quadratic(x), rtol=1e-6)


def test_one_lipschitz_step_matches_the_formulas():
    """x₁ = x₀ − (√2 s / L̄) ∇ with L̄ = 0.9·L̄₀ + 0.1·L_1 and ASGF's radius rule."""
    radius = 0.6
    tx = agsopt.dgs(radius, step="lipschitz", key=5)
    x = jnp.asarray([1.0, -2.0, 0.5, 3.0])
    state = tx.init(x)
    updates, new = _step(tx, state, x, quadratic)

    _, step_key = split_state_key(state.key, jax.random.key_impl(jax.random.key(5)))
    basis = directional_basis(step_key, DIM, DIM, first=state.direction)
    est = directional_value_and_grad(quadratic, x, basis, radius)
    lbar = 0.9 * 1.0 + 0.1 * float(est.lipschitz[0])
    lr = math.sqrt(2.0) * radius / lbar
    np.testing.assert_allclose(updates, -lr * np.asarray(est.grad), rtol=1e-5)
    ratio = float(jnp.max(jnp.abs(est.derivatives) / est.lipschitz))
    expected = radius * (0.9 if ratio < 0.1 else 1 / 0.9 if ratio > 0.9 else 1.0)
    np.testing.assert_allclose(new.radius, expected, rtol=1e-6)
    np.testing.assert_allclose(new.lipschitz, lbar, rtol=1e-6)
    np.testing.assert_array_equal(new.scales, np.ones(DIM))  # isotropic


def test_curvature_step_is_the_newton_step_along_the_main_direction():
    """On the sphere C_1 = 2 in every direction: lr = 1/2 and one step lands on the
    minimizer (the cap 2√2·s is longer than the step for this radius)."""
    tx = agsopt.dgs(3.0, key=8)
    x = jnp.asarray([1.0, -2.0, 0.5, 3.0])
    updates, _ = _step(tx, tx.init(x), x, lambda v: jnp.sum(v**2))
    np.testing.assert_allclose(x + updates, 0.0, atol=1e-5)
    # With a small radius the same step is cut to the quadrature's span.
    tx = agsopt.dgs(0.1, key=8)
    updates, _ = _step(tx, tx.init(x), x, lambda v: jnp.sum(v**2))
    np.testing.assert_allclose(jnp.linalg.norm(updates), 2 * math.sqrt(2) * 0.1, rtol=1e-5)


def test_curvature_learning_rate_rule():
    lr = adaptation.curvature_learning_rate(
        jnp.asarray([4.0, -1.0, jnp.nan, 4.0]), jnp.asarray([1.0, 1.0, 1.0, 100.0]), 1.0, 0.3
    )
    cap = 2 * math.sqrt(2) / 100.0
    np.testing.assert_allclose(lr, [0.25, 0.3, 0.3, cap], rtol=1e-6)


ELLIPSOID_CURVATURE = 2.0 * 10.0 ** np.arange(DIM)  # the Hessian of Σ_j 10^(j) x_j²


def ellipsoid(x):
    return jnp.sum(0.5 * jnp.asarray(ELLIPSOID_CURVATURE, x.dtype) * x * x)


def test_coordinate_curvature_is_exact_for_a_diagonal_hessian():
    """C_i = ξ_iᵀHξ_i = Σ_j ξ_ij² h_j: with a full basis the fit recovers diag(H)."""
    basis = directional_basis(jax.random.key(0), DIM, DIM)
    est = directional_value_and_grad(ellipsoid, jnp.ones(DIM), basis, 0.3)
    h = adaptation.coordinate_curvature(basis, est.curvatures)
    atol = 1e-5 * ELLIPSOID_CURVATURE.max()
    np.testing.assert_allclose(h, ELLIPSOID_CURVATURE, rtol=1e-3, atol=atol)
    assert np.isnan(adaptation.coordinate_curvature(basis, est.curvatures.at[1].set(jnp.nan))).all()


def ill_conditioned_basis(dim: int = 8, draws: int = 1000) -> np.ndarray:
    """The random orthonormal basis (of ``draws``, seeded) whose W = ξ∘ξ is the worst
    conditioned: cond(W) ≈ 1.5e4, cond(W)² beyond float32's 1/ε."""
    rng = np.random.default_rng(0)
    bases = [np.linalg.qr(rng.normal(size=(dim, dim)))[0] for _ in range(draws)]
    return max(bases, key=lambda q: np.linalg.cond(q * q))


def test_coordinate_curvature_is_accurate_where_the_fit_is_ill_conditioned():
    """float32 fit = the float64 ridge solution Wᵀ(WWᵀ + λI)⁻¹C to ε·cond(W), not to
    ε·cond(W)² (forming WWᵀ in float32: jit and eager then disagreed by 2e-4 relative)."""
    basis = ill_conditioned_basis()
    cond = np.linalg.cond(basis * basis)
    assert cond**2 * np.finfo(np.float32).eps > 1.0  # the case the SVD is there for
    c = np.random.default_rng(1).normal(size=basis.shape[0])
    w = basis * basis
    gram = w @ w.T
    lam = 1e-6 * np.trace(gram) / basis.shape[1]
    reference = np.linalg.solve(gram + lam * np.eye(len(gram)), c) @ w
    fitted = adaptation.coordinate_curvature(jnp.asarray(basis, jnp.float32), jnp.asarray(c))
    bound = 4 * np.finfo(np.float32).eps * cond * np.max(np.abs(reference))
    np.testing.assert_allclose(fitted, reference, rtol=0, atol=bound)
    jitted = jax.jit(adaptation.coordinate_curvature)(jnp.asarray(basis, jnp.float32), c)
    np.testing.assert_allclose(jitted, reference, rtol=0, atol=bound)


def test_diagonal_fit_tells_a_diagonal_hessian_from_a_rotated_one():
    """R² = 1 when a diagonal h predicts fresh directions' curvatures, near 0 for a rotated
    ill-conditioned Hessian (h fitted on one basis, tested on another)."""
    h = jnp.asarray(ELLIPSOID_CURVATURE)
    fresh = directional_basis(jax.random.key(1), DIM, DIM)
    c = jnp.einsum("kd,d,kd->k", fresh, h, fresh)
    assert float(adaptation.diagonal_fit(fresh, c, h)) == pytest.approx(1.0, abs=1e-5)
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(DIM, DIM)))[0]
    hessian = q @ np.diag(ELLIPSOID_CURVATURE) @ q.T
    old = directional_basis(jax.random.key(2), DIM, DIM)
    fitted = adaptation.coordinate_curvature(old, jnp.einsum("kd,de,ke->k", old, hessian, old))
    fresh_c = jnp.einsum("kd,de,ke->k", fresh, hessian, fresh)
    assert float(adaptation.diagonal_fit(fresh, fresh_c, fitted)) < 0.5
    assert float(adaptation.diagonal_fit(fresh, fresh_c, fitted.at[0].set(jnp.nan))) == 0.0


def test_adapt_scales_rule():
    """log a ← (1 − relax) log a − (rate/2)(log h⁺ − mean log h⁺), centred and clipped."""
    scales = jnp.asarray([1.0, 2.0, 0.5, 1.0])
    h = jnp.asarray([4.0, 1.0, -3.0, 16.0])  # -3 ≤ 0: floored at max/span = 0.16
    new = adaptation.adapt_scales(scales, h, 0.5, 0.2, max_ratio=10.0, span=100.0)
    log_h = np.log([4.0, 1.0, 0.16, 16.0])
    log_a = 0.8 * np.log(np.asarray(scales)) - 0.25 * (log_h - log_h.mean())
    expected = np.exp(np.clip(log_a - log_a.mean(), -np.log(10), np.log(10)))
    np.testing.assert_allclose(new, expected, rtol=1e-6)
    # Nothing positive (or a NaN): only the relaxation.
    for bad in (-jnp.ones(DIM), h.at[0].set(jnp.nan)):
        relaxed = adaptation.adapt_scales(scales, bad, 0.5, 0.2)
        log_r = 0.8 * np.log(np.asarray(scales))
        np.testing.assert_allclose(relaxed, np.exp(log_r - log_r.mean()), rtol=1e-6)
    # The clip: a 10⁸ spread of curvature gives at most a factor 10 either way.
    wide = adaptation.adapt_scales(jnp.ones(2), jnp.asarray([1e-4, 1e4]), 1.0, span=1e9)
    np.testing.assert_allclose(wide, [10.0, 0.1], rtol=1e-5)


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_metric_step_trusts_the_fit_above_its_threshold(threshold):
    """fit ← 0.8 fit + 0.2 R²; τ = clip((fit − t)/(1 − t), 0, 1); the scales take
    adapt_scales(rate 0.5 τ, relax 0.3 (1 − τ)): below t only the relaxation."""
    scales = jnp.asarray([1.0, 2.0, 0.5, 1.0])
    h = jnp.asarray([4.0, 1.0, 2.0, 16.0])
    for old_fit, r2 in ((0.1, 0.2), (0.5, 0.9), (0.9, 1.0)):
        new, curvature, fit = adaptation.metric_step(
            scales, jnp.zeros(4), jnp.asarray(old_fit), h, jnp.asarray(r2), True, threshold
        )
        expected_fit = 0.8 * old_fit + 0.2 * r2
        trust = np.clip((expected_fit - threshold) / (1 - threshold), 0.0, 1.0)
        expected = adaptation.adapt_scales(scales, h, 0.5 * trust, 0.3 * (1 - trust))
        assert float(fit) == pytest.approx(expected_fit, rel=1e-6)
        np.testing.assert_allclose(new, expected, rtol=1e-6)
        np.testing.assert_allclose(curvature, h / scales**2, rtol=1e-6)
        if expected_fit < threshold:  # not followed: the scales only relax towards 1
            log_r = 0.7 * np.log(np.asarray(scales))
            np.testing.assert_allclose(new, np.exp(log_r - log_r.mean()), rtol=1e-6)


def test_anisotropic_metric_learns_the_inverse_curvature_of_an_ellipsoid():
    """On Σ_j 10^j x_j² the fit is perfect (R² → 1) and a → h^(-1/2) up to a constant
    (geometric mean 1, clipped to [1/10, 10]): a_j ∝ 10^(−j/2)."""
    tx = agsopt.dgs(1.0, anisotropic=True, metric="diagonal", tolerance=0.0, key=6)
    _, state, _ = _run(tx, ellipsoid, jnp.full(DIM, 2.0), 30)
    target = ELLIPSOID_CURVATURE**-0.5
    target = target / np.exp(np.mean(np.log(target)))
    np.testing.assert_allclose(state.scales, target, rtol=0.05)
    assert float(state.metric_fit) > 0.9
    # The isotropic form keeps a = 1.
    _, state, _ = _run(agsopt.dgs(1.0, key=6), ellipsoid, jnp.full(DIM, 2.0), 3)
    np.testing.assert_array_equal(state.scales, np.ones(DIM))


def test_anisotropic_metric_stays_isotropic_on_ripples():
    """Ripples make curvature that no diagonal model predicts: the fit stays low and a
    relaxes towards 1 (so the metric does no harm where it cannot help)."""

    def rough(x):
        return jnp.sum(jnp.cos(9.0 * x) + 0.01 * x**2)

    tx = agsopt.dgs(0.5, anisotropic=True, metric="diagonal", key=6)
    _, state, _ = _run(tx, rough, jnp.asarray([0.3, -0.2, 0.1, 0.4]), 20)
    assert float(state.metric_fit) < 0.5
    assert float(jnp.max(jnp.abs(jnp.log(state.scales)))) < math.log(1.5)


def test_anisotropic_step_is_preconditioned_and_gradient_form_is_the_x_gradient():
    """In y = x / a the step is −lr·a ⊙ ∇_y; ``step="gradient"`` returns ∇_y / a = ∇_x,
    exact for a quadratic."""
    tx = agsopt.dgs(0.7, anisotropic=True, metric="diagonal", step="gradient", key=3)
    x = jnp.asarray([1.0, -2.0, 0.5, 3.0])
    state = tx.init(x)._replace(scales=jnp.asarray([2.0, 1.0, 0.5, 1.0]))
    updates, _ = _step(tx, state, x, quadratic)
    np.testing.assert_allclose(updates, A @ x + B, rtol=2e-5, atol=2e-5)


def test_adapt_radius_rule():
    radius = jnp.asarray([1.0, 1.0, 1.0])
    ratio = jnp.asarray([0.05, 0.95, 0.5])
    thresholds = adaptation.initial_thresholds((3,))
    new, th = adaptation.adapt_radius(radius, ratio, thresholds)
    np.testing.assert_allclose(new, [0.9, 1 / 0.9, 1.0], rtol=1e-6)
    np.testing.assert_allclose(th.lower, [0.1 * 0.95, 0.1, 0.1 * 1.02], rtol=1e-6)
    np.testing.assert_allclose(th.upper, [0.9, 0.9 * 1.01, 0.9 * 0.98], rtol=1e-6)


def test_average_lipschitz_starts_from_the_first_value_when_nan():
    assert float(adaptation.average_lipschitz(jnp.asarray(jnp.nan), jnp.asarray(7.0))) == 7.0
    assert float(adaptation.average_lipschitz(jnp.asarray(2.0), jnp.asarray(jnp.nan))) == 2.0
    np.testing.assert_allclose(
        adaptation.average_lipschitz(jnp.asarray(2.0), jnp.asarray(12.0)), 3.0, rtol=1e-6
    )


def _run(tx, fn, x, steps):
    state = tx.init(x)
    step = jax.jit(lambda s, p: tx.update(jnp.zeros_like(p), s, p, value_fn=fn))
    history = []
    for _ in range(steps):
        updates, state = step(state, x)
        x = optax.apply_updates(x, updates)
        history.append((x, state))
    return x, state, history


def test_best_point_is_the_smallest_value_seen_and_counts_every_call():
    def rugged(x):
        return jnp.sum(x**2 - 3 * jnp.cos(4 * x))

    tx = agsopt.dgs(1.0, key=1)
    x0 = jnp.asarray([2.0, -1.5, 0.3, 1.1])
    _, state, history = _run(tx, rugged, x0, 30)
    best = [float(s.best_value) for _, s in history]
    assert all(b2 <= b1 for b1, b2 in zip(best, best[1:], strict=False))
    np.testing.assert_allclose(state.best_value, rugged(state.best_params), rtol=1e-6)
    assert float(state.best_value) <= min(float(s.value) for _, s in history)
    assert int(state.num_evaluations) == 30 * (DIM * 4 + 1)


def test_collapse_resets_the_radius_then_restarts_from_the_best_point():
    """A constant function has D = 0: the ratio is 0, the radius shrinks by 0.9 a step
    until 10·min_radius, then resets (twice), then the iterate jumps to the best point."""
    tx = agsopt.dgs(1.0, min_radius=0.05, restarts=2, tolerance=0.0, key=2)
    x0 = jnp.ones(DIM)
    _, state, history = _run(tx, lambda x: jnp.sum(x * 0.0), x0, 40)
    restarts = [int(s.restarts_left) for _, s in history]
    assert restarts[0] == 2 and -1 in restarts
    first_reset = restarts.index(1)
    assert float(history[first_reset][1].radius) == pytest.approx(1.0)
    assert 0.5 < float(history[first_reset - 1][1].radius) < 0.55  # 0.9⁶; 0.9⁷ < 0.5 reset


def test_stop_signal_and_frozen_updates():
    tx = agsopt.dgs(0.5, tolerance=1e-3, key=0)
    x, state, history = _run(tx, lambda x: jnp.sum(x * 0.0) + 1.0, jnp.ones(DIM), 3)
    assert bool(state.stop)
    np.testing.assert_array_equal(x, jnp.ones(DIM))
    stopped_at = next(i for i, (_, s) in enumerate(history) if bool(s.stop))
    frozen = history[stopped_at][1]
    assert int(state.count) == int(frozen.count)


def test_nonfinite_value_skips_and_returns_to_the_best_point():
    def poisoned(x):  # NaN beyond x_0 > 2.5
        return jnp.where(x[0] > 2.5, jnp.nan, jnp.sum((x - 3.0) ** 2))

    tx = agsopt.dgs(0.3, key=4)
    x, state, history = _run(tx, poisoned, jnp.zeros(DIM), 60)
    assert np.isfinite(np.asarray(x)).all()
    assert np.isfinite(float(state.best_value))
    assert int(state.num_nonfinite) > 0
    assert all(np.isfinite(np.asarray(s.radius)).all() for _, s in history)


def test_box_recipe_converges_on_the_sphere():
    lower, upper = -5.12 * np.ones(6), 5.12 * np.ones(6)
    tx = agsopt.dgs_blackbox(lower, upper, key=0)
    x0 = jnp.asarray([3.0, -4.0, 1.0, 2.5, -1.0, 4.5])
    _, state, _ = _run(tx, lambda x: jnp.sum(x**2), x0, 25)
    assert float(state.best_value) < 1e-6 * float(jnp.sum(x0**2))


def test_scan_and_pytree_params():
    params = {"a": jnp.ones((2, 2)), "b": jnp.zeros(3)}

    def fn(p):
        return jnp.sum((p["a"] - 2.0) ** 2) + jnp.sum(jnp.sin(p["b"]) ** 2)

    tx = agsopt.dgs(0.5, num_directions=4, chunk_size=3, key=7)

    def body(carry, _):
        p, s = carry
        u, s = tx.update(optax.tree.zeros_like(p), s, p, value_fn=fn)
        return (optax.apply_updates(p, u), s), s.best_value

    (p, s), best = jax.jit(lambda c: jax.lax.scan(body, c, None, length=5))(
        (params, tx.init(params))
    )
    assert p["a"].shape == (2, 2) and np.isfinite(np.asarray(best)).all()
    assert int(s.num_evaluations) == 5 * (4 * 4 + 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"radius": 0.0}, "radius"),
        ({"radius": 1.0, "num_nodes": 4}, "num_nodes"),
        ({"radius": 1.0, "step": "newton"}, "step"),
        ({"radius": 1.0, "anisotropic": 1}, "anisotropic"),
        ({"radius": 1.0, "min_radius": 0.5}, "min_radius"),
        ({"radius": 1.0, "lr_bounds": (2.0, 1.0)}, "lr_bounds"),
        ({"radius": 1.0, "num_directions": 0}, "num_directions"),
        ({"radius": 1.0, "lateral_nodes": 2}, "lateral_nodes"),
        ({"radius": 1.0, "lateral_nodes": 3.0}, "lateral_nodes"),
        ({"radius": 1.0, "radius_ratio": "max"}, "radius_ratio"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        agsopt.dgs(**kwargs)


def test_bad_box_and_too_many_directions():
    with pytest.raises(ValueError, match="upper"):
        agsopt.dgs_blackbox(np.ones(3), np.zeros(3))
    with pytest.raises(ValueError, match="num_directions"):
        agsopt.dgs(1.0, num_directions=9).init(jnp.zeros(3))
    # The metric's k × k solve is bounded: a huge k is refused at init, naming the fix.
    with pytest.raises(ValueError, match="num_directions ≤ 4096 or anisotropic=False"):
        agsopt.dgs(1.0, anisotropic=True).init(jnp.zeros(5000))
    agsopt.dgs(1.0, anisotropic=True, num_directions=8).init(jnp.zeros(5000))
    with pytest.raises(TypeError, match="value_fn"):
        agsopt.dgs(1.0).update(jnp.zeros(3), agsopt.dgs(1.0).init(jnp.zeros(3)), jnp.zeros(3))


@pytest.mark.parametrize(("anisotropic", "lateral_nodes"), [(False, None), (True, None), (True, 3)])
def test_ask_tell_gives_the_jitted_steps(anisotropic, lateral_nodes):
    """dgs_ask_tell: the points of each step, evaluated outside JAX (NumPy), give the same
    updates and state as the jitted value_fn path, over steps with a restart-prone radius
    (isotropic) or a metric being learned (anisotropic, on an ill-conditioned function)."""
    weights = np.asarray([1.0, 10.0, 100.0, 3.0]) if anisotropic else np.ones(4)

    def rugged_np(points):
        return np.sum(weights * points**2 - 3 * np.cos(4 * points), axis=1)

    def rugged(x):
        return jnp.sum(jnp.asarray(weights, x.dtype) * x**2 - 3 * jnp.cos(4 * x))

    kwargs = {"num_directions": 3, "key": 9, "anisotropic": anisotropic}
    if lateral_nodes is not None:  # 4 nodes on the main direction, 2 on each other one
        kwargs["lateral_nodes"] = lateral_nodes
    count = 4 + 2 * 2 + 1 if lateral_nodes else 3 * 4 + 1
    asked = agsopt.dgs_ask_tell(0.8, **kwargs)
    direct = agsopt.dgs(0.8, **kwargs)
    x = y = jnp.asarray([2.0, -1.5, 0.3, 1.1])
    state_a, state_d = asked.init(x), direct.init(y)
    step = jax.jit(lambda s, p: direct.update(jnp.zeros_like(p), s, p, value_fn=rugged))
    for _ in range(6):
        points, ticket = asked.ask(state_a, x)
        assert points.shape == (count, 4)
        np.testing.assert_array_equal(points[0], np.asarray(x))
        updates_a, state_a = asked.tell(ticket, rugged_np(np.asarray(points, np.float64)))
        updates_d, state_d = step(state_d, y)
        np.testing.assert_allclose(updates_a, updates_d, rtol=2e-4, atol=1e-5)
        x, y = optax.apply_updates(x, updates_a), optax.apply_updates(y, updates_d)
        y = x  # continue both from the same point (the paths agree to rounding)
    assert int(state_a.num_evaluations) == int(state_d.num_evaluations) == 6 * count
    np.testing.assert_allclose(state_a.best_value, state_d.best_value, rtol=1e-5)
    np.testing.assert_allclose(state_a.scales, state_d.scales, rtol=1e-4)
    assert anisotropic == bool(np.any(np.abs(np.asarray(state_a.scales) - 1) > 1e-3))
    with pytest.raises(ValueError, match=rf"shape \({count},\)"):
        asked.tell(asked.ask(state_a, x)[1], np.zeros(count - 1))


def _radius_after_one_step(f, radius_ratio: str) -> float:
    """The radius after one step from x = 0 (s = 0.5) with e_0 as the main direction."""
    tx = agsopt.dgs(0.5, radius_ratio=radius_ratio, key=0)
    state = tx.init(jnp.zeros(2))._replace(direction=jnp.asarray([1.0, 0.0]))
    _, state = tx.update(jnp.zeros(2), state, jnp.zeros(2), value_fn=f)
    return float(state.radius)


def test_radius_ratio_main_reads_the_main_direction_only():
    """ "all" (ASGF) thresholds max_i |D_i|/L_i, "main" |D_1|/L_1 (A = 0.1, B = 0.9). Along
    a linear direction the ratio is 1 (> B: grow by 1/0.9); along an even ripple cos(8t) at
    x = 0 it is 0 (D = 0 < A: shrink by 0.9)."""

    def main_linear(x):
        return x[0] + 3.0 * jnp.cos(8.0 * x[1])

    def main_rippled(x):
        return 3.0 * jnp.cos(8.0 * x[0]) + x[1]

    for rule in ("all", "main"):
        assert _radius_after_one_step(main_linear, rule) == pytest.approx(0.5 / 0.9)
    assert _radius_after_one_step(main_rippled, "all") == pytest.approx(0.5 / 0.9)
    assert _radius_after_one_step(main_rippled, "main") == pytest.approx(0.5 * 0.9)


def test_lateral_nodes_count_and_match_the_uniform_rule_where_equal():
    """(M − 1) + (k − 1)(M' − 1) + 1 calls a step; lateral_nodes = num_nodes is the
    default rule bit for bit."""

    def f(x):
        return jnp.sum(x**2) + jnp.sum(jnp.sin(3 * x))

    x = jnp.asarray([0.3, -1.0, 2.0, 0.5])
    tx = agsopt.dgs(0.4, num_nodes=5, lateral_nodes=3, key=1)
    _, state = tx.update(jnp.zeros(4), tx.init(x), x, value_fn=f)
    assert int(state.num_evaluations) == 4 + 3 * 2 + 1
    same = agsopt.dgs(0.4, num_nodes=5, lateral_nodes=5, key=1)
    default = agsopt.dgs(0.4, num_nodes=5, key=1)
    step = {
        name: jax.jit(lambda s, t=t: t.update(jnp.zeros(4), s, x, value_fn=f))(t.init(x))
        for name, t in (("same", same), ("default", default))
    }
    for a, b in zip(jax.tree.leaves(step["same"]), jax.tree.leaves(step["default"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_blackbox_ask_tell_is_the_recipe():
    """dgs_blackbox_ask_tell: the recipe's points (2d + 3 a step: 5 nodes on the main
    direction, 3 on the others), evaluated in NumPy, give dgs_blackbox's jitted steps."""

    def ackley_np(points):
        d = points.shape[1]
        a = -20 * np.exp(-0.2 * np.sqrt(np.sum(points**2, axis=1) / d))
        return a - np.exp(np.mean(np.cos(2 * np.pi * points), axis=1)) + 20 + np.e

    f = agsopt.functions.get("ackley")
    asked = agsopt.dgs_blackbox_ask_tell(-5.0, 5.0, key=3)
    direct = agsopt.dgs_blackbox(-5.0, 5.0, key=3)
    x = jnp.asarray([2.0, -1.5, 0.3, 1.1])
    state_a, state_d = asked.init(x), direct.init(x)
    step = jax.jit(lambda s, p: direct.update(jnp.zeros_like(p), s, p, value_fn=f))
    for _ in range(5):
        points, ticket = asked.ask(state_a, x)
        assert points.shape == (2 * 4 + 3, 4)
        updates_a, state_a = asked.tell(ticket, ackley_np(np.asarray(points, np.float64)))
        updates_d, state_d = step(state_d, x)
        np.testing.assert_allclose(updates_a, updates_d, rtol=2e-4, atol=1e-5)
        x = optax.apply_updates(x, updates_a)
    assert int(state_a.num_evaluations) == int(state_d.num_evaluations) == 5 * 11
    np.testing.assert_allclose(state_a.radius, state_d.radius, rtol=1e-5)
    with pytest.raises(TypeError, match="dgs_blackbox_ask_tell.*radius"):
        agsopt.dgs_blackbox_ask_tell(-5.0, 5.0, radius=1.0)
    with pytest.raises(ValueError, match="upper"):
        agsopt.dgs_blackbox_ask_tell(1.0, 0.0)
