"""One process of the two-process check in ``tests/test_multiprocess.py``.

Run as ``python tests/multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT OUT.json
[--extended]``, once per process, with one CPU device per process
(``XLA_FLAGS=--xla_force_host_platform_device_count=1``). Every process joins
``jax.distributed`` through a coordinator on ``127.0.0.1:PORT`` with Gloo CPU collectives,
so the mesh is global: NUM_PROCESSES devices, of which each process addresses its own. This
is JAX's multi-host programming model on one machine; a real cluster differs only in the
coordinator's address.

The process then

1. puts every transformation's freshly initialized state (``ags`` with each covariance rule,
   ``sam``, ``asam``, ``bsam``, ``ausam``, ``vsam``) on the mesh with
   ``jax.device_put(state, NamedSharding(mesh, P()))``. A multi-process ``device_put`` checks
   that every process passes the same value and NaN ≠ NaN, so a NaN anywhere in an initial
   state makes it fail;
2. runs three jitted steps of ``optax.chain(agsopt.ags(..., sample_sharding=...), sgd)``
   with the Monte Carlo sample axis sharded over all devices of all processes (the default
   covariance rule; ``--extended``: the other rules);
3. runs two data-parallel steps of SAM (``--extended``: BSAM and vSAM in warm-up) and one of
   AUSAM under ``jax.shard_map`` with ``axis_name``, the batch split over all devices of all
   processes (each process builds the global batch from its own rows with
   ``jax.make_array_from_process_local_data``);

and writes what it sees (its copy of every replicated result) to ``OUT.json``. The test
compares both processes' files with the single-process results. The problems are defined
here and imported by the test, so both sides run the same problem.

Exit status 77 means the installed jaxlib has no CPU collectives (the test then skips).
"""

from __future__ import annotations

import inspect
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

# CPU devices per process. Not 2: with two CPU devices per process, Gloo collectives hung
# after a few steps on this machine (openxla/xla#16430 reports a crash in that setting).
LOCAL_DEVICES = 1
AGS_STEPS = 3
SAM_STEPS = 2
ROWS_PER_DEVICE = 4
COVARIANCES = ("adaptive_gradient_aligned", "gradient_aligned", "adaptive_diagonal", "isotropic")
SAM_FAMILY = ("sam", "bsam", "vsam")
# the default run (CI); ``--extended`` runs the others (the slow test)
DEFAULT_COVARIANCES = ("adaptive_gradient_aligned",)
DEFAULT_SAM_FAMILY = ("sam",)
EXTENDED_COVARIANCES = tuple(c for c in COVARIANCES if c not in DEFAULT_COVARIANCES)
EXTENDED_SAM_FAMILY = tuple(n for n in SAM_FAMILY if n not in DEFAULT_SAM_FAMILY)
UNAVAILABLE = 77


# --------------------------------------------------------------------------- the problems
# Imported by the test as well; jax is imported inside the functions only.


