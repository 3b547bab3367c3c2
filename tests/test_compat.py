"""agsopt's transformations inside the Optax/Flax/Optimistix machinery.

Each test names one combination: ``optax.chain``, ``optax.inject_hyperparams``,
``optax.MultiSteps``, ``optax.apply_if_finite``, ``flax.nnx.Optimizer`` and
``optimistix.OptaxMinimiser``. The generic ones run the transformations of
``tests/transformations.py`` through its calling protocol: one entry per public factory
(or fewer, where a case is slow) by default, the others under ``-m slow``. Findings the
README relies on are asserted here, so they stay true:

- ``optax.MultiSteps(opt, k)`` calls ``opt.update`` on *every* micro-step (optax 0.2.8,
  ``transforms/_accumulation.py``, ``_do_update``) but keeps the inner state only from the
  micro-step that emits. Wrapped inside it, AGS spends its evaluations on every micro-step
  while its state counts only the emitting one, the key is reused within the k micro-steps,
  and the emitted gradient is the estimate of the *last* micro-batch alone (AGS ignores the
  accumulated gradient it is handed); SAM likewise returns the last micro-batch's perturbed
  gradient. Accumulate *after* the estimator instead:
  ``optax.chain(agsopt.ags(...), optax.MultiSteps(base, k).gradient_transformation())``
  averages the k per-micro-batch estimates.
- ``optax.apply_if_finite`` tests the *incoming* updates. SAM: a NaN loss gives a NaN
  gradient, the step is skipped and counted. AGS ignores its incoming updates, so with a
  zero-order caller (zeros as updates) apply_if_finite never fires; AGS itself leaves out
  non-finite samples, counts them in ``num_nonfinite`` and returns a zero update when none
  is finite.
- optimistix 0.1.0 ``OptaxMinimiser.step`` (``optimistix/_solver/optax.py``, lines
  104-106) calls ``optim.update(grads, opt_state, y, value=f, grad=grads,
  value_fn=lambda y: fn(y, args)[0])``: ``value_fn`` arrives, so AGS and SAM work
  unchanged. It always differentiates ``fn`` first (line 94, ``eqx.filter_value_and_grad``),
  so a black box without a JVP must be wrapped in ``jax.lax.stop_gradient``.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import optimistix as optx
import pytest
from flax import nnx
from transformations import REGISTRY, Problem, cases, representatives, select

import agsopt

PARAMS = {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array([0.3])}
BATCHES = [jnp.array([0.1, 0.2, 0.3]) * (i + 1) for i in range(3)]
SIGMA, N = 0.3, 4


def loss(p, batch=BATCHES[0]):
    return jnp.sum((p["w"] - batch) ** 2) + jnp.sum(jnp.cos(3.0 * p["w"])) + jnp.sum(p["b"] ** 2)


def value_fn_for(batch):
    return lambda p: loss(p, batch)


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def per_example_for(batch):
    """The loss per coordinate of ``w`` (AUSAM's examples): ``loss = 3 · mean``."""

    def per_example_loss_fn(p, positions):
        w, target = p["w"][positions], batch[positions]
        return 3.0 * ((w - target) ** 2 + jnp.cos(3.0 * w)) + jnp.sum(p["b"] ** 2)

    return per_example_loss_fn


def problem_for(batch, fn=loss):
    return Problem(lambda p: fn(p, batch), per_example_for(batch), jnp.arange(3))


OVERRIDES = {  # file-specific: AGS isotropic (cheap) with N samples; AUSAM on ≥ 3 examples
    "ags": {"covariance": "isotropic", "num_samples": N, "key": 5},
    "ausam": {"num_examples": 4, "steps_per_epoch": 1},
}
ENTRIES = select(alias=False)  # the aliases are ags chained with a base: tests/test_registry.py
DEFAULT = representatives()  # one entry per public factory by default, the others when slow


def make(entry):
    return entry.make(**OVERRIDES.get(entry.name, {}))


def jitted_update(entry, opt, fn=loss):
    """``jit`` of ``entry.update`` on ``problem_for(batch, fn)``: one compilation, cheap steps."""
    return jax.jit(lambda u, s, p, batch: entry.update(opt, u, s, p, problem_for(batch, fn)))


AGS = REGISTRY["ags"]


# --------------------------------------------------------------------------- optax.chain


@pytest.mark.parametrize("entry", cases(ENTRIES, default=DEFAULT))
def test_chain_passes_extra_args_through_nested_chains(entry):
    """``chain(chain(t), clip, adam)`` equals ``t`` then clip then adam by hand."""
    tail = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.1))
    opt = optax.chain(optax.chain(make(entry)), tail)
    inner = make(entry)
    state, inner_state, tail_state = opt.init(PARAMS), inner.init(PARAMS), tail.init(PARAMS)
    opt_update, inner_update = jitted_update(entry, opt), jitted_update(entry, inner)
    params = PARAMS
    for batch in BATCHES:
        grads = jax.grad(loss)(params, batch)
        updates, state = opt_update(grads, state, params, batch)
        direction, inner_state = inner_update(grads, inner_state, params, batch)
        expected, tail_state = tail.update(direction, tail_state, params)
        assert_trees_close(updates, expected)
        params = optax.apply_updates(params, updates)


