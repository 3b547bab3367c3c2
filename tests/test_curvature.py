"""The estimator's curvature statistic (``curvature=True``) against closed forms.

Second-order Stein identity, u ~ N(0, I): E[f(x + Σu)(uuᵀ − I)] = Σᵀ∇²f_Σ(x)Σ, and the
estimator returns ĉ_i = Σ_n (v_n − v̄)(u_ni² − 1)/(N_valid − 1) for its diagonal, v_n the
antithetic mean [f(x+Σu_n) + f(x−Σu_n)]/2 or f(x+Σu_n) (forward, plain).

Statistical checks: the mean of ĉ over many keys must lie within ``Z_BOUND = 5`` standard
errors (sample standard deviation over √keys) of the closed form in every coordinate; each
check also asserts its power (a wrong formula lies outside the bound, or the standard error
is small next to the quantity tested).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from agsopt import covariance
from agsopt.smoothing import smoothed_value_and_grad

Z_BOUND = 5.0
ZERO_ORDER = ("antithetic", "forward", "plain")
TEMPLATE = {"v": jnp.zeros(3, jnp.float32), "w": jnp.zeros(2, jnp.float32)}
DIM = 5
_, _UNRAVEL = ravel_pytree(TEMPLATE)

_RNG = np.random.default_rng(11)
X0 = _RNG.uniform(-1.0, 1.0, DIM)
_M = _RNG.standard_normal((DIM, DIM))
A_QUAD = 0.5 * (_M + _M.T) + 1.5 * np.eye(DIM)  # symmetric, indefinite in general
B_QUAD = _RNG.standard_normal(DIM)
SIGMA_DIAG = np.array([0.3, 0.5, 0.7, 0.4, 0.6])
# A non-symmetric, invertible Σ.
SIGMA_DENSE = 0.6 * np.eye(DIM) + 0.3 * np.triu(_RNG.standard_normal((DIM, DIM)), 1)
_a = _RNG.standard_normal(DIM)
A_COS = 1.2 * _a / np.linalg.norm(_a)


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def to_tree(vector) -> dict:
    return _UNRAVEL(jnp.asarray(vector, jnp.float32))


def quadratic(p):
    x = ravel_pytree(p)[0]
    return 0.5 * x @ jnp.asarray(A_QUAD, jnp.float32) @ x + jnp.asarray(B_QUAD, jnp.float32) @ x


def cosine(p):
    return jnp.cos(ravel_pytree(p)[0] @ jnp.asarray(A_COS, jnp.float32))


MATRICES = {
    "diagonal": (covariance.Diagonal(to_tree(SIGMA_DIAG)), np.diag(SIGMA_DIAG)),
    "dense": (covariance.Dense(jnp.asarray(SIGMA_DENSE, jnp.float32)), SIGMA_DENSE),
}


def curvatures(fun, matrix, *, num_samples, method, num_keys, seed=0, **kwargs) -> np.ndarray:
    """ĉ for ``num_keys`` independent keys, shape (num_keys, d), float64."""
    keys = jax.random.split(jax.random.key(seed), num_keys)
    estimate = lambda k: (
        smoothed_value_and_grad(
            fun,
            to_tree(X0),
            k,
            matrix,
            num_samples=num_samples,
            method=method,
            curvature=True,
            **kwargs,
        ).curvature
    )
    out = jax.jit(jax.vmap(estimate))(keys)
    return np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(out), np.float64)


def z_scores(samples: np.ndarray, expected: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    se = samples.std(axis=0, ddof=1) / np.sqrt(samples.shape[0])
    return (samples.mean(axis=0) - expected) / se, se


@pytest.mark.parametrize("which", ["diagonal", "dense"])
@pytest.mark.parametrize("method", ZERO_ORDER)
def test_quadratic_unbiased_and_power(which, method):
    """f = ½xᵀAx + bᵀx: ∇²f_Σ = A, so E ĉ = diag(ΣᵀAΣ) exactly, at N = 3. Dividing the
    centred sum by N instead of N − 1 (the uncorrected baseline) is off by a factor 2/3,
    which the same test rejects."""
    matrix, dense = MATRICES[which]
    expected = np.diag(dense.T @ A_QUAD @ dense)
    n = 3
    samples = curvatures(quadratic, matrix, num_samples=n, method=method, num_keys=4000)
    z, se = z_scores(samples, expected)
    print(which, method, "z =", np.round(z, 2))
    assert np.all(np.abs(z) <= Z_BOUND), z
    wrong = samples * (n - 1) / n
    z_wrong, _ = z_scores(wrong, expected)
    assert np.max(np.abs(z_wrong)) > Z_BOUND, z_wrong


@pytest.mark.parametrize("which", ["diagonal", "dense"])
def test_cosine_closed_form(which):
    """f = cos(aᵀx): f_Σ = cos(aᵀx) exp(−½‖Σᵀa‖²), so Σᵀ∇²f_Σ Σ = −(Σᵀa)(Σᵀa)ᵀ f_Σ(x)."""
    matrix, dense = MATRICES[which]
    w = dense.T @ A_COS
    smoothed = np.cos(A_COS @ X0) * np.exp(-0.5 * w @ w)
    expected = -(w * w) * smoothed
    samples = curvatures(cosine, matrix, num_samples=8, method="antithetic", num_keys=3000)
    z, se = z_scores(samples, expected)
    print(which, "z =", np.round(z, 2), "expected", expected)
    assert np.all(np.abs(z) <= Z_BOUND), z
    # Power: the standard error is small next to the largest entry tested.
    assert np.max(se) < 0.1 * np.max(np.abs(expected))


@pytest.mark.parametrize("method", ZERO_ORDER)
def test_formula_on_drawn_samples_and_chunking(method):
    """ĉ equals Σ_n (v_n − v̄)(u_n² − 1)/(N − 1) evaluated in float64 on the estimator's own
    directions (u_n = normal(fold_in(key, n), (d,))), for every chunking."""
    key, n, sigma = jax.random.key(3), 7, 0.4
    u = np.stack(
        [np.asarray(jax.random.normal(jax.random.fold_in(key, i), (DIM,))) for i in range(n)]
    ).astype(np.float64)
    f_np = lambda x: np.cos(x @ A_COS) + 0.1 * np.sum(x**3, axis=-1)
    fun = lambda p: cosine(p) + 0.1 * jnp.sum(ravel_pytree(p)[0] ** 3)
    plus, minus = f_np(X0 + sigma * u), f_np(X0 - sigma * u)
    v = (plus + minus) / 2 if method == "antithetic" else plus
    expected = ((v - v.mean())[:, None] * (u * u - 1)).sum(axis=0) / (n - 1)
    for chunk in (None, 1, 3, 64):  # one per sample, 3 + 3 + 1, one chunk larger than N
        est = smoothed_value_and_grad(
            fun,
            to_tree(X0),
            key,
            covariance.isotropic(sigma),
            num_samples=n,
            method=method,
            chunk_size=chunk,
            curvature=True,
        )
        np.testing.assert_allclose(flat(est.curvature), expected, rtol=1e-4, atol=1e-5)
        assert jax.tree.map(lambda c: c.shape, est.curvature) == {"v": (3,), "w": (2,)}


def nan_above(p):
    """The quadratic, NaN where x_0 exceeds X0[0] + 0.3."""
    x = ravel_pytree(p)[0]
    return jnp.where(x[0] > X0[0] + 0.3, jnp.nan, quadratic(p))


@pytest.mark.parametrize("method", ZERO_ORDER)
def test_nonfinite_samples_excluded(method):
    """Samples with a NaN value are left out: ĉ is the formula over the finite ones, with
    N_valid − 1 in the denominator."""
    key, n, sigma = jax.random.key(5), 16, 0.5
    est = smoothed_value_and_grad(
        nan_above,
        to_tree(X0),
        key,
        covariance.isotropic(sigma),
        num_samples=n,
        method=method,
        chunk_size=5,
        curvature=True,
    )
    u = np.stack(
        [np.asarray(jax.random.normal(jax.random.fold_in(key, i), (DIM,))) for i in range(n)]
    ).astype(np.float64)
    f_np = lambda x: 0.5 * np.einsum("ni,ij,nj->n", x, A_QUAD, x) + x @ B_QUAD
    bad = sigma * u[:, 0] > 0.3
    if method == "antithetic":
        bad |= -sigma * u[:, 0] > 0.3
    ok = ~bad
    assert 2 <= ok.sum() < n and int(est.num_nonfinite) == bad.sum()
    plus, minus = f_np(X0 + sigma * u[ok]), f_np(X0 - sigma * u[ok])
    v = (plus + minus) / 2 if method == "antithetic" else plus
    expected = ((v - v.mean())[:, None] * (u[ok] ** 2 - 1)).sum(axis=0) / (ok.sum() - 1)
    np.testing.assert_allclose(flat(est.curvature), expected, rtol=1e-4, atol=1e-5)


def test_fewer_than_two_finite_samples_is_nan():
    """One finite sample (or none): the centred estimate is undefined, NaN."""
    for n in (1, 4):
        # Finite only at the first direction: f is NaN unless x_0 equals the first point's.
        key = jax.random.key(6)
        u0 = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), (DIM,)), np.float64)
        first = X0[0] + 0.5 * u0[0]

        def fun(p, first=first):
            x0 = ravel_pytree(p)[0][0]
            return jnp.where(jnp.abs(x0 - first) < 1e-6, quadratic(p), jnp.nan)

        est = smoothed_value_and_grad(
            fun,
            to_tree(X0),
            key,
            covariance.isotropic(0.5),
            num_samples=n,
            method="plain",
            curvature=True,
        )
        assert int(est.num_nonfinite) == n - 1
        assert np.all(np.isnan(flat(est.curvature)))


def _isotropic_curvature(fun, key: int, num_samples: int, chunk_size: int):
    """The estimator's curvature for Σ = 0.5 I at ``X0``."""
    return smoothed_value_and_grad(
        fun,
        to_tree(X0),
        jax.random.key(key),
        covariance.isotropic(0.5),
        num_samples=num_samples,
        chunk_size=chunk_size,
        curvature=True,
    ).curvature


