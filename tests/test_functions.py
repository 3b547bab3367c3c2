"""Tests for the test-function suite ``agsopt.functions``.

Reference values come from NumPy re-implementations of the textbook formulas written out
below, independently of the JAX code under test.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agsopt import functions as F

ALL_NAMES = [
    "ackley",
    "conditioned_rastrigin",
    "ellipsoid",
    "griewank",
    "levy",
    "michalewicz",
    "mixed_asymmetric",
    "rastrigin",
    "rastrigin_multifrequency",
    "rosenbrock",
    "rugged_ellipsoid",
    "schwefel",
    "sphere",
    "styblinski_tang",
]
SMOOTH = [
    "sphere",
    "ellipsoid",
    "rosenbrock",
    "rastrigin",
    "levy",
    "griewank",
    "styblinski_tang",
    "rastrigin_multifrequency",
    "mixed_asymmetric",
    "rugged_ellipsoid",
    "conditioned_rastrigin",
]


# ------------------------------------------------------------------------------------------
# Independent NumPy references (float64)
# ------------------------------------------------------------------------------------------


def np_sphere(x):
    return float(np.sum(x**2))


def np_ellipsoid(x):
    d = len(x)
    if d == 1:
        return float(x[0] ** 2)
    return float(sum(10 ** (6 * (i - 1) / (d - 1)) * x[i - 1] ** 2 for i in range(1, d + 1)))


def np_rosenbrock(x):
    return float(
        sum(100 * (x[i + 1] - x[i] ** 2) ** 2 + (x[i] - 1) ** 2 for i in range(len(x) - 1))
    )


def np_rastrigin(x):
    return float(10 * len(x) + np.sum(x**2 - 10 * np.cos(2 * np.pi * x)))


def np_ackley(x):
    d = len(x)
    a, b, c = 20, 0.2, 2 * np.pi
    return float(
        -a * np.exp(-b * np.sqrt(np.sum(x**2) / d)) - np.exp(np.sum(np.cos(c * x)) / d) + a + np.e
    )


def np_griewank(x):
    i = np.arange(1, len(x) + 1)
    return float(np.sum(x**2) / 4000 - np.prod(np.cos(x / np.sqrt(i))) + 1)


def np_levy(x):
    w = 1 + (x - 1) / 4
    total = np.sin(np.pi * w[0]) ** 2
    for i in range(len(x) - 1):
        total += (w[i] - 1) ** 2 * (1 + 10 * np.sin(np.pi * w[i] + 1) ** 2)
    total += (w[-1] - 1) ** 2 * (1 + np.sin(2 * np.pi * w[-1]) ** 2)
    return float(total)


def np_schwefel(x):
    return float(418.9829 * len(x) - np.sum(x * np.sin(np.sqrt(np.abs(x)))))


def np_michalewicz(x, m=10):
    i = np.arange(1, len(x) + 1)
    return float(-np.sum(np.sin(x) * np.sin(i * x**2 / np.pi) ** (2 * m)))


def np_styblinski_tang(x):
    return float(np.sum(x**4 - 16 * x**2 + 5 * x) / 2)


def np_frequencies(d):
    return np.ones(1) if d == 1 else np.array([4.0 ** (2 * k / (d - 1) - 1) for k in range(d)])


def np_rastrigin_multifrequency(x):
    w = np_frequencies(len(x))
    return float(sum(x[i] ** 2 + 10 * (1 - np.cos(2 * np.pi * w[i] * x[i])) for i in range(len(x))))


def np_mixed_asymmetric(x):
    total = 0.0
    for i in range(1, len(x) + 1):  # 1-based, as in the docstring
        t = x[i - 1]
        total += t**2 + 10 * (1 - np.cos(2 * np.pi * t)) if i % 2 else 10 * (np.exp(t) - 1 - t)
    return float(total)


def np_rugged_ellipsoid(x):
    d = len(x)
    w = [1.0] if d == 1 else [10 ** (6 * (i - 1) / (d - 1)) for i in range(1, d + 1)]
    return float(sum(w[i] * x[i] ** 2 + 10 * (1 - np.cos(2 * np.pi * x[i])) for i in range(d)))


def np_conditioned_rastrigin(x):
    d = len(x)
    lam = [1.0] if d == 1 else [10 ** (0.5 * (i - 1) / (d - 1)) for i in range(1, d + 1)]
    return np_rastrigin(np.asarray(lam) * x)


NP_REFERENCE = {
    "rugged_ellipsoid": np_rugged_ellipsoid,
    "conditioned_rastrigin": np_conditioned_rastrigin,
    "rastrigin_multifrequency": np_rastrigin_multifrequency,
    "mixed_asymmetric": np_mixed_asymmetric,
    "sphere": np_sphere,
    "ellipsoid": np_ellipsoid,
    "rosenbrock": np_rosenbrock,
    "rastrigin": np_rastrigin,
    "ackley": np_ackley,
    "griewank": np_griewank,
    "levy": np_levy,
    "schwefel": np_schwefel,
    "michalewicz": np_michalewicz,
    "styblinski_tang": np_styblinski_tang,
}


def eval64(tf, x) -> float:
    """``tf(x)`` in float64 (jitted: one compilation instead of one per primitive)."""
    with jax.enable_x64(True):
        return float(jax.jit(tf.fn)(jnp.asarray(np.asarray(x, dtype=np.float64))))


def grad64(tf, x) -> np.ndarray:
    """``∇tf(x)`` in float64."""
    with jax.enable_x64(True):
        return np.asarray(jax.jit(jax.grad(tf.fn))(jnp.asarray(np.asarray(x, dtype=np.float64))))


def random_points(name, d, n, seed=0):
    lo, hi = F.get(name).domain
    return np.random.default_rng(seed).uniform(lo, hi, size=(n, d))


# ------------------------------------------------------------------------------------------
# Minimizers and minima
# ------------------------------------------------------------------------------------------


MINIMIZER_CASES = [(name, d) for name in ALL_NAMES if name != "michalewicz" for d in (1, 2, 7)]
MINIMIZER_CASES += [("michalewicz", d) for d in (1, 2, 3, 5, 7, 10)]


@pytest.mark.parametrize(("name", "d"), MINIMIZER_CASES)
def test_value_at_minimizer_is_minimum(name, d):
    tf = F.get(name)
    x_star = tf.minimizer(d)
    assert x_star.shape == (d,)
    lo, hi = tf.domain
    assert np.all((x_star >= lo) & (x_star <= hi))
    f_star = tf.minimum(d)
    assert f_star is not None
    np.testing.assert_allclose(eval64(tf, x_star), f_star, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(NP_REFERENCE[name](x_star), f_star, rtol=1e-10, atol=1e-10)
    # float32: the same up to float32 rounding of the terms
    value32 = jax.jit(tf.fn)(jnp.asarray(x_star, dtype=jnp.float32))
    assert value32.dtype == jnp.float32
    scale = d * max(1.0, abs(lo), abs(hi))
    np.testing.assert_allclose(float(value32), f_star, atol=2e-6 * scale)


@pytest.mark.parametrize(
    ("name", "d"), [(n, 3) for n in ALL_NAMES if n != "michalewicz"] + [("michalewicz", 5)]
)
def test_no_sampled_point_beats_the_minimum(name, d):
    tf = F.get(name)
    f_star = tf.minimum(d)
    x = random_points(name, d, 2000, seed=d)
    with jax.enable_x64(True):
        values = np.asarray(jax.vmap(tf)(jnp.asarray(x)))
    assert values.min() >= f_star - 1e-9


def test_literature_constants():
    st = F.get("styblinski_tang")
    schwefel = F.get("schwefel")
    mich = F.get("michalewicz")
    for d in (1, 2, 7):
        # Styblinski-Tang: -39.16599 d at x_i = -2.903534 (the literature value is slightly off)
        assert abs(st.minimum(d) - (-39.16599 * d)) < 2e-4 * d
        np.testing.assert_allclose(st.minimizer(d), -2.903534, atol=1e-6)
        # Schwefel: ~0 up to the rounding of 418.9829, at x_i = 420.9687
        assert 0 <= schwefel.minimum(d) < 1e-4 * d
        np.testing.assert_allclose(schwefel.minimizer(d), 420.9687, atol=1e-4)
        assert abs(eval64(schwefel, np.full(d, 420.9687))) < 1e-4 * d
    for d, literature in [(2, -1.8013), (5, -4.687658), (10, -9.66015)]:
        assert abs(mich.minimum(d) - literature) < 1e-4
    for d in (11, 20):  # beyond the tabulated coordinates: unknown
        assert mich.minimum(d) is None
        assert mich.minimizer(d) is None


def test_michalewicz_coordinate_minimizers_beat_a_fine_grid():
    """f is separable: each tabulated coordinate must be the global minimizer of its term
    −sin(t) sin^20(i t²/π) on [0, π], so the sums are the minima for every d ≤ 10."""
    mich = F.get("michalewicz")
    grid = np.linspace(0.0, math.pi, 400_001)
    x_star = mich.minimizer(10)
    for i in range(1, 11):
        term = lambda t, i=i: -np.sin(t) * np.sin(i * t * t / math.pi) ** 20
        assert term(x_star[i - 1]) <= term(grid).min() + 1e-12, i
        d_minimum = mich.minimum(i) - (mich.minimum(i - 1) if i > 1 else 0.0)
        assert d_minimum == pytest.approx(term(x_star[i - 1]), abs=1e-15)
    # d = 2 minimizer as usually quoted: (2.20, 1.57)
    np.testing.assert_allclose(mich.minimizer(2), [2.20, 1.57], atol=5e-3)


def test_minimizer_rejects_bad_dim():
    with pytest.raises(ValueError, match="dim"):
        F.get("sphere").minimizer(0)
    with pytest.raises(ValueError, match="dim"):
        F.get("sphere").minimum(-1)


# ------------------------------------------------------------------------------------------
# Values against the NumPy references
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("d", [1, 5])
def test_matches_numpy_reference_at_random_points(name, d):
    tf = F.get(name)
    for x in random_points(name, d, 5, seed=10 + d):
        np.testing.assert_allclose(eval64(tf, x), NP_REFERENCE[name](x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("d", [1, 2, 7])
def test_closed_form_values(d):
    zeros, ones = np.zeros(d), np.ones(d)
    assert eval64(F.get("rosenbrock"), zeros) == pytest.approx(d - 1)
    assert eval64(F.get("rastrigin"), ones) == pytest.approx(d)
    assert eval64(F.get("sphere"), np.arange(d)) == pytest.approx(sum(i * i for i in range(d)))
    assert eval64(F.get("styblinski_tang"), zeros) == 0.0
    assert eval64(F.get("styblinski_tang"), ones) == pytest.approx(d * (1 - 16 + 5) / 2)
    assert eval64(F.get("griewank"), zeros) == pytest.approx(0.0, abs=1e-15)
    assert eval64(F.get("ackley"), ones) == pytest.approx(20 * (1 - math.exp(-0.2)))
    assert eval64(F.get("schwefel"), zeros) == pytest.approx(418.9829 * d)
    # Levy at x = -3 has w = 0: (d - 1) (1 + 10 sin^2 1) + 1.
    assert eval64(F.get("levy"), np.full(d, -3.0)) == pytest.approx(
        (d - 1) * (1 + 10 * math.sin(1) ** 2) + 1
    )
    ellipsoid_ones = 1.0 if d == 1 else sum(10 ** (6 * k / (d - 1)) for k in range(d))
    assert eval64(F.get("ellipsoid"), ones) == pytest.approx(ellipsoid_ones)


def test_specific_values():
    # Griewank, d = 1 at x = π: π²/4000 − cos(π) + 1.
    assert eval64(F.get("griewank"), [math.pi]) == pytest.approx(math.pi**2 / 4000 + 2)
    # Michalewicz, d = 2 at (π/2, π/2): −(sin(π/4)^20 + sin(π/2)^20) = −(2^−10 + 1).
    assert eval64(F.get("michalewicz"), [math.pi / 2] * 2) == pytest.approx(-(2**-10 + 1))
    # Ellipsoid is ill-conditioned: the last axis weighs 1e6 times the first.
    e = F.get("ellipsoid")
    assert eval64(e, [0, 0, 0, 1]) / eval64(e, [1, 0, 0, 0]) == pytest.approx(1e6)


def test_multifrequency_frequencies_and_periods():
    # ω runs geometrically from 1/4 to 4; coordinate i's ripple has period 1/ω_i: moving by
    # 1/ω_i changes f by the quadratic part only.
    d = 9
    w = np_frequencies(d)
    np.testing.assert_allclose(w[[0, 4, 8]], [0.25, 1.0, 4.0])
    np.testing.assert_allclose(w[1:] / w[:-1], 4 ** (2 / 8))
    tf = F.get("rastrigin_multifrequency")
    x = random_points("rastrigin_multifrequency", d, 1, seed=4)[0]
    for i in range(d):
        step = np.eye(d)[i] / w[i]
        expected = (x[i] + 1 / w[i]) ** 2 - x[i] ** 2
        assert eval64(tf, x + step) - eval64(tf, x) == pytest.approx(expected, rel=1e-9, abs=1e-9)
    # d = 1: plain Rastrigin
    assert eval64(tf, [0.3]) == pytest.approx(eval64(F.get("rastrigin"), [0.3]), rel=1e-12)


def test_mixed_asymmetric_coordinates():
    tf = F.get("mixed_asymmetric")
    t = 2.0
    # an odd coordinate is symmetric, an even one is not: 10 (e^t − e^−t − 2t) apart
    assert eval64(tf, [t, 0.0]) == eval64(tf, [-t, 0.0])
    gap = eval64(tf, [0.0, t]) - eval64(tf, [0.0, -t])
    assert gap == pytest.approx(10 * (math.exp(t) - math.exp(-t) - 2 * t), rel=1e-12)
    # the Hessian at the minimizer: 2 + 40π² on odd coordinates, 10 on even ones
    with jax.enable_x64(True):
        hess = np.asarray(jax.hessian(tf.fn)(jnp.zeros(4, jnp.float64)))
    np.testing.assert_allclose(np.diag(hess), [2 + 40 * np.pi**2, 10, 2 + 40 * np.pi**2, 10])
    np.testing.assert_allclose(hess - np.diag(np.diag(hess)), 0.0, atol=1e-12)


def gauss_smoothed(term, s, x, order=80):
    """E_u term(x + s u), u ~ N(0, 1), by Gauss–Hermite quadrature (probabilists' weights)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(order)
    return float(np.sum(weights * term(x + s * nodes)) / np.sqrt(2 * np.pi))


def test_smoothed_closed_forms_in_docstrings():
    # multi-frequency Rastrigin with diagonal Σ: x² + s² + 10 − 10 cos(2πωx) exp(−2π²ω²s²)
    for w, s, x in [(0.25, 1.3, 0.7), (4.0, 0.1, -0.2), (1.0, 0.52, 2.0)]:
        term = lambda t, w=w: t**2 + 10 * (1 - np.cos(2 * np.pi * w * t))  # noqa: E731
        closed = (
            x**2 + s**2 + 10 - 10 * np.cos(2 * np.pi * w * x) * np.exp(-2 * np.pi**2 * w**2 * s**2)
        )
        assert gauss_smoothed(term, s, x) == pytest.approx(closed, rel=1e-10)
    # an even coordinate of mixed_asymmetric: 10 (e^{x + s²/2} − 1 − x), minimized at −s²/2
    for s, x in [(0.5, 0.3), (3.0, -4.5)]:
        wall = lambda t: 10 * (np.exp(t) - 1 - t)  # noqa: E731
        closed = 10 * (np.exp(x + s**2 / 2) - 1 - x)
        assert gauss_smoothed(wall, s, x) == pytest.approx(closed, rel=1e-10)
    # the smoothed wall's minimizer moves to −s²/2 (quadrature, central differences)
    wall = lambda t: 10 * (np.exp(t) - 1 - t)  # noqa: E731
    for s in (0.5, 1.5):
        slope = [
            (gauss_smoothed(wall, s, x + 1e-5) - gauss_smoothed(wall, s, x - 1e-5)) / 2e-5
            for x in (-(s**2) / 2 - 0.1, -(s**2) / 2, -(s**2) / 2 + 0.1)
        ]
        assert slope[0] < -0.5 and abs(slope[1]) < 1e-6 and slope[2] > 0.5


def test_ackley_zero_at_origin_in_float32():
    """Exactly 0 at the origin eagerly; under jit (where XLA rounds mean(cos) − 1 to ±1e-7,
    so f − f* came out negative) within 1e-7 of it and never below 0, near it either."""
    for d in (1, 3, 10, 100):
        value = F.ackley(jnp.zeros(d, jnp.float32))
        assert value.dtype == jnp.float32 and float(value) == 0.0, d
        assert 0.0 <= float(jax.jit(F.ackley)(jnp.zeros(d, jnp.float32))) <= 1e-7, d
    near = 1e-4 * jax.random.normal(jax.random.key(0), (256, 10))
    assert float(jnp.min(jax.jit(jax.vmap(F.ackley))(near))) >= 0.0
    # float32 near the origin stays close to the float64 reference
    x = np.full(10, 1e-3)
    assert float(F.ackley(jnp.asarray(x, jnp.float32))) == pytest.approx(np_ackley(x), rel=1e-4)


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SMOOTH)
@pytest.mark.parametrize("d", [1, 2, 7])
def test_gradient_vanishes_at_minimizer(name, d):
    tf = F.get(name)
    g = grad64(tf, tf.minimizer(d))
    np.testing.assert_allclose(g, 0.0, atol=1e-8)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_gradient_matches_finite_differences(name):
    tf = F.get(name)
    d, h = 4, 1e-6
    x = random_points(name, d, 1, seed=3)[0]
    scale = max(abs(v) for v in tf.domain)
    g = grad64(tf, x)
    fd = np.array(
        [
            (NP_REFERENCE[name](x + h * scale * e) - NP_REFERENCE[name](x - h * scale * e))
            / (2 * h * scale)
            for e in np.eye(d)
        ]
    )
    np.testing.assert_allclose(g, fd, rtol=1e-5, atol=1e-5 * (1 + np.abs(fd).max()))


