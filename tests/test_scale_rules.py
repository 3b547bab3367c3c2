"""σ-scale adaptation (covariance_rules.scaled): the controller's state against the rule's
formulas written out here (plain Python/NumPy, float64), closed forms on gradient sequences
whose ratio is known (constant, sign-alternating, geometrically decaying), bounds, dtypes
under lax.scan, and composition with other rules and with ags + optax.sgd."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import agsopt
from agsopt import covariance_rules

TEMPLATE = {"k": jnp.zeros((2, 3), jnp.float32), "b": jnp.zeros(4, jnp.float32)}
DIM = 10
_, UNRAVEL = ravel_pytree(TEMPLATE)


def feed(rule, grads):
    """The rule's states after each gradient of ``grads`` (flat float64 vectors)."""
    state = rule.init(TEMPLATE)
    states = []
    update = jax.jit(rule.update)
    for g in grads:
        state = update(state, UNRAVEL(jnp.asarray(g, jnp.float32)))
        states.append(state)
    return states


def reference(
    grads,
    *,
    factor=0.9,
    lower=0.1,
    upper=0.9,
    min_scale=0.5,
    max_scale=2.0,
    decay=0.9,
    lipschitz_decay=0.9,
    factors=(0.95, 1.02, 0.98, 1.01),
):
    """The controller, written out from its docstring: one dict per update."""
    lower_shrink, lower_grow, upper_shrink, upper_grow = factors
    m = np.zeros(len(grads[0]))
    scale, lip, a, b, ratio = 1.0, 0.0, lower, upper, -1.0
    out = []
    for count, g in enumerate(grads):
        g = np.asarray(g, np.float64)
        norm = np.linalg.norm(m)
        v = m / norm if norm > 0 else np.zeros_like(m)
        s = float(v @ g)
        new_lip = max(lipschitz_decay * lip, abs(s)) if count >= 1 else 0.0
        r = max(s, 0.0) / new_lip if new_lip > 0 else 0.0
        if count >= 2 and lip > 0:
            ratio = r
            if r < a:
                scale, a = max(factor * scale, min_scale), a * lower_shrink
            elif r > b:
                scale, b = min(scale / factor, max_scale), min(b * upper_grow, 1.0)
            else:
                a, b = a * lower_grow, b * upper_shrink
        lip = new_lip
        m = decay * m + (1 - decay) * g
        out.append({"scale": scale, "lipschitz": lip, "lower": a, "upper": b, "ratio": ratio})
    return out


def assert_matches(states, expected, rtol=1e-5):
    for k, (state, ref) in enumerate(zip(states, expected, strict=True)):
        for field, value in ref.items():
            got = float(getattr(state, field))
            assert got == pytest.approx(value, rel=rtol, abs=1e-6), (k, field, got, value)