def test_huge_offset_stays_finite():
    """f + 1e30 (float32): the values are scaled by a power of two per chunk, so the sums
    do not overflow (and f + 1e37 over 64 samples neither); the unscaled sum would."""
    for offset in (1e30, 1e37):
        fun = lambda p, o=offset: quadratic(p) * 1e-30 * o + jnp.float32(o)
        assert np.all(np.isfinite(flat(_isotropic_curvature(fun, 8, 64, 16)))), offset
    # Scaling is exact: a function scaled by 2^100 gives ĉ scaled by 2^100 (bit for bit
    # up to the float32 range), as the scaled sums promise.
    base = _isotropic_curvature(quadratic, 9, 32, 8)
    big = _isotropic_curvature(lambda p: quadratic(p) * 2.0**100, 9, 32, 8)
    np.testing.assert_array_equal(flat(big), flat(base) * 2.0**100)


def test_first_order_raises_and_default_is_none():
    with pytest.raises(ValueError, match="curvature"):
        smoothed_value_and_grad(
            quadratic,
            to_tree(X0),
            jax.random.key(0),
            covariance.isotropic(0.5),
            method="first_order",
            curvature=True,
        )
    est = smoothed_value_and_grad(
        quadratic, to_tree(X0), jax.random.key(0), covariance.isotropic(0.5)
    )
    assert est.curvature is None