def ags_params() -> dict:
    import jax.numpy as jnp

    return {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": [jnp.arange(3.0)]}


def ags_loss(p: dict) -> Any:
    import jax.numpy as jnp

    return jnp.sum(jnp.sin(3.0 * p["w"])) + jnp.sum(p["b"][0] ** 4)


def ags_optimizer(covariance: str, sample_sharding: Any = None) -> Any:
    import optax

    import agsopt

    return optax.chain(
        agsopt.ags(0.3, 16, covariance=covariance, key=3, sample_sharding=sample_sharding),
        optax.sgd(0.05, momentum=0.9),
    )


def ags_train(opt: Any, params: Any, state: Any, steps: int = AGS_STEPS) -> tuple[Any, Any, str]:
    """``steps`` jitted steps of ``opt`` on :func:`ags_loss`; also the compiled text."""
    import jax
    import optax

    def step(p, s):
        u, s = opt.update(p, s, p, value_fn=ags_loss)
        return optax.apply_updates(p, u), s

    compiled = jax.jit(step).lower(params, state).compile()
    for _ in range(steps):
        params, state = compiled(params, state)
    return params, state, compiled.as_text()


def sam_problem(num_devices: int) -> tuple[dict, Any, Any]:
    """Parameters and the full batch ``(x, y)``: ROWS_PER_DEVICE rows per device."""
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    rows = ROWS_PER_DEVICE * num_devices
    x = jnp.asarray(rng.normal(size=(rows, 5)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(rows,)), jnp.float32)
    params = {
        "w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
        "v": jnp.asarray(rng.normal(size=(3,)), jnp.float32),
        "b": jnp.float32(0.1),
    }
    return params, x, y


def per_example_loss(p: dict, x: Any, y: Any) -> Any:
    import jax.numpy as jnp

    return (jnp.tanh(x @ p["w"]) @ p["v"] + p["b"] - y) ** 2


def sam_loss(p: dict, x: Any, y: Any) -> Any:
    import jax.numpy as jnp

    return jnp.mean(per_example_loss(p, x, y))


def sam_family(name: str, axis_name: str | None) -> Any:
    import agsopt

    if name == "sam":
        return agsopt.sam(0.1, axis_name=axis_name)
    if name == "bsam":
        return agsopt.bsam(0.1, 0.05, axis_name=axis_name)
    if name == "vsam":  # warm-up steps are SAM steps; the PSF average is kept in the state
        return agsopt.vsam(0.1, window=4, var_blocks=2, warmup_steps=4, axis_name=axis_name)
    raise ValueError(name)


def ausam_optimizer(num_examples: int, axis_name: str | None) -> Any:
    from agsopt.sharpness import ausam

    return ausam(num_examples, 0.1, steps_per_epoch=4, alpha=0.5, axis_name=axis_name)


def ausam_update(opt: Any, p: Any, s: Any, x: Any, y: Any, ids: Any) -> tuple[Any, Any]:
    def per_example_loss_fn(q, positions):
        return per_example_loss(q, x[positions], y[positions])

    return opt.update(None, s, p, per_example_loss_fn=per_example_loss_fn, ids=ids)


def initial_states() -> dict[str, tuple[Any, Any]]:
    """``name -> (transformation, params)`` for every transformation agsopt exports."""
    import agsopt

    params, x, _ = sam_problem(1)
    out: dict[str, tuple[Any, Any]] = {
        f"ags {c}": (agsopt.ags(0.3, 16, covariance=c), ags_params()) for c in COVARIANCES
    }
    out["sam"] = (agsopt.sam(0.1), params)
    out["asam"] = (agsopt.sam(0.5, adaptive=True), params)
    out["bsam"] = (agsopt.bsam(0.1, 0.05), params)
    out["vsam"] = (agsopt.vsam(0.1, window=4, var_blocks=2, warmup_steps=4), params)
    out["ausam"] = (ausam_optimizer(int(x.shape[0]), None), params)
    return out


def local_pcast(params: Any, axis: str) -> Any:
    """Mark replicated ``params`` as varying over ``axis`` (per-shard gradients)."""
    import jax

    pcast = getattr(jax.lax, "pcast", None)
    if pcast is not None:
        return pcast(params, axis, to="varying")
    return jax.lax.pvary(params, axis)  # older JAX


def to_lists(tree: Any) -> list:
    """The leaves of a tree as nested float64 lists (this process's copy if replicated)."""
    import jax

    out = []
    for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            assert leaf.is_fully_replicated, leaf.sharding
            leaf = leaf.addressable_data(0)
        out.append(np.asarray(leaf, np.float64).tolist())
    return out


# --------------------------------------------------------------------------- the worker


def _enable_cpu_collectives() -> str | None:
    """Select Gloo CPU collectives; the reason they are unavailable, or None."""
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError) as error:
        return f"this JAX has no Gloo CPU collectives option: {error}"
    try:
        from jax._src import lib

        extension = getattr(lib, "_jax", None) or getattr(lib, "xla_extension", None)
    except ImportError:
        extension = None
    if extension is not None and not hasattr(extension, "make_gloo_tcp_collectives"):
        return f"jaxlib {lib.version_str} was built without Gloo CPU collectives"
    return None


def _device_put_states(replicated: Any) -> dict:
    import jax

    results = {}
    for name, (opt, params) in initial_states().items():
        state = opt.init(params)
        try:
            placed = jax.device_put(state, replicated)
        except Exception as error:  # the failure is the finding; report it, do not stop
            results[name] = {"ok": False, "error": f"{type(error).__name__}: {error}"[:600]}
            continue
        same = all(
            np.array_equal(np.asarray(a), np.asarray(b.addressable_data(0)))
            for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(placed), strict=True)
        )
        replicated_ok = all(b.is_fully_replicated for b in jax.tree.leaves(placed))
        results[name] = {"ok": same and replicated_ok}
    return results


def _ags_steps(mesh: Any, covariances: tuple[str, ...]) -> dict:
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    replicated = NamedSharding(mesh, P())
    samples = NamedSharding(mesh, P("s"))
    results = {}
    for covariance in covariances:
        opt = ags_optimizer(covariance, samples)
        params = jax.device_put(ags_params(), replicated)
        state = jax.device_put(opt.init(ags_params()), replicated)
        params, state, text = ags_train(opt, params, state)
        results[covariance] = {
            "params": to_lists(params),
            "state": to_lists(state),
            "cross_device_reduction": "all-reduce" in text,
        }
    return results


