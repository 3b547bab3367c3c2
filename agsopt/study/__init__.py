"""Convergence studies: optimizers × test functions × random starts × iterations.

A study runs every optimizer of a registry (:data:`OPTIMIZERS`) on every test function of
:mod:`agsopt.functions` from the same random starts (uniform in the function's box) and
records, every ``record_every`` iterations, ``f(x_t) − f*`` (or ``f(x_t)`` where the minimum
is not known) and the distance ``‖x_t − x*‖`` to the minimizer (where known).

Quick start::

    from agsopt import study
    result = study.run_study(["rastrigin", "ackley"], ["ags-gd", "igs-gd", "gd"],
                             dim=10, starts=10, iterations=1000)
    print(result.final_table())            # median final f − f* (25–75 % in brackets)
    study.write_results(result, "results/study")   # CSV, JSON, PNG

or from the shell, ``python -m agsopt study`` (``python -m agsopt study --help``).

One concept per module:

- :mod:`~agsopt.study.registry`: the optimizers (:data:`OPTIMIZERS`, their documented
  hyperparameters, the cost convention);
- :mod:`~agsopt.study.config`: :class:`StudyConfig`, the :data:`PRESETS` and the seeds;
- :mod:`~agsopt.study.runner`: :func:`run_study` and :func:`run_starts`;
- :mod:`~agsopt.study.results`: :class:`StudyResult` and its CSV/JSON files;
- :mod:`~agsopt.study.output`: the output folder (overwrite, resume, one file per run);
- :mod:`~agsopt.study.plotting`: :func:`plot_study` (matplotlib, imported lazily);
- :mod:`~agsopt.study.rules`: covariance rules against each other;
- :mod:`~agsopt.study.profile`: where an AGS step spends its time;
- :mod:`~agsopt.study.cli`: ``python -m agsopt``.
"""

from agsopt.study.config import (
    KEY_IMPLS,
    MAX_RECORDS,
    MAX_SEED,
    PRESETS,
    StudyConfig,
    check_seed,
    default_record_every,
)
from agsopt.study.output import (
    LOCK,
    OWNED,
    FolderLockedError,
    OutputExistsError,
    StudyFileError,
    finished_runs,
    lock_folder,
    prepare_folder,
    save_run,
    study_settings,
    write_results,
)
from agsopt.study.profile import profile_step
from agsopt.study.registry import (
    ADAM_LEARNING_RATE,
    ADAM_LEARNING_RATES,
    ADAM_SIGMA,
    AGS_COVARIANCE,
    DECAY,
    FALLBACK_LEARNING_RATE,
    GD_LEARNING_RATES,
    NUM_SAMPLES,
    OPTIMIZERS,
    SMOOTHED_GD,
    OptimizerFactory,
    OptimizerSpec,
    adam_learning_rate,
    ags_spec,
    build_optimizer,
    curvature_estimate,
    function_names,
    gd_learning_rate,
    gradient_spec,
    is_tuned,
    optimizer_names,
    resolve_function,
    rule_registry,
    smoothed_adam_factory,
    smoothed_gd_factory,
)
from agsopt.study.results import (
    CSV_COLUMNS,
    SUMMARY_COLUMNS,
    RunResult,
    StudyResult,
    load_run,
    read_results,
    read_run,
    write_run,
    write_tables,
)
from agsopt.study.rules import (
    DEFAULT_RULES,
    RULE_FUNCTIONS,
    compare_rules,
    equal_evaluation_baselines,
    rule_table,
)
from agsopt.study.runner import init_states, run_starts, run_study

__all__ = [
    "ADAM_LEARNING_RATE",
    "ADAM_LEARNING_RATES",
    "ADAM_SIGMA",
    "AGS_COVARIANCE",
    "CSV_COLUMNS",
    "DECAY",
    "DEFAULT_RULES",
    "FALLBACK_LEARNING_RATE",
    "GD_LEARNING_RATES",
    "KEY_IMPLS",
    "LOCK",
    "MAX_RECORDS",
    "MAX_SEED",
    "NUM_SAMPLES",
    "OPTIMIZERS",
    "OWNED",
    "PRESETS",
    "RULE_FUNCTIONS",
    "SMOOTHED_GD",
    "SUMMARY_COLUMNS",
    "FolderLockedError",
    "OptimizerFactory",
    "OptimizerSpec",
    "OutputExistsError",
    "RunResult",
    "StudyConfig",
    "StudyFileError",
    "StudyResult",
    "adam_learning_rate",
    "ags_spec",
    "build_optimizer",
    "check_seed",
    "compare_rules",
    "curvature_estimate",
    "default_record_every",
    "equal_evaluation_baselines",
    "finished_runs",
    "function_names",
    "gd_learning_rate",
    "gradient_spec",
    "init_states",
    "is_tuned",
    "load_run",
    "lock_folder",
    "optimizer_names",
    "prepare_folder",
    "profile_step",
    "read_results",
    "read_run",
    "resolve_function",
    "rule_registry",
    "rule_table",
    "run_starts",
    "run_study",
    "save_run",
    "smoothed_adam_factory",
    "smoothed_gd_factory",
    "study_settings",
    "write_results",
    "write_run",
    "write_tables",
]
