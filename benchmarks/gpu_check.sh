#!/usr/bin/env bash
# The accelerator check (issue #13): the estimator and SAM-step benchmarks on a GPU or TPU.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; runs in the repository root
#
# Runs `python -m benchmarks --device-suite` (estimators, then sam_steps, full mode; sam_steps
# includes the SAM-family epoch-time tables on the digits MLP and conv net of issue #19), which
# writes benchmarks/results/device/<device>/{estimators,sam_steps,summary}.{json,md}, every
# file stamped with the device kind, JAX/jaxlib versions and the date; commit that folder.
# It refuses to run when JAX sees only the CPU (a CPU run must not be filed as a device
# result): it says so, with what to install, and exits with status 3. Budget: under 8
# minutes (GPU_CHECK_TIMEOUT seconds, default 450, for the whole suite; each report is
# written as soon as its benchmark ends, so a timeout keeps the estimators report). Extra
# arguments go to `python -m benchmarks`, e.g. `--quick` for a smoke test (written under
# results/benchmarks/device/, git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import os
import shutil
import sys

import jax

device = jax.devices()[0]
print(f"JAX {jax.__version__} on {device.platform}: {device.device_kind} x {jax.device_count()}")
if device.platform == "cpu":
    if os.environ.get("JAX_PLATFORMS"):
        hint = f"JAX_PLATFORMS={os.environ['JAX_PLATFORMS']} is set: unset it or name the device"
    elif shutil.which("nvidia-smi"):
        hint = (
            "nvidia-smi is here but this jaxlib has no CUDA support: "
            "pip install -U 'jax[cuda12]' (or the TPU build on a TPU VM)"
        )
    else:
        hint = "run it on a machine with a GPU or TPU and a JAX built for it ('jax[cuda12]')"
    print(
        "gpu_check: exiting (status 3) without running anything: JAX sees no GPU or TPU, only "
        "the CPU, and this check measures an accelerator (a CPU run must not be filed as a "
        f"device result). {hint}.",
        file=sys.stderr,
    )
    sys.exit(3)
PY

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
timeout "${GPU_CHECK_TIMEOUT:-450}" python -m benchmarks --device-suite "$@"
