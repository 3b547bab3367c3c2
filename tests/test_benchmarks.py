"""The benchmark suite runs end to end in quick mode and writes its reports.

No timing is asserted: only that every report exists with the expected structure.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_EVOSAX = importlib.util.find_spec("evosax") is not None
BENCHMARKS = (
    "estimators",
    "estimator_profile",
    "memory",
    "quality",
    "sam_steps",
    "scaling",
    "blackbox",
)
ENVIRONMENT_KEYS = {"date", "device", "platform", "jax", "device_count", "cpu_count"}

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("flax") is None, reason="the benchmarks need flax"
)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("benchmarks")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,  # about 3 min on the 2-core CI machine; sam_steps' conv net is most
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return out


def load(out: Path, name: str) -> dict:
    return json.loads((out / f"{name}.json").read_text(encoding="utf-8"))


def estimators_of(report: dict, table: int = -1, column: str = "estimator") -> set[str]:
    return {row[column] for row in report["tables"][table]["rows"]}


@pytest.mark.parametrize("name", BENCHMARKS)
def test_every_report_is_written(quick_results: Path, name: str):
    report = load(quick_results, name)
    assert report["mode"] == "quick"
    assert report["name"] == name
    assert ENVIRONMENT_KEYS <= set(report["environment"])
    assert report["tables"] and all(table["rows"] for table in report["tables"])
    markdown = (quick_results / f"{name}.md").read_text(encoding="utf-8")
    assert markdown.startswith(f"# {report['title']}")
    assert report["environment"]["jax"] in markdown
    for table in report["tables"]:
        assert f"## {table['title']}" in markdown
        assert "| " + " | ".join(table["columns"]) + " |" in markdown


def test_summary_is_rebuilt_from_every_report_in_the_folder(tmp_path: Path, monkeypatch):
    """A folder written by two runs (the second with --only) summarizes both reports, each
    row with its own report's date and mode, never the stale rows of an earlier summary."""
    monkeypatch.syspath_prepend(str(ROOT))
    main = importlib.import_module("benchmarks.__main__")
    for name, date, met in (
        ("memory", "2026-12-01T00:00:00", True),
        ("blackbox", "2026-12-05T09:00:00", False),
    ):
        report = {
            "mode": "full",
            "environment": {"date": date, "benchmark_seconds": 12.5},
            "name": name,
            "targets": [{"target": f"{name} target", "met": met, "detail": "x"}],
        }
        (tmp_path / f"{name}.json").write_text(json.dumps(report), encoding="utf-8")
    (tmp_path / "summary.md").write_text("stale", encoding="utf-8")
    main.write_summary(tmp_path)
    rows = json.loads((tmp_path / "summary.json").read_text(encoding="utf-8"))["benchmarks"]
    assert [(r["benchmark"], r["measured"][:10]) for r in rows] == [
        ("blackbox", "2026-12-05"),
        ("memory", "2026-12-01"),
    ]
    table = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "| blackbox | 2026-12-05 | full | 12.5 | blackbox target | NOT met | x |" in table
    assert "| memory | 2026-12-01 | full | 12.5 | memory target | met | x |" in table


def test_summary(quick_results: Path):
    summary = json.loads((quick_results / "summary.json").read_text(encoding="utf-8"))
    assert set(BENCHMARKS) <= {entry["benchmark"] for entry in summary["benchmarks"]}
    assert (quick_results / "summary.md").read_text(encoding="utf-8").startswith("# agsopt")


def test_estimators_rows(quick_results: Path):
    module = import_benchmark_module("estimators")
    report = load(quick_results, "estimators")
    names = estimators_of(report)
    assert {module.AGSOPT, module.LIMIT, module.LIMIT_DRAW, *module.PEERS[::2]} <= names
    assert (module.PEERS[1] in names) == HAS_EVOSAX
    for row in report["tables"][-1]["rows"]:
        assert row["median ms"] > 0 and row["evals/s"] > 0
        assert {"× evaluation only", "× draw + evaluate", "× agsopt", "E", "problem"} <= set(row)
    summary_row = report["tables"][0]["rows"][0]
    assert summary_row["agsopt / (draw + evaluate)"] > 0
    assert summary_row["agsopt / evaluation only"] > 0
    assert {t["target"] for t in report["targets"]} == {
        "agsopt's estimator ahead of every peer at equal evaluations",
        "agsopt within 1.3× of the draw + evaluate limit (agsopt's own draws) on CPU",
        "agsopt within 1.3× of the evaluation-only limit (precomputed points) on CPU",
    }