# --------------------------------------------------------------------------- inject_hyperparams


@pytest.mark.parametrize("entry", cases(ENTRIES, default=DEFAULT))
def test_inject_hyperparams_gives_the_same_steps(entry):
    """``inject_hyperparams(factory, static_args)(**kwargs)`` steps as ``factory(**kwargs)``."""
    kwargs = {**entry.kwargs, **OVERRIDES.get(entry.name, {})}
    injected = optax.inject_hyperparams(entry.factory, static_args=entry.static_args)(**kwargs)
    direct = entry.factory(**kwargs)
    state, direct_state, params = injected.init(PARAMS), direct.init(PARAMS), PARAMS
    injected_update, direct_update = jitted_update(entry, injected), jitted_update(entry, direct)
    for batch in BATCHES[:2]:
        updates, state = injected_update(None, state, params, batch)
        expected, direct_state = direct_update(None, direct_state, params, batch)
        assert_trees_close(updates, expected, rtol=1e-5, atol=1e-6)
        assert_trees_close(state.inner_state, direct_state, rtol=1e-5, atol=1e-6)
        params = optax.apply_updates(params, updates)


def test_inject_hyperparams_sigma_change_takes_effect():
    # (that the injected ags steps as ags: test_inject_hyperparams_gives_the_same_steps)
    opt = optax.inject_hyperparams(agsopt.ags, static_args=AGS.static_args)(
        **{**AGS.kwargs, **OVERRIDES["ags"]}
    )
    problem = problem_for(BATCHES[0])
    state = opt.init(PARAMS)
    _, state = AGS.update(opt, PARAMS, state, PARAMS, problem)
    state.hyperparams["sigma"] = jnp.asarray(1.5)  # mid-run change
    inner_before = state.inner_state
    updates, state = AGS.update(opt, PARAMS, state, PARAMS, problem)
    changed = AGS.make(**{**OVERRIDES["ags"], "sigma": 1.5})
    new, _ = AGS.update(changed, PARAMS, inner_before, PARAMS, problem)
    old, _ = AGS.update(make(AGS), PARAMS, inner_before, PARAMS, problem)
    assert_trees_close(updates, new)
    assert not np.allclose(np.asarray(updates["w"]), np.asarray(old["w"]))


RHO_CASES = {  # registry entry, the hyperparameter changed, overrides
    "sam-rho": ("sam", "rho", {}),
    "bsam-rho_max": ("bsam", "rho_max", {}),
    "vsam-rho": ("vsam", "rho", {"warmup_steps": 2}),  # both steps SAM steps
}


