"""AGS estimator throughput from 1 to 8 devices, the Monte Carlo sample axis sharded.

One antithetic estimate of the smoothed gradient of Rastrigin (N directions, 2N evaluations)
with ``sample_sharding=NamedSharding(Mesh(devices[:n], ("s",)), P("s"))``, jitted, timed warm
(median of repeats, ``block_until_ready``), for n = 1, 2, 4, 8 devices; the same key on every
n, so every n must give the single-device estimate up to float32 summation order.

On a CPU-only host the n devices are *virtual* CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=n``, one subprocess per n, since the
flag must be set before JAX starts). They share the host's cores, so no speedup is expected:
the numbers show what partitioning costs, not what more hardware gains. On a GPU/TPU host the
real devices are used (meshes over the first n of ``jax.devices()``, n up to the device
count) and the speedup is the one to expect from adding accelerators.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from . import common
from .problems import test_function_problem

DEVICE_COUNTS = (1, 2, 4, 8)
ROOT = Path(__file__).resolve().parent.parent


def settings(quick: bool) -> dict[str, Any]:
    """Problem size and timing effort. Full: d = 10⁵, N = 256 in chunks of 64 directions."""
    if quick:
        return {"dim": 1_000, "num_samples": 64, "chunk": None, "repeats": 3, "max_s": 2.0}
    return {"dim": 100_000, "num_samples": 256, "chunk": 64, "repeats": 9, "max_s": 20.0}


# --------------------------------------------------------------------------- one measurement


def measure(devices: list[Any], config: dict[str, Any]) -> dict[str, Any]:
    """Time one sharded estimate on ``devices``; also return a fingerprint of the estimate."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from agsopt import covariance
    from agsopt.estimator import smoothed_value_and_grad

    problem = test_function_problem("rastrigin", config["dim"])
    mesh = Mesh(np.array(devices), ("s",))
    sharding = NamedSharding(mesh, P("s"))
    matrix = covariance.isotropic(problem.sigma)

    @jax.jit
    def estimate(params, key):
        return smoothed_value_and_grad(
            problem.fun,
            params,
            key,
            matrix,
            num_samples=config["num_samples"],
            chunk_size=config["chunk"],
            sample_sharding=sharding,
        ).grad

    params = jax.device_put(problem.params, NamedSharding(mesh, P()))
    key = jax.random.key(0)
    stats = common.time_interleaved(
        {"estimate": (estimate, (params, key))},
        repeats=config["repeats"],
        max_seconds=config["max_s"],
    )["estimate"]
    grad = np.asarray(estimate(params, key), np.float64)
    return {
        "devices": len(devices),
        "platform": devices[0].platform,
        "device_kind": devices[0].device_kind,
        "stats": stats,
        "grad_head": grad[:64].tolist(),
        "grad_norm": float(np.linalg.norm(grad)),
    }