def test_gradients_finite_at_kinks():
    # sqrt(|x_i|) in Schwefel and sqrt(mean x²) in Ackley must not give NaN at 0.
    for tf in (F.get("schwefel"), F.get("ackley")):
        for dtype in (jnp.float32, jnp.float64):
            g = grad64(tf, np.zeros(3)) if dtype == jnp.float64 else jax.grad(tf)(jnp.zeros(3))
            np.testing.assert_array_equal(np.asarray(g), 0.0)


# ------------------------------------------------------------------------------------------
# jit / vmap / grad / dtypes
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
def test_jit_vmap_grad_and_dtypes(name):
    tf = F.get(name)
    x = jnp.asarray(random_points(name, 3, 6, seed=7), dtype=jnp.float32)
    # a Python loop over points (eager and jitted) against vmap (eager and jitted)
    jitted = jax.jit(tf)
    loop = np.array([float(jitted(xi)) for xi in x])
    np.testing.assert_allclose(float(tf(x[0])), loop[0], rtol=1e-5, atol=1e-5)
    batched = jax.vmap(tf)(x)
    assert batched.shape == (6,) and batched.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(batched), loop, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(tf))(x)), loop, rtol=1e-5, atol=1e-5)
    # gradients: batched equals looped, dtype kept
    grad_fn = jax.jit(jax.grad(tf))
    grads = jax.jit(jax.vmap(jax.grad(tf)))(x)
    assert grads.shape == x.shape and grads.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(grads)))
    grad_loop = np.stack([np.asarray(grad_fn(xi)) for xi in x])
    np.testing.assert_allclose(np.asarray(grads), grad_loop, rtol=1e-5, atol=1e-4)
    with jax.enable_x64(True):
        x64 = jnp.asarray(np.asarray(x[0]), dtype=jnp.float64)
        assert jax.jit(tf)(x64).dtype == jnp.float64
        assert jax.jit(jax.grad(tf))(x64).dtype == jnp.float64
    # integers are promoted to a float
    assert jnp.issubdtype(jitted(jnp.ones(3, jnp.int32)).dtype, jnp.floating)