@pytest.mark.parametrize("case", sorted(RHO_CASES))
def test_inject_hyperparams_rho_change_takes_effect(case):
    name, hyperparameter, overrides = RHO_CASES[case]
    entry = REGISTRY[name]
    kwargs = {**entry.kwargs, **overrides, hyperparameter: 0.05}
    opt = optax.inject_hyperparams(entry.factory, static_args=entry.static_args)(**kwargs)
    problem = problem_for(BATCHES[0])
    state = opt.init(PARAMS)
    grads = jax.grad(loss)(PARAMS)
    first, state = entry.update(opt, grads, state, PARAMS, problem)
    state.hyperparams[hyperparameter] = jnp.asarray(0.5)  # mid-run change
    inner_before = state.inner_state
    second, state = entry.update(opt, grads, state, PARAMS, problem)
    direct = entry.factory(**{**kwargs, hyperparameter: 0.5})
    expected, _ = entry.update(direct, grads, inner_before, PARAMS, problem)
    assert_trees_close(second, expected)
    # the same gradient, only ρ changed: the perturbed gradient moved
    assert not np.allclose(np.asarray(first["w"]), np.asarray(second["w"]))


def test_inject_hyperparams_learning_rate_in_chain():
    opt = optax.chain(
        optax.inject_hyperparams(agsopt.ags, static_args=("num_samples",))(
            sigma=SIGMA, num_samples=N, key=5
        ),
        optax.inject_hyperparams(optax.sgd)(learning_rate=0.1),
    )
    state = opt.init(PARAMS)
    state[1].hyperparams["learning_rate"] = jnp.asarray(0.0)
    updates, state = opt.update(PARAMS, state, PARAMS, value_fn=loss)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    state[1].hyperparams["learning_rate"] = jnp.asarray(0.1)
    smoothing_state = state[0].inner_state
    updates, state = opt.update(PARAMS, state, PARAMS, value_fn=loss)
    estimate, _ = agsopt.ags(SIGMA, N).update(PARAMS, smoothing_state, PARAMS, value_fn=loss)
    assert_trees_close(updates, jax.tree.map(lambda g: -0.1 * g, estimate))


def test_alias_factories_take_static_args():
    # ags_gd & co. spell out ags's keywords in their signatures, so inject_hyperparams can
    # name num_samples (static) and inject σ and the learning rate (they once could not:
    # ``**ags_kwargs`` reached ags as a keyword ``ags_kwargs``).
    opt = optax.inject_hyperparams(agsopt.ags_gd, static_args=("num_samples", "key"))(
        learning_rate=0.1, sigma=SIGMA, num_samples=N
    )
    state = opt.init(PARAMS)
    assert set(state.hyperparams) == {"learning_rate", "sigma"}
    assert float(state.hyperparams["sigma"]) == pytest.approx(SIGMA)


# --------------------------------------------------------------------------- MultiSteps


def _counting_loss(counter):
    def fn(p, batch):
        jax.debug.callback(lambda _: counter.append(1), p["w"][0])  # once per evaluation
        return loss(p, batch)

    return fn


def test_multisteps_runs_the_inner_estimator_every_micro_step():
    k, counter = len(BATCHES), []
    counted = _counting_loss(counter)
    opt = optax.MultiSteps(optax.chain(make(AGS), optax.sgd(1.0)), k)
    state, update = opt.init(PARAMS), jitted_update(AGS, opt, counted)
    for batch in BATCHES:
        updates, state = update(optax.tree.zeros_like(PARAMS), state, PARAMS, batch)
    smoothing = state.inner_opt_state[0]
    jax.effects_barrier()  # debug callbacks run asynchronously
    assert len(counter) == k * 2 * N  # every micro-step ran the estimator ...
    assert int(smoothing.num_evaluations) == 2 * N  # ... but only the emitting one is kept
    assert int(smoothing.count) == 1
    # the emitted update is the estimate of the last micro-batch alone (same key each time)
    alone = make(AGS)
    last, _ = jitted_update(AGS, alone)(PARAMS, alone.init(PARAMS), PARAMS, BATCHES[-1])
    assert_trees_close(updates, jax.tree.map(jnp.negative, last))


