"""The full metric of ``agsopt.dgs(anisotropic=True, metric="full")`` (``"auto"`` at small d,
``dgs_blackbox``'s default): the Hessian model's projections (sketch and secant), the root's
rule, the choice between the Hessian model and the diagonal fit, and what the transformation
learns."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import agsopt
from agsopt.smoothing import adaptation
from agsopt.smoothing._dgs import AUTO_FULL_METRIC_DIM, MAX_FULL_METRIC_DIM
from agsopt.smoothing.directional import directional_basis


def _rotation(dim: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(dim, dim)))
    return q * np.sign(np.diag(r))


def _hessian(dim: int, seed: int, decades: float = 3.0) -> np.ndarray:
    q = _rotation(dim, seed)
    return (q * 10.0 ** (decades * np.arange(dim) / (dim - 1))) @ q.T


def _root(dim: int, seed: int) -> np.ndarray:
    """A symmetric positive definite root with det 1."""
    q = _rotation(dim, seed + 100)
    logs = np.random.default_rng(seed).normal(size=dim)
    return (q * np.exp(logs - logs.mean())) @ q.T


def test_root_factors_are_the_inverse_and_the_logarithm():
    root = _root(5, 0)
    with jax.enable_x64(True):
        inverse, log_root = adaptation.root_factors(jnp.asarray(root, jnp.float64))
    np.testing.assert_allclose(np.asarray(inverse) @ root, np.eye(5), atol=1e-10)
    values, vectors = np.linalg.eigh(np.asarray(log_root))
    np.testing.assert_allclose((vectors * np.exp(values)) @ vectors.T, root, atol=1e-10)


def test_sketch_interpolates_the_measured_curvatures_and_changes_nothing_else():
    """After the projection v_iᵀĤv_i = C_i on every measured direction; the change lies in
    span{w_i w_iᵀ}, so along a pair of directions (i ≠ j) the model is unchanged."""
    dim, k = 6, 4
    with jax.enable_x64(True):
        root = jnp.asarray(_root(dim, 1))
        inverse, _ = adaptation.root_factors(root)
        basis = directional_basis(jax.random.key(0), dim, k, dtype=jnp.float64)
        directions, duals = basis @ root, basis @ inverse
        old = jnp.asarray(_hessian(dim, 2, 1.0))
        truth = jnp.asarray(_hessian(dim, 3))
        measured = jnp.einsum("id,de,ie->i", directions, truth, directions)
        new = adaptation.sketch_hessian(old, directions, duals, measured)
        np.testing.assert_allclose(
            jnp.einsum("id,de,ie->i", directions, new, directions), measured, rtol=1e-10
        )
        np.testing.assert_allclose(new, new.T, atol=0)
        change = directions @ (new - old) @ directions.T
        np.testing.assert_allclose(change - jnp.diag(jnp.diag(change)), 0.0, atol=1e-9)
        kept = adaptation.sketch_hessian(old, directions, duals, measured.at[0].set(jnp.nan))
        np.testing.assert_array_equal(kept, old)


def test_sketches_along_fresh_bases_converge_to_the_hessian():
    """Randomized Kaczmarz: full orthonormal bases, each step's model error shrinks; after 120
    steps at d = 6 the model is the Hessian to 1e-5."""
    dim = 6
    with jax.enable_x64(True):
        truth = jnp.asarray(_hessian(dim, 4))
        model = jnp.zeros((dim, dim))
        root = jnp.eye(dim)
        errors = []
        for step in range(120):
            basis = directional_basis(jax.random.key(step), dim, dim, dtype=jnp.float64)
            measured = jnp.einsum("id,de,ie->i", basis, truth, basis)
            model = adaptation.sketch_hessian(model, basis @ root, basis @ root, measured)
            errors.append(float(jnp.linalg.norm(model - truth) / jnp.linalg.norm(truth)))
        assert all(b <= a * (1 + 1e-9) for a, b in zip(errors, errors[1:], strict=False))
        assert errors[-1] < 1e-5, errors[-1]


def test_secant_update_satisfies_the_secant_equation():
    dim = 5
    with jax.enable_x64(True):
        root = jnp.asarray(_root(dim, 5))
        inverse, _ = adaptation.root_factors(root)
        old = jnp.asarray(_hessian(dim, 6, 1.0))
        truth = jnp.asarray(_hessian(dim, 7))
        step = jnp.asarray(np.random.default_rng(8).normal(size=dim))
        new = adaptation.secant_hessian(old, root, inverse, step, truth @ step)
        np.testing.assert_allclose(new @ step, truth @ step, rtol=1e-10)
        np.testing.assert_allclose(new, new.T, atol=1e-12)
        # the smallest change in the scaled coordinates: none across the step's complement
        u = inverse @ step
        complement = np.linalg.svd(np.asarray(u)[None, :])[2][1:]
        change = complement @ (root @ (new - old) @ root) @ complement.T
        np.testing.assert_allclose(change, 0.0, atol=1e-9)
        for bad_step, bad_change in (
            (jnp.zeros(dim), truth @ step),
            (step, jnp.full(dim, jnp.nan)),
        ):
            np.testing.assert_array_equal(
                adaptation.secant_hessian(old, root, inverse, bad_step, bad_change), old
            )


def test_adapt_root_takes_the_inverse_square_root_of_the_model():
    """rate 1, relax 0: A = Ĥ^{-1/2} normalized to det 1 (within the clip); then the
    eigenvalues of log A are clipped at ±log max_ratio and a model with no positive
    curvature only relaxes A."""
    dim = 4
    with jax.enable_x64(True):
        model = jnp.asarray(_hessian(dim, 9, 2.0))  # condition 100: within max_ratio² = 100
        root = adaptation.adapt_root(jnp.zeros((dim, dim)), model, 1.0)
        values, vectors = np.linalg.eigh(np.asarray(model))
        expected = (vectors * values**-0.5) @ vectors.T
        expected = expected / np.linalg.det(expected) ** (1 / dim)
        np.testing.assert_allclose(root, expected, rtol=1e-9)
        assert abs(np.linalg.det(np.asarray(root)) - 1) < 1e-9
        steep = jnp.asarray(_hessian(dim, 9, 8.0))
        clipped = np.linalg.eigvalsh(
            np.asarray(adaptation.adapt_root(jnp.zeros((4, 4)), steep, 1.0))
        )
        assert clipped.max() <= 10 * (1 + 1e-9) and clipped.min() >= 0.1 * (1 - 1e-9)
        log_root = jnp.asarray(np.diag(np.log([2.0, 0.5, 1.0, 1.0])))
        relaxed = adaptation.adapt_root(log_root, -jnp.eye(dim), 1.0, relax=0.5)
        np.testing.assert_allclose(relaxed, np.diag(np.sqrt([2.0, 0.5, 1.0, 1.0])), rtol=1e-9)


def _model_steps(hessian: np.ndarray, steps: int) -> adaptation.FullMetric:
    """:func:`adaptation.adapt_full_metric` fed the exact curvatures of a quadratic along
    fresh bases (no secant pairs), from the identity."""
    dim = hessian.shape[0]
    h = jnp.asarray(hessian)
    metric = adaptation.FullMetric(
        jnp.eye(dim), jnp.zeros((dim, dim)), jnp.zeros(()), jnp.zeros(dim), jnp.zeros(())
    )
    nothing = jnp.full(dim, jnp.nan)
    for step in range(steps):
        basis = directional_basis(jax.random.key(step), dim, dim, dtype=jnp.float64)
        directions = basis @ metric.root
        measured = jnp.einsum("id,de,ie->i", directions, h, directions)
        metric = adaptation.adapt_full_metric(
            metric, basis, measured, nothing, nothing, jnp.asarray(True)
        )
    return metric


def test_the_better_model_drives_the_metric():
    """Where H is diagonal the diagonal fit predicts fresh curvatures exactly from the second
    step and scores above the Hessian model; where H is rotated the diagonal fit predicts
    nothing (R² 0) and the Hessian model drives. Either way A H A is whitened from
    condition 100 to below 3 within 30 steps."""
    dim = 6
    with jax.enable_x64(True):
        diagonal = np.diag(10.0 ** (2.0 * np.arange(dim) / (dim - 1)))
        metric = _model_steps(diagonal, 30)
        assert float(metric.diagonal_fit) > float(metric.hessian_fit)
        root = np.asarray(metric.root)
        assert np.linalg.cond(root @ diagonal @ root) < 3
        np.testing.assert_allclose(metric.diagonal, np.diag(diagonal), rtol=1e-2)  # ridge
        rotated = _hessian(dim, 11, 2.0)
        metric = _model_steps(rotated, 30)
        assert float(metric.hessian_fit) > 0.5 and float(metric.diagonal_fit) == 0
        root = np.asarray(metric.root)
        assert np.linalg.cond(root @ rotated @ root) < 3
        np.testing.assert_allclose(metric.hessian, rotated, rtol=0, atol=5e-2 * rotated.max())


def _run(metric: str, function, x0: np.ndarray, steps: int, key: int = 0):
    tx = agsopt.dgs(1.0, anisotropic=True, metric=metric, lateral_nodes=3, key=key)
    x = jnp.asarray(x0, jnp.float32)
    state = tx.init(x)

    @jax.jit
    def step(x, state):
        updates, state = tx.update(jnp.zeros_like(x), state, x, value_fn=function)
        return optax.apply_updates(x, updates), state

    for _ in range(steps):
        x, state = step(x, state)
    return x, state


def test_full_metric_learns_a_rotated_hessian():
    """On a rotated quadratic (condition 10⁴, the clip's reach) the full metric whitens the
    Hessian within 40 steps: cond(A H A) < 20, the model within 5 % of H, f at 1e-6 of its
    minimum; the diagonal metric learns nothing there (cond stays 10⁴, f > 1)."""
    dim = 6
    hessian = _hessian(dim, 10, 4.0)
    h = jnp.asarray(hessian, jnp.float32)
    quadratic = lambda x: 0.5 * x @ h @ x
    x0 = np.random.default_rng(0).uniform(-3, 3, dim)
    _, full = _run("full", quadratic, x0, 40)
    root = np.asarray(full.scales, np.float64)
    assert float(full.hessian_fit) > 0.6
    assert np.linalg.cond(root @ hessian @ root) < 20
    model = np.asarray(full.hessian, np.float64)
    np.testing.assert_allclose(model, hessian, rtol=0, atol=5e-2 * np.abs(hessian).max())
    assert float(full.best_value) < 1e-6
    _, diagonal = _run("diagonal", quadratic, x0, 40)
    scales = np.asarray(diagonal.scales, np.float64)
    assert np.linalg.cond(scales[:, None] * hessian * scales[None, :]) > 1000
    assert float(diagonal.best_value) > 1


def test_full_metric_state_and_argument_checks():
    x = jnp.zeros(3)
    full = agsopt.dgs(0.5, anisotropic=True, metric="full")
    diagonal = agsopt.dgs(0.5, anisotropic=True, metric="diagonal")
    state = full.init(x)
    assert state.scales.shape == (3, 3) and state.hessian.shape == (3, 3)
    assert state.coordinate_curvature.shape == (3,)
    assert state.last_params.shape == (3,) and np.isnan(state.last_gradient).all()
    assert diagonal.init(x).last_params.shape == (0,)
    assert diagonal.init(x).hessian.shape == (0, 0)
    # "auto" (dgs_blackbox's default): full up to AUTO_FULL_METRIC_DIM, diagonal above
    recipe = agsopt.dgs_blackbox(-1.0, 1.0)
    assert recipe.init(jnp.zeros(AUTO_FULL_METRIC_DIM)).scales.ndim == 2
    assert recipe.init(jnp.zeros(AUTO_FULL_METRIC_DIM + 1)).scales.ndim == 1
    f = lambda v: jnp.sum(v**2)
    with pytest.raises(ValueError, match="metric"):
        diagonal.update(x, state, x, value_fn=f)
    with pytest.raises(ValueError, match="metric"):
        full.update(x, diagonal.init(x), x, value_fn=f)
    with pytest.raises(ValueError, match="anisotropic=True"):
        agsopt.dgs(0.5, metric="full")
    # one radius: "auto" (the recipe's default) and "diagonal" keep no metric
    isotropic = agsopt.dgs_blackbox(-1.0, 1.0, anisotropic=False).init(x)
    np.testing.assert_array_equal(isotropic.scales, np.ones(3))
    assert isotropic.hessian.shape == (0, 0)
    with pytest.raises(ValueError, match="metric"):
        agsopt.dgs(0.5, anisotropic=True, metric="dense")
    with pytest.raises(ValueError, match='metric="diagonal"'):
        full.init(jnp.zeros(MAX_FULL_METRIC_DIM + 1))


def test_full_metric_ask_tell_equals_the_value_fn_path():
    f = lambda v: jnp.sum(jnp.arange(1.0, 5.0) * v**2)
    opt = agsopt.dgs_blackbox_ask_tell(-2.0, 2.0, metric="full", key=3)
    x = jnp.asarray([1.0, -1.0, 0.5, 1.5])
    state = opt.init(x)
    tx = agsopt.dgs_blackbox(-2.0, 2.0, metric="full", key=3)
    reference = tx.init(x)
    for _ in range(5):
        points, ticket = opt.ask(state, x)
        updates, state = opt.tell(ticket, np.asarray(jax.vmap(f)(points)))
        expected, reference = jax.jit(partial(tx.update, value_fn=f))(
            jnp.zeros_like(x), reference, x
        )
        np.testing.assert_allclose(updates, expected, rtol=1e-5, atol=1e-6)
        x = optax.apply_updates(x, updates)
    np.testing.assert_allclose(state.scales, reference.scales, rtol=1e-4, atol=1e-5)


def test_full_metric_model_survives_nonfinite_values():
    """Values that are NaN in part of the space are counted; the metric, its model and the
    secant pair stay finite, and a step where every value is NaN changes none of them."""
    weights = jnp.asarray([1.0, 10.0, 100.0, 1.0])
    f = lambda x: jnp.where(x[0] > 1.2, jnp.nan, jnp.sum(weights * x * x))
    x0 = np.asarray([1.0, -1.0, 0.5, 1.5])
    x, state = _run("full", f, x0, 8)
    assert int(state.num_nonfinite) > 0 and not bool(state.stop)
    for field in ("scales", "hessian", "coordinate_curvature", "last_params", "last_gradient"):
        assert np.all(np.isfinite(np.asarray(getattr(state, field)))), field
    tx = agsopt.dgs(1.0, anisotropic=True, metric="full", lateral_nodes=3, key=0)
    _, after = tx.update(jnp.zeros_like(x), state, x, value_fn=lambda v: jnp.nan * f(v))
    fields = ("scales", "hessian", "hessian_fit", "coordinate_curvature", "metric_fit")
    for field in (*fields, "last_params", "last_gradient"):
        np.testing.assert_array_equal(getattr(after, field), getattr(state, field))
    assert int(after.num_skipped) == int(state.num_skipped) + 1


def test_diagonal_fit_of_a_diagonal_root_is_the_diagonal_metrics_fit():
    """For a diagonal A = diag(a) the full metric's diagonal fit (columns equilibrated by A's
    row norms) is the diagonal metric's own fit in y = x / a, carried to x: h_y / a²."""
    dim = 5
    with jax.enable_x64(True):
        logs = np.random.default_rng(12).normal(size=dim)
        scales = jnp.asarray(np.exp(logs - logs.mean()))
        basis = directional_basis(jax.random.key(1), dim, dim, dtype=jnp.float64)
        curvatures = jnp.asarray(np.random.default_rng(13).uniform(0.5, 20.0, dim))
        metric = adaptation.FullMetric(
            jnp.diag(scales), jnp.zeros((dim, dim)), jnp.zeros(()), jnp.zeros(dim), jnp.zeros(())
        )
        nothing = jnp.full(dim, jnp.nan)
        new = adaptation.adapt_full_metric(
            metric, basis, curvatures, nothing, nothing, jnp.asarray(True)
        )
        expected = adaptation.coordinate_curvature(basis, curvatures) / scales**2
        np.testing.assert_allclose(new.diagonal, expected, rtol=1e-9)