def test_rejects_non_vector_input():
    with pytest.raises(ValueError, match="shape"):
        F.sphere(jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="shape"):
        F.sphere(jnp.ones(()))


# ------------------------------------------------------------------------------------------
# Rotated variants
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("d", [2, 5])
def test_rotated_keeps_minimum_at_stated_minimizer(name, d):
    g = F.rotated(name, d, seed=1)
    base = F.get(name)
    assert g.name == "rotated_" + name
    assert g.dim == d and g.domain == base.domain
    q = g.rotation
    np.testing.assert_allclose(q @ q.T, np.eye(d), atol=1e-12)
    np.testing.assert_allclose(q.T @ q, np.eye(d), atol=1e-12)
    x_star = g.minimizer(d)
    assert g.minimum(d) == base.minimum(d)
    if x_star is None:  # only where the unrotated minimizer is unknown
        assert base.minimizer(d) is None
        return
    lo, hi = g.domain
    assert np.all((x_star >= lo) & (x_star <= hi))
    np.testing.assert_allclose(eval64(g, x_star), g.minimum(d), rtol=1e-9, atol=1e-9)
    # differs from the unrotated function at a random point
    x = random_points(name, d, 1, seed=5)[0]
    assert abs(eval64(g, x) - eval64(base, x)) > 1e-6
    # and the shift moved the minimizer away from the unrotated one
    assert not np.allclose(x_star, base.minimizer(d))


