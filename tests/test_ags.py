"""The ``agsopt.ags`` Optax transformation, its aliases, and its use inside Optax, Flax NNX
and Optimistix.

Statistical checks state their bound: an estimate passes within ``Z_BOUND = 5`` standard
errors computed from a closed form of its per-sample variance (see each test); keys are
fixed, so every run is the same.
"""

from __future__ import annotations

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import agsopt
from agsopt import covariance_rules
from agsopt.smoothing import make_noise_table
from agsopt.tree_utils import key_for_state, split_state_key

Z_BOUND = 5.0
DIM = 5
PARAMS = {"v": jnp.asarray([0.3, -0.2, 0.5], jnp.float32), "w": jnp.asarray([0.1, -0.4])}
X = np.asarray(ravel_pytree(PARAMS)[0], np.float64)
ZEROS = jax.tree.map(jnp.zeros_like, PARAMS)
NUM_SAMPLES = 16384  # for the checks that read σ off the smoothed value


def flat(tree) -> np.ndarray:
    return np.asarray(ravel_pytree(tree)[0], np.float64)


def half_square(params):
    """f(x) = ½‖x‖²: the antithetic value of a sample is f(x) + ½‖Σu‖², so the estimate of
    f_Σ reads f(x) + ½ tr(ΣᵀΣ) with a per-sample standard deviation of ½√(2 tr((ΣᵀΣ)²))."""
    x = ravel_pytree(params)[0]
    return 0.5 * jnp.sum(x**2)


def linear(params):
    return jnp.asarray([1.0, -2.0, 0.5, 3.0, -1.0], jnp.float32) @ ravel_pytree(params)[0]


def one_step(opt, value_fn=half_square, params=PARAMS, updates=ZEROS, **extra):
    state = opt.init(params)
    return opt.update(updates, state, params, value_fn=value_fn, **extra)


def assert_value_reveals(value, sigma_diag_sq: np.ndarray, num_samples: int, label=""):
    """For Σ = diag(σ_i) and f = ½‖x‖²: E value = f(x) + ½Σσ_i², per-sample SD ½√(2Σσ_i⁴)."""
    expected = 0.5 * X @ X + 0.5 * sigma_diag_sq.sum()
    se = 0.5 * math.sqrt(2 * np.sum(sigma_diag_sq**2)) / math.sqrt(num_samples)
    z = (float(value) - expected) / se
    print(f"{label}: z = {z:.2f}")
    assert abs(z) <= Z_BOUND, (label, float(value), expected, se)
    return se


# ------------------------------------------------------------------ the transformation
def test_update_replaces_incoming_gradient():
    opt = agsopt.ags(sigma=0.3, num_samples=5, key=0)
    first, _ = one_step(opt)
    other = jax.tree.map(lambda x: x + 7.0, PARAMS)
    second, _ = one_step(opt, updates=other)
    np.testing.assert_array_equal(flat(first), flat(second))
    assert np.any(flat(first) != 0)


def test_update_is_the_smoothed_gradient():
    """For linear f, ∇f_Σ = a for any Σ, and the first-order estimate is exactly a."""
    opt = agsopt.ags(sigma=0.7, num_samples=5, method="first_order")
    updates, _ = one_step(opt, value_fn=linear)
    np.testing.assert_allclose(flat(updates), [1.0, -2.0, 0.5, 3.0, -1.0], rtol=1e-6)


def test_unknown_extra_arguments_are_ignored():
    opt = agsopt.ags(sigma=0.3, num_samples=5, key=1)
    plain, plain_state = one_step(opt)
    extra, extra_state = one_step(opt, batch=jnp.ones(3), foo="bar", value=1.0, grad=ZEROS)
    np.testing.assert_array_equal(flat(plain), flat(extra))
    np.testing.assert_array_equal(flat(plain_state.key), flat(extra_state.key))


