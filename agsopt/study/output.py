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
- :func:`save_run` writes one finished run (``on_run`` of :func:`~agsopt.study.run_study`)
  with the study's settings (:func:`study_settings`: the config and whether JAX runs in
  x64); a resumed study takes a run file only if its settings are the study's.
- :func:`write_results` writes the merged tables and plots.
- :func:`lock_folder` keeps a second study out of a folder while one writes it.

A file of the folder that cannot be used (not JSON, fields missing, other settings) raises
:class:`StudyFileError` naming the file and what to do; every file is written through a
temporary one that is removed if the write fails, so a full or read-only disk leaves no
``.tmp`` behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from typing import Any

import jax

from agsopt.study.config import StudyConfig
from agsopt.study.plotting import plot_study, require_matplotlib
from agsopt.study.results import (
    RunResult,
    StudyResult,
    _replace_atomically,
    load_run,
    run_filename,
    write_run,
    write_tables,
)

try:  # POSIX; elsewhere the folder is not locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

__all__ = [
    "LOCK",
    "OWNED",
    "PLOTS",
    "FolderLockedError",
    "OutputExistsError",
    "StudyFileError",
    "finished_runs",
    "lock_folder",
    "prepare_folder",
    "save_run",
    "study_settings",
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

LOCK = ".study.lock"
"""The lock file a study holds (``flock``) in its folder while it writes there."""

_RETRY = "delete it to run that study part again, or start afresh with --overwrite"


class OutputExistsError(FileExistsError):
    """The output folder holds outputs of an earlier study (and neither overwrite nor
    resume was asked for)."""


class FolderLockedError(OutputExistsError):
    """Another study is writing to the output folder (see :func:`lock_folder`)."""


class StudyFileError(ValueError):
    """A file of the output folder cannot be used: unreadable, incomplete, or written by a
    study with other settings. The message names the file and what to do."""


def study_settings(config: StudyConfig) -> dict[str, Any]:
    """What a study's runs depend on: ``config``'s fields and whether JAX runs in x64.

    Stored in ``study.json`` and in every run file; ``--resume`` requires them equal.
    """
    return {**config.to_json(), "x64": bool(jax.config.jax_enable_x64)}


@contextlib.contextmanager
def lock_folder(out_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``out_dir``'s lock (:data:`LOCK`, created with the folder) for the ``with`` body.

    A second study that asks for it while it is held gets :class:`FolderLockedError`
    at once (it does not wait). The lock is an ``flock`` on the file, so the system drops it
    when the process ends, even killed; the file is removed on a normal exit. On systems
    without ``fcntl`` (Windows) nothing is locked.
    """
    os.makedirs(out_dir, exist_ok=True)
    if fcntl is None:  # pragma: no cover - Windows
        yield
        return
    path = os.path.join(out_dir, LOCK)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise FolderLockedError(
                f"{os.fspath(out_dir)} is being written by another study (it holds "
                f"{path}): wait for that study to end, or choose another --out"
            ) from None
        try:  # the holder before us may have removed the file: lock the one on disk
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.remove(path)
        os.close(fd)


def _owned_present(out_dir: str | os.PathLike[str]) -> list[str]:
    return [name for name in OWNED if os.path.lexists(os.path.join(out_dir, name))]


def _remove(out_dir: str | os.PathLike[str], names: list[str]) -> None:
    for name in names:
        path = os.path.join(out_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _differences(saved: dict[str, Any], wanted: dict[str, Any], where: str = "folder") -> list[str]:
    return [
        f"{key}: {where} has {saved.get(key)!r}, asked for {wanted.get(key)!r}"
        for key in sorted(set(saved) | set(wanted))
        if saved.get(key) != wanted.get(key)
    ]


def _check_run(path: str, run: RunResult, saved: Any, config: StudyConfig) -> None:
    """StudyFileError unless the run file at ``path`` belongs to a study of ``config``."""
    if saved is None:
        raise StudyFileError(
            f"{path} does not say which settings made it (written by an older agsopt): " + _RETRY
        )
    differences = _differences(saved, study_settings(config), "file")
    if differences:
        raise StudyFileError(
            f"{path} was made by a study with other settings ({'; '.join(differences)}): " + _RETRY
        )
    records = config.iterations // config.recording_interval + 1
    if run.values.shape != (config.starts, records):
        raise StudyFileError(
            f"{path} holds values of shape {run.values.shape}, the study makes "
            f"({config.starts}, {records}): " + _RETRY
        )


def finished_runs(
    out_dir: str | os.PathLike[str], config: StudyConfig
) -> dict[tuple[str, str], RunResult]:
    """The runs of ``config`` already written to ``out_dir/runs/``, by (function, optimizer).

    Every run file must carry :func:`study_settings` of ``config`` (as :func:`save_run`
    writes it) and hold ``starts × records`` values; otherwise, or if it cannot be read,
    :class:`StudyFileError` names it.
    """
    runs = {}
    for function in config.functions:
        for optimizer in config.optimizers:
            path = os.path.join(out_dir, RUNS, run_filename(function, optimizer))
            if os.path.exists(path):
                try:
                    run, saved = load_run(path)
                except ValueError as error:
                    raise StudyFileError(f"{error}: {_RETRY}") from None
                if (run.function, run.optimizer) != (function, optimizer):
                    raise StudyFileError(
                        f"{path} holds the run of {run.optimizer} on {run.function}: " + _RETRY
                    )
                _check_run(path, run, saved, config)
                runs[(function, optimizer)] = run
    return runs


def _read_manifest(path: str) -> dict[str, Any]:
    """The settings stored in ``study.json`` (StudyFileError naming it if unusable)."""
    hint = "delete it (and runs/) or start afresh with --overwrite"
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except ValueError as error:
        raise StudyFileError(f"{path} is not readable JSON ({error}): {hint}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("config"), dict):
        raise StudyFileError(f"{path} holds no study settings ('config'): {hint}")
    return {**manifest["config"], "x64": manifest.get("x64")}


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
    - ``resume``: the folder's ``study.json`` must hold the same settings
      (:func:`study_settings`: the config and the x64 mode; else ValueError listing the
      differences); the finished runs in ``runs/`` are returned (each checked by
      :func:`finished_runs`) and the merged tables and plots removed (they are written
      again at the end). A folder without ``study.json`` starts afresh if it holds no
      outputs, and is refused otherwise.

    ``study.json`` is then written with ``config``'s settings. Hold :func:`lock_folder`
    around the whole study so that no second study writes the folder meanwhile.
    """
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other: choose one")
    present = _owned_present(out_dir)
    completed: dict[tuple[str, str], RunResult] = {}
    manifest = os.path.join(out_dir, MANIFEST)
    if resume and os.path.exists(manifest):
        saved = _read_manifest(manifest)
        differences = _differences(saved, study_settings(config))
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
    settings = study_settings(config)
    x64 = settings.pop("x64")
    _replace_atomically(manifest, json.dumps({"config": settings, "x64": x64}, indent=2) + "\n")
    return completed


def save_run(out_dir: str | os.PathLike[str], run: RunResult, config: StudyConfig) -> str:
    """Write one finished run of a study of ``config`` to ``out_dir/runs/`` (atomically,
    with :func:`study_settings`); returns the path."""
    return write_run(run, os.path.join(out_dir, RUNS), settings=study_settings(config))


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