def test_memory_rows(quick_results: Path):
    report = load(quick_results, "memory")
    rows = report["tables"][0]["rows"]
    names = {row["estimator"] for row in rows}
    assert "agsopt antithetic iid, chunk_size=N (one vmap)" in names
    assert any(name.startswith("agsopt antithetic iid, chunk_size=8") for name in names)
    assert any(name.startswith("agsopt antithetic iid, default chunk_size") for name in names)
    for row in rows:
        assert all(row[column] > 0 for column in report["tables"][0]["columns"][1:])
    assert report["targets"][0]["target"] == "memory flat in num_samples when chunked"


def test_quality_rows(quick_results: Path):
    report = load(quick_results, "quality")
    names = estimators_of(report)
    assert {"agsopt antithetic iid", "agsopt antithetic orthogonal"} <= names
    assert "optax.perturbations (forward)" in names
    assert ("evosax Open_ES, identity fitness shaping" in names) == HAS_EVOSAX
    for row in report["tables"][0]["rows"]:
        assert row["relative MSE"] > 0 and -1 <= row["mean cosine"] <= 1
    assert report["data"]["optax_formula_gap"] < 1e-3


def test_profile_rows(quick_results: Path):
    module = import_benchmark_module("estimator_profile")
    report = load(quick_results, "estimator_profile")
    parts = estimators_of(report, column="part")
    assert {module.LIMIT, module.LIMIT_DRAW, module.AGSOPT, module.ASSEMBLY, module.DRAWS} <= parts
    assert report["tables"][0]["rows"][0]["draws / agsopt"] > 0


def import_benchmark_module(name: str):
    """``benchmarks.<name>``, imported from the repository root (not an installed package)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


def test_evosax_absent_is_reported(monkeypatch: pytest.MonkeyPatch):
    peers = import_benchmark_module("peers")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        peers.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "evosax" else real_find_spec(name, *a),
    )
    available, reason = peers.evosax_status()
    assert not available and "not installed" in reason


def test_mlp_problem_builds():
    problems = import_benchmark_module("problems")
    quick = problems.mlp_problem(quick=True)
    assert quick.dim == 16 * 32 + 32 + 32 * 32 + 32 + 32 * 10 + 10
    assert float(quick.fun(quick.params)) > 0


def output_args(*argv: str):
    main = import_benchmark_module("__main__")
    return main, main.parse_args(list(argv))


CPU_ENV = {"platform": "cpu", "device": "AMD EPYC"}
GPU_ENV = {"platform": "gpu", "device": "NVIDIA H200"}


def test_default_output_is_untracked_not_the_committed_reports():
    """`python -m benchmarks [--quick]` writes to results/benchmarks/ (git-ignored), never to
    benchmarks/results/, which holds the committed reports the README links (issue #12)."""
    main, args = output_args("--quick")
    out = main.output_folder(args, CPU_ENV)
    assert out == main.DEFAULT_OUT == ROOT / "results" / "benchmarks"
    assert out != main.COMMITTED_OUT == ROOT / "benchmarks" / "results"
    assert main.output_folder(main.parse_args([]), CPU_ENV) == main.DEFAULT_OUT
    if shutil.which("git") and (ROOT / ".git").exists():
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(out / "summary.json")], cwd=ROOT, check=False
        )
        assert ignored.returncode == 0, "results/benchmarks/ must be ignored by git"


def test_committed_reports_are_written_only_on_request():
    main, args = output_args("--commit-results")
    assert main.output_folder(args, CPU_ENV) == main.COMMITTED_OUT
    for argv in (["--quick", "--commit-results"], ["--quick", "--out", str(main.COMMITTED_OUT)]):
        with pytest.raises(ValueError, match="committed reports"):
            main.output_folder(main.parse_args(argv), CPU_ENV)
    # the refusal happens before any benchmark runs: exit status 2, nothing written
    assert main.main(["--quick", "--out", str(main.COMMITTED_OUT), "--only", "memory"]) == 2


def test_device_suite_names_the_device_and_refuses_cpu():
    main, args = output_args("--device-suite")
    with pytest.raises(ValueError, match="needs a GPU or TPU"):
        main.output_folder(args, CPU_ENV)
    assert main.output_folder(args, GPU_ENV) == main.COMMITTED_OUT / "device" / "nvidia-h200"
    quick = main.parse_args(["--device-suite", "--quick"])
    assert main.output_folder(quick, GPU_ENV) == main.DEFAULT_OUT / "device" / "nvidia-h200"
    assert set(main.DEVICE_SUITE) == {"estimators", "sam_steps"} <= set(main.BENCHMARKS)
