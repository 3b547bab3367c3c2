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
# result). Budget: under 8 minutes (GPU_CHECK_TIMEOUT seconds, default 450, for the whole
# suite; each report is written as soon as its benchmark ends, so a timeout keeps the
# estimators report). Extra arguments go to `python -m benchmarks`, e.g. `--quick` for a
# smoke test (written under results/benchmarks/device/, git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

python - <<'PY'
import sys

import jax

device = jax.devices()[0]
print(f"JAX {jax.__version__} on {device.platform}: {device.device_kind} x {jax.device_count()}")
sys.exit(0 if device.platform != "cpu" else 3)
PY

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
timeout "${GPU_CHECK_TIMEOUT:-450}" python -m benchmarks --device-suite "$@"