def test_missing_value_fn_or_params():
    opt = agsopt.ags(num_samples=5)
    state = opt.init(PARAMS)
    with pytest.raises(TypeError, match="value_fn"):
        opt.update(ZEROS, state, PARAMS)
    with pytest.raises(TypeError, match="value_fn"):
        opt.update(ZEROS, state, PARAMS, value_fn=3.0)
    with pytest.raises(TypeError, match="params"):
        opt.update(ZEROS, state, None, value_fn=half_square)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"sigma": 0.0}, ValueError, "sigma"),
        ({"sigma": -1.0}, ValueError, "sigma"),
        ({"sigma": float("nan")}, ValueError, "sigma"),
        ({"sigma": {"v": 0.1, "w": -0.1}}, ValueError, "sigma"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"num_samples": 2.5}, TypeError, "num_samples"),
        ({"num_samples": 2**30}, ValueError, "num_samples must be <= 1073741823"),
        ({"covariance": "diagonal"}, ValueError, "covariance"),
        ({"covariance": 3}, TypeError, "covariance"),
        ({"method": "central"}, ValueError, "method"),
        ({"chunk_size": 0}, ValueError, "chunk_size"),
        ({"key": True}, TypeError, "key"),
        ({"key": "seed"}, TypeError, "key"),
    ],
)
def test_invalid_arguments(kwargs, error, name):
    with pytest.raises(error, match=name):
        agsopt.ags(**kwargs)


@pytest.mark.parametrize("method", agsopt.estimator.METHODS)
def test_largest_num_samples_traces(method):
    """``num_samples = 2**30`` overflowed int32 at trace time (2N evaluations); it is now
    refused at construction (above), and the largest accepted, ``2**30 − 1``, traces for
    every method, counting its evaluations exactly."""
    opt = agsopt.ags(num_samples=2**30 - 1, method=method, covariance="isotropic")
    step = lambda s: opt.update(ZEROS, s, PARAMS, value_fn=half_square)
    _, state = jax.eval_shape(step, opt.init(PARAMS))
    assert state.num_evaluations.dtype == jnp.int32
    expected = agsopt.estimator.evaluations_per_estimate(method, 2**30 - 1)
    assert expected < 2**31
    estimate = lambda: agsopt.smoothed_grad(
        half_square,
        PARAMS,
        jax.random.key(0),
        agsopt.covariance.isotropic(0.1),
        num_samples=2**30,
        method=method,
    )
    with pytest.raises(ValueError, match="num_samples must be <= 1073741823"):
        jax.eval_shape(estimate)


def test_noise_table_reaches_the_estimator():
    """``ags(noise_table=t)`` takes the estimator's noise-table directions with the step key:
    its update equals ``smoothed_grad(..., noise_table=t)`` at that key, and differs from the
    i.i.d. update of the same key."""
    table = make_noise_table(jax.random.key(5), 4096)
    opt = agsopt.ags(sigma=0.3, num_samples=6, covariance="isotropic", key=3, noise_table=table)
    state = opt.init(PARAMS)
    updates, new_state = jax.jit(
        lambda s: opt.update(ZEROS, s, PARAMS, value_fn=half_square, foo=1)
    )(state)
    key_data, key_impl = key_for_state(3)
    next_key, step_key = split_state_key(key_data, key_impl)
    expected = agsopt.estimator.smoothed_grad(
        half_square,
        PARAMS,
        step_key,
        agsopt.covariance.isotropic(0.3),
        num_samples=6,
        noise_table=table,
    )
    np.testing.assert_allclose(flat(updates), flat(expected), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.asarray(new_state.key), np.asarray(next_key))
    iid = flat(one_step(agsopt.ags(sigma=0.3, num_samples=6, covariance="isotropic", key=3))[0])
    assert np.max(np.abs(iid - flat(updates))) > 1e-3


def test_noise_table_is_checked():
    with pytest.raises(TypeError, match="noise_table"):
        agsopt.ags(noise_table=jnp.zeros(64, jnp.int32))
    with pytest.raises(ValueError, match="noise_table"):
        agsopt.ags(noise_table=jnp.zeros((8, 8)))
    with pytest.raises(TypeError, match="noise_table"):
        agsopt.ags(noise_table=[0.0] * 64)
    # d = 5 needs 100·6 + 4 = 604 numbers (a relative bias √(6/(L − 4)) ≤ 0.1), checked at init
    short = agsopt.ags(noise_table=make_noise_table(jax.random.key(0), 603))
    with pytest.raises(ValueError, match="noise_table of L = 603 .* at least 604 numbers"):
        short.init(PARAMS)
    agsopt.ags(noise_table=make_noise_table(jax.random.key(0), 604)).init(PARAMS)


