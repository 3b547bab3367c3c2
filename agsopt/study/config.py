"""What a study runs: :class:`StudyConfig` (validated) and the named :data:`PRESETS`.

Seeds: from the study seed ``s`` (an integer in ``[0, 2**32)``) and the key implementation
``key_impl``, the starts of function ``name`` are drawn from
``fold_in(fold_in(key(s), 0), crc32(name))`` and start ``i``'s noise key is the ``i``-th key
of ``split(fold_in(key(s), 1), starts)``. Every optimizer therefore sees the same starts and
the same per-start noise keys (common random numbers), and adding or removing a function or
optimizer changes no other run. Seeds outside ``[0, 2**32)`` are refused: JAX keeps 32 bits
of a seed in its default mode, so ``2**32 + s`` would silently repeat the study of ``s``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from agsopt import functions as fns
from agsopt.study.registry import OPTIMIZERS, OptimizerFactory, function_names, resolve_function

__all__ = [
    "KEY_IMPLS",
    "MAX_RECORDS",
    "MAX_SEED",
    "PRESETS",
    "StudyConfig",
    "check_seed",
    "default_record_every",
]

KEY_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")
"""The PRNG implementations a study takes (``key_impl``)."""

MAX_RECORDS = 100
"""Without an explicit ``record_every``, about this many records per run (plus step 0)."""

MAX_SEED = 2**32 - 1
"""The largest study seed (seeds are 32-bit: larger ones would alias smaller ones)."""


def check_seed(seed: Any) -> int:
    """``seed`` if it is an integer in ``[0, 2**32)``, else ValueError naming ``seed``."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(
            f"seed must be an integer in [0, 2**32 - 1] (larger seeds would repeat the "
            f"streams of smaller ones), got {seed!r}"
        )
    return seed


def default_record_every(iterations: int) -> int:
    """The largest divisor of ``iterations`` that is at most ``ceil(iterations / MAX_RECORDS)``."""
    target = max(1, math.ceil(iterations / MAX_RECORDS))
    return max(k for k in range(1, target + 1) if iterations % k == 0)


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """What a study runs (validated by :meth:`validate`).

    Attributes:
      functions: test-function names (:func:`agsopt.functions.names`, ``rotated_*`` too),
        ``"module:attribute"`` references to a :class:`~agsopt.functions.TestFunction` in an
        importable module, or names of the functions handed to
        :func:`agsopt.study.run_study` as objects (see
        :func:`~agsopt.study.registry.resolve_function`).
      optimizers: names in the registry (default :data:`agsopt.study.OPTIMIZERS`).
      dim: the dimension d ≥ 1.
      starts: random starts per function, uniform in its box.
      iterations: optimizer steps per start.
      seed: the study seed, an integer in ``[0, 2**32)`` (see the module doc).
      record_every: record every this many steps; None picks :func:`default_record_every`.
      key_impl: the PRNG implementation of the starts' noise keys (and of the AGS keys).
    """

    functions: tuple[str, ...] = ("rastrigin", "ackley", "levy")
    optimizers: tuple[str, ...] = ("ags-gd", "igs-gd", "gd", "ags-adam", "igs-adam", "adam")
    dim: int = 10
    starts: int = 10
    iterations: int = 1000
    seed: int = 0
    record_every: int | None = None
    key_impl: str = "threefry2x32"

    def validate(
        self,
        registry: Mapping[str, OptimizerFactory] | None = None,
        custom: Mapping[str, fns.TestFunction] | None = None,
    ) -> StudyConfig:
        """Check every field; ValueError naming the field (and listing valid names).

        ``registry`` (default :data:`agsopt.study.OPTIMIZERS`) holds the valid optimizer
        names; ``custom`` the user's functions by name (a ``"module:attribute"`` reference
        is imported to check it).
        """
        registry = OPTIMIZERS if registry is None else registry
        for field in ("dim", "starts", "iterations"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{field} must be an integer >= 1, got {value!r}")
        check_seed(self.seed)
        valid_functions = function_names()
        if not self.functions:
            raise ValueError(f"no functions given; valid names: {', '.join(valid_functions)}")
        if not self.optimizers:
            raise ValueError(f"no optimizers given; valid names: {', '.join(registry)}")
        for name in self.functions:
            if custom and name in custom:
                continue
            if ":" in name:
                function = resolve_function(name, self.dim)
                if function.dim is not None and function.dim != self.dim:
                    raise ValueError(
                        f"functions: {name!r} is defined for dim={function.dim} only, "
                        f"got dim={self.dim}"
                    )
            elif name not in valid_functions:
                valid = ", ".join(valid_functions)
                raise ValueError(
                    f"unknown function {name!r}; valid names: {valid} (or your own "
                    "TestFunction as module:attribute)"
                )
        for name in self.optimizers:
            if name not in registry:
                raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(registry)}")
        for label, names in (("function", self.functions), ("optimizer", self.optimizers)):
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"{label}s given twice: {', '.join(duplicates)}")
        if self.record_every is not None:
            if (
                isinstance(self.record_every, bool)
                or not isinstance(self.record_every, int)
                or self.record_every < 1
                or self.iterations % self.record_every
            ):
                raise ValueError(
                    f"record_every must be a positive divisor of iterations ({self.iterations}),"
                    f" got {self.record_every!r}"
                )
        if self.key_impl not in KEY_IMPLS:
            raise ValueError(
                f"unknown key_impl {self.key_impl!r}; valid choices: {', '.join(KEY_IMPLS)}"
            )
        return self

    def override(self, **fields: Any) -> StudyConfig:
        """A copy with the given fields replaced; fields given as None are left as they are
        (sequences of names become tuples). Not validated: call :meth:`validate`."""
        for field in ("functions", "optimizers"):
            if fields.get(field) is not None:
                fields[field] = tuple(fields[field])
        return dataclasses.replace(self, **{k: v for k, v in fields.items() if v is not None})

    @property
    def recording_interval(self) -> int:
        """``record_every``, or its default for ``iterations``."""
        if self.record_every is None:
            return default_record_every(self.iterations)
        return self.record_every

    def to_json(self) -> dict[str, Any]:
        """The fields as JSON-ready values (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> StudyConfig:
        """The inverse of :meth:`to_json`."""
        fields = dict(raw)
        for field in ("functions", "optimizers"):
            fields[field] = tuple(fields[field])
        return cls(**fields)


PRESETS: dict[str, StudyConfig] = {
    "default": StudyConfig(),
    "d100": StudyConfig(
        functions=("rastrigin", "ackley", "griewank", "levy", "michalewicz"),
        optimizers=("ags-gd", "igs-gd", "gd", "ags-adam", "igs-adam", "adam"),
        dim=100,
        starts=20,
        iterations=3000,
    ),
}
"""Named study settings. ``default`` (``python -m agsopt study``): d = 10, 10 starts,
1000 steps on Rastrigin, Ackley and Levy, all six optimizers: three multimodal functions
where GD and Adam stop in a local minimum and smoothing does not (the settings are the
registry's documented ones, none chosen for this study; Levy is not symmetric about its
minimizer, so both smoothed forms keep a smoothing bias there after 1000 steps). The rotated
ellipsoid, where smoothing buys nothing, is in the notebook. ``d100``:
d = 100, 20 starts, 3000 steps on five multimodal functions (Rastrigin, Ackley, Griewank,
Levy, Michalewicz; Schwefel is left out: its minimizer lies near the box's corner and f is
unbounded below outside the box, so unconstrained methods would be judged by how far they
leave it)."""
