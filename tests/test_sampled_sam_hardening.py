"""AUSAM and vSAM hardening: precision under x64, restored states of another
configuration, out-of-range ids, ρ schedules, and state dtypes carried by ``lax.scan``."""

from __future__ import annotations

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agsopt import ausam, vsam

# ---------------------------------------------------------------------------------------
# AUSAM problem with closed forms: ℓ_i(w) = C + ½‖w − x_i‖² on the batch positions S.
#   g = mean_S (w − x_i),  ε = ρ g/‖g‖,  g_s = mean_S (w + ε − x_i) = g + ε,
#   DLP_i = ℓ_i(w + ε) − ℓ_i(w) in absolute value = |ε·(w − x_i) + ½‖ε‖²|
# (written without subtracting two large losses, so it is exact in float64).
# ---------------------------------------------------------------------------------------
C = 100.0
N_EXAMPLES, BATCH, DIM = 10, 4, 3
_rng = np.random.default_rng(0)
X = _rng.normal(size=(BATCH, DIM))
W = _rng.normal(size=DIM)
IDS = np.asarray([7, 1, 2, 3])


def per_example_loss(dtype):
    x = jnp.asarray(X, dtype)

    def fn(params, positions):
        return C + 0.5 * jnp.sum((params["w"] - x[positions]) ** 2, axis=1)

    return fn


def closed_form(rho):
    diff = W - X
    g = diff.mean(0)
    eps = rho * g / np.linalg.norm(g)
    dlp = np.abs(diff @ eps + 0.5 * eps @ eps)
    return g + eps, dlp


def ausam_step(opt, state, params, ids=IDS, dtype=jnp.float32, jit=False):
    def f(state, ids):
        return opt.update(None, state, params, per_example_loss_fn=per_example_loss(dtype), ids=ids)

    return jax.jit(f)(state, ids) if jit else f(state, ids)


# --------------------------------------------------------------------- precision (x64)


def test_ausam_records_are_float64_exact_under_x64():
    """ρ = 1e-3 and losses near C = 100: the DLP ≈ 1e-3 is the difference of two losses
    that float32 stores to ±4e-6, so a float32 subtraction is off by ~1e-3 relative."""
    rho = 1e-3
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(W, jnp.float64)}
        opt = ausam(N_EXAMPLES, rho, steps_per_epoch=5)
        state = opt.init(params)
        assert state.dlp_sum.dtype == jnp.float64 and state.loss.dtype == jnp.float64
        out, state = ausam_step(opt, state, params, dtype=jnp.float64, jit=True)
        g_s, dlp = closed_form(rho)
        assert out["w"].dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(out["w"]), g_s, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(state.dlp_sum)[IDS], dlp, rtol=1e-9)
        assert state.dlp_sum.dtype == jnp.float64 and state.loss.dtype == jnp.float64
        expected_loss = np.mean(C + 0.5 * np.sum((W - X) ** 2, axis=1))
        np.testing.assert_allclose(float(state.loss), expected_loss, rtol=1e-14)


def test_vsam_reuse_weight_is_float64_for_float64_params():
    beta = 0.7
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(W, jnp.float64)}
        psf = {"w": jnp.asarray(_rng.normal(size=DIM), jnp.float64)}
        grads = {"w": jnp.asarray(_rng.normal(size=DIM), jnp.float64)}
        opt = vsam(0.05, warmup_steps=0, window=4, var_blocks=2, beta=beta)
        state = opt.init(params)
        assert state.psf_weight.dtype == jnp.float64 and state.base_sr.dtype == jnp.float64
        state = state._replace(
            count=jnp.asarray(1, jnp.int32),  # position 1 of window 0: not a SAM step
            schedule=jnp.zeros(4, bool),
            psf=psf,
            psf_weight=jnp.ones((), jnp.float64),
            reuse_count=jnp.zeros((), jnp.int32),
        )
        step = jax.jit(lambda s: opt.update(grads, s, params, value_fn=lambda p: 0.0))
        for j in range(1, 4):
            out, state = step(state)
            expected = np.asarray(grads["w"]) + beta**j * np.asarray(psf["w"])
            assert out["w"].dtype == jnp.float64
            np.testing.assert_allclose(np.asarray(out["w"]), expected, rtol=1e-14)
            assert state.psf_weight.dtype == jnp.float64
            assert float(state.psf_weight) == pytest.approx(beta**j, rel=1e-15)