def _worker(argv: list[str]) -> None:
    """``python -m benchmarks.scaling --worker N OUT.json [--quick]`` (virtual CPU devices)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", type=int, required=True)
    parser.add_argument("out", type=Path)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    devices = jax.devices()
    if len(devices) != args.worker:
        raise RuntimeError(f"expected {args.worker} devices, got {len(devices)}")
    result = measure(devices, settings(args.quick))
    args.out.write_text(json.dumps(result), encoding="utf-8")


def _virtual_cpu_run(count: int, quick: bool) -> dict[str, Any]:
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={count}")
    env = {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "benchmarks.scaling", "--worker", str(count), str(out)]
        if quick:
            command.append("--quick")
        proc = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"scaling worker ({count} devices) failed:\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- the report


def run(quick: bool, out_dir: Path | None = None) -> dict[str, Any]:
    """Measure, build the report and, given ``out_dir``, write ``scaling.json``/``scaling.md``."""
    start = time.perf_counter()
    config = settings(quick)
    backend = jax.default_backend()
    virtual = backend == "cpu"
    if virtual:
        results = [_virtual_cpu_run(n, quick) for n in DEVICE_COUNTS]
    else:
        available = jax.devices()
        counts = [n for n in DEVICE_COUNTS if n <= len(available)]
        results = [measure(available[:n], config) for n in counts]

    evaluations = 2 * config["num_samples"]
    base = results[0]
    base_time = base["stats"]["median_s"]
    base_head = np.asarray(base["grad_head"])
    rows = []
    for r in results:
        s, n = r["stats"], r["devices"]
        speedup = base_time / s["median_s"]
        gap = float(np.max(np.abs(np.asarray(r["grad_head"]) - base_head)))
        rows.append(
            {
                "devices": n,
                "device": f"{r['platform']} (virtual)" if virtual else r["device_kind"],
                "median ms": 1e3 * s["median_s"],
                "IQR ms": f"{1e3 * s['q25_s']:.3g}–{1e3 * s['q75_s']:.3g}",
                "evals/s": evaluations / s["median_s"],
                "speedup": speedup,
                "efficiency": speedup / n,
                "max |Δgrad| vs 1 device": gap / max(1.0, float(np.max(np.abs(base_head)))),
                "first call s": s["first_s"],
                "repeats": s["repeats"],
                "stats": s,
                "grad_norm": r["grad_norm"],
            }
        )

    worst_gap = max(row["max |Δgrad| vs 1 device"] for row in rows)
    last = rows[-1]
    targets = [
        common.target(
            "sharded estimate equals the single-device one (same key)",
            worst_gap <= 1e-5,
            f"largest relative gap over the first 64 gradient entries: {worst_gap:.2e}",
        ),
        common.target(
            "throughput grows with devices (efficiency ≥ 0.5 at the largest count)",
            None if virtual else last["efficiency"] >= 0.5,
            (
                f"{last['devices']} virtual CPU devices on {common.environment()['usable_cpus']} "
                f"usable cores: speedup {last['speedup']:.2f}× — not judged, the virtual "
                "devices share the same cores"
                if virtual
                else f"{last['devices']} devices: speedup {last['speedup']:.2f}×, "
                f"efficiency {last['efficiency']:.2f}"
            ),
        ),
    ]
    notes = [
        f"Rastrigin at d = {config['dim']:,}, antithetic, N = {config['num_samples']} "
        f"directions (E = {evaluations} evaluations per estimate), isotropic Σ, "
        f"chunk_size = {config['chunk']}: each chunk's directions are constrained to "
        "P('s') over the mesh; parameters replicated.",
        "speedup = median time on 1 device / median time on n; efficiency = speedup / n.",
        (
            "CPU-only host: n virtual CPU devices (XLA_FLAGS="
            "--xla_force_host_platform_device_count=n), one subprocess per n. They share "
            f"this host's {common.environment()['usable_cpus']} usable cores, so no speedup "
            "is expected; a slowdown is the cost of partitioning the work and the "
            "cross-device reduction."
            if virtual
            else f"{backend} host: the first n of jax.devices(), in one process."
        ),
        "Timing: one warm-up call (compilation, 'first call s'), then repeats; median.",
    ]
    table = common.make_table(
        "AGS estimator throughput by device count",
        [
            "devices",
            "device",
            "median ms",
            "IQR ms",
            "evals/s",
            "speedup",
            "efficiency",
            "max |Δgrad| vs 1 device",
            "first call s",
            "repeats",
        ],
        rows,
    )
    report = common.make_report(
        "scaling",
        "AGS estimator scaling over devices (sample-axis sharding)",
        __doc__.split("\n\n", 1)[1].strip(),
        tables=[table],
        notes=notes,
        targets=targets,
        data={"config": config, "backend": backend, "virtual_devices": virtual},
    )
    if out_dir is not None:
        env = common.environment()
        mode = "quick" if quick else "full"
        common.write_report(report, Path(out_dir), env, mode, time.perf_counter() - start)
    return report


if __name__ == "__main__":
    if "--worker" in sys.argv[1:]:
        _worker(sys.argv[1:])
    else:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.scaling")
        parser.add_argument("--quick", action="store_true")
        parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
        cli = parser.parse_args()
        report = run(cli.quick, cli.out)
        for t in report["targets"]:
            print(f"[{common.target_mark(t['met'])}] {t['target']}: {t['detail']}")
