"""The registry of transformations (tests/transformations.py) is complete and says the truth.

- Every public function of ``agsopt``, ``agsopt.smoothing`` and ``agsopt.sharpness`` is
  either the factory of a registry entry or listed here as not a transformation; a new
  public transformation without an entry fails here. Every registered covariance rule and
  every estimator method appears in an AGS entry.
- Each entry's declared protocol holds: its factory builds an
  ``optax.GradientTransformationExtraArgs``; a jitted step gives updates shaped and typed
  like the parameters, finite, and a finite state; updates declared ``"ignored"`` do not
  change the result and ``"gradient"`` ones do; each declared extra argument is required;
  ``random`` is whether the state holds a key; ``axis_name`` and ``static_args`` name
  parameters of the factory.
- The ``ags_*``/``igs_*`` aliases are ``optax.chain(ags(...), base)`` (written out here):
  the same state and, bit for bit, the same step.
"""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from transformations import REGISTRY, Problem, select

import agsopt
from agsopt.smoothing.covariance_rules import RULES
from agsopt.smoothing.estimator import METHODS

MODULES = (agsopt, agsopt.smoothing, agsopt.sharpness)
# public functions that are not transformations: each must stay one (no GradientTransformation
# return annotation, checked below) or move to the registry
NOT_TRANSFORMATIONS = {
    "asam_weight_mask",
    "bsam_reference_schedules",
    "bsam_rho_min_schedule",
    "fill_masked_params",
    "sam_perturbation",
    "smoothed_grad",
    "smoothed_value_and_grad",
    "ask_tell",  # an init/ask/tell triple around ags; tested in test_ask_tell.py
    "dgs_ask_tell",  # the same around dgs; tested in test_dgs.py
    "dgs_blackbox_ask_tell",  # the same around dgs_blackbox; tested in test_dgs.py
    "directional_points",
    "default_chunk_size",
    "evaluations_per_estimate",
    "make_noise_table",
    "sample_directions",
    "mean_over_shards",
    "perturbed_gradient",
    "directional_value_and_grad",
    "directional_basis",
}
# the building blocks of AUSAM and vSAM exported by agsopt.sharpness (pure functions)
NOT_TRANSFORMATION_PREFIXES = ("ausam_", "vsam_")


def public_functions() -> dict[str, object]:
    found = {}
    for module in MODULES:
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                found[name] = obj
    return found


def test_every_public_transformation_has_an_entry():
    factories = {entry.factory_name: entry.factory for entry in REGISTRY.values()}
    functions = public_functions()
    for name, factory in factories.items():
        assert functions.get(name) is factory, f"{name}: a registry factory that is not public"
    others = {
        name
        for name in functions
        if name not in NOT_TRANSFORMATIONS and not name.startswith(NOT_TRANSFORMATION_PREFIXES)
    }
    missing = sorted(others - set(factories))
    assert not missing, f"public transformations without a registry entry: {missing}"
    assert NOT_TRANSFORMATIONS <= set(functions), "a stale name in NOT_TRANSFORMATIONS"
    for name, function in functions.items():
        if name in factories:
            continue
        annotation = str(inspect.signature(function).return_annotation)
        assert "GradientTransformation" not in annotation, f"{name} is a transformation"


def test_every_rule_and_method_has_an_ags_entry():
    ags_entries = [entry for entry in REGISTRY.values() if entry.factory is agsopt.ags]
    rules = {
        entry.kwargs.get("covariance", agsopt.smoothing.DEFAULT_COVARIANCE) for entry in ags_entries
    }
    methods = {entry.kwargs.get("method", "antithetic") for entry in ags_entries}
    assert set(RULES) <= rules, sorted(set(RULES) - rules)
    assert set(METHODS) <= methods, sorted(set(METHODS) - methods)


PARAMS = {"w": jnp.array([[0.5, -1.0], [2.0, 0.25]]), "b": [jnp.float32(0.3)]}
X = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)), jnp.float32)


def per_example_loss_fn(p, positions):
    x = X[positions]
    return jnp.sum(jnp.tanh(x @ p["w"]) ** 2, -1) + jnp.sum(x, -1) * p["b"][0] + p["b"][0] ** 2


PROBLEM = Problem(
    value_fn=lambda p: jnp.mean(per_example_loss_fn(p, jnp.arange(4))),
    per_example_loss_fn=per_example_loss_fn,
    ids=jnp.arange(4),
)
OVERRIDES = {"ausam": {"num_examples": 4}}


