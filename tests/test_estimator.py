"""Monte Carlo estimates of f_Σ and ∇f_Σ (agsopt.estimator) against closed forms.

Convention: u ~ N(0, I), perturbation Σu, f_Σ(x) = E f(x + Σu), ∇f_Σ(x) = E[f(x + Σu) Σ^{-T}u].

Statistical checks use fixed keys (deterministic) and a stated bound: an estimate passes
when every coordinate lies within ``Z_BOUND = 5`` standard errors of the closed form. The
standard error comes from the estimator's own variance: either the standard deviation of
its per-sample terms (computed in the test, in float64 numpy, on independent draws) over
√N, or the spread of many independent N-sample estimates (vmap over keys) over √keys. For
a correct estimator |z| > 5 has probability 5.7e-7 per coordinate; with about 300 z-values
in the default run the chance of a spurious failure is below 2e-4 (and the keys are fixed).
Each check also asserts that its standard error is small next to the quantity tested, so
it has the power to fail.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from agsopt import covariance
from agsopt.smoothing import ags, default_chunk_size, smoothed_grad, smoothed_value_and_grad
from agsopt.smoothing import directions as directions_module
from agsopt.tree_utils import tree_unflatten_vector

METHODS = ("antithetic", "forward", "plain", "first_order")
Z_BOUND = 5.0

# ------------------------------------------------------------------- problem (d = 5)
TEMPLATE = {"v": jnp.zeros(3, jnp.float32), "w": jnp.zeros(2, jnp.float32)}
DIM = 5
_, _UNRAVEL = ravel_pytree(TEMPLATE)


def flat(tree) -> jax.Array:
    return ravel_pytree(tree)[0]


def to_tree(vector) -> dict:
    return _UNRAVEL(jnp.asarray(vector, jnp.float32))


_RNG = np.random.default_rng(7)
X0 = _RNG.uniform(-1.0, 1.0, DIM)
# A non-symmetric, well-conditioned Σ (cond ≈ 4.7): 0.5 I plus a strictly upper triangle.
SIGMA_DENSE = 0.5 * np.eye(DIM) + 0.3 * np.triu(_RNG.standard_normal((DIM, DIM)), 1)
_a = _RNG.standard_normal(DIM)
A_COS = 1.5 * _a / np.linalg.norm(_a)
_M = _RNG.standard_normal((DIM, DIM))
A_QUAD = 0.5 * (_M + _M.T)  # symmetric, indefinite
B_QUAD = _RNG.standard_normal(DIM)
# Gradient-aligned Σ = σ(I + (κ − 1) v vᵀ).
_v = _RNG.standard_normal(DIM)
V_ALIGNED = _v / np.linalg.norm(_v)
SIGMA_PERP, RATIO = 0.4, 2.5
SIGMA_ALIGNED = SIGMA_PERP * (np.eye(DIM) + (RATIO - 1.0) * np.outer(V_ALIGNED, V_ALIGNED))
# Rastrigin: a point in [−2, 2]^d and per-coordinate stds s_i (a full-tree Diagonal scale).
X_RASTRIGIN = _RNG.uniform(-2.0, 2.0, DIM)
S_RASTRIGIN = np.array([0.15, 0.2, 0.25, 0.3, 0.35])


def matrices() -> dict:
    return {
        "dense_nonsymmetric": (
            covariance.Dense(jnp.asarray(SIGMA_DENSE, jnp.float32)),
            SIGMA_DENSE,
        ),
        "gradient_aligned": (
            covariance.gradient_aligned(SIGMA_PERP, RATIO, to_tree(V_ALIGNED)),
            SIGMA_ALIGNED,
        ),
    }


def test_problem_is_well_posed():
    assert not np.allclose(SIGMA_DENSE, SIGMA_DENSE.T)
    assert np.linalg.cond(SIGMA_DENSE) < 5
    # exp(−‖Σᵀa‖²/2) = 0.47 and exp(−‖Σa‖²/2) = 0.63: the cosine test tells Σ from Σᵀ.
    damping = lambda m: np.exp(-0.5 * np.sum((m @ A_COS) ** 2))
    assert abs(damping(SIGMA_DENSE.T) - damping(SIGMA_DENSE)) > 0.15
    assert 0.3 < abs(np.cos(A_COS @ X0)) < 0.85  # value and gradient both sizable


def quadratic(params):
    x = flat(params)
    a, b = jnp.asarray(A_QUAD, jnp.float32), jnp.asarray(B_QUAD, jnp.float32)
    return 0.5 * x @ (a @ x) + b @ x


def cosine(params):
    return jnp.cos(jnp.asarray(A_COS, jnp.float32) @ flat(params))


def rastrigin(params):
    x = flat(params)
    return 10.0 * x.shape[0] + jnp.sum(x**2 - 10.0 * jnp.cos(2 * jnp.pi * x))


# The same functions in float64 numpy, vectorized over rows, with their gradients.
NUMPY_FUNCTIONS = {
    "quadratic": (
        lambda y: 0.5 * np.einsum("ni,ij,nj->n", y, A_QUAD, y) + y @ B_QUAD,
        lambda y: y @ A_QUAD + B_QUAD,
    ),
    "cosine": (lambda y: np.cos(y @ A_COS), lambda y: -np.sin(y @ A_COS)[:, None] * A_COS),
    "rastrigin": (
        lambda y: 10.0 * y.shape[1] + np.sum(y**2 - 10 * np.cos(2 * np.pi * y), axis=1),
        lambda y: 2 * y + 20 * np.pi * np.sin(2 * np.pi * y),
    ),
}


def quadratic_truth(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """[f_Σ, ∇f_Σ] = [f + ½ tr(ΣᵀAΣ), Ax + b]."""
    value = 0.5 * x @ A_QUAD @ x + B_QUAD @ x + 0.5 * np.trace(sigma.T @ A_QUAD @ sigma)
    return np.concatenate([[value], A_QUAD @ x + B_QUAD])


def cosine_truth(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """[f_Σ, ∇f_Σ] = [cos(aᵀx), −sin(aᵀx) a] · exp(−‖Σᵀa‖²/2)."""
    damping = np.exp(-0.5 * np.sum((sigma.T @ A_COS) ** 2))
    return np.concatenate([[np.cos(A_COS @ x)], -np.sin(A_COS @ x) * A_COS]) * damping


def rastrigin_smoothed(x, s):
    """f_Σ = 10d + Σ_i [x_i² + s_i² − 10 cos(2πx_i) exp(−2π² s_i²)] for Σ = diag(s)."""
    return 10.0 * x.shape[0] + jnp.sum(
        x**2 + s**2 - 10.0 * jnp.cos(2 * jnp.pi * x) * jnp.exp(-2 * jnp.pi**2 * s**2)
    )


def rastrigin_truth(x: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The closed form and its gradient by jax.grad (float32 is ample: SEs are ≥ 1e-2)."""
    x32, s32 = jnp.asarray(x, jnp.float32), jnp.asarray(s, jnp.float32)
    value, grad = jax.value_and_grad(rastrigin_smoothed)(x32, s32)
    return np.concatenate([[float(value)], np.asarray(grad, np.float64)])