@pytest.mark.parametrize(
    "table, problem",
    [
        (make_noise_table(jax.random.key(0), 4096).at[7].set(jnp.nan), "non-finite"),
        (jnp.zeros(4096), "E t² is 0"),
        (3.0 * make_noise_table(jax.random.key(0), 4096), "E t² is"),
        (jax.random.uniform(jax.random.key(0), (4096,), minval=-(3**0.5), maxval=3**0.5), "kurt"),
    ],
    ids=["nan", "zeros", "scaled", "uniform"],
)
def test_noise_table_contents_are_checked_at_construction(table, problem):
    """A NaN table made every step "skip" and blamed the loss; a zero table gave zero
    updates; a scaled or uniform one gave wrong-sized gradients, all silently."""
    with pytest.raises(ValueError, match=f"noise_table.*{problem}"):
        agsopt.ags(noise_table=table)


def test_sigma_schedule_follows_the_count():
    """σ_k = 0.5^k: the smoothed value at step k reads f + ½ d σ_k² (bound: 5 SE)."""
    schedule = optax.exponential_decay(1.0, transition_steps=1, decay_rate=0.5)
    opt = agsopt.ags(sigma=schedule, num_samples=NUM_SAMPLES, covariance="isotropic", key=2)
    state = opt.init(PARAMS)
    for k in range(3):
        _, state = opt.update(ZEROS, state, PARAMS, value_fn=half_square)
        assert int(state.count) == k + 1
        assert_value_reveals(state.value, np.full(DIM, 0.25**k), NUM_SAMPLES, f"step {k}")


def test_sigma_per_leaf_and_per_entry():
    """σ as one scalar per leaf, and as a pytree like the parameters."""
    opt = agsopt.ags(
        sigma={"v": 1.0, "w": 0.1}, num_samples=NUM_SAMPLES, covariance="isotropic", key=3
    )
    _, state = one_step(opt)
    se = assert_value_reveals(
        state.value, np.array([1.0, 1.0, 1.0, 0.01, 0.01]), NUM_SAMPLES, "per leaf"
    )
    # Neither scalar reading (σ = 1 or σ = 0.1 everywhere) is within reach.
    for wrong in (np.full(DIM, 1.0), np.full(DIM, 0.01)):
        assert abs(float(state.value) - 0.5 * X @ X - 0.5 * wrong.sum()) > 20 * se
    entries = np.array([0.2, 0.4, 0.6, 0.8, 1.0])
    sigma = {"v": jnp.asarray(entries[:3]), "w": jnp.asarray(entries[3:])}
    opt = agsopt.ags(sigma=sigma, num_samples=NUM_SAMPLES, covariance="isotropic", key=4)
    _, state = one_step(opt)
    assert_value_reveals(state.value, entries**2, NUM_SAMPLES, "per entry")


def test_key_forms_agree():
    """An int seed, a typed key and a raw uint32 key with the same seed give the same step."""
    updates = [
        flat(one_step(agsopt.ags(sigma=0.3, num_samples=5, key=key))[0])
        for key in (5, jax.random.key(5), jax.random.PRNGKey(5), np.int64(5))
    ]
    for other in updates[1:]:
        np.testing.assert_array_equal(other, updates[0])
    different = flat(one_step(agsopt.ags(sigma=0.3, num_samples=5, key=6))[0])
    assert np.max(np.abs(different - updates[0])) > 1e-3