def _keyed_states(state):
    """The NamedTuple states within ``state`` that hold a ``key`` field."""
    found = []

    def visit(node):
        if hasattr(node, "_fields") and "key" in node._fields:
            found.append(node)
        if isinstance(node, (tuple, list)):
            for child in node:
                visit(child)
        elif isinstance(node, dict):
            for child in node.values():
                visit(child)

    visit(state)
    return found


def _finite(tree):
    return all(
        np.all(np.isfinite(np.asarray(x, np.float32)))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)
    )


@pytest.mark.parametrize("entry", select(alias=False), ids=lambda e: e.name)
def test_entry_protocol_holds(entry):
    opt = entry.make(**OVERRIDES.get(entry.name, {}))
    assert isinstance(opt, optax.GradientTransformationExtraArgs)
    parameters = inspect.signature(entry.factory).parameters
    assert ("axis_name" in parameters) == entry.axis_name
    assert set(entry.static_args) <= set(parameters)
    assert bool(_keyed_states(opt.init(PARAMS))) == entry.random

    step = jax.jit(lambda incoming: entry.update(opt, incoming, opt.init(PARAMS), PARAMS, PROBLEM))
    grads = jax.grad(PROBLEM.value_fn)(PARAMS)
    other = jax.tree.map(lambda g: -2.0 * g + 0.5, grads)  # another direction
    (outputs, state), (other_outputs, _) = step(grads), step(other)
    assert jax.tree.structure(outputs) == jax.tree.structure(PARAMS)
    for u, p in zip(jax.tree.leaves(outputs), jax.tree.leaves(PARAMS), strict=True):
        assert u.shape == jnp.shape(p) and u.dtype == jnp.asarray(p).dtype
    assert _finite(outputs) and _finite(state)
    same = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(jax.tree.leaves(outputs), jax.tree.leaves(other_outputs), strict=True)
    )
    assert same == (entry.protocol.updates != "gradient"), entry.protocol
    for name in entry.protocol.extra_args:  # each declared extra argument is required
        args = {**entry.extra_args(PROBLEM), name: None}
        incoming = entry.incoming(grads, PARAMS, PROBLEM)
        with pytest.raises((TypeError, ValueError), match=name):
            opt.update(incoming, opt.init(PARAMS), PARAMS, **args)


ALIASES = {  # alias: (its base optimizer, the covariance it fixes)
    "ags_gd": (lambda lr: optax.sgd(lr), {}),
    "ags_sgd": (lambda lr: optax.sgd(lr, momentum=0.9), {}),
    "ags_adam": (lambda lr: optax.adam(lr), {}),
    "igs_gd": (lambda lr: optax.sgd(lr), {"covariance": "isotropic"}),
    "igs_sgd": (lambda lr: optax.sgd(lr, momentum=0.9), {"covariance": "isotropic"}),
    "igs_adam": (lambda lr: optax.adam(lr), {"covariance": "isotropic"}),
}


def test_aliases_are_listed():
    assert set(ALIASES) == {entry.name for entry in select(alias=True)}


@pytest.mark.slow  # by default tests/test_ags.py checks each alias's first step in closed form
@pytest.mark.parametrize("entry", select(alias=True), ids=lambda e: e.name)
def test_alias_is_ags_chained_with_its_base(entry):
    base, fixed = ALIASES[entry.name]
    kwargs = {k: v for k, v in entry.kwargs.items() if k != "learning_rate"}
    alias = entry.make(num_samples=2)
    by_hand = optax.chain(
        agsopt.ags(**{**kwargs, "num_samples": 2, **fixed}), base(entry.kwargs["learning_rate"])
    )

    @jax.jit
    def run():
        results = []
        for opt in (alias, by_hand):  # one step
            updates, state = entry.update(opt, None, opt.init(PARAMS), PARAMS, PROBLEM)
            results.append((optax.apply_updates(PARAMS, updates), state))
        return results

    (params, state), (expected_params, expected_state) = run()
    assert jax.tree.structure(state) == jax.tree.structure(expected_state)
    for a, b in zip(
        jax.tree.leaves((params, state)),
        jax.tree.leaves((expected_params, expected_state)),
        strict=True,
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(params["w"]), np.asarray(PARAMS["w"]))
