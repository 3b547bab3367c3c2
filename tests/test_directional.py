"""The directional Gauss–Hermite estimator against closed forms (arXiv:2002.03001).

Along direction ξ with radius s, G(t) = E_u f(x + (t + s u) ξ), u ~ N(0, 1):
- a polynomial p(t) = f(x + tξ) of degree ≤ 2M − 2 gives D = G'(0) exactly, and of degree
  ≤ 2M − 3 gives C = G''(0) exactly (E u^{2j} = (2j − 1)!!);
- f = cos(aᵀx): D = −sin(aᵀx)(aᵀξ) e^{−(s aᵀξ)²/2}, C = −cos(aᵀx)(aᵀξ)² e^{−(s aᵀξ)²/2};
- a quadratic ½xᵀAx + bᵀx: Σ_i D_i ξ_i = Ax + b for any radii (k = d), C_i = ξ_iᵀAξ_i.
Checked in float64 (x64) so that "exact" means to round-off.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from agsopt.smoothing.directional import (
    directional_basis,
    directional_value_and_grad,
    evaluations_per_step,
    gauss_hermite,
)

DIM = 5


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _basis(dim=DIM, k=DIM, first=None, seed=0):
    return directional_basis(jax.random.key(seed), dim, k, first=first, dtype=jnp.float64)


def _smoothed_monomial_moments(coeffs: np.ndarray, s: float) -> tuple[float, float]:
    """G'(0) and G''(0) of p(t) = Σ_j c_j t^j smoothed with N(0, s²), by E u^{2j}."""

    def moment(n: int) -> float:
        return 0.0 if n % 2 else float(math.prod(range(n - 1, 0, -2))) if n else 1.0

    # G(t) = Σ_j c_j E(t + s u)^j; G'(0) = Σ_j c_j j E(su)^{j−1}; G''(0) = Σ c_j j(j−1) E(su)^{j−2}
    d1 = sum(c * j * s ** (j - 1) * moment(j - 1) for j, c in enumerate(coeffs) if j >= 1)
    d2 = sum(c * j * (j - 1) * s ** (j - 2) * moment(j - 2) for j, c in enumerate(coeffs) if j >= 2)
    return d1, d2


@pytest.mark.parametrize("num_nodes", [3, 5, 7])
def test_exact_for_polynomials_along_each_direction(num_nodes):
    rng = np.random.default_rng(num_nodes)
    x0 = rng.uniform(-1, 1, DIM)
    basis = _basis()
    radii = jnp.asarray(rng.uniform(0.3, 1.2, DIM))
    degree = 2 * num_nodes - 2
    coeffs = rng.standard_normal(degree + 1)

    def poly(t):
        return sum(c * t**j for j, c in enumerate(coeffs))

    for i in range(DIM):
        xi = basis[i]

        # f varies along ξ_i only: f(x) = p(ξ_iᵀ(x − x0)).
        def f(x, xi=xi):
            return poly(jnp.dot(xi, x - x0))

        est = directional_value_and_grad(f, jnp.asarray(x0), basis, radii, num_nodes=num_nodes)
        d1, d2 = _smoothed_monomial_moments(coeffs, float(radii[i]))
        np.testing.assert_allclose(est.derivatives[i], d1, rtol=1e-9, atol=1e-9)
        # The other directions see a constant.
        others = np.delete(np.asarray(est.derivatives), i)
        np.testing.assert_allclose(others, 0.0, atol=1e-8)
        # C is exact up to degree 2M − 3: test it on the polynomial without its top term.
        low = coeffs.copy()
        low[-1] = 0.0

        def f_low(x, xi=xi, low=low):
            t = jnp.dot(xi, x - x0)
            return sum(c * t**j for j, c in enumerate(low))

        est_low = directional_value_and_grad(
            f_low, jnp.asarray(x0), basis, radii, num_nodes=num_nodes
        )
        np.testing.assert_allclose(
            est_low.curvatures[i], _smoothed_monomial_moments(low, float(radii[i]))[1], rtol=1e-9
        )


