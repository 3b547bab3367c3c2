"""AUSAM's ``full_batch`` and vSAM's ``sam_step`` hints (issue #19).

Under ``jit`` both transformations choose a branch with ``lax.cond``; on XLA:CPU a
convolution's gradient inside a branch runs ≈ 20× slower than outside. A static hint makes
the hinted branch straight-line code (a training loop compiles one program per phase).
These tests check the two promises, without timing anything:

- *structure*: with a hint, the loss (its marker primitive ``sin``) is evaluated at the top
  level of the program, outside every ``cond``; without one, only inside a ``cond``;
- *results*: every hint, right or wrong, gives the default trajectory (a wrong hint only
  costs both branches), so hints never change what is computed.
"""

from __future__ import annotations

import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agsopt import ausam, vsam
from agsopt.sharpness import VSAMState, vsam_sam_step_hint

N_EXAMPLES, BATCH, DIM, CLASSES = 24, 8, 3, 4
STEPS_PER_EPOCH = N_EXAMPLES // BATCH
_rng = np.random.default_rng(0)
X = jnp.asarray(_rng.normal(size=(N_EXAMPLES, DIM)), jnp.float32)
Y = jnp.asarray(_rng.integers(0, CLASSES, size=N_EXAMPLES), jnp.int32)
PARAMS = {
    "b": jnp.zeros(CLASSES, jnp.float32),
    "w": jnp.asarray(_rng.normal(size=(DIM, CLASSES)), jnp.float32),
}


def per_example(params, x, y):
    """Softmax cross-entropy of a linear model; ``sin`` marks where the loss is evaluated."""
    logits = jnp.sin(x) @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y)


def mean_loss(params, x, y):
    return jnp.mean(per_example(params, x, y))


