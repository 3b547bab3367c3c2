"""A study's results: :class:`RunResult`, :class:`StudyResult` and their files.

Files (all in one output folder, see :mod:`agsopt.study.output` for the folder itself):

- ``results.csv``: tidy, one row per (function, optimizer, start, recorded step), columns
  :data:`CSV_COLUMNS`;
- ``summary.csv``: percentiles over the starts, columns :data:`SUMMARY_COLUMNS`;
- ``results.json``: settings, seeds, versions, device, timings and final medians;
- ``final.md``: :meth:`StudyResult.final_table`;
- ``runs/<function>__<optimizer>.json``: one finished run each, written as it ends
  (:func:`write_run` / :func:`read_run`), so that an interrupted study keeps its work.

Floats are written with ``repr`` (CSV) or JSON's shortest round-trip form, so reading a
file back gives the very numbers that were written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import urllib.parse
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import optax

from agsopt.study.config import StudyConfig

__all__ = [
    "CSV_COLUMNS",
    "EVALUATION_CONVENTION",
    "SUMMARY_COLUMNS",
    "RunResult",
    "StudyResult",
    "environment",
    "format_value",
    "read_results",
    "load_run",
    "read_run",
    "run_filename",
    "study_metadata",
    "write_run",
    "write_tables",
]

CSV_COLUMNS = (
    "function",
    "optimizer",
    "dim",
    "start",
    "iteration",
    "evaluations",
    "f",
    "f_gap",
    "distance",
)
"""Columns of the tidy ``results.csv``; ``f_gap`` = f − f* and ``distance`` = ‖x − x*‖ are
empty where f* or x* is not known."""

SUMMARY_COLUMNS = ("function", "optimizer", "iteration", "evaluations", "q25", "median", "q75")
"""Columns of ``summary.csv``: percentiles over the starts of f − f* (f where f* unknown)."""

EVALUATION_CONVENTION = (
    "one f evaluation = 1, one gradient = 1; AGS/IGS antithetic: 2N per step, "
    "first_order: N; GD/Adam: 1; recording f(x_t) is not counted"
)


@dataclasses.dataclass
class RunResult:
    """One optimizer on one function, all starts.

    Attributes:
      function, optimizer: the names.
      description: the optimizer's hyperparameters.
      evaluations_per_step: its cost per step (see :mod:`agsopt.study.registry`).
      iterations: the recorded steps, shape ``(R,)``.
      values: ``f(x_t)``, shape ``(starts, R)``, float64.
      gaps: ``f(x_t) − f*`` (None where f* is not known for this d).
      distances: ``‖x_t − x*‖`` (None where x* is not known).
      seconds: wall time of the run, compilation included.
    """

    function: str
    optimizer: str
    description: str
    evaluations_per_step: int
    iterations: np.ndarray
    values: np.ndarray
    gaps: np.ndarray | None
    distances: np.ndarray | None
    seconds: float

    @property
    def evaluations(self) -> np.ndarray:
        """Function evaluations spent up to each recorded step."""
        return self.iterations * self.evaluations_per_step

    @property
    def objective(self) -> np.ndarray:
        """What the plots and tables show: ``f − f*`` where f* is known, else ``f``."""
        return self.values if self.gaps is None else self.gaps

    def quantiles(self, qs: Sequence[float] = (25.0, 50.0, 75.0)) -> np.ndarray:
        """Percentiles over the starts of :attr:`objective`, shape ``(len(qs), R)``."""
        return np.percentile(self.objective, qs, axis=0)

    def final(self) -> tuple[float, float, float]:
        """(median, 25 %, 75 %) of :attr:`objective` at the last step."""
        q25, q50, q75 = np.percentile(self.objective[:, -1], (25.0, 50.0, 75.0))
        return float(q50), float(q25), float(q75)


@dataclasses.dataclass
class StudyResult:
    """All runs of a study, with its configuration and metadata (see :func:`run_study`)."""

    config: StudyConfig
    runs: list[RunResult]
    metadata: dict[str, Any]

    def run(self, function: str, optimizer: str) -> RunResult:
        """The run of ``optimizer`` on ``function``."""
        for r in self.runs:
            if r.function == function and r.optimizer == optimizer:
                return r
        raise KeyError(f"no run of {optimizer!r} on {function!r}")

    def final_table(self, *, iqr: bool = True) -> str:
        """A Markdown table: functions × optimizers, median final ``f − f*`` (f if f* unknown).

        With ``iqr``, the 25–75 % range follows in brackets.
        """
        optimizers = list(self.config.optimizers)
        header = f"| function (d = {self.config.dim}) | " + " | ".join(optimizers) + " |"
        lines = [header, "|" + "---|" * (len(optimizers) + 1)]
        for name in self.config.functions:
            cells = []
            for opt in optimizers:
                median, q25, q75 = self.run(name, opt).final()
                cell = format_value(median)
                if iqr:
                    cell += f" [{format_value(q25)}, {format_value(q75)}]"
                cells.append(cell)
            gap = self.run(name, optimizers[0]).gaps is not None
            lines.append(f"| {name}{'' if gap else ' (f)'} | " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def rows(self) -> list[dict[str, Any]]:
        """The tidy records: one per (function, optimizer, start, recorded step)."""
        out = []
        for r in self.runs:
            for s in range(r.values.shape[0]):
                for j, it in enumerate(r.iterations):
                    out.append(
                        {
                            "function": r.function,
                            "optimizer": r.optimizer,
                            "dim": self.config.dim,
                            "start": s,
                            "iteration": int(it),
                            "evaluations": int(it) * r.evaluations_per_step,
                            "f": float(r.values[s, j]),
                            "f_gap": None if r.gaps is None else float(r.gaps[s, j]),
                            "distance": None if r.distances is None else float(r.distances[s, j]),
                        }
                    )
        return out


def format_value(value: float) -> str:
    """A table cell: 3 significant digits, scientific notation outside [1e-3, 1e4)."""
    if not math.isfinite(value):
        return str(value)
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e4:
        return f"{value:.3g}"
    return f"{value:.2e}"


def _version(package: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - metadata only
        return None


def environment() -> dict[str, Any]:
    """Versions, platform and device, for the JSON metadata."""
    device = jax.devices()[0]
    return {
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
        "optax": optax.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": f"{device.platform}:{getattr(device, 'device_kind', '')}",
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "x64": bool(jax.config.jax_enable_x64),
    }


def study_metadata(
    config: StudyConfig, runs: Sequence[RunResult], wall_seconds: float, **extra: Any
) -> dict[str, Any]:
    """The ``results.json`` content of a study of ``config`` with ``runs``."""
    metadata = {
        "config": config.to_json(),
        "record_every": config.recording_interval,
        "seeds": {
            "study_seed": config.seed,
            "key_impl": config.key_impl,
            "starts": "fold_in(fold_in(key(seed), 0), crc32(function name))",
            "noise": "split(fold_in(key(seed), 1), starts)[i] for start i, every optimizer",
        },
        "evaluation_convention": EVALUATION_CONVENTION,
        "environment": environment(),
        "wall_seconds": wall_seconds,
        "runs": [
            {
                "function": r.function,
                "optimizer": r.optimizer,
                "description": r.description,
                "evaluations_per_step": r.evaluations_per_step,
                "seconds": r.seconds,
                "final_median": r.final()[0],
                "final_q25": r.final()[1],
                "final_q75": r.final()[2],
                "objective": "f - f*" if r.gaps is not None else "f",
            }
            for r in runs
        ],
    }
    metadata.update(extra)
    return metadata


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return str(value)


def _replace_atomically(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, so no half file is left.

    If writing fails (full or read-only disk, Ctrl-C) the temporary file is removed and
    ``path`` keeps its old content (or stays absent); an OSError then names ``path``.
    """
    tmp = f"{os.fspath(path)}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException as error:
        try:
            os.remove(tmp)
        except OSError:
            pass
        if isinstance(error, OSError) and error.filename in (None, tmp):
            error.filename = os.fspath(path)  # name the file, also for a failed write
        raise


