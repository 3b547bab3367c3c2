"""Hostile inputs a user could plausibly pass: each gets a clear error naming the argument (at
construction where possible), or works and keeps the state finite."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import agsopt
from agsopt import covariance

PARAMS = {"b": jnp.zeros(2), "w": jnp.ones(3)}


def quadratic(params):
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(params))


def finite(tree) -> bool:
    leaves = [jnp.asarray(x) for x in jax.tree.leaves(tree)]
    inexact = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return all(bool(jnp.all(jnp.isfinite(x))) for x in inexact)


# --- hyper-parameters: None, bool, strings, lists --------------------------------------


@pytest.mark.parametrize(
    ("factory", "name", "error"),
    [
        (lambda v: agsopt.sam(0.05, eta=v), "eta", TypeError),
        (lambda v: agsopt.sam(0.05, eps=v), "eps", TypeError),
        (lambda v: agsopt.vsam(warmup_steps=1, beta=v), "beta", TypeError),
        (lambda v: agsopt.vsam(warmup_steps=1, a1=v), "a1", TypeError),
        (lambda v: agsopt.vsam(warmup_steps=1, max_p=v), "max_p", TypeError),
        (lambda v: agsopt.ausam(8, steps_per_epoch=1, f_min=v), "f_min", TypeError),
        (lambda v: agsopt.dgs(v), "radius", TypeError),
    ],
)
def test_none_hyperparameter_names_the_argument(factory, name, error):
    with pytest.raises(error, match=name):
        factory(None)


@pytest.mark.parametrize("value", [True, "0.5"])
def test_vsam_fraction_must_be_a_real_number(value):
    with pytest.raises(TypeError, match="beta"):
        agsopt.vsam(warmup_steps=1, beta=value)


@pytest.mark.parametrize("value", [[0.5], np.array([0.5])])
def test_vsam_max_p_must_be_a_scalar(value):
    with pytest.raises(ValueError, match="max_p must be a scalar"):
        agsopt.vsam(warmup_steps=1, max_p=value)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"radius": [0.1]}, "radius"),
        ({"radius": 0.1, "min_radius": [1e-5]}, "min_radius"),
        ({"radius": 0.1, "tolerance": np.array([1e-9])}, "tolerance"),
        ({"radius": 0.1, "initial_lipschitz": -1.0}, "initial_lipschitz"),
        ({"radius": 0.1, "initial_lipschitz": float("inf")}, "initial_lipschitz"),
        ({"radius": 0.1, "initial_lipschitz": "1"}, "initial_lipschitz"),
        ({"radius": 0.1, "lr_bounds": (0.0,)}, "lr_bounds"),
        ({"radius": 0.1, "lr_bounds": None}, "lr_bounds"),
        ({"radius": 0.1, "lr_bounds": 0.5}, "lr_bounds"),
    ],
)
def test_dgs_rejects_bad_settings_at_construction(kwargs, name):
    with pytest.raises((TypeError, ValueError), match=name):
        agsopt.dgs(**kwargs)


def test_dgs_radius_function_returning_an_array_is_rejected_at_init():
    opt = agsopt.dgs(lambda d: 0.1 * jnp.ones(d))
    with pytest.raises(ValueError, match="radius must be a scalar"):
        opt.init(PARAMS)


def test_ask_tell_base_must_be_an_optimizer():
    with pytest.raises(TypeError, match="base must be an Optax optimizer"):
        agsopt.ask_tell(0.1)


# --- keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    [jax.random.split(jax.random.key(0), 3), jax.random.split(jax.random.PRNGKey(0), 3)],
    ids=["typed", "raw"],
)
@pytest.mark.parametrize(
    "factory",
    [
        lambda k: agsopt.ags(0.1, 4, key=k),
        lambda k: agsopt.dgs(0.1, key=k),
        lambda k: agsopt.vsam(warmup_steps=1, key=k),
        lambda k: agsopt.ausam(8, steps_per_epoch=1, key=k),
    ],
)
def test_a_batch_of_keys_is_refused_at_construction(factory, key):
    with pytest.raises(ValueError, match="key must be a single PRNG key"):
        factory(key)


def test_estimator_takes_an_int_seed_like_the_key_it_stands_for():
    matrix = covariance.isotropic(0.1)
    by_seed = agsopt.smoothed_value_and_grad(quadratic, PARAMS, 3, matrix, num_samples=4)
    by_key = agsopt.smoothed_value_and_grad(
        quadratic, PARAMS, jax.random.key(3), matrix, num_samples=4
    )
    assert jnp.array_equal(by_seed.value, by_key.value)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, by_seed.grad, by_key.grad))


def test_estimator_matrix_must_be_a_smoothing_matrix():
    with pytest.raises(TypeError, match="matrix must be a smoothing matrix"):
        agsopt.smoothed_value_and_grad(quadratic, PARAMS, jax.random.key(0), 0.1)


# --- states of another transformation or configuration ----------------------------------


@pytest.mark.parametrize(
    ("make_state", "opt", "kind"),
    [
        (lambda: agsopt.ags_adam(0.1).init(PARAMS), agsopt.ags(0.1), "AGSState"),
        (lambda: agsopt.ags(0.1).init(PARAMS), agsopt.dgs(0.1), "DGSState"),
        (lambda: agsopt.dgs(0.1).init(PARAMS), agsopt.ags(0.1), "AGSState"),
        (lambda: agsopt.vsam(warmup_steps=1).init(PARAMS), agsopt.sam(), "SAMState"),
        (lambda: agsopt.sam().init(PARAMS), agsopt.bsam(), "BSAMState"),
        (lambda: agsopt.sam().init(PARAMS), agsopt.vsam(warmup_steps=1), "VSAMState"),
    ],
)
def test_state_of_another_transformation_is_a_type_error(make_state, opt, kind):
    with pytest.raises(TypeError, match=f"state must be the {kind}"):
        opt.update(PARAMS, make_state(), PARAMS, value_fn=quadratic)


def test_ausam_state_of_another_transformation_is_a_type_error():
    opt = agsopt.ausam(8, steps_per_epoch=1)
    state = agsopt.vsam(warmup_steps=1).init(PARAMS)
    with pytest.raises(TypeError, match="state must be the AUSAMState"):
        opt.update(None, state, PARAMS, per_example_loss_fn=lambda p, i: i * 0.0, ids=jnp.arange(8))


@pytest.mark.parametrize(
    "other", [{"b": jnp.zeros(2), "w": jnp.ones(4)}, {"x": jnp.ones(5)}], ids=["size", "tree"]
)
def test_dgs_state_for_other_parameters_is_refused(other):
    opt = agsopt.dgs(0.1)
    with pytest.raises(ValueError, match="initialized for other parameters"):
        opt.update(other, opt.init(PARAMS), other, value_fn=quadratic)
    at = agsopt.dgs_ask_tell(0.1)
    with pytest.raises(ValueError, match="initialized for other parameters"):
        at.ask(at.init(PARAMS), other)


def test_dgs_state_with_another_key_shape_is_refused():
    state = agsopt.dgs(0.1, key=jax.random.key(0, impl="rbg")).init(PARAMS)
    with pytest.raises(ValueError, match="state.key has shape"):
        agsopt.dgs(0.1).update(PARAMS, state, PARAMS, value_fn=quadratic)


def test_ask_tell_ask_with_other_parameters_is_refused():
    at = agsopt.ask_tell(sigma=0.1, num_samples=4)
    other = {"b": jnp.zeros(2), "w": jnp.ones(4)}
    with pytest.raises(ValueError, match="does not match these params"):
        at.ask(at.init(PARAMS), other)


# --- parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize("params", [2.0, [1.0, 2.0]], ids=["float", "list"])
def test_ags_accepts_python_number_parameters_like_their_arrays(params):
    opt = agsopt.ags(0.1, 4)
    as_arrays = jax.tree.map(jnp.asarray, params)
    loss = lambda p: sum(jnp.sum(jnp.asarray(x) ** 2) for x in jax.tree.leaves(p))  # noqa: E731
    got, _ = opt.update(params, opt.init(params), params, value_fn=loss)
    want, _ = opt.update(as_arrays, opt.init(as_arrays), as_arrays, value_fn=loss)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, got, want))


@pytest.mark.parametrize(
    "sigma",
    [{"w": 0.1}, [0.1, 0.2], jnp.full(3, 0.1), {"b": 0.1, "w": jnp.full(2, 0.1)}],
    ids=["missing-leaf", "list-for-dict", "array", "leaf-shape"],
)
def test_ags_sigma_of_the_wrong_structure_is_refused_at_init(sigma):
    with pytest.raises(ValueError, match="sigma must be a number, one number per leaf"):
        agsopt.ags(sigma, 4).init(PARAMS)


def test_ags_sigma_schedule_of_the_wrong_shape_is_refused():
    opt = agsopt.ags(lambda count: jnp.full(5, 0.1), 4)
    with pytest.raises(ValueError, match="sigma must be a number"):
        opt.update(PARAMS, opt.init(PARAMS), PARAMS, value_fn=quadratic)


def test_ags_sigma_like_the_parameters_still_works():
    sigma = {"b": 0.2, "w": jnp.full(3, 0.1)}
    opt = agsopt.ags(sigma, 4)
    updates, state = opt.update(PARAMS, opt.init(PARAMS), PARAMS, value_fn=quadratic)
    assert finite(updates) and finite(state)


# --- value_fn and updates -----------------------------------------------------------------


@pytest.mark.parametrize(
    "value_fn",
    [
        lambda p: jnp.ones(2) * quadratic(p),
        lambda p: jnp.reshape(quadratic(p), (1,)),
        lambda p: {"loss": quadratic(p)},
        lambda p: quadratic(p) + 0j,
    ],
    ids=["vector", "shape-1", "dict", "complex"],
)
@pytest.mark.parametrize("name", ["ags", "dgs"])
def test_non_scalar_value_fn_names_value_fn(name, value_fn):
    opt = agsopt.ags(0.1, 4) if name == "ags" else agsopt.dgs(0.1)
    with pytest.raises(TypeError, match=f"agsopt.{name}: value_fn must return a (real )?scalar"):
        opt.update(PARAMS, opt.init(PARAMS), PARAMS, value_fn=value_fn)


@pytest.mark.parametrize(
    "factory",
    [agsopt.sam, agsopt.bsam, lambda: agsopt.vsam(warmup_steps=1)],
    ids=["sam", "bsam", "vsam"],
)
def test_sam_family_names_a_missing_gradient_and_a_vector_loss(factory):
    opt = factory()
    state = opt.init(PARAMS)
    with pytest.raises(TypeError, match="updates must be the gradient"):
        opt.update(None, state, PARAMS, value_fn=quadratic)
    with pytest.raises(TypeError, match="updates must be the gradient"):
        opt.update({"w": jnp.ones(3)}, state, PARAMS, value_fn=quadratic)
    with pytest.raises(TypeError, match="value_fn must return a scalar"):
        opt.update(PARAMS, state, PARAMS, value_fn=lambda p: jnp.ones(2) * quadratic(p))


def test_sam_under_masked_still_gets_its_partial_gradient():
    opt = optax.masked(agsopt.sam(0.05), {"b": False, "w": True})
    grads = jax.grad(quadratic)(PARAMS)
    value_fn = agsopt.fill_masked_params(quadratic, PARAMS)
    updates, _ = opt.update(grads, opt.init(PARAMS), PARAMS, value_fn=value_fn)
    assert finite(updates)


# --- directional estimator ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"radii": 0.0}, "radii must be finite and positive"),
        ({"radii": -0.1}, "radii must be finite and positive"),
        ({"directions": jnp.ones(5)}, r"directions must be a \(k, d\) array"),
        ({"chunk_size": 0}, "chunk_size must be >= 1"),
        ({"params": jnp.ones(5, jnp.int32)}, "real floating array"),
        ({"fn": lambda p: jnp.ones(2)}, "fn must return a scalar"),
    ],
)
def test_directional_value_and_grad_names_bad_arguments(kwargs, match):
    args = {"fn": quadratic, "params": PARAMS, "directions": jnp.eye(5), "radii": 0.1}
    args.update(kwargs)
    fn, params, directions, radii = (args.pop(k) for k in ("fn", "params", "directions", "radii"))
    with pytest.raises((TypeError, ValueError), match=match):
        agsopt.directional_value_and_grad(fn, params, directions, radii, **args)


def test_directional_takes_directions_as_a_nested_list():
    est = agsopt.directional_value_and_grad(quadratic, PARAMS, np.eye(5).tolist(), 0.1)
    want = agsopt.directional_value_and_grad(quadratic, PARAMS, jnp.eye(5), 0.1)
    assert jax.tree.all(jax.tree.map(jnp.allclose, est.grad, want.grad))


# --- dgs_blackbox boxes -------------------------------------------------------------------


def test_dgs_blackbox_box_of_another_length_is_refused_at_init():
    opt = agsopt.dgs_blackbox(np.zeros(2), np.ones(2))
    with pytest.raises(ValueError, match="lower and upper have 2 entries"):
        opt.init(PARAMS)


def test_dgs_blackbox_array_box_keeps_its_radius():
    width = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    state = agsopt.dgs_blackbox(-width / 2, width / 2).init(PARAMS)
    assert np.isclose(float(state.radius), np.linalg.norm(width) / (10 * np.sqrt(2.0)))


@pytest.mark.parametrize(("lower", "upper"), [("a", "b"), (None, 1.0), (False, True)])
def test_dgs_blackbox_non_numeric_box_names_lower(lower, upper):
    with pytest.raises(TypeError, match="lower must be a real number or array"):
        agsopt.dgs_blackbox(lower, upper)


# --- test functions -----------------------------------------------------------------------


@pytest.mark.parametrize("name", agsopt.functions.names())
def test_functions_refuse_complex_points(name):
    with pytest.raises(TypeError, match="real point"):
        agsopt.functions.get(name)(jnp.ones(2, jnp.complex64))


# --- non-finite losses keep the state finite and usable (already true: regression guard) ----


@pytest.mark.parametrize("anisotropic", [False, True])
def test_dgs_recovers_after_a_nan_loss(anisotropic):
    opt = agsopt.dgs(0.1, anisotropic=anisotropic)
    state = opt.init(PARAMS)
    updates, state = opt.update(PARAMS, state, PARAMS, value_fn=lambda p: jnp.nan)
    assert finite(updates) and int(state.num_skipped) == 1
    assert float(state.radius) == pytest.approx(0.05)  # halved, not poisoned
    updates, state = opt.update(PARAMS, state, PARAMS, value_fn=quadratic)
    assert finite(updates) and finite(state._replace(value=0.0))