def top_level_primitives(jaxpr) -> set[str]:
    """Primitive names of ``jaxpr`` outside ``cond``/``while`` (inlined calls followed)."""
    names: set[str] = set()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in ("cond", "while"):
            names.add(name)
            continue
        names.add(name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    names |= top_level_primitives(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    names |= top_level_primitives(sub)
    return names


# --------------------------------------------------------------------------- AUSAM


def ausam_opt(full_batch_epochs=1):
    return optax.chain(
        ausam(
            N_EXAMPLES,
            0.1,
            steps_per_epoch=STEPS_PER_EPOCH,
            alpha=0.5,
            trans_epoch=2,
            full_batch_epochs=full_batch_epochs,
            key=3,
        ),
        optax.sgd(0.1, momentum=0.9),
    )


def ausam_update(opt, params, state, ids, full_batch=None):
    xb, yb = X[ids], Y[ids]

    def per_example_loss_fn(p, positions):
        return per_example(p, xb[positions], yb[positions])

    kwargs = {} if full_batch is None else {"full_batch": full_batch}
    updates, state = opt.update(
        None, state, params, per_example_loss_fn=per_example_loss_fn, ids=ids, **kwargs
    )
    return optax.apply_updates(params, updates), state


@pytest.mark.parametrize("full_batch", [True, False])
def test_ausam_hinted_branch_is_outside_every_cond(full_batch):
    opt = ausam_opt()
    state = opt.init(PARAMS)
    ids = jnp.arange(BATCH)
    default = jax.make_jaxpr(lambda p, s: ausam_update(opt, p, s, ids))(PARAMS, state)
    hinted = jax.make_jaxpr(lambda p, s: ausam_update(opt, p, s, ids, full_batch))(PARAMS, state)
    assert "sin" not in top_level_primitives(default.jaxpr)  # only inside the lax.cond
    assert "sin" in top_level_primitives(hinted.jaxpr)
    # the hinted branch evaluates B (full batch) or k = B/2 (sampled) examples outside the cond
    sin_shapes = {
        tuple(eqn.outvars[0].aval.shape) for eqn in hinted.jaxpr.eqns if eqn.primitive.name == "sin"
    }
    assert sin_shapes == {(BATCH if full_batch else BATCH // 2, DIM)}


@functools.lru_cache(maxsize=1)
def _ausam_default(steps):
    return _ausam_run(lambda i: None, steps)


def _ausam_run(hints, steps):
    opt = ausam_opt()
    step = jax.jit(functools.partial(ausam_update, opt), static_argnames="full_batch")
    params, state = PARAMS, opt.init(PARAMS)
    order = np.random.default_rng(1)
    for i in range(steps):
        ids = jnp.asarray(order.permutation(N_EXAMPLES)[:BATCH], jnp.int32)
        params, state = step(params, state, ids, full_batch=hints(i))
    return params, state


def assert_same_run(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize(
    "hints",
    [
        lambda i: i < STEPS_PER_EPOCH,  # right: the first epoch is full-batch
        lambda i: True,  # wrong from epoch 1 on
        lambda i: False,  # wrong in epoch 0
        lambda i: i % 2 == 0,
    ],
    ids=["right", "always-full", "always-sampled", "alternating"],
)
def test_ausam_any_hint_gives_the_default_trajectory(hints):
    steps = 3 * STEPS_PER_EPOCH
    default = _ausam_default(steps)
    assert_same_run(_ausam_run(hints, steps), default)
    _, state = default
    assert int(state[0].dlp_count.sum()) == STEPS_PER_EPOCH * BATCH + 2 * STEPS_PER_EPOCH * (
        BATCH // 2
    )


def test_ausam_hint_is_ignored_where_there_is_no_choice():
    """full_batch_epochs=0: every step samples, whatever the hint says."""
    opt = ausam_opt(full_batch_epochs=0)
    state = opt.init(PARAMS)
    ids = jnp.arange(BATCH)
    step = jax.jit(functools.partial(ausam_update, opt), static_argnames="full_batch")
    want = step(PARAMS, state, ids)
    for hint in (True, False):
        assert_same_run(step(PARAMS, state, ids, full_batch=hint), want)


# --------------------------------------------------------------------------- vSAM

WARMUP, WINDOW = 4, 6


def vsam_opt():
    return optax.chain(
        vsam(0.05, warmup_steps=WARMUP, window=WINDOW, var_blocks=3, max_p=0.8, last_layer=None),
        optax.sgd(0.1, momentum=0.9),
    )


def vsam_update(opt, params, state, ids, sam_step=None):
    x, y = X[ids], Y[ids]
    grads = jax.grad(mean_loss)(params, x, y)
    kwargs = {} if sam_step is None else {"sam_step": sam_step}
    updates, state = opt.update(
        grads, state, params, value_fn=lambda p: mean_loss(p, x, y), **kwargs
    )
    return optax.apply_updates(params, updates), state


def test_vsam_hinted_sam_step_is_outside_every_cond():
    opt = vsam_opt()
    state = opt.init(PARAMS)
    ids = jnp.arange(BATCH)

    def sin_count(sam_step):
        jaxpr = jax.make_jaxpr(lambda p, s: vsam_update(opt, p, s, ids, sam_step))(PARAMS, state)
        return sum(e.primitive.name == "sin" for e in jaxpr.jaxpr.eqns)

    # the caller's gradient evaluates the loss once outside; a hinted SAM step once more
    assert sin_count(None) == sin_count(False) == 1
    assert sin_count(True) == 2


@functools.lru_cache(maxsize=1)
def _vsam_default(steps):
    return _vsam_run(lambda i, s: None, steps)


def _vsam_run(hints, steps):
    opt = vsam_opt()
    step = jax.jit(functools.partial(vsam_update, opt), static_argnames="sam_step")
    params, state = PARAMS, opt.init(PARAMS)
    order = np.random.default_rng(2)
    flags, given = [], []
    for i in range(steps):
        ids = jnp.asarray(order.permutation(N_EXAMPLES)[:BATCH], jnp.int32)
        hint = hints(i, state)
        given.append(hint)
        params, state = step(params, state, ids, sam_step=hint)
        flags.append(bool(state[0].last_was_sam))
    return (params, state), flags, given


@pytest.mark.parametrize(
    "hints",
    [
        lambda i, s: vsam_sam_step_hint(s[0], warmup_steps=WARMUP),
        lambda i, s: True,
        lambda i, s: False,
        lambda i, s: i % 3 == 0,
    ],
    ids=["helper", "always-sam", "never", "every-third"],
)
def test_vsam_any_hint_gives_the_default_trajectory(hints):
    steps = WARMUP + 4 * WINDOW
    default, flags, _ = _vsam_default(steps)
    got, got_flags, _ = _vsam_run(hints, steps)
    assert got_flags == flags
    assert_same_run(got, default)
    assert all(flags[:WARMUP]) and 0 < sum(flags[WARMUP:]) < 4 * WINDOW


def test_vsam_sam_step_hint_names_the_known_sam_steps():
    steps = WARMUP + 6 * WINDOW
    _, flags, given = _vsam_run(lambda i, s: vsam_sam_step_hint(s[0], warmup_steps=WARMUP), steps)
    for i, (flag, hint) in enumerate(zip(flags, given, strict=True)):
        window_start = i >= WARMUP and (i - WARMUP) % WINDOW == 0
        # True exactly on the SAM steps the state already knows (all but window starts)
        assert hint == (flag and not window_start), i


def assert_close_run(a, b):
    """Eager and jitted runs: the same steps, rounded apart (XLA fuses differently)."""
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert jnp.result_type(x) == jnp.result_type(y)  # no dtype drift in the eager state
        x, y = np.asarray(x), np.asarray(y)
        if np.issubdtype(x.dtype, np.floating):
            np.testing.assert_allclose(x, y, rtol=2e-5, atol=1e-6)
        else:
            np.testing.assert_array_equal(x, y)


def _eager_run(update, opt, steps, seed, **hint):
    """The run of ``_ausam_run``/``_vsam_run`` with ``update`` called outside ``jit``."""
    params, state = PARAMS, opt.init(PARAMS)
    order = np.random.default_rng(seed)
    for _ in range(steps):
        ids = jnp.asarray(order.permutation(N_EXAMPLES)[:BATCH], jnp.int32)
        params, state = update(opt, params, state, ids, **hint)
    return params, state


def _no_cond(monkeypatch):
    """Make ``lax.cond`` fail: an eager step must pick its branch in Python."""

    def refuse(*args, **kwargs):
        raise AssertionError("lax.cond called eagerly (it recompiles both branches each call)")

    monkeypatch.setattr(jax.lax, "cond", refuse)


@pytest.mark.parametrize("hint", [None, True])
def test_ausam_eager_update_is_the_jitted_trajectory_without_cond(monkeypatch, hint):
    steps = 3 * STEPS_PER_EPOCH
    default = _ausam_default(steps)
    _no_cond(monkeypatch)
    kwargs = {} if hint is None else {"full_batch": hint}
    assert_close_run(_eager_run(ausam_update, ausam_opt(), steps, 1, **kwargs), default)


@pytest.mark.parametrize("hint", [None, False])
def test_vsam_eager_update_is_the_jitted_trajectory_without_cond(monkeypatch, hint):
    steps = WARMUP + 4 * WINDOW
    (default, _, _) = _vsam_default(steps)
    _no_cond(monkeypatch)
    kwargs = {} if hint is None else {"sam_step": hint}
    assert_close_run(_eager_run(vsam_update, vsam_opt(), steps, 2, **kwargs), default)


def test_hints_must_be_static_bools():
    opt, vopt = ausam_opt(), vsam_opt()
    ids = jnp.arange(BATCH)
    for bad in (1, "yes", jnp.asarray(True)):
        with pytest.raises(TypeError, match="full_batch"):
            ausam_update(opt, PARAMS, opt.init(PARAMS), ids, bad)
        with pytest.raises(TypeError, match="sam_step"):
            vsam_update(vopt, PARAMS, vopt.init(PARAMS), ids, bad)
    state = vopt.init(PARAMS)
    with pytest.raises(TypeError, match="VSAMState"):
        vsam_sam_step_hint(state, warmup_steps=WARMUP)  # the chain's state, not opt_state[0]
    assert isinstance(state[0], VSAMState)
    with pytest.raises(ValueError, match="warmup_steps"):
        vsam_sam_step_hint(state[0], warmup_steps=-1)


# --------------------------------------------------------------------------- shard_map

SHARDED_SCRIPT = r"""
import functools, json
import jax, jax.numpy as jnp, numpy as np, optax
from jax.sharding import Mesh, PartitionSpec as P
from agsopt import ausam, vsam

mesh = Mesh(np.array(jax.devices()), ("b",))
rng = np.random.default_rng(0)
n, batch, dim, classes = 32, 16, 3, 4
x_all = jnp.asarray(rng.normal(size=(n, dim)), jnp.float32)
y_all = jnp.asarray(rng.integers(0, classes, size=n), jnp.int32)
params = {"b": jnp.zeros(classes), "w": jnp.asarray(rng.normal(size=(dim, classes)), jnp.float32)}

def per_example(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(jnp.sin(x) @ p["w"] + p["b"], y)

a_opt = optax.chain(ausam(n, 0.1, steps_per_epoch=2, alpha=0.5, key=1, axis_name="b"),
                    optax.sgd(0.1))
v_opt = optax.chain(vsam(0.05, warmup_steps=2, window=4, var_blocks=2, key=1, axis_name="b"),
                    optax.sgd(0.1))

def a_step(p, s, x, y, ids, hint):
    u, s = a_opt.update(None, s, p, ids=ids, full_batch=hint,
                        per_example_loss_fn=lambda q, pos: per_example(q, x[pos], y[pos]))
    return optax.apply_updates(p, u), s

def v_step(p, s, x, y, ids, hint):
    loss = lambda q: jnp.mean(per_example(q, x, y))
    u, s = v_opt.update(jax.grad(loss)(p), s, p, value_fn=loss, sam_step=hint)
    return optax.apply_updates(p, u), s

def run(step, opt, hints):
    programs = {}
    p, s = params, opt.init(params)
    for i in range(8):
        hint = hints(i)
        if hint not in programs:
            programs[hint] = jax.jit(jax.shard_map(
                functools.partial(step, hint=hint), mesh=mesh,
                in_specs=(P(), P(), P("b"), P("b"), P("b")), out_specs=(P(), P()),
                check_vma=False))
        ids = jnp.asarray(rng.permutation(n)[:batch], jnp.int32)
        p, s = programs[hint](p, s, x_all[ids], y_all[ids], ids)
    return [np.asarray(leaf, np.float64).tolist() for leaf in jax.tree.leaves((p, s))]

out = {}
for name, step, opt in (("ausam", a_step, a_opt), ("vsam", v_step, v_opt)):
    rng = np.random.default_rng(5)
    default = run(step, opt, lambda i: None)
    gaps = []
    for hints in (lambda i: i < 2, lambda i: True, lambda i: False):
        rng = np.random.default_rng(5)
        got = run(step, opt, hints)
        gaps.append(max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0))
                        for a, b in zip(got, default)))
    out[name] = max(gaps)
print(json.dumps(out))
"""


def test_hints_keep_the_sharded_m_sharpness_results():
    """Under shard_map (4 virtual devices, axis_name): every hint gives the default run."""
    import json
    import subprocess
    import sys

    from markdown_blocks import ROOT, device_env

    completed = subprocess.run(
        [sys.executable, "-c", SHARDED_SCRIPT],
        cwd=ROOT,
        env=device_env(4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    gaps = json.loads(completed.stdout.strip().splitlines()[-1])
    assert gaps["ausam"] < 1e-5 and gaps["vsam"] < 1e-5, gaps