# ------------------------------------------------------------------------- estimation
# Calls are eager (not jitted): JAX caches each primitive per shape, so tests that share
# shapes (d = 5, N = NUM_SAMPLES) reuse compilations, which keeps the suite fast.
NUM_SAMPLES = 16384  # one large-N estimate
NUM_KEYS, SMALL_N = 2000, DIM  # many small estimates: 2000 keys × N = d = 5 samples


def estimate_row(fun, x, key, matrix, method, num_samples=NUM_SAMPLES, **kwargs):
    """[value, flat grad...] of one estimate, and its non-finite count."""
    est = smoothed_value_and_grad(
        fun, to_tree(x), key, matrix, num_samples=num_samples, method=method, **kwargs
    )
    row = np.concatenate([[float(est.value)], np.asarray(flat(est.grad), np.float64)])
    return row, int(est.num_nonfinite)


def estimates_over_keys(fun, x, keys, matrix, method, num_samples, **kwargs):
    """One estimate per key (vmap): rows [value, flat grad...], and non-finite counts."""

    def one(key):
        est = smoothed_value_and_grad(
            fun, to_tree(x), key, matrix, num_samples=num_samples, method=method, **kwargs
        )
        return jnp.concatenate([est.value[None].astype(jnp.float32), flat(est.grad)]), (
            est.num_nonfinite
        )

    rows, counts = jax.vmap(one)(keys)
    return np.asarray(rows, np.float64), np.asarray(counts)


def per_sample_terms(f_np, grad_np, x, sigma, method, *, num=40_000, seed=0):
    """The estimator's per-sample terms [value_n, grad_n...] on u_n ~ N(0, I) drawn by
    numpy, in float64: independent of the library; their spread gives the SE of the mean."""
    u = np.random.default_rng(seed).standard_normal((num, x.size))
    shift = u @ sigma.T  # rows Σu
    inv_t_u = np.linalg.solve(sigma.T, u.T).T  # rows Σ^{-T}u
    plus = f_np(x + shift)
    if method == "antithetic":
        minus = f_np(x - shift)
        return np.column_stack([(plus + minus) / 2, ((plus - minus) / 2)[:, None] * inv_t_u])
    if method == "first_order":
        return np.column_stack([plus, grad_np(x + shift)])
    base = f_np(x[None])[0] if method == "forward" else 0.0
    return np.column_stack([plus, (plus - base)[:, None] * inv_t_u])


def check_closed_form(
    fun,
    x,
    matrix,
    sigma,
    method,
    truth,
    *,
    seed,
    f_np=None,
    grad_np=None,
    num_samples=NUM_SAMPLES,
    max_rel_se=0.1,
):
    """One N-sample estimate within Z_BOUND standard errors of ``truth`` (value and grad).

    SE = (per-sample standard deviation)/√N, the per-sample standard deviation computed from
    40 000 per-sample terms evaluated in numpy (``per_sample_terms``). As a check of the
    closed form and of those terms themselves, their own mean must lie within Z_BOUND of
    its SE from ``truth`` too. Returns the z-scores of the estimate and its SEs.
    """
    if f_np is None:
        f_np, grad_np = NUMPY_FUNCTIONS[fun.__name__]
    terms = per_sample_terms(f_np, grad_np, x, sigma, method, seed=seed)
    term_sd = terms.std(axis=0, ddof=1)
    z_numpy = (terms.mean(axis=0) - truth) / (term_sd / math.sqrt(len(terms)))
    assert np.all(np.abs(z_numpy) <= Z_BOUND), f"closed form vs numpy terms: z = {z_numpy}"
    row, count = estimate_row(fun, x, jax.random.key(seed), matrix, method, num_samples)
    assert count == 0
    se = term_sd / math.sqrt(num_samples)
    z = (row - truth) / se
    print(f"{fun.__name__}/{method}: z = {np.round(z, 2)}, SE = {np.round(se, 4)}")
    assert np.all(np.abs(z) <= Z_BOUND), f"z-scores {z} exceed {Z_BOUND} (SE {se})"
    # Power: the gradient's standard error is a small fraction of the gradient.
    assert se[1:].max() <= max_rel_se * np.abs(truth[1:]).max(), (se, truth)
    return z, se