def random_walk(num, seed):
    """Gradient estimates that drift and fluctuate: every branch of the controller fires."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal(DIM)
    return [base * np.cos(0.3 * k) + 0.7 * rng.standard_normal(DIM) for k in range(num)]


@pytest.mark.parametrize(
    ("seed", "kwargs"),
    [(0, {}), (1, dict(min_scale=0.3, max_scale=3.0, decay=0.8, lipschitz_decay=0.7))],
)
def test_state_evolution_matches_reference(seed, kwargs):
    grads = random_walk(60, seed)
    states = feed(covariance_rules.scaled(**kwargs), grads)
    expected = reference(grads, **kwargs)
    assert_matches(states, expected)
    scales = [e["scale"] for e in expected]
    # the sequence exercises shrinking and growing, not one branch only
    assert any(b < a for a, b in zip(scales, scales[1:], strict=False))
    assert any(b > a for a, b in zip(scales, scales[1:], strict=False))


def test_constant_gradient_grows_the_scale_by_one_over_gamma_per_step():
    # f linear: the slope along v never changes, r = 1 > B from the third update on, so
    # c = γ^-(n-2) after n updates (B = 0.9·1.01^j stays below 1 for j ≤ 10 grows), up to
    # max_scale.
    g = np.linspace(-1.0, 2.0, DIM)
    states = feed(covariance_rules.scaled(max_scale=2.0), [g] * 12)
    for n, state in enumerate(states, start=1):
        expected = min(0.9 ** -max(n - 2, 0), 2.0)
        assert float(state.scale) == pytest.approx(expected, rel=1e-6)
        if n >= 3:
            assert float(state.ratio) == pytest.approx(1.0, rel=1e-6)
            assert float(state.upper) == pytest.approx(min(0.9 * 1.01 ** (n - 2), 1.0), 1e-6)
    assert float(states[-1].lipschitz) == pytest.approx(np.linalg.norm(g), rel=1e-6)


def test_alternating_gradient_shrinks_the_scale_by_gamma_per_step():
    # the slope along the travel direction is negative at every step (the iterate crossed the
    # valley floor): r = 0 < A, c = γ^(n-2) down to min_scale, A = 0.1·0.95^(n-2).
    g = np.linspace(0.5, 1.5, DIM)
    grads = [g * (-1) ** k for k in range(30)]
    states = feed(covariance_rules.scaled(min_scale=0.2), grads)
    for n, state in enumerate(states, start=1):
        assert float(state.scale) == pytest.approx(max(0.9 ** max(n - 2, 0), 0.2), rel=1e-5)
        if n >= 3:
            assert float(state.ratio) == 0.0
            assert float(state.lower) == pytest.approx(0.1 * 0.95 ** (n - 2), rel=1e-5)


def test_geometrically_decaying_slope_closed_form():
    # GD on a 1-D quadratic: g_n = q^(n-1) g_1. With q < λ the running maximum decays as
    # L_n = λ^(n-2) q g_1, so r_n = (q/λ)^(n-2). With q = 0.5, λ = 0.9 the thresholds narrow
    # (A·1.02, B·0.98) at n = 3, 4, 5 and the scale shrinks at n = 6 and 7.
    q, lam = 0.5, 0.9
    direction = np.ones(DIM) / np.sqrt(DIM)
    grads = [q**n * direction for n in range(7)]
    states = feed(covariance_rules.scaled(lipschitz_decay=lam), grads)
    ratios = [float(s.ratio) for s in states[2:]]
    np.testing.assert_allclose(ratios, [(q / lam) ** (n - 2) for n in range(3, 8)], rtol=1e-5)
    a3, b3 = 0.1 * 1.02**3, 0.9 * 0.98**3  # after the three in-between updates
    assert (q / lam) ** 3 > a3 and (q / lam) ** 4 < a3  # so n = 6 shrinks ...
    assert (q / lam) ** 5 < a3 * 0.95  # ... and n = 7 again
    expected_scales = [1.0, 1.0, 1.0, 1.0, 1.0, 0.9, 0.81]
    np.testing.assert_allclose([float(s.scale) for s in states], expected_scales, rtol=1e-6)
    assert float(states[-1].lower) == pytest.approx(a3 * 0.95**2, rel=1e-5)
    assert float(states[-1].upper) == pytest.approx(b3, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scale_stays_within_bounds(seed):
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(DIM) * 10.0 ** rng.uniform(-6, 6) for _ in range(150)]
    grads[40:60] = [np.zeros(DIM)] * 20  # no information: m keeps its direction, s = 0
    grads[100:] = [np.full(DIM, 1e8)] * 50  # a long linear stretch that dominates: grows
    states = feed(covariance_rules.scaled(min_scale=0.25, max_scale=4.0), grads)
    scales = np.array([float(s.scale) for s in states])
    assert np.all((scales >= 0.25 * (1 - 1e-6)) & (scales <= 4.0 * (1 + 1e-6)))
    assert scales.max() == pytest.approx(4.0, rel=1e-6)
    assert scales.min() == pytest.approx(0.25, rel=1e-6)
    for s in states:
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(s))
        assert 0.0 < float(s.upper) <= 1.0 and float(s.lower) > 0


@pytest.mark.parametrize("inner", ["isotropic", "adaptive_gradient_aligned", "adaptive_diagonal"])
def test_matrix_is_the_inner_rules_matrix_at_the_scaled_sigma(inner):
    # Σ = inner Σ at c·σ, for a scalar σ and for one σ per leaf
    grads = random_walk(25, 3)
    rule = covariance_rules.scaled(inner)
    inner_rule = covariance_rules.get_rule(inner)
    state = feed(rule, grads)[-1]
    c = float(state.scale)
    assert c != 1.0
    u = UNRAVEL(jnp.asarray(np.random.default_rng(0).standard_normal(DIM), jnp.float32))
    for sigma in (0.3, {"b": 0.5, "k": 2.0}):
        scaled_sigma = jax.tree.map(lambda s: s * c, sigma)
        want = inner_rule.matrix(state.inner, scaled_sigma)
        got = rule.matrix(state, sigma)
        for method in ("apply", "solve_transpose"):
            np.testing.assert_allclose(
                ravel_pytree(getattr(got, method)(u))[0],
                ravel_pytree(getattr(want, method)(u))[0],
                rtol=1e-5,
            )
    # the inner state evolves exactly as the inner rule alone would
    alone = feed(inner_rule, grads)[-1]
    for a, b in zip(jax.tree.leaves(state.inner), jax.tree.leaves(alone), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_linear_function_in_ags_grows_sigma_exactly():
    # f(x) = aᵀx, first-order estimates are exactly a: the ratio is 1, the scale after n
    # steps is γ^-(n-2) (up to max_scale) and Σ is c·σ·I.
    a = jnp.linspace(-1.0, 1.0, 6)
    opt = agsopt.ags(
        0.2, 4, covariance=covariance_rules.scaled(max_scale=1.5), method="first_order"
    )
    x = jnp.zeros(6)
    state = opt.init(x)
    step = jax.jit(lambda s: opt.update(x, s, x, value_fn=lambda y: a @ y))
    for n in range(1, 8):
        updates, state = step(state)
        np.testing.assert_allclose(updates, a, rtol=1e-6)
        c = float(state.rule_state.scale)
        assert c == pytest.approx(min(0.9 ** -max(n - 2, 0), 1.5), rel=1e-6)
    sigma_matrix = covariance_rules.scaled().matrix(state.rule_state, 0.2)
    np.testing.assert_allclose(sigma_matrix.apply(jnp.ones(6)), 0.2 * 1.5 * np.ones(6), rtol=1e-6)


@pytest.mark.parametrize("inner", ["isotropic", "adaptive_gradient_aligned"])
def test_ags_with_scaled_rule_minimizes_a_quadratic(inner):
    # f = ½ xᵀAx, antithetic estimates are unbiased for Ax (σ only scales the directions);
    # 100 steps of lr 0.2 contract the error by (1 − 0.2·λ_min)^100 ≈ 2·10⁻¹⁰ in expectation.
    diag = jnp.array([1.0, 2.0, 4.0, 3.0])
    f = lambda x: 0.5 * jnp.sum(diag * x * x)  # noqa: E731
    opt = optax.chain(
        agsopt.ags(0.3, 16, covariance=covariance_rules.scaled(inner), key=1), optax.sgd(0.2)
    )
    x = jnp.array([1.0, -2.0, 0.5, 3.0])
    state = opt.init(x)

    def body(carry, _):
        x, state = carry
        updates, state = opt.update(jnp.zeros_like(x), state, x, value_fn=f)
        return (x + updates, state), None

    (x, state), _ = jax.jit(lambda c: jax.lax.scan(body, c, None, length=100))((x, state))
    assert float(f(x)) < 1e-6
    scale = float(state[0].rule_state.scale)
    assert 0.5 <= scale <= 2.0
    # near the minimizer the slope along the travel direction runs out: σ has shrunk
    assert scale < 1.0


SCAN_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp
    from agsopt.covariance_rules import scaled

    def check():
        params = {"a": jnp.ones(3, jnp.float32), "b": jnp.ones((2, 2), jnp.bfloat16)}
        if jax.config.jax_enable_x64:
            params["c"] = jnp.ones(2, jnp.float64)
        names = ("isotropic", "adaptive_gradient_aligned", "adaptive_diagonal")
        for name in names:
            rule = scaled(name)
            state = rule.init(params)
            before = jax.tree.map(lambda x: (x.shape, x.dtype), state)

            def body(s, k):
                g = jax.tree.map(lambda p: (jnp.cos(k + p.astype(jnp.float32))).astype(p.dtype),
                                 params)
                return rule.update(s, g), None

            final, _ = jax.lax.scan(body, state, jnp.arange(12.0))
            after = jax.tree.map(lambda x: (x.shape, x.dtype), final)
            assert after == before, (name, before, after)
            assert final.scale.dtype == jnp.float32 and final.count.dtype == jnp.int32
        return len(names)

    print(check())
    """
)


