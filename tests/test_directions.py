"""Search directions (agsopt.smoothing.directions): the statistical contract.

i.i.d.: row n is ``normal(fold_in(key, n), (d,))``. Orthogonal (arXiv:1804.02395): in each
block of b = min(d, count) rows, u_j = q_j ‖g_j‖ with Q the Gram–Schmidt (LQ) of a Gaussian
block G, so rows are mutually orthogonal, each u_j ~ N(0, I_d) and the χ_d norms are
independent of the directions. Every statistical bound below is stated with its standard
error; the keys are fixed, so the tests are deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from agsopt.covariance import isotropic
from agsopt.smoothing import directions
from agsopt.smoothing.directions import make_noise_table, orthonormal_rows, sample_directions
from agsopt.smoothing.estimator import smoothed_grad

# float32 rows are orthonormal to ~1e-6 (measured ≤ 1.5e-6 on 300 square 100 × 100 blocks)
ORTHO_TOL = 2e-5


@functools.cache
def draw(dim: int, count: int) -> np.ndarray:
    """``(num_keys, count, d)`` orthogonal directions, one independent key per slice
    (``split(key(dim), num_keys)``; 600 keys for d < 10, else 60), computed once per shape."""
    num_keys = 600 if dim < 10 else 60
    sample = jax.jit(jax.vmap(lambda k: sample_directions(k, dim, 0, count, orthogonal=True)))
    return np.asarray(sample(draw_keys(dim, num_keys)), np.float64)


def draw_keys(dim: int, num_keys: int) -> jax.Array:
    return jax.random.split(jax.random.key(dim), num_keys)


def block_slices(dim: int, count: int) -> list[slice]:
    block = min(dim, count)
    return [slice(s, min(s + block, count)) for s in range(0, count, block)]


@pytest.mark.parametrize("dim, count", [(100, 128), (64, 200), (6, 8), (3, 5), (1, 3)])
def test_rows_in_a_block_are_orthogonal(dim: int, count: int):
    """Cosines between rows of one block vanish (square, partial and wide blocks, d = 1–100);
    rows of different blocks are independent, not orthogonal."""
    u = draw(dim, count)
    assert np.all(np.isfinite(u))
    unit = u / np.linalg.norm(u, axis=-1, keepdims=True)
    for rows in block_slices(dim, count):
        cosines = np.einsum("kid,kjd->kij", unit[:, rows], unit[:, rows])
        identity = np.broadcast_to(np.eye(cosines.shape[-1]), cosines.shape)
        np.testing.assert_allclose(cosines, identity, atol=ORTHO_TOL)


def lq_reference(gaussian: np.ndarray) -> np.ndarray:
    """Q of G = LQ with diag(L) > 0, by Householder QR of Gᵀ in float64 (numpy)."""
    q, r = np.linalg.qr(gaussian.T)
    return (q * np.sign(np.diagonal(r))).T


@pytest.mark.parametrize("rows, dim", [(100, 100), (130, 2000), (5, 5)])
def test_orthonormal_rows_is_the_lq_factor(rows: int, dim: int):
    """The staged Cholesky-QR equals the Gram–Schmidt (LQ) of G row by row."""
    gaussian = np.asarray(jax.random.normal(jax.random.key(rows * dim), (rows, dim)))
    got = np.asarray(jax.jit(orthonormal_rows)(jnp.asarray(gaussian)), np.float64)
    expected = lq_reference(gaussian.astype(np.float64))
    np.testing.assert_allclose(got, expected, atol=5e-5)
    np.testing.assert_allclose(got @ got.T, np.eye(rows), atol=ORTHO_TOL)


def test_orthonormal_rows_rejects_more_rows_than_dimensions():
    with pytest.raises(ValueError, match="at most d = 3 rows"):
        orthonormal_rows(jnp.ones((4, 3)))


def test_orthogonal_rows_are_the_iid_rows_orthogonalized_in_blocks():
    """u_j = q_j ‖g_j‖ with g_j the i.i.d. direction of the same index: the lengths are the
    i.i.d. ones (so i.i.d. χ_d), and each block spans what its i.i.d. rows span (row j of a
    block lies in the span of its rows 0…j: Gram–Schmidt order)."""
    dim, count = 64, 200
    u, key = draw(dim, count)[0], draw_keys(dim, 60)[0]
    g = np.asarray(sample_directions(key, dim, 0, count), np.float64)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), np.linalg.norm(g, axis=1), rtol=1e-5)
    for rows in block_slices(dim, count):
        block_u, block_g = u[rows], g[rows]
        for j in (0, 5, block_u.shape[0] - 1):
            basis = np.linalg.qr(block_g[: j + 1].T)[0]
            residual = block_u[j] - basis @ (basis.T @ block_u[j])
            assert np.linalg.norm(residual) < 1e-4 * np.linalg.norm(block_u[j])


@pytest.mark.parametrize("dim, count", [(100, 128), (6, 8)])
def test_squared_norms_are_chi_square_d(dim: int, count: int):
    """‖u‖² ~ χ²_d: mean d within 5 standard errors (Var = 2d, i.i.d. norms), and the
    Kolmogorov–Smirnov p-value above 1e-4 (at d = 100 this key gives p ≈ 9e-4; two other
    keys with 76,800 norms gave p = 0.29 and 0.86, means within one standard error)."""
    u = draw(dim, count)
    squared = np.sum(u * u, axis=-1).ravel()
    standard_error = np.sqrt(2 * dim / squared.size)
    assert abs(squared.mean() - dim) < 5 * standard_error, (squared.mean(), standard_error)
    assert stats.kstest(squared, "chi2", args=(dim,)).pvalue > 1e-4


def test_directions_have_mean_zero_and_identity_covariance():
    """Marginally N(0, I_d): sample mean and covariance over 4800 directions (d = 6, a block
    of 6 and a partial block of 2 per key) within 5 standard errors of 0 and I
    (se of a mean 1/√M, of a covariance entry ≤ √(2/M)), and the first coordinate passes a
    KS test against N(0, 1)."""
    dim, count = 6, 8
    u = draw(dim, count).reshape(-1, dim)
    m = u.shape[0]
    assert np.max(np.abs(u.mean(axis=0))) < 5 / np.sqrt(m)
    covariance = u.T @ u / m
    assert np.max(np.abs(covariance - np.eye(dim))) < 5 * np.sqrt(2 / m)
    assert stats.kstest(u[:, 0], "norm").pvalue > 1e-3


def test_lengths_are_independent_of_directions():
    """‖u_j‖ is independent of q_j = u_j/‖u_j‖: the correlation of ‖u‖² with q_1² (a
    function of the direction that depends on every row's position in the block) is 0
    within 5 standard errors (≈ 1/√M); E[q_1²] = 1/d."""
    dim, count = 6, 8
    u = draw(dim, count).reshape(-1, dim)
    squared = np.sum(u * u, axis=1)
    first = u[:, 0] ** 2 / squared
    m = u.shape[0]
    assert abs(np.corrcoef(squared, first)[0, 1]) < 5 / np.sqrt(m)
    assert abs(first.mean() - 1 / dim) < 5 * first.std() / np.sqrt(m)


def test_iid_rows_follow_the_fold_in_rule():
    key, dim = jax.random.key(9), 12
    u = np.asarray(sample_directions(key, dim, 3, 4))
    expected = np.stack(
        [np.asarray(jax.random.normal(jax.random.fold_in(key, n), (dim,))) for n in range(3, 7)]
    )
    np.testing.assert_array_equal(u, expected)


def test_stage_sizes_keep_each_stage_at_most_half_its_complement():
    """A stage from row s takes k ≤ max(1, (d − s)/2) rows and at most STAGE_ROWS: its
    projected rows are a well-conditioned Gaussian block in the complement."""
    for rows, dim in [(100, 100), (128, 10_000), (3, 3), (200, 257)]:
        sizes = directions._stage_sizes(rows, dim)
        assert sum(sizes) == rows
        offsets = np.cumsum([0, *sizes[:-1]])
        for start, size in zip(offsets, sizes, strict=True):
            assert 1 <= size <= min(directions.STAGE_ROWS, max(1, (dim - start) // 2))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="CPU lowering")
def test_no_qr_or_triangular_solve_on_cpu():
    """The orthogonal path uses no LAPACK QR or triangular solve: on CPU jaxlib runs both
    through OpenBLAS, whose threads fought XLA's on a loaded machine (100 × 100 blocks took
    0.4–47 ms). Only Cholesky factorizations of at most 2·STAGE_ROWS rows remain."""
    lowered = jax.jit(lambda k: sample_directions(k, 100, 0, 128, orthogonal=True)).lower(
        jax.random.key(0)
    )
    text = lowered.as_text()
    assert "geqrf" not in text and "orgqr" not in text and "trsm" not in text
    assert "potrf" in text


# --------------------------------------------------------------------------- noise table


def test_noise_table_rows_are_slices_at_fold_in_offsets():
    """Row n is ``table[o_n : o_n + d]``, ``o_n = randint(fold_in(key, n), 0, L − d + 1)``."""
    table = make_noise_table(jax.random.key(1), 1000)
    key, dim = jax.random.key(2), 7
    u = np.asarray(sample_directions(key, dim, 5, 4, noise_table=table))
    for row, n in zip(u, range(5, 9), strict=True):
        offset = int(jax.random.randint(jax.random.fold_in(key, n), (), 0, 1000 - dim + 1))
        np.testing.assert_array_equal(row, np.asarray(table)[offset : offset + dim])


def test_noise_table_is_checked():
    with pytest.raises(ValueError, match="noise_table of L = 5 numbers is too short for d = 8"):
        sample_directions(jax.random.key(0), 8, 0, 2, noise_table=jnp.zeros(5))
    with pytest.raises(TypeError, match="noise_table must be a floating array"):
        sample_directions(jax.random.key(0), 3, 0, 2, noise_table=jnp.zeros(5, jnp.int32))
    with pytest.raises(ValueError, match="size must be a positive int"):
        make_noise_table(jax.random.key(0), 0)
    with pytest.raises(ValueError, match="dim must be a positive int"):
        make_noise_table(jax.random.key(0), dim=0)
    with pytest.raises(ValueError, match="noise_table"):
        smoothed_grad(
            lambda x: jnp.sum(x),
            jnp.zeros(8),
            jax.random.key(0),
            isotropic(0.1),
            noise_table=jnp.zeros(5),
        )


def test_noise_table_bias_closed_form():
    """Given the table, E[u uᵀ] = Ĉ = (1/K) Σ_o t_o t_oᵀ over the K = L − d + 1 slices, and
    over tables E‖(Ĉ − I)a‖² = [(d + 1)‖a‖² + Σ_i Σ_{j≠i} (1 − |i − j|/K)₊ a_j a_{2i−j}]/K
    (Isserlis). Checked over 4000 tables, within 5 standard errors, for a random unit a (the
    cross term small) and for a = 1/√d (the cross term large); the root mean square over
    random directions is :func:`directions.table_bias` = √((d + 1)/K)."""
    dim, size, num_tables = 12, 40, 4000
    slices = size - dim + 1
    rng = np.random.default_rng(0)
    tables = rng.standard_normal((num_tables, size))
    windows = np.lib.stride_tricks.sliding_window_view(tables, dim, axis=1)  # (T, K, d)
    c_hat = np.einsum("tki,tkj->tij", windows, windows) / slices
    random_a = rng.standard_normal(dim)
    for a in (random_a / np.linalg.norm(random_a), np.ones(dim) / dim**0.5):
        squared = np.sum(((c_hat - np.eye(dim)) @ a) ** 2, axis=1)
        cross = sum(
            max(0.0, 1 - abs(i - j) / slices) * a[j] * a[2 * i - j]
            for i in range(dim)
            for j in range(dim)
            if j != i and 0 <= 2 * i - j < dim
        )
        theory = ((dim + 1) * (a @ a) + cross) / slices
        error = squared.std(ddof=1) / num_tables**0.5
        assert abs(squared.mean() - theory) < 5 * error, (squared.mean(), theory, error)
    # over directions as well: E_a E_table ‖(Ĉ − I)a‖² = (d + 1)/K for a uniform unit a
    directions_a = rng.standard_normal((num_tables, dim))
    directions_a /= np.linalg.norm(directions_a, axis=1, keepdims=True)
    errors = np.einsum("tij,tj->ti", c_hat - np.eye(dim), directions_a)
    squared = np.sum(errors**2, axis=1)
    bias = directions.table_bias(size, dim)
    assert bias == pytest.approx(((dim + 1) / slices) ** 0.5)
    assert abs(squared.mean() - bias**2) < 5 * squared.std(ddof=1) / num_tables**0.5


def test_noise_table_minimum_size_gives_the_bias_limit():
    """``minimum_table_size(d)`` is the smallest L with bias ≤ 0.1, and a table of that size
    measures a relative bias ‖(Ĉ − I)a‖/‖a‖ of about 0.1 (root mean square over 200 random
    directions a, within 20 %). Shorter tables are refused; the issue's tables (L = d: every
    direction the same vector, GD diverged; d = 3000, L = 4096: the slices span 1097 of the
    3000 dimensions, the run stalled) were accepted before."""
    for dim in (1, 7, 100, 3000):
        size = directions.minimum_table_size(dim)
        assert directions.table_bias(size, dim) <= directions.TABLE_BIAS_LIMIT
        assert directions.table_bias(size - 1, dim) > directions.TABLE_BIAS_LIMIT
    dim = 50
    size = directions.minimum_table_size(dim)
    table = np.asarray(make_noise_table(jax.random.key(9), size), np.float64)
    windows = np.lib.stride_tricks.sliding_window_view(table, dim)
    c_hat = windows.T @ windows / windows.shape[0]
    a = np.random.default_rng(1).standard_normal((200, dim))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    measured = np.sqrt(np.mean(np.sum((a @ (c_hat - np.eye(dim))) ** 2, axis=1)))
    assert measured == pytest.approx(directions.TABLE_BIAS_LIMIT, rel=0.2)
    for short_dim, short in ((64, 64), (3000, 4096), (dim, size - 1)):
        table = make_noise_table(jax.random.key(2), short)
        least = f"at least {directions.minimum_table_size(short_dim)} numbers"
        with pytest.raises(ValueError, match=f"noise_table of L = {short} .*{least}"):
            sample_directions(jax.random.key(0), short_dim, 0, 2, noise_table=table)


def test_make_noise_table_is_sized_from_dim():
    """``make_noise_table(key, dim=d)`` draws max(2²², minimum_table_size(d)) numbers: 2²²
    up to d = 41,526, then 101d + 99 (a relative bias ≤ 0.1 at any d)."""
    key = jax.random.key(0)
    shape = lambda **kw: jax.eval_shape(lambda k: make_noise_table(k, **kw), key).shape
    assert shape() == (directions.DEFAULT_TABLE_SIZE,) == (1 << 22,)
    assert shape(dim=41_526) == (1 << 22,)
    assert shape(dim=41_527) == (101 * 41_527 + 99,)
    assert shape(dim=10**6) == (directions.minimum_table_size(10**6),)
    assert directions.table_bias(shape(dim=10**6)[0], 10**6) <= 0.1
    assert shape(size=1000, dim=10**6) == (1000,)  # an explicit size is kept (checked at use)


@pytest.mark.parametrize(
    "make_table, problem",
    [
        (lambda t: t.at[100].set(jnp.inf), "non-finite"),
        (lambda t: jnp.zeros_like(t), "E t² is 0"),
        (lambda t: 0.5 * t, "E t² is"),
        (lambda t: t + 0.2, "mean is"),
        (lambda t: jnp.sort(t), "lag-1 correlation is"),
        (lambda t: jnp.sign(t), "kurtosis"),
    ],
    ids=["inf", "zeros", "scaled", "shifted", "sorted", "rademacher"],
)
def test_noise_table_contents_are_checked(make_table, problem):
    """A concrete table must be finite with standard normal moments (each within 6 standard
    errors); a traced one is not inspected. Genuine tables pass (the sizes the other tests
    use, bfloat16 included)."""
    table = make_noise_table(jax.random.key(4), 8192)
    with pytest.raises(ValueError, match=f"noise_table.*{problem}"):
        sample_directions(jax.random.key(0), 8, 0, 2, noise_table=make_table(table))
    for size in (604, 1000, 2048, 8192):
        for seed in range(5):
            genuine = make_noise_table(jax.random.key(seed), size)
            sample_directions(jax.random.key(0), 5, 0, 2, noise_table=genuine)
    sample_directions(jax.random.key(0), 5, 0, 2, noise_table=table.astype(jnp.bfloat16))
    traced = jax.jit(lambda t: sample_directions(jax.random.key(0), 8, 0, 2, noise_table=t))
    assert traced(jnp.zeros(8192)).shape == (2, 8)


def test_noise_table_linear_bias_and_mse_closed_forms():
    """Linear f(x) = aᵀx, antithetic, Σ = σI: g = (1/N) Σ_n h_{o_n}, h_o = (aᵀt_o) t_o, with
    t_o the table's slice at offset o and the offsets i.i.d. uniform over the K = L − d + 1
    slices. Given the table, E[g] = Ĉ a with Ĉ = (1/K) Σ_o t_o t_oᵀ, not a, and
    E‖g − a‖² = ‖(Ĉ − I)a‖² + (mean_o ‖h_o‖² − ‖Ĉ a‖²)/N, both computed here from the table
    (for Gaussian u: 0 + (d + 1)/N ‖a‖²). With L = 2048 the bias is visible; the mean and
    the MSE over 20,000 keys match within 5 standard errors."""
    dim, num, size, keys = 8, 4, 2048, 20_000
    table = make_noise_table(jax.random.key(3), size)
    a = np.asarray(jax.random.normal(jax.random.key(4), (dim,)), np.float64)
    a /= np.linalg.norm(a)
    fun = lambda x: jnp.dot(jnp.asarray(a, jnp.float32), x)

    def one(k):
        return smoothed_grad(
            fun, jnp.zeros(dim), k, isotropic(0.3), num_samples=num, noise_table=table
        )

    g = np.asarray(jax.jit(jax.vmap(one))(jax.random.split(jax.random.key(5), keys)), np.float64)
    t = np.asarray(table, np.float64)
    slices = np.lib.stride_tricks.sliding_window_view(t, dim)  # (K, d)
    c_hat = slices.T @ slices / slices.shape[0]
    expected_mean = c_hat @ a
    bias = expected_mean - a
    se = g.std(axis=0, ddof=1) / np.sqrt(keys)
    assert np.linalg.norm(bias) > 10 * np.linalg.norm(se) / np.sqrt(dim)  # the bias is real
    assert np.all(np.abs(g.mean(axis=0) - expected_mean) < 5 * se)
    squared = np.sum((g - a) ** 2, axis=1)
    mse, mse_se = squared.mean(), squared.std(ddof=1) / np.sqrt(keys)
    h = (slices @ a)[:, None] * slices
    theory = bias @ bias + (np.mean(np.sum(h * h, axis=1)) - expected_mean @ expected_mean) / num
    assert abs(mse - theory) < 5 * mse_se, (mse, theory, mse_se)
    assert abs(theory / ((dim + 1) / num) - 1) < 0.2  # near the Gaussian value at this L


def test_vmapped_orthogonal_draws_with_a_partial_block_finish():
    """Full and partial blocks go through one batched factorization: two batched LAPACK
    Cholesky calls in one program deadlocked jaxlib's CPU runtime once ``vmap``-ped over
    keys (d = 100, 128 directions, 60 keys hung forever). Run in a subprocess with a
    deadline so that a regression fails instead of hanging the suite."""
    import subprocess
    import sys

    code = (
        "import jax\n"
        "from agsopt.smoothing.directions import sample_directions\n"
        "f = jax.jit(jax.vmap(lambda k: sample_directions(k, 100, 0, 128, orthogonal=True)))\n"
        "u = f(jax.random.split(jax.random.key(0), 60)).block_until_ready()\n"
        "print(u.shape)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=180
        )
    except subprocess.TimeoutExpired:
        pytest.fail("vmapped orthogonal draws with a partial block did not finish in 180 s")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "(60, 128, 100)"