def test_estimator_before_multisteps_averages_micro_batches():
    k, counter = len(BATCHES), []
    counted = _counting_loss(counter)
    accumulate = optax.MultiSteps(optax.sgd(1.0), k).gradient_transformation()
    opt = optax.chain(make(AGS), accumulate)
    state, update = opt.init(PARAMS), jitted_update(AGS, opt, counted)
    alone = make(AGS)
    alone_state, alone_update, estimates = alone.init(PARAMS), jitted_update(AGS, alone), []
    for i, batch in enumerate(BATCHES):
        updates, state = update(PARAMS, state, PARAMS, batch)
        if i < k - 1:
            assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
        estimate, alone_state = alone_update(PARAMS, alone_state, PARAMS, batch)
        estimates.append(estimate)
    jax.effects_barrier()
    assert len(counter) == k * 2 * N
    assert int(state[0].num_evaluations) == k * 2 * N
    mean = jax.tree.map(lambda *e: -sum(e) / k, *estimates)
    assert_trees_close(updates, mean, rtol=1e-5, atol=1e-6)


def test_sam_inside_multisteps_uses_the_last_micro_batch_only():
    k = len(BATCHES)
    inside = optax.MultiSteps(optax.chain(agsopt.sam(0.05), optax.sgd(1.0)), k)
    outside = optax.chain(
        agsopt.sam(0.05), optax.MultiSteps(optax.sgd(1.0), k).gradient_transformation()
    )
    s_in, s_out = inside.init(PARAMS), outside.init(PARAMS)
    sam, sharp = agsopt.sam(0.05), []
    grads = [jax.grad(loss)(PARAMS, b) for b in BATCHES]
    for g, batch in zip(grads, BATCHES, strict=True):
        u_in, s_in = inside.update(g, s_in, PARAMS, value_fn=value_fn_for(batch))
        u_out, s_out = outside.update(g, s_out, PARAMS, value_fn=value_fn_for(batch))
        sharp.append(sam.update(g, sam.init(PARAMS), PARAMS, value_fn=value_fn_for(batch))[0])
    mean_grad = jax.tree.map(lambda *x: sum(x) / k, *grads)
    last_only, _ = sam.update(
        mean_grad, sam.init(PARAMS), PARAMS, value_fn=value_fn_for(BATCHES[-1])
    )
    assert_trees_close(u_in, jax.tree.map(jnp.negative, last_only), rtol=1e-5, atol=1e-6)
    mean_sharp = jax.tree.map(lambda *x: -sum(x) / k, *sharp)
    assert_trees_close(u_out, mean_sharp, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- apply_if_finite


def nan_at(batch_is_bad):
    def fn(p):  # a NaN loss whose gradient is NaN too (a bad batch, an overflow)
        return loss(p) * jnp.where(batch_is_bad, jnp.nan, 1.0)

    return fn


def test_apply_if_finite_skips_and_counts_a_nan_step_for_sam():
    opt = optax.apply_if_finite(optax.chain(agsopt.sam(0.05), optax.sgd(0.1)), 2)
    state, params = opt.init(PARAMS), PARAMS
    for bad in (False, True, False):
        value_fn = nan_at(bad)
        grads = jax.grad(value_fn)(params)
        updates, state = opt.update(grads, state, params, value_fn=value_fn)
        new_params = optax.apply_updates(params, updates)
        if bad:
            assert_trees_equal(new_params, params)
            assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
            assert int(state.inner_state[0].count) == 1  # SAM's state untouched
        else:
            assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(new_params))
        params = new_params
    assert int(state.total_notfinite) == 1 and int(state.notfinite_count) == 0
    assert int(state.inner_state[0].count) == 2


def test_apply_if_finite_gives_up_after_max_consecutive_errors():
    opt = optax.apply_if_finite(optax.chain(agsopt.sam(0.05), optax.sgd(0.1)), 1)
    state = opt.init(PARAMS)
    value_fn = nan_at(True)
    grads = jax.grad(value_fn)(PARAMS)
    u1, state = opt.update(grads, state, PARAMS, value_fn=value_fn)
    u2, state = opt.update(grads, state, PARAMS, value_fn=value_fn)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(u1))
    assert all(np.all(np.isnan(np.asarray(u))) for u in jax.tree.leaves(u2))  # accepted
    assert int(state.total_notfinite) == 2