def test_key_changes_every_step_and_never_repeats():
    """Plain method, Σ = I, f ≡ 1: each update is the mean of the step's directions u_n.
    Over 12 steps the state keys and the updates are all distinct; a restart from the
    same state replays the same sequence (the key lives in the state)."""
    opt = agsopt.ags(sigma=1.0, num_samples=5, method="plain", covariance="isotropic", key=7)
    one = lambda p: jnp.float32(1.0)
    state = opt.init(PARAMS)
    start = state
    keys, directions = [flat(state.key)], []
    for _ in range(12):
        updates, state = opt.update(ZEROS, state, PARAMS, value_fn=one)
        keys.append(flat(state.key))
        directions.append(flat(updates))
    assert len({tuple(k) for k in keys}) == len(keys)
    directions = np.asarray(directions)
    gaps = np.linalg.norm(directions[:, None] - directions[None], axis=-1)
    assert np.all(gaps[~np.eye(12, dtype=bool)] > 1e-3)
    replay, _ = opt.update(ZEROS, start, PARAMS, value_fn=one)
    np.testing.assert_array_equal(flat(replay), directions[0])


@pytest.mark.parametrize(
    ("method", "per_step"), [("antithetic", 10), ("forward", 6), ("plain", 5), ("first_order", 5)]
)
def test_num_evaluations_counter(method, per_step):
    opt = agsopt.ags(sigma=0.3, num_samples=5, method=method, key=8)
    state = opt.init(PARAMS)
    for step in range(3):
        _, state = opt.update(ZEROS, state, PARAMS, value_fn=half_square)
        assert int(state.num_evaluations) == per_step * (step + 1)
        assert int(state.num_nonfinite) == 0


# ---------------------------------------------------------------- non-finite
# Thresholds for the partly-NaN step: a share of the samples cross it at each rule's scale.
@pytest.mark.parametrize(
    ("rule_name", "threshold"), [("gradient_aligned", 0.3), ("adaptive_diagonal", 0.15)]
)
def test_nonfinite_steps_counters_and_rule_state(rule_name, threshold):
    """Steps: finite, finite, all-NaN, partly NaN, finite. The counters add up (2N
    evaluations a step; N non-finite on the NaN step, between 1 and N − 1 on the partial
    one), the all-NaN step returns a zero update, keeps the last finite value and leaves the
    rule's state exactly as it was (one skipped step), while the finite steps do move it."""
    n = 5
    opt = agsopt.ags(sigma=0.5, num_samples=n, covariance=rule_name, key=10)
    all_nan = lambda p: jnp.float32(jnp.nan) + 0.0 * half_square(p)
    partly = lambda p: jnp.where(ravel_pytree(p)[0][0] > X[0] + threshold, jnp.nan, half_square(p))
    state = opt.init(PARAMS)
    history = []
    for fn in (half_square, half_square, all_nan, partly, half_square):
        before = state
        updates, state = opt.update(ZEROS, state, PARAMS, value_fn=fn)
        history.append((before, updates, state))
    increments = [int(s.num_nonfinite) - int(b.num_nonfinite) for b, _, s in history]
    assert increments[:3] == [0, 0, n] and increments[4] == 0
    assert 0 < increments[3] < n
    assert int(state.num_nonfinite) == sum(increments)
    assert int(state.num_evaluations) == 5 * 2 * n
    assert int(state.count) == 5
    before, updates, after = history[2]
    np.testing.assert_array_equal(flat(updates), np.zeros(DIM))
    assert float(after.value) == float(before.value) and np.isfinite(float(after.value))
    assert [int(s.num_skipped) for _, _, s in history] == [0, 0, 1, 1, 1]
    assert int(state.num_rule_skipped) == 0
    jax.tree.map(np.testing.assert_array_equal, after.rule_state, before.rule_state)
    assert not np.array_equal(flat(after.key), flat(before.key))
    for before, updates, after in (history[1], history[3]):
        assert np.all(np.isfinite(flat(updates))) and np.isfinite(float(after.value))
        moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), after.rule_state, before.rule_state)
        assert any(jax.tree.leaves(moved))