def write_tables(result: StudyResult, out_dir: str | os.PathLike[str]) -> dict[str, str]:
    """Write ``results.csv``, ``summary.csv``, ``results.json`` and ``final.md``.

    Returns:
      The written paths by kind: ``csv``, ``summary``, ``json``, ``table``.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        "csv": os.path.join(out_dir, "results.csv"),
        "summary": os.path.join(out_dir, "summary.csv"),
        "json": os.path.join(out_dir, "results.json"),
        "table": os.path.join(out_dir, "final.md"),
    }
    lines = [",".join(CSV_COLUMNS)]
    for row in result.rows():
        lines.append(",".join(_csv_cell(row[c]) for c in CSV_COLUMNS))
    _replace_atomically(paths["csv"], "\n".join(lines) + "\n")
    lines = [",".join(SUMMARY_COLUMNS)]
    for r in result.runs:
        q25, q50, q75 = r.quantiles()
        for j, it in enumerate(r.iterations):
            cells = (r.function, r.optimizer, int(it), int(r.evaluations[j]))
            cells += (float(q25[j]), float(q50[j]), float(q75[j]))
            lines.append(",".join(_csv_cell(c) for c in cells))
    _replace_atomically(paths["summary"], "\n".join(lines) + "\n")
    _replace_atomically(paths["json"], json.dumps(result.metadata, indent=2, default=str) + "\n")
    _replace_atomically(paths["table"], result.final_table() + "\n")
    return paths


def _grid(cells: list[str], where: tuple[np.ndarray, np.ndarray], shape: tuple[int, int]):
    """CSV cells into a ``(starts, records)`` array, or None if the column is empty."""
    if cells[0] == "":
        return None
    out = np.empty(shape)
    out[where] = np.asarray(cells, float)
    return out


def read_results(out_dir: str | os.PathLike[str]) -> StudyResult:
    """Load a study written by :func:`agsopt.study.write_results` (CSV and JSON).

    The result can be plotted or tabulated again without re-running the study.
    """
    with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as f:
        metadata = json.load(f)
    cfg = StudyConfig.from_json(metadata["config"])
    table: dict[tuple[str, str], dict[str, list]] = {}
    with open(os.path.join(out_dir, "results.csv"), encoding="utf-8") as f:
        header = f.readline().strip().split(",")
        for line in f:
            row = dict(zip(header, line.rstrip("\n").split(","), strict=True))
            entry = table.setdefault((row["function"], row["optimizer"]), {})
            for column in ("start", "iteration", "f", "f_gap", "distance"):
                entry.setdefault(column, []).append(row[column])
    info = {(r["function"], r["optimizer"]): r for r in metadata["runs"]}
    runs = []
    for (function, optimizer), entry in table.items():
        starts = np.asarray(entry["start"], int)
        iterations = np.asarray(entry["iteration"], int)
        recorded = np.unique(iterations)
        shape = (int(starts.max()) + 1, recorded.size)
        where = (starts, np.searchsorted(recorded, iterations))
        meta = info[(function, optimizer)]
        runs.append(
            RunResult(
                function=function,
                optimizer=optimizer,
                description=meta["description"],
                evaluations_per_step=int(meta["evaluations_per_step"]),
                iterations=recorded,
                values=_grid(entry["f"], where, shape),
                gaps=_grid(entry["f_gap"], where, shape),
                distances=_grid(entry["distance"], where, shape),
                seconds=float(meta["seconds"]),
            )
        )
    return StudyResult(cfg, runs, metadata)


# --------------------------------------------------------------------------------------
# One file per finished run
# --------------------------------------------------------------------------------------


def run_filename(function: str, optimizer: str) -> str:
    """``<function>__<optimizer>.json`` with unsafe characters percent-encoded."""
    return urllib.parse.quote(f"{function}__{optimizer}", safe="") + ".json"


def _array(value: Any) -> np.ndarray | None:
    return None if value is None else np.asarray(value, np.float64)


def write_run(
    run: RunResult,
    directory: str | os.PathLike[str],
    *,
    settings: dict[str, Any] | None = None,
) -> str:
    """Write one finished run to ``directory/<function>__<optimizer>.json`` (atomically).

    ``settings`` (JSON-ready; the command line passes
    :func:`agsopt.study.output.study_settings`) is stored with the run, so that a resumed
    study takes the run only if it was made with the same settings (see :func:`load_run`).
    """
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, run_filename(run.function, run.optimizer))
    record = {
        "settings": settings,
        "function": run.function,
        "optimizer": run.optimizer,
        "description": run.description,
        "evaluations_per_step": run.evaluations_per_step,
        "seconds": run.seconds,
        "iterations": [int(i) for i in run.iterations],
        "values": np.asarray(run.values, np.float64).tolist(),
        "gaps": None if run.gaps is None else np.asarray(run.gaps, np.float64).tolist(),
        "distances": (
            None if run.distances is None else np.asarray(run.distances, np.float64).tolist()
        ),
    }
    _replace_atomically(path, json.dumps(record) + "\n")
    return path


def read_run(path: str | os.PathLike[str]) -> RunResult:
    """A run written by :func:`write_run`, with the very numbers that were written."""
    return load_run(path)[0]


def load_run(path: str | os.PathLike[str]) -> tuple[RunResult, dict[str, Any] | None]:
    """A run written by :func:`write_run` and the ``settings`` stored with it (None if none).

    ValueError naming the file if it is not such a run file (truncated, not JSON, fields
    missing).
    """
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
        return _run_from_record(record), record.get("settings")
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{os.fspath(path)} is not a readable run file ({type(error).__name__}: {error})"
        ) from None


def _run_from_record(record: dict[str, Any]) -> RunResult:
    return RunResult(
        function=record["function"],
        optimizer=record["optimizer"],
        description=record["description"],
        evaluations_per_step=int(record["evaluations_per_step"]),
        iterations=np.asarray(record["iterations"], np.int64),
        values=_array(record["values"]),
        gaps=_array(record["gaps"]),
        distances=_array(record["distances"]),
        seconds=float(record["seconds"]),
    )
