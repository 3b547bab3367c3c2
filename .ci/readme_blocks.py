"""Run README.md's Python blocks against an installed agsopt, not the checkout.

    python .ci/readme_blocks.py [README.md]     # with the Python of the environment to test

Used by ``.ci/wheel-readme`` with the Python of a fresh venv that holds the built wheel.
Every block runs as a script in its own empty folder, with ``PYTHONPATH`` removed, so
``import agsopt`` can only find the installed package; that it does is checked first (an
editable install or the checkout on the path is refused). Blocks that mention
``xla_force_host_platform_device_count`` run with eight virtual CPU devices and must print
"8 devices"; blocks starting with ``# illustrative`` are only compiled (as in
``tests/markdown_blocks.py``, whose parser this uses).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the Markdown parser only (standard library)

from markdown_blocks import (  # noqa: E402
    ILLUSTRATIVE_MARKER,
    MULTI_DEVICE_MARKER,
    NUM_DEVICES,
    python_blocks,
)


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without ``PYTHONPATH``, on the CPU, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def check_location(module_file: Path, prefix: Path, root: Path = ROOT) -> None:
    """``module_file`` (agsopt's ``__init__.py``) lies in the environment ``prefix`` and not in
    the checkout ``root``; a ``RuntimeError`` that says where it was found otherwise."""
    module_file, prefix, root = (Path(p).resolve() for p in (module_file, prefix, root))
    if module_file.is_relative_to(root) or not module_file.is_relative_to(prefix):
        raise RuntimeError(
            f"agsopt is imported from {module_file}, not from the environment under test "
            f"({prefix}): an editable install or the checkout is on the path, so the blocks "
            "would not test the wheel"
        )


def installed_agsopt(python: str, cwd: Path) -> Path:
    """Where ``python`` imports agsopt from (run in ``cwd``), checked by :func:`check_location`."""
    done = subprocess.run(
        [python, "-c", "import sys, agsopt; print(agsopt.__file__); print(sys.prefix)"],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{python} cannot import agsopt:\n{done.stderr[-2000:]}")
    module_file, prefix = done.stdout.split()[-2:]
    check_location(Path(module_file), Path(prefix))
    return Path(module_file)


def run_blocks(readme: Path, python: str = sys.executable) -> int:
    """Run every Python block of ``readme``; the number that failed."""
    failed = 0
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        print(f"readme-blocks: agsopt from {installed_agsopt(python, scratch)}", flush=True)
        for number, block in enumerate(python_blocks(readme)):
            if block.code.startswith(ILLUSTRATIVE_MARKER):
                compile(block.code, block.id, "exec")
                print(f"readme-blocks: {block.id} compiled (illustrative)", flush=True)
                continue
            folder = scratch / f"block{number}"
            folder.mkdir()
            (folder / "block.py").write_text(block.code)
            extra = {}
            if MULTI_DEVICE_MARKER in block.code:
                flags = os.environ.get("XLA_FLAGS", "")
                count = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
                extra["XLA_FLAGS"] = f"{flags} {count}".strip()
            start = time.perf_counter()
            done = subprocess.run(
                [python, "block.py"],
                cwd=folder,
                env=clean_env(**extra),
                capture_output=True,
                text=True,
                timeout=900,
            )
            seconds = time.perf_counter() - start
            ok = done.returncode == 0
            if ok and MULTI_DEVICE_MARKER in block.code:
                ok = f"{NUM_DEVICES} devices" in done.stdout
            print(f"readme-blocks: {block.id} {'ok' if ok else 'FAILED'} ({seconds:.0f} s)")
            if not ok:
                failed += 1
                print(done.stdout[-2000:], done.stderr[-4000:], sep="\n", flush=True)
    return failed


if __name__ == "__main__":
    readme = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "README.md"
    sys.exit(1 if run_blocks(readme) else 0)
