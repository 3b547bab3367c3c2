"""ρ checked inside the step (SAM, ASAM, BSAM): a scheduled or injected radius that is not
finite and ≥ 0 at some step skips that step — zero update, ``value_fn`` not evaluated, the
base optimizer's state kept — and counts it in ``state.num_skipped``, as AGS does for σ.

Construction checks a schedule at count 0 only; these schedules pass it and turn bad later.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from shared_problems import make_params, np_norm, quartic_grad_np, quartic_loss, to_np

from agsopt.sharpness import bsam, sam


def _sam_np(w, rho):
    g = quartic_grad_np(w)
    return quartic_grad_np({k: w[k] + rho * g[k] / np_norm(g) for k in w})


def _negative_after(steps, start=0.05):  # ρ(c) = start − (start/(steps − ½))·c: < 0 at c = steps
    return lambda c: start - start / (steps - 0.5) * c


def _nan_at(step, value=0.05):
    return lambda c: jnp.where(c == step, jnp.nan, value)


def _run(opt, params, steps, count_calls=False):
    """``steps`` jitted updates at fixed params; the updates of each, the last state and, with
    ``count_calls``, how many times each step evaluated the loss."""
    calls = []

    def loss(p):
        if count_calls:
            jax.debug.callback(lambda: calls.append(1))
        return quartic_loss(p)

    update = jax.jit(lambda s: opt.update(jax.grad(quartic_loss)(params), s, params, value_fn=loss))
    state, out, per_step = opt.init(params), [], []
    for _ in range(steps):
        before = len(calls)
        updates, state = update(state)
        jax.block_until_ready(updates)
        jax.effects_barrier()
        out.append(updates)
        per_step.append(len(calls) - before)
    return out, state, per_step


def _is_zero(tree):
    return all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_sam_skips_a_step_whose_scheduled_rho_is_invalid(bad, adaptive):
    rho = _negative_after(2) if bad == "negative" else _nan_at(1)
    bad_steps = {2} if bad == "negative" else {1}
    params = make_params()
    out, state, calls = _run(sam(rho, adaptive=adaptive), params, 3, count_calls=True)
    for k, updates in enumerate(out):
        if k in bad_steps:
            assert _is_zero(updates)
            assert calls[k] == 0  # nothing evaluated
        else:
            assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
            assert not _is_zero(updates)
            assert calls[k] > 0
            if not adaptive:
                expected = _sam_np(to_np(params), float(rho(k)))
                for name in expected:
                    np.testing.assert_allclose(updates[name], expected[name], rtol=1e-5)
    assert int(state.num_skipped) == len(bad_steps)
    assert int(state.count) == 3


def test_sam_injected_negative_rho_is_skipped():
    params = make_params()
    opt = optax.inject_hyperparams(sam)(rho=0.05)
    state = opt.init(params)
    update = jax.jit(
        lambda s: opt.update(jax.grad(quartic_loss)(params), s, params, value_fn=quartic_loss)
    )
    updates, state = update(state)
    assert not _is_zero(updates)
    state.hyperparams["rho"] = jnp.asarray(-0.05)  # would flip ε into a descent step
    updates, state = update(state)
    assert _is_zero(updates)
    assert int(state.inner_state.num_skipped) == 1


@pytest.mark.parametrize("which", ["rho_max", "rho_min"])
@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_bsam_skips_a_step_whose_scheduled_rho_is_invalid(which, bad):
    schedule = _negative_after(2, 0.02) if bad == "negative" else _nan_at(1, 0.02)
    bad_step = 2 if bad == "negative" else 1
    kwargs = {"rho_max": 0.05, "rho_min": 0.02, which: schedule}
    params = make_params()
    out, state, calls = _run(bsam(**kwargs), params, 3, count_calls=True)
    for k, updates in enumerate(out):
        assert _is_zero(updates) == (k == bad_step)
        assert (calls[k] == 0) == (k == bad_step)
        assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))
    assert int(state.num_skipped) == 1


@pytest.mark.parametrize("step_from", ["params", "min_point"])
def test_bsam_with_base_keeps_its_state_on_a_skipped_step(step_from):
    """A skipped step leaves the base optimizer's momentum as it was (and, with min_point,
    does not move the parameters by −ρ_min ĝ either)."""
    base = optax.sgd(0.1, momentum=0.9)
    opt = bsam(0.05, _negative_after(1, 0.02), step_from=step_from, base=base)
    params = make_params()
    out, state, _ = _run(opt, params, 2)
    assert not _is_zero(out[0])
    assert _is_zero(out[1])
    first_state = _run(opt, params, 1)[1]
    for kept, before in zip(
        jax.tree.leaves(state.base_state), jax.tree.leaves(first_state.base_state), strict=True
    ):
        np.testing.assert_array_equal(kept, before)
    assert int(state.num_skipped) == 1


def test_constant_rho_is_never_skipped():
    params = make_params()
    for opt in (sam(0.05), bsam(0.05, 0.02)):
        out, state, _ = _run(opt, params, 2)
        assert int(state.num_skipped) == 0
        assert not any(_is_zero(u) for u in out)