@pytest.mark.parametrize("method", ZERO_ORDER)
def test_off_traces_the_same_program(method):
    """curvature=False adds nothing to the traced program: its jaxpr equals the one traced
    without the argument, and differs from the curvature=True one (so the check can fail)."""
    trace = lambda **kw: str(
        jax.make_jaxpr(
            lambda p, k: smoothed_value_and_grad(
                cosine,
                p,
                k,
                covariance.isotropic(0.3),
                num_samples=5,
                chunk_size=2,
                method=method,
                **kw,
            )
        )(to_tree(X0), jax.random.key(0))
    )
    assert trace(curvature=False) == trace()
    assert trace(curvature=True) != trace()


def test_dtype_follows_parameters_x64():
    """The curvature comes in each leaf's accumulation dtype: float64 leaves in x64 mode stay
    float64, float16/bfloat16 leaves get float32 (the statistic is not rounded to 11 bits
    before a rule reads it)."""
    with jax.enable_x64(True):
        params = {
            "a": jnp.asarray(X0[:3], jnp.float64),
            "b": jnp.asarray(X0[3:], jnp.float32),
            "h": jnp.asarray(X0[:2], jnp.float16),
            "bf": jnp.asarray(X0[:2], jnp.bfloat16),
        }
        fun = lambda p: (
            jnp.sum(jnp.cos(p["a"]))
            + jnp.sum(p["b"] ** 2)
            + jnp.sum(p["h"].astype(jnp.float32) ** 2)
            + jnp.sum(p["bf"].astype(jnp.float32) ** 2)
        )
        est = smoothed_value_and_grad(
            fun,
            params,
            jax.random.key(1),
            covariance.isotropic(0.5),
            num_samples=4,
            curvature=True,
        )
        assert est.curvature["a"].dtype == jnp.float64
        assert est.curvature["b"].dtype == jnp.float32
        assert est.curvature["h"].dtype == jnp.float32
        assert est.curvature["bf"].dtype == jnp.float32
        assert est.grad["h"].dtype == jnp.float16