# ------------------------------------------------------------- covariance rule
def test_gradient_aligned_follows_ema_of_the_estimates():
    """m ← βm + (1 − β)ĝ over the returned estimates; the smoothed value shows the Σ used:
    isotropic first (m = 0: f + ½dσ²), then σ(I + (κ−1)vvᵀ): f + ½σ²(d − 1 + κ²), with a
    per-sample SD of ½σ²√(2(d − 1 + κ⁴)) (bound: 5 SE)."""
    ratio, decay, sigma = 3.0, 0.5, 0.8
    rule = covariance_rules.gradient_aligned(ratio=ratio, decay=decay)
    opt = agsopt.ags(sigma=sigma, num_samples=NUM_SAMPLES, covariance=rule, key=11)
    state = opt.init(PARAMS)
    m = np.zeros(DIM)
    for step in range(3):
        updates, state = opt.update(ZEROS, state, PARAMS, value_fn=half_square)
        if step == 0:
            assert_value_reveals(state.value, np.full(DIM, sigma**2), NUM_SAMPLES, "isotropic")
        else:
            # Eigenvalues of ΣᵀΣ: σ² (d − 1 times) and κ²σ².
            eig = np.array([sigma**2] * (DIM - 1) + [(ratio * sigma) ** 2])
            assert_value_reveals(state.value, eig, NUM_SAMPLES, f"aligned step {step}")
        m = decay * m + (1 - decay) * flat(updates)
        np.testing.assert_allclose(flat(state.rule_state.momentum), m, rtol=1e-5, atol=1e-6)
    v = m / np.linalg.norm(m)
    matrix = rule.matrix(state.rule_state, sigma)
    basis = jax.vmap(ravel_pytree(PARAMS)[1])(jnp.eye(DIM))
    dense = np.asarray(jax.vmap(lambda b: ravel_pytree(matrix.apply(b))[0])(basis)).T
    np.testing.assert_allclose(
        dense, sigma * (np.eye(DIM) + (ratio - 1) * np.outer(v, v)), rtol=1e-4, atol=1e-5
    )


# ------------------------------------------------------------------- aliases
def test_aliases_are_chains_of_ags_and_the_base_optimizer():
    lr, kwargs = 0.1, {"sigma": 0.3, "num_samples": 5, "key": 12}
    estimate = flat(one_step(agsopt.ags(**kwargs))[0])
    iso = flat(one_step(agsopt.ags(covariance="isotropic", **kwargs))[0])
    np.testing.assert_allclose(
        flat(one_step(agsopt.ags_gd(lr, **kwargs))[0]), -lr * estimate, rtol=1e-6
    )
    np.testing.assert_allclose(flat(one_step(agsopt.igs_gd(lr, **kwargs))[0]), -lr * iso, rtol=1e-6)
    # SGD with momentum: the first trace is the gradient itself.
    np.testing.assert_allclose(
        flat(one_step(agsopt.ags_sgd(lr, **kwargs))[0]), -lr * estimate, rtol=1e-6
    )
    np.testing.assert_allclose(
        flat(one_step(agsopt.igs_sgd(lr, **kwargs))[0]), -lr * iso, rtol=1e-6
    )
    # Adam's bias-corrected first step is −lr·g/(|g| + eps).
    adam = flat(one_step(agsopt.ags_adam(lr, **kwargs))[0])
    np.testing.assert_allclose(adam, -lr * estimate / (np.abs(estimate) + 1e-8), rtol=1e-5)
    igs_adam = flat(one_step(agsopt.igs_adam(lr, **kwargs))[0])
    np.testing.assert_allclose(igs_adam, -lr * iso / (np.abs(iso) + 1e-8), rtol=1e-5)


# ------------------------------------------------------ AGS-GD on Rastrigin
def rastrigin(x):
    return 10.0 * x.size + jnp.sum(x**2 - 10.0 * jnp.cos(2 * jnp.pi * x))


def run(tx, x0, steps: int, *, zero_order: bool):
    def body(carry, _):
        x, state = carry
        grad = jnp.zeros_like(x) if zero_order else jax.grad(rastrigin)(x)
        updates, state = tx.update(grad, state, x, value_fn=rastrigin)
        return (optax.apply_updates(x, updates), state), None

    (x, _), _ = jax.lax.scan(body, (x0, tx.init(x0)), None, length=steps)
    return rastrigin(x)


