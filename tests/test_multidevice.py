"""Multiple devices: AGS with its sample axis sharded, the SAM family data-parallel.

Eight virtual CPU devices need ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` before
JAX starts, so the checks run in a subprocess: this file, run as a script
(``python tests/test_multidevice.py OUT.json``), computes every comparison with eight devices
and writes the numbers; the tests below read them. The same keys are used on one and on eight
devices, so the results agree up to the order of float32 summations.

- AGS: ``smoothed_value_and_grad(..., sample_sharding=NamedSharding(mesh, P("s")))`` against
  the unsharded estimate, for antithetic, forward (with a remainder chunk that does not split
  evenly over the devices) and first-order estimates; and a jitted training step
  ``optax.chain(agsopt.ags(..., sample_sharding=...), optax.sgd(...))`` with replicated
  parameters against the same step on one device. The compiled sharded step must contain a
  cross-device reduction (it really is partitioned).
- SAM, ASAM, BSAM and vSAM (warm-up steps): a jitted ``jax.shard_map`` training step over
  the batch axis with ``axis_name`` against the mean of the per-shard single-device updates,
  computed explicitly shard by shard. Under ``shard_map``'s default ``check_vma=True`` the
  per-shard gradient is taken at ``jax.lax.pcast(params, axis, to="varying")``: the gradient
  of a replicated (invariant) value is otherwise summed over the shards by JAX's autodiff
  (recorded below as ``sam_without_pcast``). ``check_vma=False`` needs no cast.
- AUSAM (first epoch, ``check_vma=False``): the same against per-shard single-device AUSAM,
  and the sharpness records are the union of the shards' records.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from markdown_blocks import device_env
from transformations import Problem, select

ROOT = Path(__file__).resolve().parents[1]
NUM_DEVICES = 8
# the SAM family under shard_map: every entry that takes axis_name and reads the gradient;
# sam and bsam by default, the others in the extended (slow) run
SAM_FAMILY = [e.name for e in select(alias=False, axis_name=True, needs_grads=True)]
SAM_DEFAULT = ["sam", "bsam"]
SAM_OVERRIDES = {  # vSAM: warm-up (all SAM) steps only
    "sam": {"rho": 0.1},
    "bsam": {"rho_max": 0.1, "rho_min": 0.05},
    "vsam": {"rho": 0.1, "window": 4, "var_blocks": 2, "warmup_steps": 4},
}
TOLERANCE = 2e-5  # max |sharded − single| / max(1, max |single|), float32 summation order


# --------------------------------------------------------------------------- the worker
# Everything below until the tests runs in the subprocess; jax is imported only there.


def _gap(a, b) -> float:
    """``max |a − b| / max(1, max |b|)`` over all leaves (float64 on the host)."""
    import jax

    la = [np.asarray(x, np.float64) for x in jax.tree.leaves(a)]
    lb = [np.asarray(x, np.float64) for x in jax.tree.leaves(b)]
    assert len(la) == len(lb)
    scale = max([1.0] + [float(np.max(np.abs(y))) for y in lb if y.size])
    return max(float(np.max(np.abs(x - y))) for x, y in zip(la, lb, strict=True)) / scale


def _local(params, axis: str):
    """Mark replicated ``params`` as varying over ``axis`` (per-shard gradients)."""
    import jax

    pcast = getattr(jax.lax, "pcast", None)
    if pcast is not None:
        return pcast(params, axis, to="varying")
    return jax.lax.pvary(params, axis)  # older JAX


def _ags_checks(out: dict, extended: bool) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    from transformations import REGISTRY

    from agsopt import covariance
    from agsopt.estimator import smoothed_value_and_grad

    mesh = Mesh(np.array(jax.devices()), ("s",))
    sharding = NamedSharding(mesh, P("s"))
    replicated = NamedSharding(mesh, P())
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": [jnp.arange(3.0)]}

    def fun(p):
        return jnp.sum(jnp.sin(3.0 * p["w"])) + jnp.sum(p["b"][0] ** 4)

    # a jitted training step (antithetic, the default Σ rule), parameters replicated
    entry = REGISTRY["ags"]

    def train(sharded: bool, steps: int = 3):
        opt = optax.chain(
            entry.make(num_samples=16, key=3, sample_sharding=sharding if sharded else None),
            optax.sgd(0.05, momentum=0.9),
        )

        def step(p, s):
            u, s = entry.update(opt, p, s, p, Problem(fun))
            return optax.apply_updates(p, u), s

        p = jax.device_put(params, replicated) if sharded else params
        s = opt.init(p)
        compiled = jax.jit(step).lower(p, s).compile()
        for _ in range(steps):
            p, s = compiled(p, s)
        return p, s, "all-reduce" in compiled.as_text()

    p1, s1, _ = train(False)
    p8, s8, reduces = train(True)
    out["ags_train_step"] = {
        "params_gap": _gap(p8, p1),
        "rule_state_gap": _gap(s8[0].rule_state, s1[0].rule_state),
        "value_gap": _gap(s8[0].value, s1[0].value),
        "keys_equal": bool(np.array_equal(s8[0].key, s1[0].key)),
        "cross_device_reduction": reduces,
        "params_sharding": str(jax.tree.leaves(p8)[0].sharding),
    }

    key = jax.random.key(7)
    matrix = covariance.gradient_aligned(0.3, 2.0, jax.tree.map(jnp.ones_like, params))
    configs = {
        "forward N=20 chunk=8 (remainder 4)": {
            "num_samples": 20,
            "chunk_size": 8,
            "method": "forward",
        },
    }
    if extended:
        configs["antithetic N=16"] = {"num_samples": 16}
        configs["first_order N=16 orthogonal"] = {
            "num_samples": 16,
            "method": "first_order",
            "orthogonal": True,
        }
    estimates = {}
    for name, kwargs in configs.items():

        def estimate(p, k, sharded, kwargs=kwargs):
            shard = sharding if sharded else None
            return smoothed_value_and_grad(fun, p, k, matrix, sample_sharding=shard, **kwargs)

        single = jax.jit(lambda p, k, e=estimate: e(p, k, False))(params, key)
        compiled = jax.jit(lambda p, k, e=estimate: e(p, k, True)).lower(params, key).compile()
        sharded = compiled(params, key)
        estimates[name] = {
            "grad_gap": _gap(sharded.grad, single.grad),
            "value_gap": _gap(sharded.value, single.value),
            "counts_equal": int(sharded.num_evaluations) == int(single.num_evaluations)
            and int(sharded.num_nonfinite) == int(single.num_nonfinite),
            "cross_device_reduction": "all-reduce" in compiled.as_text(),
        }
    out["ags_estimator"] = estimates


def _sam_family_checks(out: dict, extended: bool) -> None:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P
    from transformations import REGISTRY

    mesh = Mesh(np.array(jax.devices()), ("b",))
    rng = np.random.default_rng(0)
    batch = 8 * NUM_DEVICES
    x_all = jnp.asarray(rng.normal(size=(batch, 5)), jnp.float32)
    y_all = jnp.asarray(rng.normal(size=(batch,)), jnp.float32)
    params = {
        "w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        "b": jnp.float32(0.1),
    }

    def per_example(p, x, y):
        return (jnp.tanh(x @ p["w"]) @ p["v"] + p["b"] - y) ** 2

    def loss(p, x, y):
        return jnp.mean(per_example(p, x, y))

    shards = [(x_all[i * 8 : (i + 1) * 8], y_all[i * 8 : (i + 1) * 8]) for i in range(NUM_DEVICES)]
    names = SAM_FAMILY if extended else SAM_DEFAULT
    entries = {name: REGISTRY[name] for name in names}

    def problem(x, y):
        return Problem(lambda q: loss(q, x, y))

    steps, lr = 2, 0.1
    results = {}
    for name, entry in entries.items():
        overrides = SAM_OVERRIDES.get(name, {})
        for variant in ("pcast", "check_vma=False", "without pcast"):
            if variant != "pcast" and name != "sam":
                continue
            # the whole training step runs per shard: gradient, m-sharpness, SGD, apply
            sharded_opt = optax.chain(
                entry.make(**overrides, axis_name="b"), optax.sgd(lr, momentum=0.9)
            )
            cast = variant == "pcast"

            def train_step(p, s, x, y, opt=sharded_opt, cast=cast, entry=entry):
                g = jax.grad(loss)(_local(p, "b") if cast else p, x, y)
                u, s = entry.update(opt, g, s, p, problem(x, y))
                return optax.apply_updates(p, u), s

            mapped = jax.jit(
                jax.shard_map(
                    train_step,
                    mesh=mesh,
                    in_specs=(P(), P(), P("b"), P("b")),
                    out_specs=(P(), P()),
                    check_vma=variant != "check_vma=False",
                )
            )
            # reference: each shard's single-device update, averaged explicitly, then SGD
            base = optax.sgd(lr, momentum=0.9)
            single_opt = entry.make(**overrides)
            single_update = jax.jit(
                lambda g, s, p, x, y, o=single_opt, e=entry: e.update(o, g, s, p, problem(x, y))
            )
            p_sharded, s_sharded = params, sharded_opt.init(params)
            p_ref, b_ref = params, base.init(params)
            s_ref = [single_opt.init(params) for _ in shards]
            gaps = []
            for _ in range(steps):
                p_sharded, s_sharded = mapped(p_sharded, s_sharded, x_all, y_all)
                per_shard = []
                for i, (x, y) in enumerate(shards):
                    d, s_ref[i] = single_update(jax.grad(loss)(p_ref, x, y), s_ref[i], p_ref, x, y)
                    per_shard.append(d)
                mean = jax.tree.map(lambda *ds: sum(ds) / len(ds), *per_shard)
                r, b_ref = base.update(mean, b_ref, p_ref)
                p_ref = optax.apply_updates(p_ref, r)
                gaps.append(_gap(p_sharded, p_ref))
            record = {"params_gap": max(gaps)}
            if entry.factory_name == "vsam":
                psf_mean = jax.tree.map(lambda *t: sum(t) / len(t), *[s.psf for s in s_ref])
                record["psf_gap"] = _gap(s_sharded[0].psf, psf_mean)
                record["num_sam_steps"] = int(s_sharded[0].num_sam_steps)
            key = name if variant == "pcast" else f"{name} {variant}"
            results[key] = record
    out["sam_family"] = results
    if extended:
        _ausam_check(out, mesh, params, per_example, x_all, y_all, shards)


def _ausam_check(out, mesh, params, per_example, x_all, y_all, shards) -> None:
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P
    from transformations import REGISTRY

    # AUSAM, first (full-batch) epoch, check_vma=False
    num_examples = x_all.shape[0]
    ids_all = jnp.arange(num_examples, dtype=jnp.int32)
    entry = REGISTRY["ausam"]

    def ausam_opt(axis):
        overrides = {"num_examples": num_examples, "rho": 0.1, "steps_per_epoch": 4}
        return entry.make(**overrides, alpha=0.5, axis_name=axis)

    def ausam_step(p, s, x, y, ids, opt):
        problem = Problem(
            value_fn=lambda q: jnp.mean(per_example(q, x, y)),
            per_example_loss_fn=lambda q, positions: per_example(q, x[positions], y[positions]),
            ids=ids,
        )
        return entry.update(opt, None, s, p, problem)

    sharded_opt = ausam_opt("b")
    mapped = jax.jit(
        jax.shard_map(
            lambda p, s, x, y, ids: ausam_step(p, s, x, y, ids, sharded_opt),
            mesh=mesh,
            in_specs=(P(), P(), P("b"), P("b"), P("b")),
            out_specs=(P(), P()),
            check_vma=False,
        )
    )
    u_sharded, s_sharded = mapped(params, sharded_opt.init(params), x_all, y_all, ids_all)
    single_opt = ausam_opt(None)
    single = jax.jit(lambda p, s, x, y, ids: ausam_step(p, s, x, y, ids, single_opt))
    per_shard, dlp_sum = [], 0.0
    for i, (x, y) in enumerate(shards):
        u, s = single(params, single_opt.init(params), x, y, ids_all[i * 8 : (i + 1) * 8])
        per_shard.append(u)
        dlp_sum = dlp_sum + s.dlp_sum
    mean = jax.tree.map(lambda *us: sum(us) / len(us), *per_shard)
    out["ausam"] = {
        "update_gap": _gap(u_sharded, mean),
        "dlp_sum_gap": _gap(s_sharded.dlp_sum, dlp_sum),
        "all_recorded": bool(np.all(np.asarray(s_sharded.dlp_count) == 1)),
    }


def _worker(out_path: str, extended: bool) -> None:
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    out: dict = {"device_count": jax.device_count(), "jax": jax.__version__}
    _ags_checks(out, extended)
    _sam_family_checks(out, extended)
    Path(out_path).write_text(json.dumps(out, indent=2), encoding="utf-8")


# --------------------------------------------------------------------------- the tests


def _run_worker(out: Path, extended: bool) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), str(out)]
    if extended:
        command.append("--extended")
    proc = subprocess.run(
        command,
        env=device_env(NUM_DEVICES),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return _run_worker(tmp_path_factory.mktemp("multidevice") / "results.json", False)


@pytest.fixture(scope="module")
def extended_results(tmp_path_factory) -> dict:
    return _run_worker(tmp_path_factory.mktemp("multidevice") / "extended.json", True)


def _check_estimates(estimates: dict) -> None:
    for name, entry in estimates.items():
        assert entry["grad_gap"] <= TOLERANCE, (name, entry)
        assert entry["value_gap"] <= TOLERANCE, (name, entry)
        assert entry["counts_equal"], name
        assert entry["cross_device_reduction"], f"{name}: the sharded estimate is not partitioned"


def _check_sam_family(entry: dict) -> None:
    assert entry["params_gap"] <= TOLERANCE, entry
    if "psf_gap" in entry:
        assert entry["psf_gap"] <= TOLERANCE, entry
        assert entry["num_sam_steps"] == 2


def test_eight_virtual_devices(results):
    assert results["device_count"] == NUM_DEVICES


def test_ags_sharded_training_step_equals_single_device(results):
    entry = results["ags_train_step"]
    assert entry["params_gap"] <= TOLERANCE, entry
    assert entry["rule_state_gap"] <= TOLERANCE, entry
    assert entry["value_gap"] <= TOLERANCE, entry
    assert entry["keys_equal"]
    assert entry["cross_device_reduction"], "the sharded step is not partitioned"


def test_ags_sharded_estimate_with_uneven_chunk_equals_single_device(results):
    _check_estimates(results["ags_estimator"])


@pytest.mark.parametrize("name", ["sam", "bsam", "sam check_vma=False"])
def test_sam_family_shard_map_equals_mean_of_shards(results, name):
    _check_sam_family(results["sam_family"][name])


def test_sam_gradient_of_replicated_params_is_summed_under_vma(results):
    # The pitfall the README warns about: under shard_map's check_vma=True, jax.grad at the
    # replicated params is the sum over the shards, not the local gradient, so SAM then
    # perturbs along the global direction and averages summed gradients.
    assert results["sam_family"]["sam without pcast"]["params_gap"] > 1e-3


@pytest.mark.slow
def test_extended_multidevice_checks(extended_results):
    _check_estimates(extended_results["ags_estimator"])
    for name in SAM_FAMILY:
        _check_sam_family(extended_results["sam_family"][name])
    entry = extended_results["ausam"]
    assert entry["update_gap"] <= TOLERANCE, entry
    assert entry["dlp_sum_gap"] <= TOLERANCE, entry
    assert entry["all_recorded"]


if __name__ == "__main__":
    _worker(sys.argv[1], extended="--extended" in sys.argv[2:])