@pytest.mark.parametrize("name", SMOOTH)
def test_rotated_gradient_vanishes_at_minimizer(name):
    g = F.rotated(name, 4, seed=2)
    np.testing.assert_allclose(grad64(g, g.minimizer(4)), 0.0, atol=1e-7)


def test_rotated_with_unknown_minimizer_pivots_on_box_centre():
    g = F.rotated("michalewicz", 11, seed=0)  # d > 10: no tabulated minimizer
    assert g.minimizer(11) is None and g.minimum(11) is None
    x = np.linspace(0.5, 2.5, 11)
    c = np.full(11, math.pi / 2)
    expected = np_michalewicz(g.rotation @ (x - g.offset) + c)
    assert eval64(g, x) == pytest.approx(expected, rel=1e-12)


def test_rotated_algebra_and_options():
    d = 3
    g = F.rotated("rosenbrock", d, seed=4)
    q, o = g.rotation, g.offset
    x = np.array([0.3, -1.2, 2.0])
    assert eval64(g, x) == pytest.approx(np_rosenbrock(q @ (x - o) + np.ones(d)), rel=1e-12)
    np.testing.assert_allclose(g.minimizer(d), o)
    # the offset stays within 20 % of the box width of the pivot
    lo, hi = g.domain
    assert np.all(np.abs(o - np.ones(d)) <= 0.2 * (hi - lo))
    # shift=False: rotation about the original minimizer, which stays the minimizer
    g0 = F.rotated("rosenbrock", d, seed=4, shift=False)
    np.testing.assert_allclose(g0.minimizer(d), np.ones(d))
    np.testing.assert_allclose(g0.rotation, q)
    # other dims have no minimizer and the function rejects them
    assert g.minimizer(d + 1) is None and g.minimum(d + 1) is None
    with pytest.raises(ValueError, match="shape"):
        g(jnp.ones(d + 1))
    # reproducible from the seed; a different seed gives a different function
    np.testing.assert_array_equal(F.rotated("rosenbrock", d, seed=4).rotation, q)
    assert not np.allclose(F.rotated("rosenbrock", d, seed=5).rotation, q)