@pytest.mark.parametrize(
    "covariance", ["gradient_aligned", pytest.param("isotropic", marks=pytest.mark.slow)]
)
def test_ags_gd_solves_rastrigin_where_gd_stalls(covariance):
    """10-d Rastrigin from a uniform start in [−5.12, 5.12]^10. With σ = 0.6 every coordinate
    of f_Σ is convex (f_Σ'' = 2 + 40π² cos(2πx) e^{−2π²σ²} ≥ 2 − 0.32 > 0 needs σ ≥ 0.52; the
    gradient-aligned Σ smooths each coordinate by at least σ), so AGS-GD reaches the global
    minimum 0, while GD at stable step sizes (curvature ≤ 2 + 40π² ≈ 397) stops in a local
    minimum near a non-zero integer point, where f ≥ 1."""
    x0 = jax.random.uniform(jax.random.key(13), (10,), minval=-5.12, maxval=5.12)
    tx = agsopt.ags_gd(0.01, sigma=0.6, num_samples=256, covariance=covariance, key=14)
    final = float(jax.jit(lambda x: run(tx, x, 1500, zero_order=True))(x0))
    print(f"AGS-GD ({covariance}): f = {final:.3g}")
    assert final < 1e-3
    gd = jax.jit(
        lambda x: jnp.stack([run(optax.sgd(lr), x, 3000, zero_order=False) for lr in (4e-4, 1e-3)])
    )(x0)
    print(f"GD: f = {np.asarray(gd)}")
    assert np.all(np.asarray(gd) > 1.0)


# ----------------------------------------------------------------- compatibility
def test_inside_optax_chain_with_clipping():
    """chain(ags, clip_by_global_norm(1), sgd(lr)) steps by −lr·clip(∇̂f_Σ) and descends."""
    center = {"v": jnp.asarray([3.0, -2.0, 1.0]), "w": jnp.asarray([4.0, 0.5])}
    loss = lambda p: 5.0 * sum(jnp.sum((p[k] - center[k]) ** 2) for k in p)
    kwargs = {"sigma": 0.2, "num_samples": 5, "key": 15}
    lr = 0.2
    tx = optax.chain(agsopt.ags(**kwargs), optax.clip_by_global_norm(1.0), optax.sgd(lr))
    raw = flat(one_step(agsopt.ags(**kwargs), value_fn=loss)[0])
    assert np.linalg.norm(raw) > 1.0  # the clip is active
    got = flat(one_step(tx, value_fn=loss)[0])
    np.testing.assert_allclose(got, -lr * raw / np.linalg.norm(raw), rtol=1e-5)

    params, state = PARAMS, tx.init(PARAMS)
    for _ in range(20):  # clipped steps of length lr = 0.2 toward a center 5.2 away
        updates, state = tx.update(ZEROS, state, params, value_fn=loss)
        assert np.linalg.norm(flat(updates)) <= lr * (1 + 1e-5)
        params = optax.apply_updates(params, updates)
    assert float(loss(params)) < 0.5 * float(loss(PARAMS))


def test_inject_hyperparams_sigma_changed_mid_run():
    """σ is a hyperparameter: after setting it from 0.3 to 1.0 the smoothed value of
    ½‖x‖² moves from f + ½d·0.09 to f + ½d (bound: 5 SE each)."""
    tx = optax.inject_hyperparams(agsopt.ags, static_args=("num_samples",))(
        sigma=0.3, num_samples=NUM_SAMPLES, covariance="isotropic", key=16
    )
    state = tx.init(PARAMS)
    _, state = tx.update(ZEROS, state, PARAMS, value_fn=half_square)
    assert_value_reveals(state.inner_state.value, np.full(DIM, 0.09), NUM_SAMPLES, "σ = 0.3")
    state.hyperparams["sigma"] = jnp.asarray(1.0)
    key_before = flat(state.inner_state.key)
    _, state = tx.update(ZEROS, state, PARAMS, value_fn=half_square)
    assert_value_reveals(state.inner_state.value, np.full(DIM, 1.0), NUM_SAMPLES, "σ = 1")
    assert not np.array_equal(flat(state.inner_state.key), key_before)
    assert int(state.inner_state.count) == 2