def test_vsam_records_are_float64_exact_under_x64():
    """L(w) = ¼Σw⁴: g = w³, g_s = (w + ρ g/‖g‖)³, psf = g_s − g, ratio = ‖psf‖/‖g‖."""
    rho = 0.05
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(W, jnp.float64)}

        def loss(p):
            return 0.25 * jnp.sum(p["w"] ** 4)

        opt = vsam(rho, warmup_steps=3, window=4, var_blocks=2, last_layer=None)
        grads = jax.grad(loss)(params)
        out, state = jax.jit(lambda s: opt.update(grads, s, params, value_fn=loss))(
            opt.init(params)
        )
        g = W**3
        g_s = (W + rho * g / np.linalg.norm(g)) ** 3
        psf = g_s - g
        np.testing.assert_allclose(np.asarray(out["w"]), g_s, rtol=1e-14)
        np.testing.assert_allclose(np.asarray(state.psf["w"]), psf, rtol=1e-12)
        assert state.ratio_history.dtype == jnp.float64
        ratio = np.linalg.norm(psf) / np.linalg.norm(g)
        np.testing.assert_allclose(float(state.ratio_history[-1]), ratio, rtol=1e-12)
        np.testing.assert_allclose(
            float(state.psf_norm_history[-1]), np.linalg.norm(psf), rtol=1e-12
        )
        norms = np.asarray([0.0, 0.0, 0.0, np.linalg.norm(psf)])
        var = np.mean([np.var(norms[:2], ddof=1), np.var(norms[2:], ddof=1)])
        np.testing.assert_allclose(float(state.var_history[-1]), var, rtol=1e-12)


# ------------------------------------------------------- restoring into another config


def _roundtrip(state, target):
    return flax.serialization.from_bytes(target, flax.serialization.to_bytes(state))