def test_rotated_ellipsoid_is_ill_conditioned_and_non_separable():
    d = 6
    g = F.get("rotated_ellipsoid", dim=d)
    with jax.enable_x64(True):
        hessian = np.asarray(jax.hessian(g)(jnp.asarray(g.minimizer(d))))
    eigenvalues = np.linalg.eigvalsh(hessian)
    assert eigenvalues.max() / eigenvalues.min() == pytest.approx(1e6, rel=1e-6)
    off_diagonal = hessian - np.diag(np.diag(hessian))
    assert np.abs(off_diagonal).max() > 1.0


def test_rotated_works_under_jit_vmap():
    g = F.get("rotated_rastrigin", dim=4, seed=3)
    x = jnp.asarray(random_points("rastrigin", 4, 5, seed=8), dtype=jnp.float32)
    loop = np.array([float(jax.jit(g)(xi)) for xi in x])
    np.testing.assert_allclose(np.asarray(jax.jit(jax.vmap(g))(x)), loop, rtol=1e-5, atol=1e-4)
    assert jax.vmap(jax.grad(g))(x).dtype == jnp.float32


def test_random_rotation_is_orthogonal_with_unit_determinant_magnitude():
    for dim in (1, 2, 9):
        q = F.random_rotation(dim, seed=dim)
        np.testing.assert_allclose(q.T @ q, np.eye(dim), atol=1e-12)
        assert abs(abs(np.linalg.det(q)) - 1) < 1e-12