@pytest.mark.parametrize("alias", ["ags_gd", "ags_sgd", "ags_adam", "igs_gd", "igs_adam"])
def test_inject_hyperparams_on_the_aliases(alias):
    """``optax.inject_hyperparams(agsopt.ags_adam)`` binds the learning rate and ags's
    keywords by name (the aliases' ``**ags_kwargs`` once reached ags as ``ags_kwargs``): the
    injected optimizer's steps equal the plain one's, and σ is a hyperparameter."""
    factory = getattr(agsopt, alias)
    kwargs = {"learning_rate": 0.1, "sigma": 0.3, "num_samples": 4, "key": 3}
    injected = optax.inject_hyperparams(factory, static_args=("num_samples", "key"))(**kwargs)
    plain = factory(**kwargs)
    state_i, state_p = injected.init(PARAMS), plain.init(PARAMS)
    for _ in range(2):
        u_i, state_i = injected.update(ZEROS, state_i, PARAMS, value_fn=half_square)
        u_p, state_p = plain.update(ZEROS, state_p, PARAMS, value_fn=half_square)
        # (Adam's b1, b2, eps become float32 arrays when injected: rounding only)
        np.testing.assert_allclose(flat(u_i), flat(u_p), rtol=2e-5, atol=1e-7)
    assert float(state_i.hyperparams["sigma"]) == pytest.approx(0.3)
    assert "covariance" not in inspect.signature(agsopt.igs_adam).parameters


def test_flax_nnx_optimizer_passes_value_fn():
    """flax 0.12: ``nnx.Optimizer(model, tx, wrt=nnx.Param).update(model, grads, **kwargs)``
    forwards ``value_fn`` to ``tx.update``; value_fn takes the (pure) parameter State."""
    from flax import nnx

    rng = np.random.default_rng(17)
    inputs = jnp.asarray(rng.standard_normal((64, 3)), jnp.float32)
    targets = inputs @ jnp.asarray([[1.0], [-2.0], [0.5]]) + 0.3
    model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(model, nnx.Param)

    def value_fn(param_state):
        return jnp.mean((nnx.merge(graphdef, param_state)(inputs) - targets) ** 2)

    loss = lambda m: jnp.mean((m(inputs) - targets) ** 2)
    optimizer = nnx.Optimizer(
        model,
        agsopt.ags_adam(0.05, sigma=0.01, num_samples=8, covariance="isotropic", key=18),
        wrt=nnx.Param,
    )

    @nnx.jit
    def train_step(model, optimizer):
        grads = nnx.grad(loss)(model)
        optimizer.update(model, grads, value_fn=value_fn)

    initial = float(loss(model))
    for _ in range(300):
        train_step(model, optimizer)
    final = float(loss(model))
    print(f"nnx: loss {initial:.3g} -> {final:.3g}")
    assert final < 1e-3 * initial
    assert int(optimizer.step[...]) == 300


def test_optimistix_minimise_with_ags_gd():
    """optimistix 0.1.0's OptaxMinimiser calls ``optim.update(grads, state, y, value=f,
    grad=grads, value_fn=lambda y: fn(y, args)[0])``, so AGS gets the loss. On a quadratic
    the antithetic estimate's error is proportional to the gradient, so AGS-GD converges to
    the exact minimizer."""
    import optimistix as optx

    center = {"v": jnp.asarray([1.0, -2.0, 0.5]), "w": jnp.asarray([0.0, 3.0])}
    scales = {"v": jnp.asarray([1.0, 2.0, 0.5]), "w": jnp.asarray([1.5, 1.0])}

    def fn(y, args):
        return sum(jnp.sum(scales[k] * (y[k] - center[k]) ** 2) for k in y)

    solver = optx.OptaxMinimiser(
        agsopt.ags_gd(0.1, sigma=0.1, num_samples=8, covariance="isotropic", key=19),
        rtol=1e-7,
        atol=1e-7,
    )
    solution = optx.minimise(fn, solver, PARAMS, max_steps=1000, throw=False)
    error = np.max(np.abs(flat(solution.value) - flat(center)))
    print(f"optimistix: steps {int(solution.stats['num_steps'])}, error {error:.2e}")
    assert error < 1e-3