def test_not_exact_beyond_the_degree():
    """Power of the exactness test: degree 2M (the integrand u·t^{2M} has degree 2M + 1 …
    odd, hence still 0 by symmetry) — use degree 2M − 1 + 2 = 2M + 1: D is then off."""
    num_nodes = 3
    basis = _basis()
    s = 0.8
    coeffs = np.zeros(2 * num_nodes + 2)
    coeffs[-1] = 1.0  # t^(2M+1)

    def f(x):
        t = jnp.dot(basis[0], x)
        return t ** (2 * num_nodes + 1)

    est = directional_value_and_grad(f, jnp.zeros(DIM), basis, s, num_nodes=num_nodes)
    exact = _smoothed_monomial_moments(coeffs, s)[0]
    assert abs(float(est.derivatives[0]) - exact) > 1e-3 * abs(exact)


def test_cosine_closed_form():
    rng = np.random.default_rng(3)
    a = rng.standard_normal(DIM)
    x0 = rng.uniform(-1, 1, DIM)
    radii = jnp.asarray(rng.uniform(0.2, 0.8, DIM))
    basis = _basis()

    def f(x):
        return jnp.cos(jnp.dot(jnp.asarray(a), x))

    est = directional_value_and_grad(f, jnp.asarray(x0), basis, radii, num_nodes=21)
    ax = np.asarray(basis) @ a
    damp = np.exp(-((np.asarray(radii) * ax) ** 2) / 2)
    np.testing.assert_allclose(est.derivatives, -np.sin(a @ x0) * ax * damp, atol=1e-10)
    np.testing.assert_allclose(est.curvatures, -np.cos(a @ x0) * ax**2 * damp, atol=1e-10)
    np.testing.assert_allclose(est.value, np.cos(a @ x0), rtol=1e-12)


def test_quadratic_gradient_exact_for_any_radii_and_pytree():
    rng = np.random.default_rng(4)
    m = rng.standard_normal((DIM, DIM))
    a = m @ m.T + np.eye(DIM)
    b = rng.standard_normal(DIM)
    x0 = rng.uniform(-2, 2, DIM)
    params = {"u": jnp.asarray(x0[:2]), "w": jnp.asarray(x0[2:]).reshape(3, 1)}

    def f(p):
        x = jnp.concatenate([p["u"], p["w"].ravel()])
        return 0.5 * x @ a @ x + b @ x

    basis = _basis(first=jnp.arange(1.0, DIM + 1))
    est = directional_value_and_grad(f, params, basis, jnp.asarray([0.1, 1, 3, 0.5, 7.0]))
    grad = np.concatenate([est.grad["u"], est.grad["w"].ravel()])
    np.testing.assert_allclose(grad, a @ x0 + b, rtol=1e-9)
    np.testing.assert_allclose(est.curvatures, np.einsum("id,de,ie->i", basis, a, basis), rtol=1e-9)
    assert est.grad["w"].shape == (3, 1)


def test_chunked_equals_unchunked_and_counts():
    basis = _basis(dim=7, k=6)

    def f(x):
        return jnp.sum(jnp.sin(3 * x) + x**2)

    x = jnp.linspace(-1, 1, 7)
    full = directional_value_and_grad(f, x, basis, 0.4, num_nodes=5)
    for chunk in (1, 4, 6):
        part = directional_value_and_grad(f, x, basis, 0.4, num_nodes=5, chunk_size=chunk)
        # Equal up to the ulps of a vectorized sin at another batch shape.
        np.testing.assert_allclose(part.derivatives, full.derivatives, rtol=1e-14)
    assert int(full.num_evaluations) == evaluations_per_step(6, 5) == 6 * 4 + 1


