"""Tests for agsopt.ausam (AUSAM, arXiv:2406.08001)."""

from __future__ import annotations

import importlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from shared_problems import docstring_example

from agsopt.sharpness import (
    AUSAMState,
    ausam,
    ausam_adlp,
    ausam_f_max,
    ausam_record,
    ausam_sam_on_subset,
    ausam_sample_subset,
    ausam_sampling_probs,
    ausam_select_subset,
    ausam_subset_size,
    ausam_valid_ids,
)

ausam_module = importlib.import_module("agsopt.sharpness._ausam")

RHO = 0.1
N_EXAMPLES, BATCH, DIM, CLASSES = 40, 8, 3, 4

# ---------------------------------------------------------------------------------------
# A linear softmax classifier with a hand-written float64 numpy gradient:
#   ℓ_i(w, b) = logsumexp(x_i W + b) − (x_i W + b)_{y_i}
#   ∇_W mean_S ℓ = X_Sᵀ (softmax − onehot)/|S|,   ∇_b mean_S ℓ = mean_S (softmax − onehot)
# ---------------------------------------------------------------------------------------
_rng = np.random.default_rng(0)
X = _rng.normal(size=(BATCH, DIM)).astype(np.float32)
Y = _rng.integers(0, CLASSES, size=BATCH).astype(np.int32)
IDS = np.asarray([3, 17, 0, 39, 8, 22, 11, 30], np.int32)
PARAMS = {
    "b": jnp.asarray(_rng.normal(size=CLASSES) * 0.1, jnp.float32),
    "w": jnp.asarray(_rng.normal(size=(DIM, CLASSES)), jnp.float32),
}


def np_losses(p, pos):
    logits = X[pos].astype(np.float64) @ p["w"] + p["b"]
    lse = np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1)) + logits.max(1)
    return lse - logits[np.arange(len(pos)), Y[pos]]