# ------------------------------------------------------------------------------------------
# Registry and sampling
# ------------------------------------------------------------------------------------------


def test_names_and_registry():
    assert F.names() == sorted(ALL_NAMES)
    assert set(F.REGISTRY) == set(ALL_NAMES)
    assert len(F.names(include_rotated=True)) == 2 * len(ALL_NAMES)
    for name in ALL_NAMES:
        tf = F.get(name)
        assert isinstance(tf, F.TestFunction) and tf.name == name
        assert tf.domain[0] < tf.domain[1]
        assert tf.description
        assert tf(jnp.ones(2)) == tf.fn(jnp.ones(2))
        assert getattr(F, name) is tf.fn
    with pytest.raises(dataclasses.FrozenInstanceError):
        F.get("sphere").name = "other"


def test_get_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        F.get("no_such_function")
    message = str(info.value)
    assert "no_such_function" in message
    for name in ALL_NAMES:
        assert name in message
    with pytest.raises(ValueError, match="rastrigin"):
        F.get("rotated_nothing", dim=3)


def test_get_rotated_by_name():
    g = F.get("rotated_ellipsoid", dim=5)
    h = F.rotated("ellipsoid", 5, seed=0)
    np.testing.assert_array_equal(g.rotation, h.rotation)
    np.testing.assert_array_equal(g.offset, h.offset)
    assert not np.allclose(F.get("rotated_ellipsoid", dim=5, seed=1).rotation, g.rotation)
    with pytest.raises(ValueError, match="dim"):
        F.get("rotated_ellipsoid")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_sample_starts_in_domain(name):
    starts = F.sample_starts(name, jax.random.key(0), num_starts=64, dim=3)
    assert starts.shape == (64, 3)
    lo, hi = F.get(name).domain
    s = np.asarray(starts)
    assert np.all((s >= lo) & (s <= hi))
    assert s.std() > 0.1 * (hi - lo)  # actually spread over the box


def test_sample_starts_arguments():
    key = jax.random.key(1)
    tf = F.get("levy")
    np.testing.assert_array_equal(
        np.asarray(F.sample_starts(tf, key, 4, 2)), np.asarray(F.sample_starts("levy", key, 4, 2))
    )
    with jax.enable_x64(True):
        assert F.sample_starts(tf, key, 4, 2, dtype=jnp.float64).dtype == jnp.float64
    for bad in (0, -1):
        with pytest.raises(ValueError, match="dim"):
            F.sample_starts(tf, key, 4, bad)
    with pytest.raises(ValueError, match="num_starts"):
        F.sample_starts(tf, key, 0, 2)
    g = F.get("rotated_levy", dim=3)
    assert F.sample_starts(g, key, 2, 3).shape == (2, 3)
    with pytest.raises(ValueError, match="dim"):
        F.sample_starts(g, key, 2, 4)
    with pytest.raises(ValueError, match="valid names"):
        F.sample_starts("nope", key, 2, 2)