@pytest.mark.parametrize(("lateral_nodes", "expected"), [(None, 3 * 6 + 1), (3, 6 + 2 * 2 + 1)])
def test_evaluation_count_is_the_number_of_calls(lateral_nodes, expected):
    points = []

    def record(x):  # under vmap the callback receives the whole batch of points
        points.extend(np.asarray(x).reshape(-1, 4).tolist())

    def f(x):
        jax.debug.callback(record, x)
        return jnp.sum(x**2)

    basis = _basis(dim=4, k=3)
    est = directional_value_and_grad(
        f, jnp.ones(4), basis, 0.5, num_nodes=7, lateral_nodes=lateral_nodes
    )
    jax.effects_barrier()
    assert len(points) == int(est.num_evaluations) == expected
    assert len({tuple(p) for p in points}) == len(points)  # no point evaluated twice


def test_lipschitz_and_best_point():
    """L_i is the largest divided difference of the node values; the best point is the
    smallest evaluated value, and f there equals it."""
    basis = _basis(dim=3, k=3)
    s = 0.7

    def f(x):
        return jnp.sum(jnp.abs(x - 0.3)) + jnp.sin(5 * x[0])

    x = jnp.asarray([1.0, -0.5, 0.2])
    est = directional_value_and_grad(f, x, basis, s, num_nodes=5)
    nodes, _ = gauss_hermite(5)
    for i in range(3):
        values = np.array([float(f(x + math.sqrt(2) * s * t * basis[i])) for t in nodes])
        slopes = np.abs(np.diff(values)) / (math.sqrt(2) * s * np.diff(nodes))
        np.testing.assert_allclose(est.lipschitz[i], slopes.max(), rtol=1e-9)
    assert float(est.best_value) == pytest.approx(float(f(est.best_params)))
    assert float(est.best_value) <= float(est.value)


def test_nonfinite_directions_are_dropped():
    basis = jnp.eye(3, dtype=jnp.float64)

    def f(x):  # NaN on the positive side of coordinate 1 only
        return jnp.where(x[1] > 0.5, jnp.nan, jnp.sum(x**2))

    est = directional_value_and_grad(f, jnp.zeros(3), basis, 0.5, num_nodes=5)
    assert float(est.derivatives[1]) == 0.0 and np.isnan(est.lipschitz[1])
    assert np.isfinite(np.asarray(est.lipschitz)[[0, 2]]).all()
    assert int(est.num_nonfinite) == 2  # the two nodes beyond 0.5 along e_1
    assert np.isfinite(est.best_value)