# ------------------------------------------------------------- closed forms
@pytest.mark.parametrize("method", METHODS)
def test_quadratic_closed_form_nonsymmetric_sigma(method):
    """½xᵀAx + bᵀx: ∇f_Σ = Ax + b, f_Σ = f + ½tr(ΣᵀAΣ)."""
    matrix, dense = matrices()["dense_nonsymmetric"]
    check_closed_form(quadratic, X0, matrix, dense, method, quadratic_truth(X0, dense), seed=1)


def test_antithetic_quadratic_per_sample_is_linear_in_u():
    """For a quadratic, [f(x+Σu) − f(x−Σu)]/2 = (Ax+b)ᵀΣu and [f(x+Σu) + f(x−Σu)]/2 =
    f + ½uᵀΣᵀAΣu: the antithetic estimate is exactly (1/N)Σ_n Σ^{-T}u_n u_nᵀΣᵀ(Ax+b), its
    value f + (1/N)Σ_n ½u_nᵀΣᵀAΣu_n, on the estimator's own samples u_n."""
    matrix, dense = matrices()["dense_nonsymmetric"]
    params, key = to_tree(X0), jax.random.key(2)
    est = smoothed_value_and_grad(quadratic, params, key, matrix, num_samples=SMALL_N)
    u = np.asarray(drawn_directions(key, params, SMALL_N))
    g = A_QUAD @ X0 + B_QUAD
    inv_t_u = np.linalg.solve(dense.T, u.T).T
    expected_grad = np.mean(inv_t_u * (u @ dense.T @ g)[:, None], axis=0)
    np.testing.assert_allclose(flat(est.grad), expected_grad, rtol=1e-4, atol=1e-5)
    f0 = 0.5 * X0 @ A_QUAD @ X0 + B_QUAD @ X0
    curvature = dense.T @ A_QUAD @ dense
    expected_value = f0 + 0.5 * np.mean(np.einsum("ni,ij,nj->n", u, curvature, u))
    np.testing.assert_allclose(float(est.value), expected_value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("which", ["dense_nonsymmetric", "gradient_aligned"])
def test_cosine_closed_form_anisotropic(which, method):
    """cos(aᵀx): f_Σ = cos(aᵀx) exp(−‖Σᵀa‖²/2), ∇f_Σ = −sin(aᵀx) exp(−‖Σᵀa‖²/2) a."""
    matrix, dense = matrices()[which]
    truth = cosine_truth(X0, dense)
    z, se = check_closed_form(cosine, X0, matrix, dense, method, truth, seed=3)
    if which == "dense_nonsymmetric":
        # The check tells Σᵀ from Σ: the value with ‖Σa‖ in place of ‖Σᵀa‖, and the gradient
        # that Σ^{-1} in place of Σ^{-T} would give, lie far outside the bound.
        wrong_value = cosine_truth(X0, dense.T)[0]
        assert abs(wrong_value - truth[0]) > 4 * Z_BOUND * se[0]
        if method != "first_order":
            wrong_grad = np.linalg.solve(dense, dense.T @ truth[1:])
            assert np.max(np.abs(wrong_grad - truth[1:]) / se[1:]) > 4 * Z_BOUND


@pytest.mark.parametrize("method", METHODS)
def test_rastrigin_closed_form_diagonal(method):
    """Rastrigin, Σ = diag(s): f_Σ = 10d + Σ_i [x_i² + s_i² − 10cos(2πx_i)exp(−2π²s_i²)]."""
    matrix = covariance.Diagonal(to_tree(S_RASTRIGIN))
    truth = rastrigin_truth(X_RASTRIGIN, S_RASTRIGIN)
    check_closed_form(
        rastrigin, X_RASTRIGIN, matrix, np.diag(S_RASTRIGIN), method, truth, seed=4, max_rel_se=0.2
    )


# ------------------------------------------------------ unbiasedness over keys
def check_unbiased(
    fun, x, matrix, method, truth, *, seed, num_keys=NUM_KEYS, num_samples=SMALL_N, **kwargs
):
    """The mean of ``num_keys`` independent small-N estimates within Z_BOUND SE of the truth
    (SE = std over keys / √num_keys)."""
    keys = jax.random.split(jax.random.key(seed), num_keys)
    rows, counts = estimates_over_keys(fun, x, keys, matrix, method, num_samples, **kwargs)
    assert counts.sum() == 0
    se = rows.std(axis=0, ddof=1) / math.sqrt(num_keys)
    z = (rows.mean(axis=0) - truth) / se
    print(f"{fun.__name__}/{method}/{kwargs}: z = {np.round(z, 2)}")
    assert np.all(np.abs(z) <= Z_BOUND), f"z-scores {z} exceed {Z_BOUND}"
    assert se[1:].max() <= 0.1 * np.abs(truth[1:]).max(), (se, truth)
    return z


@pytest.mark.parametrize("method", METHODS)
def test_unbiased_over_many_keys_cosine_dense(method):
    """2000 keys × N = 5, non-symmetric Σ."""
    matrix, dense = matrices()["dense_nonsymmetric"]
    check_unbiased(cosine, X0, matrix, method, cosine_truth(X0, dense), seed=5)


@pytest.mark.slow
@pytest.mark.parametrize("orthogonal", [False, True])
@pytest.mark.parametrize("method", METHODS)
def test_unbiased_over_many_keys_full_grid(method, orthogonal):
    """Every method × sampling, N = 7 in chunks of 3 (orthogonal blocks 3, 3, 1): Rastrigin
    with its diagonal Σ (100 000 keys) and the cosine with both anisotropic Σ (20 000)."""
    kwargs = {"orthogonal": orthogonal, "num_samples": 7, "chunk_size": 3}
    truth = rastrigin_truth(X_RASTRIGIN, S_RASTRIGIN)
    matrix = covariance.Diagonal(to_tree(S_RASTRIGIN))
    check_unbiased(
        rastrigin, X_RASTRIGIN, matrix, method, truth, seed=8, num_keys=100_000, **kwargs
    )
    for matrix, dense in matrices().values():
        check_unbiased(
            cosine, X0, matrix, method, cosine_truth(X0, dense), seed=9, num_keys=20_000, **kwargs
        )


# ------------------------------------------------------- linear f: MSE
_LRNG = np.random.default_rng(8)
LIN_A = _LRNG.standard_normal(DIM)
LIN_X = 0.5 * LIN_A / np.linalg.norm(LIN_A) + 0.1 * _LRNG.standard_normal(DIM)
LIN_SIGMA = 0.5


def linear(params):
    return jnp.asarray(LIN_A, jnp.float32) @ flat(params)


def linear_mse(method, num_samples=SMALL_N, *, seed, num_keys=NUM_KEYS, **kwargs):
    """Mean of ‖ĝ − a‖² over keys and its standard error (std over keys / √keys)."""
    params = to_tree(LIN_X)
    matrix = covariance.isotropic(LIN_SIGMA)

    def one(key):
        return flat(
            smoothed_grad(
                linear, params, key, matrix, num_samples=num_samples, method=method, **kwargs
            )
        )

    grads = jax.vmap(one)(jax.random.split(jax.random.key(seed), num_keys))
    errors = np.sum((np.asarray(grads, np.float64) - LIN_A) ** 2, axis=1)
    return errors.mean(), errors.std(ddof=1) / math.sqrt(num_keys)


def assert_mse(measured, se, theory, label):
    z = (measured - theory) / se
    print(
        f"{label}: MSE measured/theory = {measured / theory:.4f} (z = {z:.2f}, "
        f"relative SE {se / theory:.4f})"
    )
    assert abs(z) <= Z_BOUND, (label, measured, theory, se)
    assert se <= 0.05 * theory  # the MSE is measured to ±5 % (1 SE): the check has power


def test_linear_antithetic_mse():
    """Antithetic estimate (1/N)Σ(aᵀu_n)u_n: E‖ĝ − a‖² = (d + 1)‖a‖²/N."""
    n = SMALL_N
    measured, se = linear_mse("antithetic", n, seed=10)
    assert_mse(measured, se, (DIM + 1) * LIN_A @ LIN_A / n, "antithetic")


def test_linear_plain_mse():
    """Plain: adds f(x)²·d/(σ²N) to (d + 1)‖a‖²/N (the cross term has zero mean)."""
    n = SMALL_N
    f_x = LIN_A @ LIN_X
    extra = f_x**2 * DIM / LIN_SIGMA**2
    assert extra > 0.5 * (DIM + 1) * LIN_A @ LIN_A  # a sizable part of the total
    theory = ((DIM + 1) * LIN_A @ LIN_A + extra) / n
    measured, se = linear_mse("plain", n, seed=11)
    assert_mse(measured, se, theory, "plain")


def test_linear_forward_equals_antithetic_and_first_order_is_exact():
    """For linear f, f(x+σu) − f(x) = [f(x+σu) − f(x−σu)]/2 = σaᵀu: forward and antithetic
    give the same estimate for the same key; the first-order estimate is exactly a."""
    params = to_tree(LIN_X)
    matrix = covariance.isotropic(LIN_SIGMA)
    key = jax.random.key(12)
    forward = smoothed_grad(linear, params, key, matrix, num_samples=SMALL_N, method="forward")
    antithetic = smoothed_grad(linear, params, key, matrix, num_samples=SMALL_N)
    np.testing.assert_allclose(flat(forward), flat(antithetic), rtol=1e-4, atol=1e-4)
    first = smoothed_grad(linear, params, key, matrix, num_samples=SMALL_N, method="first_order")
    np.testing.assert_allclose(flat(first), LIN_A, rtol=1e-6, atol=1e-6)


def test_linear_orthogonal_mse():
    """N = d orthogonal directions u_n = r_n q_n (q orthonormal, r_n ~ χ_d): with α_n = aᵀq_n,
    ĝ − a = Σ_n (r_n²/d − 1) α_n q_n, so E‖ĝ − a‖² = Σ_n Var(r_n²/d) α_n² = (2/d)‖a‖²,
    against (d + 1)‖a‖²/d for i.i.d. directions: a ratio of 2/(d + 1) = 1/3 at d = 5."""
    norm2 = LIN_A @ LIN_A
    orth, orth_se = linear_mse("antithetic", seed=13, orthogonal=True)
    assert_mse(orth, orth_se, 2 * norm2 / DIM, "orthogonal N=d")
    iid, iid_se = linear_mse("antithetic", seed=14)
    assert_mse(iid, iid_se, (DIM + 1) * norm2 / DIM, "iid N=d")
    ratio = orth / iid
    print(f"orthogonal/iid MSE ratio = {ratio:.4f} (theory {2 / (DIM + 1):.4f})")
    assert ratio < 0.8


def test_linear_orthogonal_mse_partial_block():
    """N = 2 ≤ d/2 orthogonal directions (the CholeskyQR2 branch): one block of b = N has
    E‖ĝ − a‖² = b(d + 2 − b)/N² ‖a‖² = (d + 2 − N)/N ‖a‖² (i.i.d.: (d + 1)/N ‖a‖²)."""
    mse, se = linear_mse("antithetic", 2, seed=21, orthogonal=True)
    assert_mse(mse, se, (DIM + 2 - 2) / 2 * LIN_A @ LIN_A, "orthogonal N=2")


def test_cholesky_qr_branch_equals_householder_qr():
    """Blocks use staged Cholesky-QR: the same rows as Householder QR of Gᵀ, diag(R) > 0."""
    gaussian = jax.random.normal(jax.random.key(22), (40, 300))
    wide = directions_module.orthonormal_rows(gaussian)
    q, r = np.linalg.qr(np.asarray(gaussian, np.float64).T)
    np.testing.assert_allclose(wide, (q * np.sign(np.diag(r))).T, atol=2e-5)
    np.testing.assert_allclose(wide @ wide.T, np.eye(40), atol=2e-5)


@pytest.mark.slow
def test_linear_orthogonal_mse_several_blocks():
    """N = 3d in chunks of d: three independent orthogonal blocks, MSE 2‖a‖²/N."""
    n = 3 * DIM
    mse, se = linear_mse("antithetic", n, seed=15, orthogonal=True, chunk_size=DIM)
    assert_mse(mse, se, 2 * LIN_A @ LIN_A / n, "orthogonal N=3d, chunks of d")


# ------------------------------------------------- exact formula on the drawn samples
def drawn_directions(key, params, num_samples):
    """Sample n is ``normal(fold_in(key, n), (d,))`` in leaf order (the estimator's rule)."""
    dim = flat(params).size
    return [
        np.asarray(jax.random.normal(jax.random.fold_in(key, n), (dim,)), np.float64)
        for n in range(num_samples)
    ]


def test_drawn_directions_match_estimator():
    """Plain method, Σ = I, f ≡ 1: the estimate is (1/N)Σ u_n, which pins the samples down."""
    params, key = to_tree(X0), jax.random.key(16)
    got = smoothed_grad(
        lambda p: jnp.float32(1.0),
        params,
        key,
        covariance.isotropic(1.0),
        num_samples=SMALL_N,
        method="plain",
    )
    np.testing.assert_allclose(
        flat(got), np.mean(drawn_directions(key, params, SMALL_N), axis=0), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("method", METHODS)
def test_matches_formula_on_drawn_samples(method):
    """The estimate equals the method's formula evaluated (in float64) on its own samples,
    with the non-symmetric Σ: Σ^{-T} is applied, not Σ^{-1}."""
    params, key = to_tree(X0), jax.random.key(17)
    matrix, dense = matrices()["dense_nonsymmetric"]
    n = SMALL_N
    est = smoothed_value_and_grad(rastrigin, params, key, matrix, num_samples=n, method=method)
    f_np, grad_np = NUMPY_FUNCTIONS["rastrigin"]
    u = np.asarray(drawn_directions(key, params, n))
    shift = u @ dense.T
    inv_t_u = np.linalg.solve(dense.T, u.T).T
    plus, minus = f_np(X0 + shift), f_np(X0 - shift)
    if method == "antithetic":
        values, grads = (plus + minus) / 2, ((plus - minus) / 2)[:, None] * inv_t_u
    elif method == "forward":
        values, grads = plus, (plus - f_np(X0[None])[0])[:, None] * inv_t_u
    elif method == "plain":
        values, grads = plus, plus[:, None] * inv_t_u
    else:
        values, grads = plus, grad_np(X0 + shift)
    np.testing.assert_allclose(float(est.value), values.mean(), rtol=1e-5)
    np.testing.assert_allclose(flat(est.grad), grads.mean(axis=0), rtol=2e-3, atol=2e-3)
    expected_evaluations = {"antithetic": 2 * n, "forward": n + 1}.get(method, n)
    assert int(est.num_evaluations) == expected_evaluations
    assert int(est.num_nonfinite) == 0


# ------------------------------------------------------------ chunking, jit, vmap
def assert_same_estimate(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(float(a.value), float(b.value), rtol=rtol, atol=atol)
    np.testing.assert_allclose(flat(a.grad), flat(b.grad), rtol=rtol, atol=atol)
    assert int(a.num_evaluations) == int(b.num_evaluations)
    assert int(a.num_nonfinite) == int(b.num_nonfinite)


@pytest.mark.parametrize(
    "method",
    [
        "antithetic",
        pytest.param("first_order", marks=pytest.mark.slow),
        pytest.param("forward", marks=pytest.mark.slow),
        pytest.param("plain", marks=pytest.mark.slow),
    ],
)
def test_chunked_equals_unchunked(method):
    """Sample n comes from fold_in(key, n): chunks of 2 (2 + 2 and a remainder of 1)
    and a chunk larger than N give the unchunked estimate."""
    params, key = to_tree(X0), jax.random.key(18)
    matrix, _ = matrices()["gradient_aligned"]
    estimate = lambda **kw: smoothed_value_and_grad(
        cosine, params, key, matrix, num_samples=SMALL_N, method=method, **kw
    )
    whole = estimate()
    assert_same_estimate(estimate(chunk_size=2), whole)
    assert_same_estimate(estimate(chunk_size=64), whole)
    # A different key gives a different estimate (the comparison is not vacuous).
    other = smoothed_value_and_grad(
        cosine, params, jax.random.key(19), matrix, num_samples=SMALL_N, method=method
    )
    assert np.max(np.abs(flat(other.grad) - flat(whole.grad))) > 1e-3


def test_default_chunk_size_rule():
    """About 2¹⁶ floats of directions per chunk on CPU, 2²⁶ elsewhere, never more than N,
    at least 1, and whole orthogonal blocks (≥ min(d, N))."""
    assert default_chunk_size(100, 128, backend="cpu") == 128
    assert default_chunk_size(10_000, 128, backend="cpu") == 6
    assert default_chunk_size(10**6, 32, backend="cpu") == 1
    assert default_chunk_size(10_000, 128, orthogonal=True, backend="cpu") == 128
    assert default_chunk_size(10_000, 20_000, orthogonal=True, backend="cpu") == 10_000
    assert default_chunk_size(10**6, 32, backend="gpu") == 32
    assert default_chunk_size(10**6, 1024, backend="tpu") == 67


def test_tree_unflatten_vector_keeps_dtype_and_leaf_order():
    like = {"b": jnp.zeros((2, 3), jnp.bfloat16), "a": jnp.zeros(4, jnp.float32)}
    vector = jnp.arange(10, dtype=jnp.float32)
    tree = tree_unflatten_vector(vector, like)
    assert tree["a"].dtype == tree["b"].dtype == jnp.float32
    np.testing.assert_array_equal(tree["a"], np.arange(4))  # "a" is the first leaf
    np.testing.assert_array_equal(tree["b"], np.arange(4, 10).reshape(2, 3))
    np.testing.assert_array_equal(flat(tree), vector)


def test_orthogonal_default_chunks_with_a_remainder():
    """Orthogonal, default chunks, N not a multiple of the chunk (d = 100, N = 1000: chunks
    of 655 on CPU, then 345). The last chunk's evaluation pieces were cut with the full
    chunk's size and the trace failed ("slice_sizes (655, 100) for operand shape (345,
    100)"). Its estimate is the one of the same chunks evaluated whole (explicit
    ``chunk_size``: the same directions, one piece per chunk), and through ``ags`` a step is
    taken."""
    dim, num = 100, 1000
    params, key = jnp.full(dim, 0.5), jax.random.key(23)
    fun = lambda x: jnp.sum(jnp.cos(x))
    matrix = covariance.isotropic(0.3)
    chunk = default_chunk_size(dim, num, orthogonal=True)
    assert num % chunk or jax.default_backend() != "cpu"  # a remainder on CPU (655 + 345)
    estimate = lambda **kw: smoothed_value_and_grad(
        fun, params, key, matrix, num_samples=num, orthogonal=True, **kw
    )
    assert_same_estimate(estimate(), estimate(chunk_size=chunk))
    opt = ags(sigma=0.3, num_samples=num, orthogonal=True, covariance="isotropic")
    updates, state = opt.update(jnp.zeros(dim), opt.init(params), params, value_fn=fun)
    assert np.all(np.isfinite(np.asarray(updates))) and int(state.num_skipped) == 0


@pytest.mark.slow
def test_chunks_without_remainder_and_orthogonal_blocks_follow_chunks():
    """Chunks of 5 (two full chunks, no remainder) give the unchunked estimate. Orthogonal
    blocks fold in their start: N = 2d in chunks of d equals N = 2d unchunked (blocks of d
    at 0 and d either way). (That the directions of a block are orthogonal with χ_d norms is
    tested through its MSE in ``test_linear_orthogonal_mse``.)"""
    params, key = to_tree(X0), jax.random.key(20)
    matrix = covariance.isotropic(1.0)
    for method in METHODS:
        estimate = lambda method=method, **kw: smoothed_value_and_grad(
            cosine, params, key, matrix, num_samples=10, method=method, **kw
        )
        assert_same_estimate(estimate(chunk_size=5), estimate())
    estimate = lambda **kw: smoothed_value_and_grad(
        cosine, params, key, matrix, num_samples=2 * DIM, orthogonal=True, **kw
    )
    assert_same_estimate(estimate(chunk_size=DIM), estimate())


def test_jit_and_vmap_over_starting_points():
    matrix, _ = matrices()["dense_nonsymmetric"]
    key = jax.random.key(21)
    points = np.random.default_rng(22).uniform(-1, 1, (3, DIM))
    batch = jax.vmap(to_tree)(jnp.asarray(points, jnp.float32))
    batched = jax.jit(
        jax.vmap(lambda p: smoothed_value_and_grad(cosine, p, key, matrix, num_samples=SMALL_N))
    )(batch)
    for i in range(3):
        point = to_tree(points[i])
        eager = smoothed_value_and_grad(cosine, point, key, matrix, num_samples=SMALL_N)
        one = jax.tree.map(lambda x, i=i: x[i], batched)
        assert_same_estimate(one, eager)


def test_black_box_floor_zero_order():
    """f(x) = Σ floor(x_i) (jax.grad is 0 a.e.): with Σ = σI,
    ∂f_Σ/∂x_i = Σ_k φ((k − x_i)/σ)/σ and E floor(t + σu) = Σ_{k≥1} Φ((t−k)/σ) − Σ_{k≤0}
    Φ((k−t)/σ), which the zero-order methods estimate."""
    sigma = 0.4

    def floor_sum(params):
        return jnp.sum(jnp.floor(flat(params)))

    ks = np.arange(-10, 11)
    cdf = lambda t: 0.5 * math.erfc(-t / math.sqrt(2))
    grad = [
        np.sum(np.exp(-0.5 * ((ks - t) / sigma) ** 2)) / (sigma * math.sqrt(2 * math.pi))
        for t in X0
    ]
    value = sum(
        sum(cdf((t - k) / sigma) for k in ks if k >= 1)
        - sum(cdf((k - t) / sigma) for k in ks if k <= 0)
        for t in X0
    )
    truth = np.concatenate([[value], grad])
    f_np = lambda y: np.sum(np.floor(y), axis=1)
    for method in ("antithetic", "forward"):
        check_closed_form(
            floor_sum,
            X0,
            covariance.isotropic(sigma),
            sigma * np.eye(DIM),
            method,
            truth,
            seed=23,
            f_np=f_np,
        )
    # The first-order estimate sees jax.grad(floor) = 0: the zero-order methods are needed.
    first = smoothed_grad(
        floor_sum,
        to_tree(X0),
        jax.random.key(0),
        covariance.isotropic(sigma),
        num_samples=SMALL_N,
        method="first_order",
    )
    np.testing.assert_array_equal(flat(first), np.zeros(DIM))


def test_black_box_pure_callback_zero_order():
    """A numpy function through jax.pure_callback: f(x) = Σ|x_i|, Σ = σI:
    f_Σ = Σ_i [σ√(2/π) exp(−x_i²/2σ²) + x_i erf(x_i/(σ√2))], ∇f_Σ = erf(x/(σ√2))."""
    sigma = 0.5

    def numpy_abs_sum(x):
        return np.sum(np.abs(np.asarray(x)), axis=-1).astype(np.float32)

    def abs_sum(params):
        return jax.pure_callback(
            numpy_abs_sum,
            jax.ShapeDtypeStruct((), jnp.float32),
            flat(params),
            vmap_method="broadcast_all",
        )

    erf = np.array([math.erf(t / (sigma * math.sqrt(2))) for t in X0])
    value = np.sum(sigma * math.sqrt(2 / math.pi) * np.exp(-(X0**2) / (2 * sigma**2)) + X0 * erf)
    check_closed_form(
        abs_sum,
        X0,
        covariance.isotropic(sigma),
        sigma * np.eye(DIM),
        "antithetic",
        np.concatenate([[value], erf]),
        seed=24,
        f_np=lambda y: np.sum(np.abs(y), axis=1),
    )


@pytest.mark.slow
def test_sample_sharding_on_one_device_matches():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("s",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("s"))
    params, key = to_tree(X0), jax.random.key(25)
    matrix, _ = matrices()["gradient_aligned"]
    plain = smoothed_value_and_grad(cosine, params, key, matrix, num_samples=10)
    sharded = smoothed_value_and_grad(
        cosine, params, key, matrix, num_samples=10, sample_sharding=sharding
    )
    assert_same_estimate(sharded, plain)


@pytest.mark.slow
def test_gradient_dtypes_follow_parameters():
    params = {"h": jnp.asarray([0.3, -0.2], jnp.bfloat16), "s": jnp.asarray([0.1], jnp.float32)}
    fun = lambda p: jnp.sum(jnp.cos(p["h"].astype(jnp.float32))) + jnp.sum(p["s"] ** 2)
    for method in ("antithetic", "first_order"):
        est = smoothed_value_and_grad(
            fun, params, jax.random.key(26), covariance.isotropic(0.1), num_samples=8, method=method
        )
        assert est.grad["h"].dtype == jnp.bfloat16 and est.grad["s"].dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(est.grad["h"], np.float32)))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"num_samples": 0}, "num_samples"),
        ({"method": "central"}, "method"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_invalid_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        smoothed_value_and_grad(
            cosine, to_tree(X0), jax.random.key(0), covariance.isotropic(1.0), **kwargs
        )


# ---------------------------------------------------------------- non-finite values
NAN_THRESHOLD = 0.3


def nan_above(params):
    """The quadratic, NaN where x_0 > X0_0 + NAN_THRESHOLD."""
    x = flat(params)
    return jnp.where(x[0] > X0[0] + NAN_THRESHOLD, jnp.nan, quadratic(params))


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_samples_are_excluded_and_counted(method):
    """Samples with a NaN are left out of both sums and of the denominator, and counted."""
    params, key = to_tree(X0), jax.random.key(27)
    sigma, n = 0.5, SMALL_N
    est = smoothed_value_and_grad(
        nan_above, params, key, covariance.isotropic(sigma), num_samples=n, method=method
    )
    f_np, grad_np = NUMPY_FUNCTIONS["quadratic"]
    u = np.asarray(drawn_directions(key, params, n))
    plus, minus = X0 + sigma * u, X0 - sigma * u
    bad = plus[:, 0] > X0[0] + NAN_THRESHOLD
    if method == "antithetic":
        bad |= minus[:, 0] > X0[0] + NAN_THRESHOLD
    ok = ~bad
    assert 0 < bad.sum() < n
    assert int(est.num_nonfinite) == bad.sum()
    assert np.all(np.isfinite(flat(est.grad))) and np.isfinite(float(est.value))
    fp, fm = f_np(plus[ok]), f_np(minus[ok])
    if method == "antithetic":
        values, grads = (fp + fm) / 2, ((fp - fm) / 2)[:, None] * u[ok] / sigma
    elif method == "first_order":
        values, grads = fp, grad_np(plus[ok])
    else:
        base = f_np(X0[None])[0] if method == "forward" else 0.0
        values, grads = fp, (fp - base)[:, None] * u[ok] / sigma
    np.testing.assert_allclose(float(est.value), values.mean(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(flat(est.grad), grads.mean(axis=0), rtol=1e-3, atol=1e-4)


def test_first_order_nonfinite_gradient_is_excluded():
    """A finite value with a NaN gradient (sqrt behind a where) is left out too."""
    params, key = to_tree(X0), jax.random.key(28)
    sigma, n = 0.5, SMALL_N

    def fun(p):
        t = flat(p)[0] - X0[0]
        return jnp.where(t > 0, jnp.sqrt(t), 0.0) + cosine(p)

    est = smoothed_value_and_grad(
        fun, params, key, covariance.isotropic(sigma), num_samples=n, method="first_order"
    )
    u = np.asarray(drawn_directions(key, params, n))
    kept = X0 + sigma * u[u[:, 0] > 0]
    assert 0 < len(kept) < n
    assert int(est.num_nonfinite) == n - len(kept)
    grads = np.eye(DIM)[0] * 0.5 / np.sqrt(kept[:, :1] - X0[0]) + NUMPY_FUNCTIONS["cosine"][1](kept)
    np.testing.assert_allclose(flat(est.grad), grads.mean(axis=0), rtol=1e-3, atol=1e-4)


def test_nonfinite_fraction_matches_probability():
    """P(x_0 + σu_0 > x_0 + t) = Φ(−t/σ): the count is Binomial(N, p), within 5 SD."""
    sigma, n = 0.5, NUM_SAMPLES
    est = smoothed_value_and_grad(
        nan_above,
        to_tree(X0),
        jax.random.key(29),
        covariance.isotropic(sigma),
        num_samples=n,
        method="plain",
    )
    p = 0.5 * math.erfc(NAN_THRESHOLD / sigma / math.sqrt(2))
    z = (int(est.num_nonfinite) - n * p) / math.sqrt(n * p * (1 - p))
    print(f"non-finite count z = {z:.2f}")
    assert abs(z) <= Z_BOUND, z


@pytest.mark.parametrize("method", METHODS)
def test_all_nonfinite_gives_zero_grad(method):
    params = to_tree(X0)
    for bad_value in (jnp.nan, jnp.inf, -jnp.inf):
        fun = lambda p, b=bad_value: jnp.float32(b) + 0.0 * jnp.sum(flat(p))
        est = smoothed_value_and_grad(
            fun,
            params,
            jax.random.key(30),
            covariance.isotropic(0.3),
            num_samples=SMALL_N,
            method=method,
        )
        assert int(est.num_nonfinite) == SMALL_N
        np.testing.assert_array_equal(flat(est.grad), np.zeros(DIM))
        assert np.isnan(float(est.value))


def test_forward_nonfinite_baseline_invalidates_every_sample():
    """f is finite everywhere except at x itself: every forward difference is non-finite."""
    params = to_tree(X0)
    fun = lambda p: jnp.where(jnp.all(flat(p) == flat(params)), jnp.nan, quadratic(p))
    kwargs = {"num_samples": 5, "matrix": covariance.isotropic(0.3)}
    est = smoothed_value_and_grad(fun, params, jax.random.key(31), method="forward", **kwargs)
    assert int(est.num_nonfinite) == 5
    np.testing.assert_array_equal(flat(est.grad), np.zeros(DIM))
    ok = smoothed_value_and_grad(fun, params, jax.random.key(31), method="antithetic", **kwargs)
    assert int(ok.num_nonfinite) == 0
