"""The one registry of agsopt's public transformations, and how each is called (tests only).

Every test that runs "each transformation" draws its cases from :data:`REGISTRY`: an entry
holds a name, the public factory, small keyword arguments (fixed keys) and its calling
protocol. Adding a transformation, or a configuration that matters, is one entry here;
``tests/test_registry.py`` fails when a public transformation has none.

The calling protocol is declarative: what ``update`` receives as its updates and which
keyword extra arguments it reads. A test states its problem once, as a :class:`Problem`
(the minibatch loss, and for AUSAM the per-example losses and the dataset ids), and calls
``entry.update(opt, grads, state, params, problem)``, where ``opt`` is the entry's
transformation or anything that forwards extra arguments to it (``optax.chain`` with it
first, ``optax.MultiSteps``, ``bsam(base=...)``).

``core`` entries run in every generic test by default, the others (further covariance
rules and estimator methods, ``step_from="min_point"``) under ``-m slow``; a cheap generic
test may run every entry by default, an expensive one only :func:`representatives` (one
per public factory). ``tests/test_registry.py`` steps every entry by default. The
``ags_*``/``igs_*`` aliases are ``optax.chain(ags(...), base)``: the generic tests leave them
out (``alias=True``); ``tests/test_registry.py`` checks that they are exactly that.

A file may select entries by flag, add overrides it needs (a dataset size, a warm-up
length), chain a base optimizer; it does not call ``update`` any other way.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import optax
import pytest

import agsopt


class Problem(NamedTuple):
    """What one update is given, named as the keyword extra arguments that carry it.

    ``value_fn(params) -> scalar`` is the minibatch loss; ``per_example_loss_fn(params,
    positions) -> losses`` the losses of the batch's examples at ``positions`` (AUSAM), and
    ``ids`` those examples' dataset ids.
    """

    value_fn: Callable[[Any], jax.Array]
    per_example_loss_fn: Callable[[Any, jax.Array], jax.Array] | None = None
    ids: jax.Array | None = None


class Protocol(NamedTuple):
    """How ``update`` is called.

    ``updates``: ``"gradient"`` (it reads them as ``∇L(w)``), ``"ignored"`` (any tree shaped
    like the parameters: the given gradient, or zeros) or ``"none"`` (``None``).
    ``extra_args``: the keyword extra arguments it reads, each a :class:`Problem` field.
    """

    updates: str
    extra_args: tuple[str, ...]


GRADIENT = Protocol("gradient", ("value_fn",))  # SAM, ASAM, BSAM, vSAM
ZERO_ORDER = Protocol("ignored", ("value_fn",))  # AGS/IGS (and their aliases)
PER_EXAMPLE = Protocol("none", ("per_example_loss_fn", "ids"))  # AUSAM


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity (functools.cache)
class Entry:
    """One transformation under test.

    ``random``: its state holds a PRNG key. ``axis_name``: it takes ``axis_name`` (m-sharpness
    under ``shard_map``). ``alias``: a public ``optax.chain(ags(...), base)`` alias.
    ``final_updates``: ``update`` returns final updates (a base optimizer inside), not a
    gradient to chain in front of one. ``static_args``: what ``optax.inject_hyperparams``
    must be told is static (the integer arguments, as the factory's docstring lists them).
    """

    name: str
    factory: Callable[..., optax.GradientTransformationExtraArgs]
    kwargs: Mapping[str, Any]
    protocol: Protocol
    random: bool = False
    axis_name: bool = False
    alias: bool = False
    final_updates: bool = False
    core: bool = False
    static_args: tuple[str, ...] = ()

    @property
    def factory_name(self) -> str:
        return self.factory.__name__

    @property
    def needs_grads(self) -> bool:
        return self.protocol.updates == "gradient"

    @property
    def uses_value_fn(self) -> bool:
        return "value_fn" in self.protocol.extra_args

    def make(self, **overrides: Any) -> optax.GradientTransformationExtraArgs:
        """The transformation, with ``overrides`` replacing or adding keyword arguments."""
        return self.factory(**{**self.kwargs, **overrides})

    def extra_args(self, problem: Problem) -> dict[str, Any]:
        """The keyword extra arguments of ``update`` (also for ``nnx.Optimizer.update``)."""
        args = {name: getattr(problem, name) for name in self.protocol.extra_args}
        missing = [name for name, value in args.items() if value is None]
        if missing:
            raise ValueError(f"{self.name}: the problem lacks {missing}")
        return args

    def incoming(self, grads: Any, params: Any, problem: Problem) -> Any:
        """What ``update`` receives as its updates (``grads=None``: computed if needed)."""
        kind = self.protocol.updates
        if kind == "none":
            return None
        if grads is not None:
            return grads
        if kind == "gradient":
            return jax.grad(problem.value_fn)(params)
        return optax.tree.zeros_like(params)

    def update(
        self,
        opt: optax.GradientTransformation,
        grads: Any,
        state: Any,
        params: Any,
        problem: Problem,
    ) -> tuple[Any, Any]:
        """``opt.update`` called as this transformation needs (``opt`` may wrap it)."""
        incoming = self.incoming(grads, params, problem)
        return opt.update(incoming, state, params, **self.extra_args(problem))


def _ags(name: str, *, core: bool = False, **kwargs: Any) -> Entry:
    kwargs = {"sigma": 0.3, "num_samples": 8, **kwargs}
    static = ("num_samples", "key", "chunk_size")
    return Entry(name, agsopt.ags, kwargs, ZERO_ORDER, random=True, core=core, static_args=static)


def _alias(factory: Callable[..., Any], key: int) -> Entry:
    kwargs = {"learning_rate": 0.05, "sigma": 0.3, "num_samples": 8, "key": key}
    return Entry(
        factory.__name__, factory, kwargs, ZERO_ORDER, random=True, alias=True, final_updates=True
    )


_DGS_STATIC = (
    "num_directions",
    "num_nodes",
    "lateral_nodes",
    "anisotropic",
    "metric",
    "step",
    "radius_ratio",
    "restarts",
    "key",
    "chunk_size",
)

_ENTRIES = (
    # AGS: every registered covariance rule, every method, orthogonal blocks, a σ schedule
    # and a chunk size that leaves a remainder
    _ags("ags", key=1, core=True),  # the default rule, adaptive_gradient_aligned, antithetic
    _ags(
        "ags adaptive_diagonal forward schedule chunked",
        sigma=optax.exponential_decay(0.3, 2, 0.5),
        num_samples=6,
        covariance="adaptive_diagonal",
        method="forward",
        chunk_size=4,
        key=2,
        core=True,
    ),
    _ags(
        "ags isotropic first_order", covariance="isotropic", method="first_order", key=3, core=True
    ),
    _ags(
        "ags gradient_aligned plain orthogonal",
        covariance="gradient_aligned",
        method="plain",
        orthogonal=True,
        key=4,
    ),
    _ags("ags scaled_isotropic", covariance="scaled_isotropic", key=5),
    _ags("ags curvature_diagonal", covariance="curvature_diagonal", key=13),
    _ags("ags curvature_metric", covariance="curvature_metric", key=14),
    _ags(
        "ags scaled_adaptive_gradient_aligned",
        covariance="scaled_adaptive_gradient_aligned",
        key=6,
    ),
    _alias(agsopt.ags_gd, 7),
    _alias(agsopt.ags_sgd, 8),
    _alias(agsopt.ags_adam, 9),
    _alias(agsopt.igs_gd, 10),
    _alias(agsopt.igs_sgd, 11),
    _alias(agsopt.igs_adam, 12),
    # directional smoothing (black-box): the curvature and Lipschitz steps (final updates),
    # the gradient form with a block of directions, chunked, with either metric, and the box
    # recipe (the full metric at these sizes)
    Entry(
        "dgs",
        agsopt.dgs,
        {"radius": 0.3, "key": 14},
        ZERO_ORDER,
        random=True,
        final_updates=True,
        core=True,
        static_args=_DGS_STATIC,
    ),
    Entry(
        "dgs gradient diagonal metric block chunked",
        agsopt.dgs,
        {
            "radius": 0.3,
            "step": "gradient",
            "anisotropic": True,
            "metric": "diagonal",
            "num_directions": 2,
            "chunk_size": 1,
            "key": 15,
        },
        ZERO_ORDER,
        random=True,
        static_args=_DGS_STATIC,
    ),
    Entry(
        "dgs lipschitz",
        agsopt.dgs,
        {"radius": 0.3, "step": "lipschitz", "key": 17},
        ZERO_ORDER,
        random=True,
        final_updates=True,
        static_args=_DGS_STATIC,
    ),
    Entry(
        "dgs_blackbox",
        agsopt.dgs_blackbox,
        {"lower": -2.0, "upper": 2.0, "key": 16},
        ZERO_ORDER,
        random=True,
        final_updates=True,
        static_args=("lower", "upper", *_DGS_STATIC),
    ),
    Entry(
        "dgs gradient full metric block",
        agsopt.dgs,
        {
            "radius": 0.3,
            "step": "gradient",
            "anisotropic": True,
            "metric": "full",
            "num_directions": 2,
            "key": 18,
        },
        ZERO_ORDER,
        random=True,
        static_args=_DGS_STATIC,
    ),
    # the SAM family
    Entry("sam", agsopt.sam, {"rho": 0.05}, GRADIENT, axis_name=True, core=True),
    Entry("asam", agsopt.sam, {"rho": 0.5, "adaptive": True}, GRADIENT, axis_name=True, core=True),
    Entry(
        "bsam", agsopt.bsam, {"rho_max": 0.05, "rho_min": 0.02}, GRADIENT, axis_name=True, core=True
    ),
    Entry(
        "bsam min_point",
        agsopt.bsam,
        {
            "rho_max": 0.05,
            "rho_min": 0.02,
            "step_from": "min_point",
            "base": optax.sgd(0.1, momentum=0.9),
        },
        GRADIENT,
        axis_name=True,
        final_updates=True,
    ),
    Entry(
        "vsam",
        agsopt.vsam,
        {"rho": 0.05, "window": 2, "var_blocks": 1, "warmup_steps": 1, "reuse_steps": 2, "key": 4},
        GRADIENT,
        random=True,
        axis_name=True,
        core=True,
        static_args=(
            "steps_per_epoch",
            "warmup_epochs",
            "warmup_steps",
            "window",
            "var_blocks",
            "last_layer",
            "reuse_steps",
            "key",
        ),
    ),
    Entry(
        "ausam",
        agsopt.ausam,
        {"num_examples": 8, "rho": 0.05, "steps_per_epoch": 2, "alpha": 0.5, "key": 5},
        PER_EXAMPLE,
        random=True,
        axis_name=True,
        core=True,
        static_args=(
            "num_examples",
            "steps_per_epoch",
            "alpha",
            "trans_epoch",
            "full_batch_epochs",
            "key",
        ),
    ),
)

REGISTRY: dict[str, Entry] = {entry.name: entry for entry in _ENTRIES}
assert len(REGISTRY) == len(_ENTRIES), "entry names must be unique"


def select(**flags: Any) -> list[Entry]:
    """The entries whose attributes equal ``flags`` (e.g. ``select(alias=False)``)."""
    return [e for e in _ENTRIES if all(getattr(e, k) == v for k, v in flags.items())]


def representatives(entries: list[Entry] | None = None) -> list[Entry]:
    """The first core entry of each public factory among ``entries`` (all by default)."""
    entries = select(alias=False) if entries is None else entries
    firsts: dict[str, Entry] = {}
    for entry in sorted(entries, key=lambda e: not e.core):
        firsts.setdefault(entry.factory_name, entry)
    return [e for e in entries if firsts[e.factory_name] is e]


def cases(entries: list[Entry], *, default: list[Entry] | None = None) -> list[Any]:
    """A ``pytest.param`` per entry, with its name as id; those not in ``default`` (the
    core entries when ``None``) marked slow."""
    return [
        pytest.param(
            e,
            id=e.name,
            marks=() if (e.core if default is None else e in default) else pytest.mark.slow,
        )
        for e in entries
    ]