def test_apply_if_finite_after_sam_catches_a_nan_perturbed_pass():
    """NaN only at w + ε: the incoming g is finite, so wrap the base optimizer instead."""
    value_fn = lambda p: loss(p) * jnp.where(p["w"][0] > PARAMS["w"][0] + 1e-3, jnp.nan, 1.0)
    grads = jax.grad(loss)(PARAMS)
    outer = optax.apply_if_finite(optax.chain(agsopt.sam(0.5), optax.sgd(0.1)), 2)
    updates, _ = outer.update(grads, outer.init(PARAMS), PARAMS, value_fn=value_fn)
    assert np.isnan(np.asarray(updates["w"])).all()  # g was finite: not caught
    inner = optax.chain(agsopt.sam(0.5), optax.apply_if_finite(optax.sgd(0.1), 2))
    updates, state = inner.update(grads, inner.init(PARAMS), PARAMS, value_fn=value_fn)
    assert all(np.all(np.asarray(u) == 0) for u in jax.tree.leaves(updates))
    assert int(state[1].total_notfinite) == 1


def test_apply_if_finite_skips_and_counts_a_nan_step_for_ags_given_gradients():
    opt = optax.apply_if_finite(optax.chain(agsopt.ags(SIGMA, N, key=5), optax.sgd(0.1)), 2)
    state = opt.init(PARAMS)
    value_fn = nan_at(True)
    updates, new_state = opt.update(jax.grad(value_fn)(PARAMS), state, PARAMS, value_fn=value_fn)
    assert_trees_equal(optax.apply_updates(PARAMS, updates), PARAMS)
    assert int(new_state.notfinite_count) == 1 and int(new_state.total_notfinite) == 1
    assert_trees_equal(new_state.inner_state, state.inner_state)  # key not consumed


def test_ags_zero_order_nan_step_is_handled_by_ags_not_apply_if_finite():
    opt = optax.apply_if_finite(optax.chain(agsopt.ags(SIGMA, N, key=5), optax.sgd(0.1)), 2)
    state = opt.init(PARAMS)
    zeros = optax.tree.zeros_like(PARAMS)
    updates, state = opt.update(zeros, state, PARAMS, value_fn=nan_at(True))
    assert_trees_equal(optax.apply_updates(PARAMS, updates), PARAMS)  # zero update
    assert int(state.total_notfinite) == 0  # apply_if_finite saw finite zeros
    smoothing = state.inner_state[0]
    assert int(smoothing.num_nonfinite) == N and int(smoothing.count) == 1
    momentum = smoothing.rule_state.momentum
    assert all(np.all(np.asarray(m) == 0) for m in jax.tree.leaves(momentum))  # rule untouched
    updates, state = opt.update(zeros, state, PARAMS, value_fn=loss)
    assert int(state.inner_state[0].num_nonfinite) == N
    assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))


# --------------------------------------------------------------------------- flax.nnx.Optimizer


class Tiny(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.linear(x)


X, Y = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3), jnp.ones((4, 2))


NNX_DEFAULT = [AGS, REGISTRY["sam"], REGISTRY["bsam"]]  # the others (eager, slower) when slow


