"""The output folder of a study: what it owns, when it may be written, and keeping work.

A study owns these entries of its folder (:data:`OWNED`): ``study.json`` (the settings,
written first), ``runs/`` (one JSON file per finished run, written as the run ends),
``results.csv``, ``summary.csv``, ``results.json``, ``final.md``, ``rules.md`` and the plots
``study_iterations.png`` / ``study_evaluations.png``. Other files in the folder are never
touched.

- :func:`prepare_folder` refuses a folder that already holds study outputs unless told to
  ``overwrite`` them (then it removes every owned entry first, so no stale plot or table
  survives) or to ``resume`` (then it checks that the settings are the same and returns the
  finished runs, which :func:`agsopt.study.run_study` skips).
- :func:`save_run` writes one finished run (``on_run`` of :func:`~agsopt.study.run_study`).
- :func:`write_results` writes the merged tables and plots.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from agsopt.study.config import StudyConfig
from agsopt.study.plotting import plot_study, require_matplotlib
from agsopt.study.results import (
    RunResult,
    StudyResult,
    read_run,
    run_filename,
    write_run,
    write_tables,
)

__all__ = [
    "OWNED",
    "PLOTS",
    "OutputExistsError",
    "finished_runs",
    "prepare_folder",
    "save_run",
    "write_results",
]

PLOTS = ("study_iterations.png", "study_evaluations.png")
"""The plot files, by x axis (iterations, evaluations)."""

OWNED = (
    "study.json",
    "runs",
    "results.csv",
    "summary.csv",
    "results.json",
    "final.md",
    "rules.md",
    *PLOTS,
)
"""The entries of an output folder that a study writes (and may remove)."""

RUNS = "runs"
MANIFEST = "study.json"


class OutputExistsError(FileExistsError):
    """The output folder holds outputs of an earlier study (and neither overwrite nor
    resume was asked for)."""


def _owned_present(out_dir: str | os.PathLike[str]) -> list[str]:
    return [name for name in OWNED if os.path.lexists(os.path.join(out_dir, name))]


def _remove(out_dir: str | os.PathLike[str], names: list[str]) -> None:
    for name in names:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    return [
        f"{key}: folder has {saved.get(key)!r}, asked for {wanted.get(key)!r}"
        for key in sorted(set(saved) | set(wanted))
        if saved.get(key) != wanted.get(key)
    ]


def finished_runs(
    out_dir: str | os.PathLike[str], config: StudyConfig
) -> dict[tuple[str, str], RunResult]:
    """The runs of ``config`` already written to ``out_dir/runs/``, by (function, optimizer)."""
    runs = {}
    for function in config.functions:
        for optimizer in config.optimizers:
            path = os.path.join(out_dir, RUNS, run_filename(function, optimizer))
            if os.path.exists(path):
                runs[(function, optimizer)] = read_run(path)
    return runs


def prepare_folder(
    out_dir: str | os.PathLike[str],
    config: StudyConfig,
    *,
    overwrite: bool = False,
    resume: bool = False,
) -> dict[tuple[str, str], RunResult]:
    """Make ``out_dir`` ready for a study of ``config``; return the runs to skip.

    - Neither flag: a folder holding any owned entry (:data:`OWNED`) raises
      :class:`OutputExistsError` naming them; an absent or output-free folder is used.
    - ``overwrite``: the owned entries are removed first (other files stay).
    - ``resume``: the folder's ``study.json`` must hold the same settings (else ValueError
      listing the differences); the finished runs in ``runs/`` are returned and the merged
      tables and plots removed (they are written again at the end). A folder without
      ``study.json`` starts afresh if it holds no outputs, and is refused otherwise.

    ``study.json`` is then written with ``config``'s settings.
    """
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other: choose one")
    present = _owned_present(out_dir)
    completed: dict[tuple[str, str], RunResult] = {}
    manifest = os.path.join(out_dir, MANIFEST)
    if resume and os.path.exists(manifest):
        with open(manifest, encoding="utf-8") as f:
            saved = json.load(f)["config"]
        differences = _differences(saved, config.to_json())
        if differences:
            raise ValueError(
                f"cannot resume in {os.fspath(out_dir)}: it holds a study with other settings ("
                + "; ".join(differences)
                + "); use the same options, another --out, or --overwrite"
            )
        completed = finished_runs(out_dir, config)
        _remove(out_dir, [name for name in present if name not in (MANIFEST, RUNS)])
    elif present and not overwrite:
        hint = (
            "it has no study.json to resume from; use --overwrite or another --out"
            if resume
            else "pass --overwrite to replace them, --resume to continue an interrupted "
            "study, or choose another --out"
        )
        raise OutputExistsError(
            f"{os.fspath(out_dir)} already holds study outputs ({', '.join(present)}): {hint}"
        )
    else:
        _remove(out_dir, present)
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{manifest}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({"config": config.to_json()}, f, indent=2)
        f.write("\n")
    os.replace(tmp, manifest)
    return completed


def save_run(out_dir: str | os.PathLike[str], run: RunResult) -> str:
    """Write one finished run to ``out_dir/runs/`` (atomically); returns the path."""
    return write_run(run, os.path.join(out_dir, RUNS))


def write_results(
    result: StudyResult, out_dir: str | os.PathLike[str], *, plots: bool = True
) -> dict[str, str]:
    """Write a study's tables and (with ``plots``) its plots into ``out_dir``.

    Files: ``results.csv``, ``summary.csv``, ``results.json``, ``final.md`` (see
    :mod:`agsopt.study.results`) and, with ``plots``, ``study_iterations.png`` and
    ``study_evaluations.png`` (median with a 25–75 % band, one panel per function). With
    ``plots`` matplotlib is checked before anything is written (ImportError with the
    install hint); without, plot files left in ``out_dir`` by an earlier study are removed
    so that no plot disagrees with the tables beside it.

    Returns:
      The written paths by kind: ``csv``, ``summary``, ``json``, ``table`` and
      ``plot_iterations``, ``plot_evaluations``.
    """
    if plots:
        require_matplotlib()
    paths = write_tables(result, out_dir)
    if plots:
        for axis, name in zip(("iterations", "evaluations"), PLOTS, strict=True):
            path = os.path.join(out_dir, name)
            plot_study(result, path, x=axis)
            paths[f"plot_{axis}"] = path
    else:
        _remove(out_dir, list(PLOTS))
    return paths
