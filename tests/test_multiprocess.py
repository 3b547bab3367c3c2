"""Multiple processes: JAX's own distribution (``jax.distributed``) on one machine.

Two processes (``tests/multiprocess_worker.py``) join a coordinator on a free loopback port
with Gloo CPU collectives and one CPU device each, so every mesh spans two devices in two
processes, the multi-host model of JAX. (One device per process: with two CPU devices per
process, Gloo collectives hung after a few steps here, and XLA reports a crash in that
configuration, openxla/xla#16430; GPUs and TPUs use their own collectives.) This test
starts them, kills both if either fails or they take longer than ``TIMEOUT_S``, and
compares what each process saw with the single-process results computed here:

- every transformation's initial state goes onto the global mesh with a plain
  ``jax.device_put(state, NamedSharding(mesh, P()))`` (multi-process ``device_put`` checks
  that the processes agree, so no initial leaf may be NaN);
- AGS with ``sample_sharding`` over both devices, three jitted steps chained with SGD
  with momentum, the default covariance rule (the other rules: ``-m slow``): equal to the
  same steps with no sharding in this process;
- SAM (BSAM and vSAM in warm-up: ``-m slow``) data-parallel under ``jax.shard_map`` with
  ``axis_name``, the batch split over both devices: equal to the mean of the two
  per-shard single-device updates, computed here shard by shard; AUSAM's first epoch
  likewise, and its sharpness records are the union of the shards' records.

Tolerance: the random numbers do not depend on the sharding or the process count (the same
keys are split the same way), so the two computations differ only in the order of float32
sums (partial sums per device, then an all-reduce over the processes). Observed: at most
1.7e-7 of ``max(1, max |single|)`` (1.4 float32 ulps at scale 1, ε = 1.19e-7) over all
steps, rules and the SAM family; ``TOLERANCE = 2e-6`` (about 17 ulps) leaves a 10× margin. The
errors this test is for are far larger: a state that cannot be placed fails outright, and a
gradient summed instead of averaged over the shards moves a SAM step by more than 1e-3
(``tests/test_multidevice.py``), and AGS on 8 of its 16 samples (half lost) ends three
steps 0.82 away. The PRNG key data and the counters are
compared exactly, and the two processes, which hold replicas of one result, must agree
exactly.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import multiprocess_worker as worker
import numpy as np
import optax
import pytest

NUM_PROCESSES = 2
TOLERANCE = 2e-6  # of max(1, max |single|): float32 summation order, see the module docstring
TIMEOUT_S = 120
WORKER = Path(__file__).with_name("multiprocess_worker.py")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker_env() -> dict[str, str]:
    # The coordinator is gRPC on loopback: proxy variables can make jax.distributed hang
    # (JAX warns about them), so the workers run without any.
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={worker.LOCAL_DEVICES}")
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    return env


def _start(tmp: Path, extended: bool) -> tuple[list[int | None], bool]:
    """Run the processes on a fresh port; kill all of them if one fails or time runs out.

    Returns the exit codes (None: killed) and whether the time ran out.
    """
    port = _free_port()
    procs, logs = [], []
    timed_out = False
    try:
        for i in range(NUM_PROCESSES):
            log = (tmp / f"process{i}.log").open("w", encoding="utf-8")
            logs.append(log)
            command = [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port)]
            procs.append(
                subprocess.Popen(
                    [*command, str(tmp / f"process{i}.json")] + ["--extended"] * extended,
                    env=_worker_env(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                break  # the others would wait for it until their own timeouts
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    return [p.returncode for p in procs], timed_out


def _launch(tmp: Path, extended: bool = False) -> list[dict]:
    for attempt in range(2):
        codes, timed_out = _start(tmp, extended)
        logs = [(tmp / f"process{i}.log").read_text(errors="replace") for i in range(len(codes))]
        text = "\n".join(
            f"--- process {i} (exit {c}):\n{log[-4000:]}"
            for i, (c, log) in enumerate(zip(codes, logs, strict=True))
        )
        # the port was taken between _free_port and the coordinator's bind: once more
        if attempt == 0 and codes[0] not in (0, None) and "Failed to add port" in logs[0]:
            continue
        break
    if worker.UNAVAILABLE in codes:
        pytest.skip(f"no CPU collectives in the installed jaxlib:\n{text}")
    if timed_out:
        pytest.fail(f"the worker processes did not finish in {TIMEOUT_S} s:\n{text}")
    assert codes == [0] * NUM_PROCESSES, f"a worker process failed:\n{text}"
    return [
        json.loads((tmp / f"process{i}.json").read_text(encoding="utf-8"))
        for i in range(NUM_PROCESSES)
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("multiprocess"))


@pytest.fixture(scope="module")
def extended_runs(tmp_path_factory) -> list[dict]:
    return _launch(tmp_path_factory.mktemp("multiprocess_extended"), extended=True)


def _as_lists(tree) -> list:
    return [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(tree)]


def _gap(got: list, want: list) -> float:
    """``max |got − want| / max(1, max |want|)`` over all leaves."""
    got = [np.asarray(g, np.float64) for g in got]
    want = [np.asarray(w, np.float64) for w in want]
    assert [g.shape for g in got] == [w.shape for w in want]
    scale = max([1.0] + [float(np.max(np.abs(w))) for w in want if w.size])
    return max(float(np.max(np.abs(g - w))) for g, w in zip(got, want, strict=True)) / scale


def test_two_processes_one_device_each(runs):
    for i, run in enumerate(runs):
        assert run["process_index"] == i
        assert run["process_count"] == NUM_PROCESSES
        assert run["local_device_count"] == worker.LOCAL_DEVICES
        assert run["device_count"] == NUM_PROCESSES * worker.LOCAL_DEVICES


def test_every_initial_state_device_puts_to_the_global_mesh(runs):
    names = set(worker.initial_states())
    for run in runs:
        assert set(run["device_put"]) == names
        failed = {k: v for k, v in run["device_put"].items() if not v["ok"]}
        assert not failed, failed


def test_every_initial_state_is_finite():
    # Why device_put can fail: a multi-process device_put compares the processes' values,
    # and NaN != NaN. Checked here too, in one process, so the cause is named.
    for name, (opt, params) in worker.initial_states().items():
        for leaf in jax.tree.leaves(opt.init(params)):
            leaf = np.asarray(leaf)
            if np.issubdtype(leaf.dtype, np.inexact):
                assert np.all(np.isfinite(leaf)), (name, leaf)


@pytest.mark.parametrize("covariance", worker.DEFAULT_COVARIANCES)
def test_ags_sample_sharding_over_processes_equals_single_process(runs, covariance):
    _check_ags(runs, covariance)


@pytest.mark.slow
@pytest.mark.parametrize("covariance", worker.EXTENDED_COVARIANCES)
def test_ags_sample_sharding_over_processes_other_rules(extended_runs, covariance):
    _check_ags(extended_runs, covariance)


def _check_ags(runs: list[dict], covariance: str) -> None:
    assert "ags_error" not in runs[0], runs[0]["ags_error"]
    opt = worker.ags_optimizer(covariance)
    params, state, _ = worker.ags_train(opt, worker.ags_params(), opt.init(worker.ags_params()))
    assert int(state[0].count) == worker.AGS_STEPS
    leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(state)]
    exact = [np.issubdtype(leaf.dtype, np.integer) for leaf in leaves]  # keys and counters
    assert any(exact) and not all(exact)
    first = runs[0]["ags"][covariance]
    for run in runs:
        got = run["ags"][covariance]
        assert got["cross_device_reduction"], "the sharded step is not partitioned"
        assert _gap(got["params"], _as_lists(params)) <= TOLERANCE
        assert len(got["state"]) == len(leaves)
        floats = [(g, w) for g, w, e in zip(got["state"], leaves, exact, strict=True) if not e]
        assert _gap(*zip(*floats, strict=True)) <= TOLERANCE
        for g, w, e in zip(got["state"], leaves, exact, strict=True):
            if e:  # the PRNG key data and the counters: the same integers
                np.testing.assert_array_equal(np.asarray(g, np.float64), w.astype(np.float64))
        # replicas of one result: the processes agree exactly
        assert got["params"] == first["params"] and got["state"] == first["state"]


def _shards(num_devices: int):
    params, x, y = worker.sam_problem(num_devices)
    r = worker.ROWS_PER_DEVICE
    return params, [(x[i * r : (i + 1) * r], y[i * r : (i + 1) * r]) for i in range(num_devices)]


@pytest.mark.parametrize("name", worker.DEFAULT_SAM_FAMILY)
def test_sam_family_data_parallel_over_processes_equals_mean_of_shards(runs, name):
    _check_sam_family(runs, name)


@pytest.mark.slow
@pytest.mark.parametrize("name", worker.EXTENDED_SAM_FAMILY)
def test_sam_family_data_parallel_over_processes_bsam_vsam(extended_runs, name):
    _check_sam_family(extended_runs, name)


def _check_sam_family(runs: list[dict], name: str) -> None:
    assert "sam_family_error" not in runs[0], runs[0]["sam_family_error"]
    num_devices = NUM_PROCESSES * worker.LOCAL_DEVICES
    params, shards = _shards(num_devices)
    # reference: each shard's single-device update, averaged explicitly, then SGD
    single = worker.sam_family(name, None)
    base = optax.sgd(0.1, momentum=0.9)
    update = jax.jit(
        lambda g, s, p, x, y: single.update(g, s, p, value_fn=lambda q: worker.sam_loss(q, x, y))
    )
    states = [single.init(params) for _ in shards]
    base_state = base.init(params)
    trajectory = []
    for _ in range(worker.SAM_STEPS):
        per_shard = []
        for i, (x, y) in enumerate(shards):
            d, states[i] = update(jax.grad(worker.sam_loss)(params, x, y), states[i], params, x, y)
            per_shard.append(d)
        mean = jax.tree.map(lambda *ds: sum(ds) / len(ds), *per_shard)
        r, base_state = base.update(mean, base_state, params)
        params = optax.apply_updates(params, r)
        trajectory.append(_as_lists(params))
    for run in runs:
        got = run["sam_family"][name]["params"]
        for step, want in enumerate(trajectory):
            assert _gap(got[step], want) <= TOLERANCE, (name, step)
        assert got == runs[0]["sam_family"][name]["params"]
    if name == "vsam":  # the perturbation-gradient average is the mean over all shards
        psf = jax.tree.map(lambda *t: sum(t) / len(t), *[s.psf for s in states])
        for run in runs:
            assert _gap(run["sam_family"][name]["psf"], _as_lists(psf)) <= TOLERANCE
            assert run["sam_family"][name]["num_sam_steps"] == worker.SAM_STEPS


def test_ausam_data_parallel_over_processes_equals_mean_of_shards(runs):
    assert "sam_family_error" not in runs[0], runs[0]["sam_family_error"]
    num_devices = NUM_PROCESSES * worker.LOCAL_DEVICES
    params, shards = _shards(num_devices)
    num_examples = num_devices * worker.ROWS_PER_DEVICE
    single = worker.ausam_optimizer(num_examples, None)
    step = jax.jit(lambda p, s, x, y, i: worker.ausam_update(single, p, s, x, y, i))
    r = worker.ROWS_PER_DEVICE
    updates, dlp_sum = [], jnp.zeros((num_examples,), jnp.float32)
    for i, (x, y) in enumerate(shards):
        ids = jnp.arange(i * r, (i + 1) * r, dtype=jnp.int32)
        u, s = step(params, single.init(params), x, y, ids)
        updates.append(u)
        dlp_sum = dlp_sum + s.dlp_sum
    mean = jax.tree.map(lambda *us: sum(us) / len(us), *updates)
    for run in runs:
        got = run["sam_family"]["ausam"]
        assert _gap(got["update"], _as_lists(mean)) <= TOLERANCE
        assert _gap(got["dlp_sum"], _as_lists(dlp_sum)) <= TOLERANCE
        assert np.all(np.asarray(got["dlp_count"]) == 1), "an example's sharpness is missing"
        assert got == runs[0]["sam_family"]["ausam"]