def np_grad(p, pos):
    logits = X[pos].astype(np.float64) @ p["w"] + p["b"]
    soft = np.exp(logits - logits.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    soft[np.arange(len(pos)), Y[pos]] -= 1.0
    return {"b": soft.mean(0), "w": X[pos].astype(np.float64).T @ soft / len(pos)}


def to_np(tree):
    return {k: np.asarray(v, np.float64) for k, v in tree.items()}


def make_loss(log=None, x=X, y=Y):
    """per_example_loss_fn; if ``log`` is a list, each *executed* call appends its positions."""

    def per_example_loss_fn(p, positions):
        if log is not None:
            jax.debug.callback(lambda pos: log.append(np.asarray(pos)), positions)
        logits = jnp.asarray(x)[positions] @ p["w"] + p["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)[positions])

    return per_example_loss_fn


def run_step(opt, state, log=None, ids=IDS, params=PARAMS, jit=False, **extra):
    def step(state, ids):
        return opt.update(None, state, params, per_example_loss_fn=make_loss(log), ids=ids, **extra)

    out = jax.jit(step)(state, ids) if jit else step(state, ids)
    jax.effects_barrier()
    return out


def expected_sam(positions):
    """Independent SAM on the subset: g, ε = ρĝ, g_s at w + ε, and the DLPs."""
    w = to_np(PARAMS)
    g = np_grad(w, positions)
    gn = math.sqrt(sum(np.sum(v**2) for v in g.values()))
    w_adv = {k: w[k] + RHO * g[k] / gn for k in w}
    dlp = np.abs(np_losses(w_adv, positions) - np_losses(w, positions))
    return np_grad(w_adv, positions), dlp, np_losses(w, positions).mean()


def assert_tree_allclose(a, b, rtol=2e-5, atol=1e-6):
    for k in b:
        np.testing.assert_allclose(np.asarray(a[k], np.float64), b[k], rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- formulas


def test_subset_step_matches_formula_and_records():
    k = ausam_subset_size(0.5, BATCH)
    opt = ausam(N_EXAMPLES, RHO, alpha=0.5, steps_per_epoch=5, full_batch_epochs=0, key=3)
    log = []
    out, state = run_step(opt, opt.init(PARAMS), log)
    # both passes ran on the same k positions, and only on them
    assert [p.shape for p in log] == [(k,), (k,)]
    np.testing.assert_array_equal(log[0], log[1])
    positions = log[0]
    assert len(set(positions.tolist())) == k
    g_s, dlp, loss = expected_sam(positions)
    assert_tree_allclose(out, g_s)
    # the sharper gradient differs from the plain subset gradient
    assert not np.allclose(np.asarray(out["w"]), np_grad(to_np(PARAMS), positions)["w"])
    # record: DLP at the selected ids only
    expected_sum = np.zeros(N_EXAMPLES)
    expected_sum[IDS[positions]] = dlp
    np.testing.assert_allclose(np.asarray(state.dlp_sum), expected_sum, rtol=1e-4, atol=1e-7)
    expected_count = np.zeros(N_EXAMPLES, np.int64)
    expected_count[IDS[positions]] = 1
    np.testing.assert_array_equal(np.asarray(state.dlp_count), expected_count)
    np.testing.assert_allclose(float(state.loss), loss, rtol=1e-5)
    assert int(state.count) == 1


def test_record_is_a_running_mean_at_selected_ids_only():
    opt = ausam(N_EXAMPLES, RHO, alpha=0.5, steps_per_epoch=5, full_batch_epochs=0, key=1)
    state = opt.init(PARAMS)
    prior_count = np.arange(N_EXAMPLES) % 4 + 1  # every example seen 1..4 times
    prior_mean = np.linspace(0.05, 0.9, N_EXAMPLES)
    state = state._replace(
        dlp_sum=jnp.asarray(prior_mean * prior_count, jnp.float32),
        dlp_count=jnp.asarray(prior_count, jnp.int32),
    )
    log = []
    _, new = run_step(opt, state, log)
    positions = log[0]
    _, dlp, _ = expected_sam(positions)
    adlp, seen = ausam_adlp(new)
    expected = prior_mean.copy()
    sel = IDS[positions]
    expected[sel] = (prior_mean[sel] * prior_count[sel] + dlp) / (prior_count[sel] + 1)
    np.testing.assert_allclose(np.asarray(adlp), expected, rtol=1e-5, atol=1e-7)
    count = prior_count.copy()
    count[sel] += 1
    np.testing.assert_array_equal(np.asarray(new.dlp_count), count)
    assert bool(np.all(np.asarray(seen)))


def test_duplicate_ids_in_a_batch_are_both_recorded():
    opt = ausam(N_EXAMPLES, RHO, alpha=1.0, steps_per_epoch=5)
    ids = np.asarray([5, 5, 1, 2, 3, 4, 6, 7], np.int32)
    _, state = run_step(opt, opt.init(PARAMS), ids=ids)
    _, dlp, _ = expected_sam(np.arange(BATCH))
    assert int(state.dlp_count[5]) == 2
    np.testing.assert_allclose(float(state.dlp_sum[5]), dlp[0] + dlp[1], rtol=1e-4)


def test_nonfinite_dlp_is_not_recorded():
    """The loss of the example at position 2 is NaN at w + ε only: every other example is
    recorded as usual, that one keeps an empty record (count 0, sum 0)."""
    opt = ausam(N_EXAMPLES, RHO, alpha=1.0, steps_per_epoch=5)
    clean = make_loss()

    def nan_at_position_2_when_moved(p, positions):
        moved = jnp.abs(p["w"] - PARAMS["w"]).sum() > 0
        losses = clean(p, positions)
        return jnp.where(moved & (positions == 2), jnp.nan, losses)

    _, state = opt.update(
        None,
        opt.init(PARAMS),
        PARAMS,
        per_example_loss_fn=nan_at_position_2_when_moved,
        ids=IDS,
    )
    _, dlp, _ = expected_sam(np.arange(BATCH))
    count = np.zeros(N_EXAMPLES, np.int64)
    count[IDS] = 1
    count[IDS[2]] = 0
    np.testing.assert_array_equal(np.asarray(state.dlp_count), count)
    expected_sum = np.zeros(N_EXAMPLES)
    expected_sum[IDS] = dlp
    expected_sum[IDS[2]] = 0.0
    np.testing.assert_allclose(np.asarray(state.dlp_sum), expected_sum, rtol=1e-4, atol=1e-7)


def test_sampling_probabilities_match_formula():
    a = np.asarray([0.3, 0.1, 0.7, 0.25, 0.7, 0.05])
    f_min, f_max_t = 0.1, 0.4
    s = f_min + (f_max_t - f_min) * (a - a.min()) / (a.max() - a.min())
    np.testing.assert_allclose(
        np.asarray(ausam_sampling_probs(jnp.asarray(a), f_min, f_max_t)), s / s.sum(), rtol=1e-6
    )
    # unseen entries take the largest seen score; degenerate spread → uniform
    seen = np.asarray([True, True, False, True, False, True])
    a_seen = np.where(seen, a, np.max(np.where(seen, a, -np.inf)))
    s = f_min + (f_max_t - f_min) * (a_seen - a_seen.min()) / (a_seen.max() - a_seen.min())
    got = ausam_sampling_probs(jnp.asarray(a), f_min, f_max_t, seen=jnp.asarray(seen))
    np.testing.assert_allclose(np.asarray(got), s / s.sum(), rtol=1e-6)
    for probs in (
        ausam_sampling_probs(jnp.full(5, 0.3), f_min, f_max_t),
        ausam_sampling_probs(jnp.asarray(a), f_min, f_max_t, seen=jnp.zeros(6, bool)),
    ):
        np.testing.assert_allclose(np.asarray(probs), np.full(probs.shape, 1 / probs.size))


def test_f_max_ramp_matches_formula():
    f_min, f_max, trans = 0.1, 0.5, 30
    for epoch in [0, 1, 7, 29, 30, 31, 100]:
        expected = f_min + (f_max - f_min) * min(epoch / trans, 1.0)
        np.testing.assert_allclose(float(ausam_f_max(epoch, f_min, f_max, trans)), expected)
    assert float(ausam_f_max(0, f_min, f_max, 0)) == pytest.approx(f_max)


def test_sampler_law_is_sequential_sampling_without_replacement():
    p = np.asarray([0.4, 0.3, 0.2, 0.1])
    keys = jax.random.split(jax.random.key(0), 20000)
    first = jax.vmap(lambda k: ausam_sample_subset(k, jnp.asarray(p), 1))(keys)[:, 0]
    freq = np.bincount(np.asarray(first), minlength=4) / len(keys)
    np.testing.assert_allclose(freq, p, atol=0.015)
    two = np.asarray(jax.vmap(lambda k: ausam_sample_subset(k, jnp.asarray(p), 2))(keys))
    assert np.all(two[:, 0] != two[:, 1])
    # P(i ∈ S) for two successive draws ∝ p among the rest
    incl = p + np.asarray(
        [sum(p[j] * p[i] / (1 - p[j]) for j in range(4) if j != i) for i in range(4)]
    )
    freq2 = np.asarray([np.mean(np.any(two == i, axis=1)) for i in range(4)])
    np.testing.assert_allclose(freq2, incl, atol=0.015)


def test_sharp_examples_are_preferred_after_the_ramp():
    # ADLP 1 for batch positions 0..3, 0 for 4..7; f_min 0.01, f_max 1 (ramp done) → p ∝ 100:1
    opt = ausam(N_EXAMPLES, RHO, alpha=0.5, steps_per_epoch=1, trans_epoch=0, f_min=0.01, f_max=1.0)
    state = opt.init(PARAMS)
    sums = np.zeros(N_EXAMPLES, np.float32)
    sums[IDS[:4]] = 1.0
    state = state._replace(
        count=jnp.asarray(5, jnp.int32),
        dlp_sum=jnp.asarray(sums),
        dlp_count=jnp.ones(N_EXAMPLES, jnp.int32),
    )
    log = []
    step = jax.jit(
        lambda st: opt.update(None, st, PARAMS, per_example_loss_fn=make_loss(log), ids=IDS)[1]
    )
    for _ in range(20):
        state = step(state)._replace(dlp_sum=jnp.asarray(sums), dlp_count=state.dlp_count * 0 + 1)
    jax.effects_barrier()
    chosen = np.concatenate(log[::2])
    assert np.mean(chosen < 4) > 0.9


# ------------------------------------------------------------------- epochs and shapes


def test_first_epoch_uses_all_examples_then_exactly_k():
    steps_per_epoch, alpha = 3, 0.4
    k = ausam_subset_size(alpha, BATCH)
    assert k == 3
    opt = ausam(N_EXAMPLES, RHO, alpha=alpha, steps_per_epoch=steps_per_epoch, key=0)
    log = []
    step = jax.jit(
        lambda st, ids: opt.update(None, st, PARAMS, per_example_loss_fn=make_loss(log), ids=ids)
    )
    state = opt.init(PARAMS)
    for _ in range(2 * steps_per_epoch):
        _, state = step(state, IDS)
    jax.effects_barrier()
    # two executed loss evaluations per step; full batch in epoch 0, k examples after
    shapes = [p.shape for p in log]
    assert shapes == [(BATCH,)] * (2 * steps_per_epoch) + [(k,)] * (2 * steps_per_epoch)
    np.testing.assert_array_equal(log[0], np.arange(BATCH))
    counts = np.asarray(state.dlp_count)
    assert counts[IDS].sum() == steps_per_epoch * BATCH + steps_per_epoch * k
    assert counts.sum() == counts[IDS].sum()  # nothing outside the batch was touched


def test_first_epoch_step_matches_full_batch_sam():
    opt = ausam(N_EXAMPLES, RHO, steps_per_epoch=10)
    out, state = run_step(opt, opt.init(PARAMS))
    g_s, dlp, _ = expected_sam(np.arange(BATCH))
    assert_tree_allclose(out, g_s)
    np.testing.assert_allclose(np.asarray(state.dlp_sum)[IDS], dlp, rtol=1e-4, atol=1e-7)


def test_subset_size_is_the_references_int_alpha_b():
    # the reference: sample_size = int(self.alpha * datalen), a double-precision product
    for alpha, batch in [(0.5, 128), (0.29, 100), (0.7, 10), (0.3, 7), (0.1, 256)]:
        assert ausam_subset_size(alpha, batch) == int(alpha * batch)
    assert ausam_subset_size(0.5, 128) == 64
    assert ausam_subset_size(0.29, 100) == 28  # 0.29 * 100 = 28.999999999999996
    assert ausam_subset_size(0.01, 10) == 1
    assert ausam_subset_size(1.0, 7) == 7


def test_the_sampled_path_evaluates_only_k_under_trace():
    # the traced program of a sampled-only optimizer never builds a B-sized loss call
    opt = ausam(N_EXAMPLES, RHO, alpha=0.25, steps_per_epoch=5, full_batch_epochs=0)
    traced = []

    def loss_fn(p, positions):
        traced.append(positions.shape)
        return make_loss()(p, positions)

    jax.jit(lambda st: opt.update(None, st, PARAMS, per_example_loss_fn=loss_fn, ids=IDS)).lower(
        opt.init(PARAMS)
    )
    assert traced and set(traced) == {(2,)}


# ----------------------------------------------------------------------- conventions


def test_jit_matches_eager_and_key_changes():
    opt = ausam(N_EXAMPLES, RHO, alpha=0.5, steps_per_epoch=1, key=jax.random.key(7))
    state = opt.init(PARAMS)
    state = state._replace(count=jnp.asarray(3, jnp.int32))  # a sampled step
    out_e, st_e = run_step(opt, state)
    out_j, st_j = run_step(opt, state, jit=True)
    assert_tree_allclose(out_j, to_np(out_e), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(st_j.dlp_sum), np.asarray(st_e.dlp_sum), rtol=1e-5)
    keys = [state.key]
    log = []
    for _ in range(4):
        _, state = run_step(opt, state, log, jit=True)
        keys.append(state.key)
    for a, b in zip(keys[:-1], keys[1:], strict=True):
        assert not np.array_equal(np.asarray(a), np.asarray(b))
    subsets = {tuple(sorted(p.tolist())) for p in log[::2]}
    assert len(subsets) > 1


def test_updates_are_ignored_extra_args_accepted_and_chainable():
    opt = optax.chain(ausam(N_EXAMPLES, RHO, steps_per_epoch=4), optax.sgd(0.1))
    state = opt.init(PARAMS)
    kw = dict(per_example_loss_fn=make_loss(), ids=IDS)
    u_none, _ = opt.update(None, state, PARAMS, **kw)
    u_params, _ = opt.update(PARAMS, state, PARAMS, unused=1.0, value_fn=lambda p: 0.0, **kw)
    assert_tree_allclose(u_none, to_np(u_params), rtol=0, atol=0)
    g_s, _, _ = expected_sam(np.arange(BATCH))
    assert_tree_allclose(u_none, {k: -0.1 * v for k, v in g_s.items()})


def test_zero_gradient_gives_finite_update():
    opt = ausam(N_EXAMPLES, RHO, alpha=0.5, steps_per_epoch=1, full_batch_epochs=0)

    def flat(p, positions):
        return jnp.zeros(positions.shape) * jnp.sum(p["w"])

    out, state = opt.update(None, opt.init(PARAMS), PARAMS, per_example_loss_fn=flat, ids=IDS)
    for leaf in jax.tree.leaves(out):
        assert np.all(np.asarray(leaf) == 0)
    assert np.all(np.isfinite(np.asarray(state.dlp_sum)))


def test_state_is_a_namedtuple_of_arrays_and_scans():
    opt = ausam(N_EXAMPLES, RHO, alpha=0.5, steps_per_epoch=2)
    state = opt.init(PARAMS)
    assert isinstance(state, AUSAMState)
    assert all(isinstance(x, jax.Array) for x in state)

    def body(carry, _):
        params, st = carry
        g, st = opt.update(None, st, params, per_example_loss_fn=make_loss(), ids=IDS)
        return (jax.tree.map(lambda w, u: w - 0.5 * u, params, g), st), st.loss

    (params, state), losses = jax.lax.scan(body, (PARAMS, state), length=8)
    assert int(state.count) == 8
    assert np.all(np.isfinite(np.asarray(losses)))
    # every example of the batch was recorded in epoch 0 (2 steps × all B)
    assert np.all(np.asarray(state.dlp_count)[IDS] >= 2)


# ------------------------------------------------------------------------ validation


@pytest.mark.parametrize("alpha", [0.0, -0.2, 1.5, float("nan")])
def test_bad_alpha(alpha):
    with pytest.raises(ValueError, match="alpha"):
        ausam(N_EXAMPLES, steps_per_epoch=3, alpha=alpha)


def test_constructor_validation():
    with pytest.raises(TypeError, match="alpha"):
        ausam(N_EXAMPLES, steps_per_epoch=3, alpha=jnp.float32(0.5) + jax.numpy.zeros(2))
    with pytest.raises(TypeError, match="alpha"):
        ausam(N_EXAMPLES, steps_per_epoch=3, alpha=True)
    with pytest.raises(ValueError, match="rho"):
        ausam(N_EXAMPLES, -0.1, steps_per_epoch=3)
    with pytest.raises(ValueError, match="f_max"):
        ausam(N_EXAMPLES, steps_per_epoch=3, f_min=0.5, f_max=0.2)
    with pytest.raises(ValueError, match="f_min"):
        ausam(N_EXAMPLES, steps_per_epoch=3, f_min=0.0)
    with pytest.raises(ValueError, match="num_examples"):
        ausam(0, steps_per_epoch=3)
    with pytest.raises(TypeError, match="num_examples"):
        ausam(10.0, steps_per_epoch=3)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        ausam(N_EXAMPLES, steps_per_epoch=0)
    with pytest.raises(ValueError, match="trans_epoch"):
        ausam(N_EXAMPLES, steps_per_epoch=3, trans_epoch=-1)
    with pytest.raises(TypeError, match="key"):
        ausam(N_EXAMPLES, steps_per_epoch=3, key="seed")


def test_traced_alpha_is_rejected():
    def build(alpha):
        ausam(N_EXAMPLES, steps_per_epoch=3, alpha=alpha)
        return alpha

    with pytest.raises(TypeError, match="alpha"):
        jax.jit(build)(0.5)


def test_update_validation():
    opt = ausam(N_EXAMPLES, RHO, steps_per_epoch=3)
    state = opt.init(PARAMS)
    with pytest.raises(TypeError, match="per_example_loss_fn"):
        opt.update(None, state, PARAMS, ids=IDS)
    with pytest.raises(TypeError, match="ids"):
        opt.update(None, state, PARAMS, per_example_loss_fn=make_loss())
    with pytest.raises(TypeError, match="params"):
        opt.update(None, state, None, per_example_loss_fn=make_loss(), ids=IDS)
    with pytest.raises(TypeError, match="ids"):
        opt.update(None, state, PARAMS, per_example_loss_fn=make_loss(), ids=IDS.astype(float))
    for bad in (N_EXAMPLES, -1):
        ids = IDS.copy()
        ids[2] = bad
        with pytest.raises(ValueError, match="ids"):
            opt.update(None, state, PARAMS, per_example_loss_fn=make_loss(), ids=ids)
    with pytest.raises(ValueError, match="one loss per position"):
        opt.update(None, state, PARAMS, per_example_loss_fn=lambda p, pos: jnp.sum(p["w"]), ids=IDS)


def test_out_of_range_ids_under_jit_are_dropped_and_counted():
    opt = ausam(N_EXAMPLES, RHO, steps_per_epoch=3)
    ids = IDS.copy()
    ids[1], ids[4] = N_EXAMPLES + 5, -3
    out, state = run_step(opt, opt.init(PARAMS), ids=ids, jit=True)
    assert int(state.num_invalid_ids) == 2
    counts = np.asarray(state.dlp_count)
    assert counts.sum() == BATCH - 2
    assert counts[N_EXAMPLES - 3] == 0  # a negative id must not wrap around
    np.testing.assert_array_equal(counts[np.delete(IDS, [1, 4])], 1)
    g_s, _, _ = expected_sam(np.arange(BATCH))  # the gradient still uses every example
    assert_tree_allclose(out, g_s)


def test_axis_name_keeps_records_identical_across_shards():
    opt = ausam(N_EXAMPLES, RHO, alpha=0.5, steps_per_epoch=1, axis_name="d")
    x2 = np.stack([X, X[::-1]])
    y2 = np.stack([Y, Y[::-1]])
    ids2 = np.stack([IDS, (IDS + 1) % N_EXAMPLES])
    state = opt.init(PARAMS)

    def step(x, y, ids):
        return opt.update(None, state, PARAMS, per_example_loss_fn=make_loss(x=x, y=y), ids=ids)

    out, new = jax.vmap(step, axis_name="d")(x2, y2, ids2)
    for leaf in jax.tree.leaves(out):
        np.testing.assert_allclose(np.asarray(leaf[0]), np.asarray(leaf[1]))
    np.testing.assert_array_equal(np.asarray(new.dlp_sum[0]), np.asarray(new.dlp_sum[1]))
    counts = np.zeros(N_EXAMPLES, np.int64)
    np.add.at(counts, ids2.ravel(), 1)
    np.testing.assert_array_equal(np.asarray(new.dlp_count[0]), counts)


# -------------------------------------------------------------------------- docstring


def test_docstring_example_trains(capsys):
    namespace: dict = {}
    exec(compile(docstring_example(ausam_module), "ausam_example", "exec"), namespace)
    assert namespace["accuracy"] > 0.7
    assert int(namespace["opt_state"][0].count) == 6 * namespace["steps_per_epoch"]


def test_inject_hyperparams_schedules_rho():
    static = ("num_examples", "steps_per_epoch", "alpha", "trans_epoch", "full_batch_epochs", "key")
    opt = optax.inject_hyperparams(ausam, static_args=static)(
        N_EXAMPLES, rho=RHO, steps_per_epoch=4
    )
    state = opt.init(PARAMS)
    out, state = jax.jit(
        lambda st: opt.update(None, st, PARAMS, per_example_loss_fn=make_loss(), ids=IDS)
    )(state)
    g_s, _, _ = expected_sam(np.arange(BATCH))
    assert_tree_allclose(out, g_s)
    assert float(state.hyperparams["rho"]) == pytest.approx(RHO)


# ---------------------------------------------------------------------------- kernels
# Each kernel of the update on its own, against a formula written out here.


def test_kernel_valid_ids():
    n = 10
    ids = np.asarray([0, 9, 10, -1, 4, 2**31 - 1, -(2**31)], np.int32)
    safe, valid = ausam_valid_ids(jnp.asarray(ids), n)
    expected_valid = (ids >= 0) & (ids < n)
    np.testing.assert_array_equal(np.asarray(valid), expected_valid)
    np.testing.assert_array_equal(np.asarray(safe), np.where(expected_valid, ids, 0))
    assert safe.dtype == jnp.int32
    # unsigned ids: no wrap to negative, the large ones are simply out of range
    uids = np.asarray([3, 2**32 - 1, 2**31 + 3], np.uint32)
    safe, valid = ausam_valid_ids(jnp.asarray(uids), n)
    np.testing.assert_array_equal(np.asarray(valid), [True, False, False])
    np.testing.assert_array_equal(np.asarray(safe), [3, 0, 0])


def test_kernel_select_subset_draws_from_the_formula_probabilities():
    """Positions = Gumbel-top-k of p_i = s_i/Σs with s from ADLP = sum/count; unseen and
    invalid entries take the largest seen ADLP."""
    n, k = 12, 3
    dlp_sum = np.asarray([0.3, 0.0, 1.2, 0.4, 2.0, 0.0, 0.9, 0.6, 0.1, 0.0, 0.5, 3.0])
    dlp_count = np.asarray([1, 0, 3, 2, 4, 0, 1, 2, 1, 0, 1, 6])
    ids = np.asarray([0, 1, 2, 3, 4, 6, 7, 8], np.int32)  # id 1 is unseen
    valid = np.asarray([True] * 7 + [False])  # the last one is out of range
    f_min, f_max_t = 0.1, 0.35
    a = dlp_sum[ids] / np.maximum(dlp_count[ids], 1)
    seen = (dlp_count[ids] > 0) & valid
    a = np.where(seen, a, a[seen].max())
    s = f_min + (f_max_t - f_min) * (a - a.min()) / (a.max() - a.min())
    p = s / s.sum()
    for seed in range(5):
        key = jax.random.key(seed)
        got = ausam_select_subset(
            key,
            jnp.asarray(dlp_sum, jnp.float32),
            jnp.asarray(dlp_count, jnp.int32),
            jnp.asarray(ids),
            jnp.asarray(valid),
            k,
            f_min,
            f_max_t,
        )
        expected = ausam_sample_subset(key, jnp.asarray(p, jnp.float32), k)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert n == len(dlp_sum)


def test_kernel_sam_on_subset_matches_formula():
    positions = np.asarray([5, 1, 6], np.int32)
    g_s, dlp, loss = ausam_sam_on_subset(make_loss(), PARAMS, jnp.asarray(positions), RHO)
    expected_g_s, expected_dlp, expected_loss = expected_sam(positions)
    assert_tree_allclose(g_s, expected_g_s)
    np.testing.assert_allclose(np.asarray(dlp), expected_dlp, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
    assert dlp.dtype == jnp.float32 and dlp.shape == (3,)


def test_kernel_record_is_a_scatter_add_of_finite_in_range_dlps():
    n = 6
    dlp_sum = np.asarray([0.5, 0.0, 1.0, 0.2, 0.0, 0.7])
    dlp_count = np.asarray([2, 0, 1, 1, 0, 3])
    record_ids = np.asarray([1, 3, 3, -1, 6, 4, 0])
    dlp = np.asarray([0.25, 0.5, 0.125, 9.0, 9.0, np.nan, 1.5])
    new_sum, new_count = ausam_record(
        jnp.asarray(dlp_sum, jnp.float32),
        jnp.asarray(dlp_count, jnp.int32),
        jnp.asarray(record_ids, jnp.int32),
        jnp.asarray(dlp, jnp.float32),
    )
    expected_sum, expected_count = dlp_sum.copy(), dlp_count.copy()
    for i, d in zip(record_ids, dlp, strict=True):
        if 0 <= i < n and np.isfinite(d):
            expected_sum[i] += d
            expected_count[i] += 1
    np.testing.assert_allclose(np.asarray(new_sum), expected_sum, rtol=1e-7)
    np.testing.assert_array_equal(np.asarray(new_count), expected_count)
    assert new_sum.dtype == jnp.float32 and new_count.dtype == jnp.int32
    # the running mean after the update: (old mean · old count + Σ new) / new count
    np.testing.assert_allclose(float(new_sum[3] / new_count[3]), (0.2 + 0.5 + 0.125) / 3)