def test_ausam_state_of_another_num_examples_is_rejected():
    params = {"w": jnp.asarray(W, jnp.float32)}
    small = ausam(100, 0.05, steps_per_epoch=2)
    _, state = ausam_step(small, small.init(params), params)
    big = ausam(200, 0.05, steps_per_epoch=2)
    restored = _roundtrip(state, big.init(params))
    assert restored.dlp_sum.shape == (100,)  # flax restores without a shape check
    with pytest.raises(ValueError, match="num_examples=200"):
        ausam_step(big, restored, params)
    with pytest.raises(ValueError, match="num_examples=200"):
        ausam_step(big, restored, params, jit=True)
    # into the configuration that wrote it: restores exactly and continues identically
    same = _roundtrip(state, small.init(params))
    out_a, next_a = ausam_step(small, same, params)
    out_b, next_b = ausam_step(small, state, params)
    np.testing.assert_array_equal(np.asarray(out_a["w"]), np.asarray(out_b["w"]))
    for a, b in zip(next_a, next_b, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_vsam_state_of_another_window_or_params_is_rejected():
    params = {"w": jnp.asarray(W, jnp.float32)}
    grads = {"w": jnp.ones(DIM, jnp.float32)}

    def loss(p):
        return jnp.sum(p["w"] ** 4)

    small = vsam(0.05, warmup_steps=2, window=4, var_blocks=2)
    _, state = small.update(grads, small.init(params), params, value_fn=loss)
    big = vsam(0.05, warmup_steps=2, window=8, var_blocks=2)
    restored = _roundtrip(state, big.init(params))
    with pytest.raises(ValueError, match="window=8"):
        big.update(grads, restored, params, value_fn=loss)
    with pytest.raises(ValueError, match="window=8"):
        jax.jit(lambda s: big.update(grads, s, params, value_fn=loss))(restored)
    other = {"w": jnp.ones(DIM + 1, jnp.float32)}
    with pytest.raises(ValueError, match="psf"):
        small.update({"w": jnp.ones(DIM + 1)}, state, other, value_fn=loss)
    same = _roundtrip(state, small.init(params))
    out, _ = small.update(grads, same, params, value_fn=loss)
    ref, _ = small.update(grads, state, params, value_fn=loss)
    np.testing.assert_array_equal(np.asarray(out["w"]), np.asarray(ref["w"]))


# ------------------------------------------------------------------- out-of-range ids


def test_ausam_64bit_id_is_not_wrapped_under_x64():
    """2³²+5 cast to int32 is 5: it must be counted as invalid, not recorded as example 5."""
    with jax.enable_x64(True):
        params = {"w": jnp.asarray(W, jnp.float64)}
        opt = ausam(N_EXAMPLES, 1e-3, steps_per_epoch=5)
        ids = np.asarray([2**32 + 5, 1, 2, 3], np.int64)
        out, state = ausam_step(opt, opt.init(params), params, ids=ids, dtype=jnp.float64, jit=True)
        counts = np.asarray(state.dlp_count)
        assert counts[5] == 0 and counts.sum() == 3
        np.testing.assert_array_equal(counts[[1, 2, 3]], 1)
        assert int(state.num_invalid_ids) == 1
        g_s, dlp = closed_form(1e-3)  # the example still contributes to the gradient
        np.testing.assert_allclose(np.asarray(out["w"]), g_s, rtol=1e-12)
        np.testing.assert_allclose(np.asarray(state.dlp_sum)[[1, 2, 3]], dlp[1:], rtol=1e-9)
        with pytest.raises(ValueError, match="ids"):  # concrete ids: a clear error
            ausam_step(opt, opt.init(params), params, ids=ids, dtype=jnp.float64)


# ---------------------------------------------------------------------- ρ schedules


def test_ausam_accepts_a_rho_schedule():
    params = {"w": jnp.asarray(W, jnp.float32)}
    schedule = optax.linear_schedule(0.05, 0.25, 4)
    opt = ausam(N_EXAMPLES, schedule, steps_per_epoch=5)
    state = opt.init(params)
    step = jax.jit(lambda s: ausam_step(opt, s, params))
    for count in range(3):
        rho = 0.05 + 0.05 * count  # schedule(count), count = steps taken before this one
        before = state
        out, state = step(state)
        g_s, dlp = closed_form(rho)
        np.testing.assert_allclose(np.asarray(out["w"]), g_s, rtol=1e-5)
        recorded = np.asarray(state.dlp_sum, np.float64) - np.asarray(before.dlp_sum)
        np.testing.assert_allclose(recorded[IDS], dlp, rtol=1e-3)
        fixed = ausam(N_EXAMPLES, rho, steps_per_epoch=5)
        ref, _ = ausam_step(fixed, before, params)
        np.testing.assert_allclose(np.asarray(out["w"]), np.asarray(ref["w"]), rtol=1e-6)
    assert int(state.count) == 3


def _bad_rho(count):
    """0.05, except NaN at step 2 and −0.1 at step 4 (a buggy schedule, an injected NaN)."""
    return jnp.where(count == 2, jnp.nan, jnp.where(count == 4, -0.1, 0.05))


def test_ausam_skips_a_step_whose_rho_is_invalid_and_counts_it():
    """As SAM: zero update, no record, ``loss`` kept, ``num_skipped`` + 1; the steps around
    it are the fixed-ρ closed form."""
    params = {"w": jnp.asarray(W, jnp.float32)}
    opt = ausam(N_EXAMPLES, _bad_rho, steps_per_epoch=5)
    state = opt.init(params)
    step = jax.jit(lambda s: ausam_step(opt, s, params))
    for count in range(5):  # the first epoch: full-batch steps, the closed form's
        before = state
        out, state = step(state)
        if count in (2, 4):
            np.testing.assert_array_equal(np.asarray(out["w"]), 0.0)
            for name in ("dlp_sum", "dlp_count", "loss"):
                np.testing.assert_array_equal(getattr(state, name), getattr(before, name))
            assert int(state.num_skipped) == int(before.num_skipped) + 1
        else:
            np.testing.assert_allclose(np.asarray(out["w"]), closed_form(0.05)[0], rtol=1e-5)
            assert int(state.num_skipped) == int(before.num_skipped)
    assert int(state.num_skipped) == 2 and int(state.count) == 5


def test_vsam_skips_a_sam_step_whose_rho_is_invalid_and_counts_it():
    """A SAM step (the warm-up) at an invalid ρ: zero update, PSF, weights and records kept,
    not counted as a SAM step; ``num_skipped`` + 1."""
    params = {"w": jnp.asarray(W, jnp.float32)}

    def loss(p):
        return jnp.sum(jnp.cos(p["w"]) + 0.5 * p["w"] ** 4)

    opt = vsam(_bad_rho, warmup_steps=10, window=4, var_blocks=2)
    state = opt.init(params)
    grads = jax.grad(loss)(params)
    step = jax.jit(lambda s: opt.update(grads, s, params, value_fn=loss))
    kept = ("psf", "psf_weight", "reuse_count", "ratio_history", "psf_norm_history")
    for count in range(6):
        before = state
        out, state = step(state)
        if count in (2, 4):
            np.testing.assert_array_equal(np.asarray(out["w"]), 0.0)
            for name in (*kept, "var_history", "num_sam_steps"):
                np.testing.assert_array_equal(
                    np.asarray(jax.tree.leaves(getattr(state, name))[0]),
                    np.asarray(jax.tree.leaves(getattr(before, name))[0]),
                )
            assert not bool(state.last_was_sam)
        else:
            w_adv = W + 0.05 * np.asarray(grads["w"]) / np.linalg.norm(np.asarray(grads["w"]))
            want = -np.sin(w_adv) + 2 * w_adv**3
            np.testing.assert_allclose(np.asarray(out["w"]), want, rtol=1e-5, atol=1e-6)
    assert int(state.num_skipped) == 2 and int(state.num_sam_steps) == 4


def test_a_static_rho_never_skips():
    params = {"w": jnp.asarray(W, jnp.float32)}
    opt = vsam(0.05, warmup_steps=2, window=4, var_blocks=2)
    state = opt.init(params)
    grads = {"w": jnp.ones(DIM)}
    for _ in range(6):
        _, state = opt.update(grads, state, params, value_fn=lambda p: jnp.sum(p["w"] ** 2))
    assert int(state.num_skipped) == 0


def test_vsam_accepts_a_rho_schedule():
    params = {"w": jnp.asarray(W, jnp.float32)}

    def loss(p):
        return jnp.sum(jnp.cos(p["w"]) + 0.5 * p["w"] ** 4)

    schedule = optax.linear_schedule(0.05, 0.25, 4)
    opt = vsam(schedule, warmup_steps=10, window=4, var_blocks=2)
    state = opt.init(params)
    grads = jax.grad(loss)(params)
    step = jax.jit(lambda s: opt.update(grads, s, params, value_fn=loss))
    for count in range(3):
        before = state
        out, state = step(state)
        rho = 0.05 + 0.05 * count
        ref, _ = vsam(rho, warmup_steps=10, window=4, var_blocks=2).update(
            grads, before, params, value_fn=loss
        )
        np.testing.assert_allclose(np.asarray(out["w"]), np.asarray(ref["w"]), rtol=1e-6)
        g = np.asarray(grads["w"], np.float64)
        w_adv = W + rho * g / np.linalg.norm(g)
        np.testing.assert_allclose(
            np.asarray(out["w"]), -np.sin(w_adv) + 2 * w_adv**3, rtol=1e-5, atol=1e-6
        )


# ------------------------------------------------- state dtypes across steps (lax.scan)


def _scan_states(kind, dtype, steps=6):
    params = {"w": jnp.asarray(W, dtype), "b": jnp.asarray(W[:2], dtype)}
    if kind == "ausam":
        opt = ausam(N_EXAMPLES, 0.05, steps_per_epoch=2, alpha=0.5)
        x = jnp.asarray(X, dtype)

        def per_example(p, positions):
            return jnp.sum((p["w"] - x[positions]) ** 2, axis=1) + jnp.sum(p["b"] ** 2)

        def update(p, s):
            return opt.update(None, s, p, per_example_loss_fn=per_example, ids=jnp.arange(4))
    else:
        opt = vsam(0.05, warmup_steps=2, window=2, var_blocks=1, reuse_steps=1)

        def loss(p):
            return jnp.sum(p["w"] ** 4) + jnp.sum(jnp.cos(p["b"]))

        def update(p, s):
            return opt.update(jax.grad(loss)(p), s, p, value_fn=loss)

    state = opt.init(params)

    def body(carry, _):
        p, s = carry
        u, s = update(p, s)
        return (jax.tree.map(lambda w, d: w - 0.01 * d, p, u), s), None

    (_, final), _ = jax.jit(lambda c: jax.lax.scan(body, c, length=steps))((params, state))
    return state, final


@pytest.mark.parametrize("kind", ["ausam", "vsam"])
@pytest.mark.parametrize(
    ("x64", "dtype", "stat_dtype"),
    [
        (False, jnp.float32, jnp.float32),
        (False, jnp.bfloat16, jnp.float32),
        (True, jnp.float32, jnp.float32),
        (True, jnp.float64, jnp.float64),
    ],
)
def test_state_dtypes_are_kept_across_steps(kind, x64, dtype, stat_dtype):
    with jax.enable_x64(x64):
        initial, final = _scan_states(kind, dtype)
        assert jax.tree.structure(initial) == jax.tree.structure(final)
        for a, b in zip(jax.tree.leaves(initial), jax.tree.leaves(final), strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape
        assert int(final.count) == 6
        stats = (
            [final.dlp_sum, final.loss]
            if kind == "ausam"
            else [final.psf_weight, final.base_sr, final.ratio_history, final.var_history]
        )
        for x in stats:
            assert x.dtype == stat_dtype
            assert np.all(np.isfinite(np.asarray(x, np.float64)))


# ------------------------------------------- step counts that do not fit the int32 count


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps_per_epoch": 2**30}, "3·1073741824"),  # 3 warm-up epochs overflow int32
        ({"steps_per_epoch": 2**31, "warmup_epochs": 1}, "warm-up"),
        ({"warmup_steps": 2**40}, "warmup_steps=1099511627776"),
        ({"warmup_steps": 10, "window": 2**31}, "window"),
    ],
)
def test_vsam_refuses_a_warmup_beyond_the_int32_step_count(kwargs, match):
    """Issue #18 item 9: these were accepted and failed at the first update (OverflowError)."""
    with pytest.raises(ValueError, match=match):
        vsam(0.05, **kwargs)
    # the largest warm-up that fits still runs: every step of it is a SAM step
    opt = vsam(0.05, warmup_steps=2**31 - 1, window=4, var_blocks=2)
    params = {"w": jnp.ones(3)}
    _, state = opt.update(params, opt.init(params), params, value_fn=lambda p: jnp.sum(p["w"] ** 2))
    assert bool(state.last_was_sam)


@pytest.mark.parametrize("name", ["steps_per_epoch", "trans_epoch", "full_batch_epochs"])
def test_ausam_refuses_epoch_settings_beyond_the_int32_step_count(name):
    kwargs = {"steps_per_epoch": 5, name: 2**40}
    with pytest.raises(ValueError, match=name):
        ausam(N_EXAMPLES, 0.1, **kwargs)
    opt = ausam(N_EXAMPLES, 0.1, **{**kwargs, name: 2**31 - 1})
    params = {"w": jnp.asarray(W, jnp.float32)}
    _, state = ausam_step(opt, opt.init(params), params)
    assert int(state.count) == 1