@pytest.mark.parametrize("entry", cases(ENTRIES, default=NNX_DEFAULT))
def test_nnx_optimizer_passes_extra_args_through(entry):
    model = Tiny(nnx.Rngs(0))
    graphdef, _ = nnx.split(model, nnx.Param)
    tx = optax.chain(make(entry), optax.sgd(0.1))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    def model_loss(m):
        return jnp.mean((m(X) - Y) ** 2)

    def per_example_loss_fn(p, positions):  # p: the nnx.State of the parameters
        return jnp.mean((nnx.merge(graphdef, p)(X[positions]) - Y[positions]) ** 2, axis=-1)

    def value_fn(p):
        return jnp.mean(per_example_loss_fn(p, jnp.arange(4)))

    problem = Problem(value_fn, per_example_loss_fn, jnp.arange(4))
    params = jax.tree.map(jnp.array, nnx.as_pure(nnx.state(model, nnx.Param)))  # a copy
    opt_state = tx.init(params)
    for _ in range(2):
        grads = nnx.grad(model_loss)(model)
        optimizer.update(model, grads, **entry.extra_args(problem))
        pure_grads = jax.grad(value_fn)(params)
        updates, opt_state = entry.update(tx, pure_grads, opt_state, params, problem)
        params = optax.apply_updates(params, updates)
    assert_trees_close(nnx.as_pure(nnx.state(model, nnx.Param)), params, rtol=1e-5, atol=1e-6)
    if entry is AGS:
        assert int(nnx.as_pure(optimizer.opt_state)[0].num_evaluations) == 2 * 2 * N


def test_nnx_optimizer_under_nnx_jit():
    model = Tiny(nnx.Rngs(0))
    graphdef, _ = nnx.split(model, nnx.Param)
    optimizer = nnx.Optimizer(model, optax.chain(agsopt.sam(0.05), optax.sgd(0.1)), wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, x, y):
        def value_fn(p):
            return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

        loss_value, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads, value_fn=value_fn)
        return loss_value

    losses = [float(train_step(model, optimizer, X, Y)) for _ in range(5)]
    assert losses[-1] < losses[0]


# --------------------------------------------------------------------------- optimistix


def quadratic(y, args):
    del args
    return jnp.sum((y["w"] - 1.0) ** 2) + jnp.sum(y["b"] ** 2)


def _optax_loop(entry, opt, steps):
    y, state = PARAMS, opt.init(PARAMS)
    for _ in range(steps):
        grads = jax.grad(quadratic)(y, None)
        problem = Problem(lambda p: quadratic(p, None))
        updates, state = entry.update(opt, grads, state, y, problem)
        y = eqx.apply_updates(y, updates)
    return y


# what OptaxMinimiser passes is value_fn; one entry per factory (OptaxMinimiser cannot hold an
# optax schedule at all, agsopt's or not: equinox's closure conversion raises "Cell is empty")
VALUE_FN_ENTRIES = representatives(select(alias=False, uses_value_fn=True))


@pytest.mark.parametrize("entry", cases(VALUE_FN_ENTRIES, default=[AGS, REGISTRY["sam"]]))
def test_optimistix_optax_minimiser_passes_value_fn(entry):
    steps = 10
    chained = lambda: optax.chain(make(entry), optax.sgd(0.1))
    solver = optx.OptaxMinimiser(chained(), rtol=0.0, atol=0.0)  # run all max_steps
    solution = optx.minimise(quadratic, solver, PARAMS, max_steps=steps, throw=False)
    assert int(solution.stats["num_steps"]) == steps
    assert_trees_close(solution.value, _optax_loop(entry, chained(), steps), rtol=1e-5, atol=1e-6)


def test_optimistix_black_box_needs_stop_gradient():
    def black_box_numpy(w):
        return np.asarray(np.sum((w - 1.0) ** 2), np.float32)

    def black_box(y, args):
        del args
        spec = jax.ShapeDtypeStruct((), jnp.float32)
        return jax.pure_callback(black_box_numpy, spec, y["w"], vmap_method="sequential")

    params = {"w": PARAMS["w"]}
    solver = optx.OptaxMinimiser(
        optax.chain(agsopt.ags(SIGMA, N, key=5), optax.sgd(0.1)), rtol=0.0, atol=0.0
    )
    with pytest.raises(ValueError, match="JVP"):  # OptaxMinimiser differentiates fn itself
        optx.minimise(black_box, solver, params, max_steps=2, throw=False)
    wrapped = lambda y, args: black_box(jax.lax.stop_gradient(y), args)
    solution = optx.minimise(wrapped, solver, params, max_steps=20, throw=False)
    assert float(black_box_numpy(np.asarray(solution.value["w"]))) < float(
        black_box_numpy(np.asarray(params["w"]))
    )