def test_rule_state_dtypes_kept_by_scan_float32():
    namespace: dict = {}
    exec(compile(SCAN_SCRIPT.replace("print(", "RESULT = ("), "scan", "exec"), namespace)
    assert namespace["RESULT"] == 3


def test_rule_state_dtypes_kept_by_scan_x64():
    env = dict(os.environ, JAX_ENABLE_X64="1", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", SCAN_SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "3"


def test_registered_names():
    for name in ("scaled_isotropic", "scaled_adaptive_gradient_aligned"):
        rule = covariance_rules.get_rule(name)
        state = rule.init(TEMPLATE)
        assert isinstance(state, covariance_rules.ScaledState)
    assert covariance_rules.get_rule("scaled_isotropic").init(TEMPLATE).inner == (
        covariance_rules.EmptyRuleState()
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"factor": 1.0}, "factor"),
        ({"factor": 0.0}, "factor"),
        ({"lower": 0.95, "upper": 0.9}, "lower"),
        ({"upper": 1.0}, "upper"),
        ({"min_scale": 0.0}, "min_scale"),
        ({"min_scale": 2.0}, "min_scale"),
        ({"max_scale": 0.5}, "max_scale"),
        ({"decay": 1.0}, "decay"),
        ({"lipschitz_decay": -0.1}, "lipschitz_decay"),
        ({"upper_grow": 0.0}, "upper_grow"),
        ({"rule": "nope"}, "covariance"),
    ],
)
def test_rejects_bad_arguments(kwargs, name):
    kwargs = dict(kwargs)
    rule = kwargs.pop("rule", "isotropic")
    with pytest.raises(ValueError, match=name):
        covariance_rules.scaled(rule, **kwargs)