def test_basis_first_row_and_orthonormality():
    first = jnp.asarray([3.0, 0.0, -4.0, 0.0])
    basis = _basis(dim=4, k=3, first=first)
    np.testing.assert_allclose(basis @ basis.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(basis[0], np.asarray(first) / 5.0, atol=1e-12)
    zero_first = _basis(dim=4, k=4, first=jnp.zeros(4))
    np.testing.assert_allclose(zero_first @ zero_first.T, np.eye(4), atol=1e-12)


@pytest.mark.parametrize("num_nodes", [2, 4, 1, 3.0, True])
def test_bad_num_nodes(num_nodes):
    with pytest.raises((ValueError, TypeError), match="num_nodes"):
        gauss_hermite(num_nodes)


def test_bad_directions_shape():
    with pytest.raises(ValueError, match="directions"):
        directional_value_and_grad(jnp.sum, jnp.zeros(3), jnp.eye(4), 0.1)


def test_lateral_nodes_are_exact_to_their_own_degree():
    """M nodes on the first direction, M' on the others: D_i exact for polynomials of degree
    ≤ 2M − 2 along the first, ≤ 2M' − 2 along the others; C_i to 2M − 3 and 2M' − 3."""
    rng = np.random.default_rng(0)
    x0 = rng.uniform(-1, 1, DIM)
    basis = _basis()
    radii = jnp.asarray(rng.uniform(0.3, 1.2, DIM))
    for i, nodes in ((0, 5), (1, 3), (3, 3)):
        coeffs = rng.standard_normal(2 * nodes - 1)  # degree 2M − 2 (D exact)
        low = np.where(np.arange(len(coeffs)) < len(coeffs) - 1, coeffs, 0.0)  # C exact

        def f(x, xi=basis[i], c=coeffs):
            t = jnp.dot(xi, x - x0)
            return sum(cj * t**j for j, cj in enumerate(c))

        def f_low(x, xi=basis[i], c=low):
            t = jnp.dot(xi, x - x0)
            return sum(cj * t**j for j, cj in enumerate(c))

        est = directional_value_and_grad(
            f, jnp.asarray(x0), basis, radii, num_nodes=5, lateral_nodes=3
        )
        est_low = directional_value_and_grad(
            f_low, jnp.asarray(x0), basis, radii, num_nodes=5, lateral_nodes=3
        )
        d1, _ = _smoothed_monomial_moments(coeffs, float(radii[i]))
        _, d2 = _smoothed_monomial_moments(low, float(radii[i]))
        np.testing.assert_allclose(est.derivatives[i], d1, rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(est_low.curvatures[i], d2, rtol=1e-9, atol=1e-9)
        assert int(est.num_evaluations) == 4 + (DIM - 1) * 2 + 1

    # a lateral direction is not exact at degree 2M − 2 of the main one's 5 nodes: degree 8
    def f8(x):
        return jnp.dot(basis[1], x - x0) ** 8

    est = directional_value_and_grad(f8, jnp.asarray(x0), basis, 0.9, num_nodes=5, lateral_nodes=3)
    exact = _smoothed_monomial_moments(np.eye(9)[8], 0.9)[1]
    assert abs(float(est.curvatures[1]) - exact) > 1e-3 * abs(exact)
    assert evaluations_per_step(DIM, 5, 3) == 4 + (DIM - 1) * 2 + 1
    assert evaluations_per_step(1, 5, 3) == 5 and evaluations_per_step(DIM, 5) == DIM * 4 + 1


def test_lateral_nodes_points_match_the_tabulated_order():
    """directional_points lists x, the first direction's M − 1 nodes, then each other
    direction's M' − 1; the estimator reading those values (TabulatedValues) equals the
    estimator calling f."""
    from agsopt.smoothing.directional import directional_points
    from agsopt.smoothing.estimator import TabulatedValues

    rng = np.random.default_rng(3)
    x0 = jnp.asarray(rng.uniform(-1, 1, DIM))
    basis = _basis(k=3)

    def f(x):
        return jnp.sum(jnp.cos(2 * x) + x**3)

    points = directional_points(x0, basis, 0.7, num_nodes=5, lateral_nodes=3)
    assert points.shape == (4 + 2 * 2 + 1, DIM)
    np.testing.assert_array_equal(points[0], x0)
    offsets = np.asarray(points[1:5] - x0) @ np.asarray(basis[0])
    nodes3, nodes5 = gauss_hermite(3)[0], gauss_hermite(5)[0]
    np.testing.assert_allclose(offsets, math.sqrt(2) * 0.7 * np.delete(nodes5, 2), atol=1e-12)
    for row, first in ((1, 5), (2, 7)):
        along = np.asarray(points[first : first + 2] - x0) @ np.asarray(basis[row])
        np.testing.assert_allclose(along, math.sqrt(2) * 0.7 * np.delete(nodes3, 1), atol=1e-12)
    table = TabulatedValues(jax.vmap(f)(points))
    read = directional_value_and_grad(table, x0, basis, 0.7, num_nodes=5, lateral_nodes=3)
    called = directional_value_and_grad(f, x0, basis, 0.7, num_nodes=5, lateral_nodes=3)
    for a, b in zip(jax.tree.leaves(read), jax.tree.leaves(called), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)