def _global_batch(mesh: Any, full: Any) -> Any:
    """The global array over ``mesh`` built from this process's rows only, checked."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    sharding = NamedSharding(mesh, P("b"))
    rows = full.shape[0] // jax.process_count()
    local = full[jax.process_index() * rows : (jax.process_index() + 1) * rows]
    array = jax.make_array_from_process_local_data(sharding, np.asarray(local))
    assert array.shape == full.shape
    for shard in array.addressable_shards:
        assert np.array_equal(np.asarray(shard.data), np.asarray(full[shard.index])), shard.index
    return array


def _sam_steps(mesh: Any, names: tuple[str, ...], with_ausam: bool) -> dict:
    import jax
    import optax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    replicated = NamedSharding(mesh, P())
    params0, x_all, y_all = sam_problem(mesh.size)
    x, y = _global_batch(mesh, x_all), _global_batch(mesh, y_all)
    results: dict = {}
    for name in names:
        opt = optax.chain(sam_family(name, "b"), optax.sgd(0.1, momentum=0.9))

        def train_step(p, s, x, y, opt=opt):
            g = jax.grad(sam_loss)(local_pcast(p, "b"), x, y)
            u, s = opt.update(g, s, p, value_fn=lambda q: sam_loss(q, x, y))
            return optax.apply_updates(p, u), s

        step = jax.jit(
            jax.shard_map(
                train_step,
                mesh=mesh,
                in_specs=(P(), P(), P("b"), P("b")),
                out_specs=(P(), P()),
            )
        )
        params = jax.device_put(params0, replicated)
        state = jax.device_put(opt.init(params0), replicated)
        trajectory = []
        for _ in range(SAM_STEPS):
            params, state = step(params, state, x, y)
            trajectory.append(to_lists(params))
        results[name] = {"params": trajectory}
        if name == "vsam":
            results[name]["psf"] = to_lists(state[0].psf)
            results[name]["num_sam_steps"] = int(state[0].num_sam_steps.addressable_data(0))

    if not with_ausam:
        return results
    # AUSAM, first (full-batch) epoch; records are gathered over the shards
    num_examples = int(x_all.shape[0])
    ids = _global_batch(mesh, np.arange(num_examples, dtype=np.int32))
    opt = ausam_optimizer(num_examples, "b")
    step = jax.jit(
        jax.shard_map(
            lambda p, s, x, y, i: ausam_update(opt, p, s, x, y, i),
            mesh=mesh,
            in_specs=(P(), P(), P("b"), P("b"), P("b")),
            out_specs=(P(), P()),
            check_vma=False,
        )
    )
    state = jax.device_put(opt.init(params0), replicated)
    update, state = step(jax.device_put(params0, replicated), state, x, y, ids)
    results["ausam"] = {
        "update": to_lists(update),
        "dlp_sum": to_lists(state.dlp_sum),
        "dlp_count": to_lists(state.dlp_count),
    }
    return results


def main(process_id: int, num_processes: int, port: int, out_path: str, extended: bool) -> int:
    reason = _enable_cpu_collectives()
    if reason is not None:
        print(reason, file=sys.stderr)
        return UNAVAILABLE
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    jax.config.update("jax_default_matmul_precision", "highest")
    address = f"127.0.0.1:{port}"
    options = {}
    if "coordinator_bind_address" in inspect.signature(jax.distributed.initialize).parameters:
        options["coordinator_bind_address"] = address  # loopback only, not every interface
    jax.distributed.initialize(
        coordinator_address=address,
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=60,
        **options,
    )
    try:
        out: dict = {
            "process_index": jax.process_index(),
            "process_count": jax.process_count(),
            "device_count": jax.device_count(),
            "local_device_count": jax.local_device_count(),
            "jax": jax.__version__,
        }
        devices = np.array(jax.devices())
        start = time.perf_counter()
        if not extended:
            out["device_put"] = _device_put_states(NamedSharding(Mesh(devices, ("s",)), P()))
            print(f"device_put: {time.perf_counter() - start:.1f} s", flush=True)
        covariances = EXTENDED_COVARIANCES if extended else DEFAULT_COVARIANCES
        try:
            out["ags"] = _ags_steps(Mesh(devices, ("s",)), covariances)
        except Exception:
            out["ags_error"] = traceback.format_exc()[-3000:]
        print(f"+ AGS: {time.perf_counter() - start:.1f} s", flush=True)
        names = EXTENDED_SAM_FAMILY if extended else DEFAULT_SAM_FAMILY
        try:
            out["sam_family"] = _sam_steps(Mesh(devices, ("b",)), names, not extended)
        except Exception:
            out["sam_family_error"] = traceback.format_exc()[-3000:]
        print(f"total after distributed.initialize: {time.perf_counter() - start:.1f} s")
        Path(out_path).write_text(json.dumps(out), encoding="utf-8")
    finally:
        jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    process_id, num_processes, port, out_path = sys.argv[1:5]
    extended = "--extended" in sys.argv[5:]
    sys.exit(main(int(process_id), int(num_processes), int(port), out_path, extended))
