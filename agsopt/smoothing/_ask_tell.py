"""Ask/tell for AGS and IGS: the function is evaluated outside JAX (a NumPy simulator, an
external program), the estimate and the optimizer step run in JAX.

The zero-order estimators of :mod:`agsopt.smoothing.estimator` (arXiv:2411.11747) are two
halves: the points ``x ± Σu_n`` (and ``x`` for the forward form) at which ``f`` is needed,
and the combination of ``f`` at those points into

    ∇f_Σ(x) ≈ (1/N) Σ_n w_n Σ^{-T}u_n,   w_n = [f(x+Σu_n) − f(x−Σu_n)]/2, f(x+Σu_n) − f(x)
                                          or f(x+Σu_n) (antithetic, forward, plain).

:func:`ask_tell` hands the first half to the caller: ``ask`` returns the points as NumPy
arrays, the caller evaluates them however it likes, and ``tell`` runs the optimizer's own
``update`` with those values in place of ``value_fn`` (a
:class:`~agsopt.smoothing.estimator.TabulatedValues`). The state is the optimizer's state,
the estimate is computed by the same code: given the same values, the ask/tell loop and
the jitted ``value_fn`` loop do the same arithmetic on the same numbers, and they can be
mixed or checkpointed interchangeably. (They are two XLA programs: on CPU, XLA fuses
``a·b + c`` into one FMA depending on the program around it, so a statistic can differ in
its last bit; with ``XLA_FLAGS=--xla_disable_hlo_passes=fusion`` the two agree bit for bit,
as ``tests/test_ask_tell.py`` checks.)

An estimator plugs in as such a pair: :func:`agsopt.smoothing.estimator.points` gives the
points of a step in a fixed order, and the estimator, given a ``TabulatedValues`` as its
function, reads the value of point m at place m instead of evaluating it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agsopt.smoothing import directional, estimator
from agsopt.smoothing._ags import (
    DEFAULT_COVARIANCE,
    AGSState,
    ScalarOrSchedule,
    _sigma_is_valid,
    ags,
)
from agsopt.smoothing._ags import _check_state as check_ags_state
from agsopt.smoothing._dgs import (
    DGSState,
    _box_radius,
    _box_width,
    check_state,
    dgs,
    dgs_blackbox,
    step_directions,
    uses_full_metric,
)
from agsopt.smoothing.covariance_rules import CovarianceRule, get_rule
from agsopt.tree_utils import key_for_state, split_state_key, tree_size

PyTree = Any

__all__ = ["AskTell", "Ticket", "ask_tell", "dgs_ask_tell", "dgs_blackbox_ask_tell"]


class Ticket(NamedTuple):
    """What ``ask`` hands to ``tell``: the step's optimizer state and parameters.

    Attributes:
      state: the optimizer state ``ask`` was called with.
      params: the parameters ``ask`` was called with.
      num_points: how many values ``tell`` expects (0 when the step is skipped because σ is
        not finite and positive: nothing is to be evaluated).
    """

    state: Any
    params: PyTree
    num_points: int


class AskTell(NamedTuple):
    """An evosax-style optimizer: ``init``, ``ask``, ``tell`` (see :func:`ask_tell`).

    Attributes:
      init: ``params -> state``, the state of ``optax.chain(agsopt.ags(...), base)``.
      ask: ``(state, params) -> (points, ticket)``: the points as NumPy arrays, each leaf
        ``(M,) + leaf.shape``, and the :class:`Ticket` to pass to ``tell``.
      tell: ``(ticket, values) -> (updates, state)``: ``values`` are f at the points, a
        length-M array; apply the updates with ``optax.apply_updates``.
    """

    init: Callable[[PyTree], Any]
    ask: Callable[[Any, PyTree], tuple[PyTree, Ticket]]
    tell: Callable[[Ticket, Any], tuple[PyTree, Any]]


def _check_ticket(ticket: Any, owner: str) -> Ticket:
    """``ticket`` is the :class:`Ticket` that ``ask`` returned (else a ``TypeError``)."""
    if not isinstance(ticket, Ticket):
        raise TypeError(
            f"{owner}: tell needs the Ticket that ask returned, got {type(ticket).__name__}"
        )
    return ticket


def _check_values(values: Any, num_points: int) -> np.ndarray:
    """``values`` as a 1-D NumPy array of ``num_points`` real numbers (else a clear error)."""
    array = np.asarray(values)
    if array.dtype == np.bool_ or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        hint = (
            " (a failed evaluation is NaN, not None: it is left out and counted)"
            if array.dtype == object
            else ""
        )
        raise TypeError(
            f"agsopt.ask_tell: values must be real numbers, one per point of ask; got dtype "
            f"{array.dtype}{hint}"
        )
    if array.shape != (num_points,):
        raise ValueError(
            f"agsopt.ask_tell: values must have shape ({num_points},), one value per point "
            f"returned by ask, in the same order; got shape {array.shape}"
        )
    return array


def ask_tell(
    base: optax.GradientTransformation | None = None,
    *,
    sigma: ScalarOrSchedule = 0.1,
    num_samples: int = 16,
    covariance: str | CovarianceRule = DEFAULT_COVARIANCE,
    key: int | jax.Array = 0,
    method: str = "antithetic",
    orthogonal: bool = False,
    chunk_size: int | None = None,
    noise_table: jax.Array | None = None,
) -> AskTell:
    """AGS/IGS with an ask/tell interface, for a function evaluated outside JAX.

    The optimizer is ``optax.chain(agsopt.ags(sigma, num_samples, ...), base)`` (``ags``
    alone if ``base`` is None): ``ask_tell(optax.adam(lr), **kw)`` is ``agsopt.ags_adam(lr,
    **kw)``, ``ask_tell(optax.sgd(lr), covariance="isotropic", **kw)`` is
    ``agsopt.igs_gd(lr, **kw)``, with the same state and, for the same values of f, the same
    updates (up to XLA's fusion of the two programs, see the module doc). One step::

        points, ticket = opt.ask(state, params)        # NumPy, each leaf (M,) + leaf.shape
        values = simulate(points)                      # f at each point, shape (M,)
        updates, state = opt.tell(ticket, values)
        params = optax.apply_updates(params, updates)

    The M points (:func:`agsopt.smoothing.estimator.points`) are, for N = ``num_samples``:
    ``x + Σu_n`` then ``x − Σu_n`` (antithetic, M = 2N), ``x`` then ``x + Σu_n`` (forward,
    N + 1), ``x + Σu_n`` (plain, N); ``method="first_order"`` needs gradients and is a
    ``ValueError``. Non-finite values (a failed simulation) are handled as a non-finite
    loss is by :func:`agsopt.ags`: left out and counted in ``num_nonfinite``, and a step with
    no finite sample is skipped (zero update, rule state kept, ``num_skipped``). At a step
    whose σ (a schedule) is not finite and positive, ``ask`` returns no points and ``tell``
    takes an empty array: the step is skipped, as in ``ags``.

    Values are taken in the estimator's working dtype (float32 for float32 or lower
    precision parameters, float64 for float64 ones). ``ask`` and ``tell`` are compiled once
    per parameter shape; the points of one step take O(M · d) memory.

    Args:
      base: the Optax optimizer that follows ``ags`` (e.g. ``optax.adam(1e-2)``), or None
        for the smoothed-gradient estimate itself.
      sigma, num_samples, covariance, key, method, orthogonal, chunk_size, noise_table: as
        for :func:`agsopt.ags` (zero-order methods only).

    Returns:
      An :class:`AskTell` of ``init``, ``ask`` and ``tell``.

    Raises:
      ValueError: ``method="first_order"``, and any argument :func:`agsopt.ags` rejects.
      TypeError, ValueError (from ``tell``): values that are not real numbers or not of
        shape ``(M,)``.
    """
    if method == "first_order":
        raise ValueError(
            "agsopt.ask_tell: method='first_order' needs gradients of the function, which a "
            "black box does not give; use 'antithetic', 'forward' or 'plain'"
        )
    if base is not None and not (hasattr(base, "init") and hasattr(base, "update")):
        raise TypeError(
            "agsopt.ask_tell: base must be an Optax optimizer (e.g. optax.adam(1e-2)) or None, "
            f"got {type(base).__name__}; the smoothing settings are keyword arguments"
        )
    smoother = ags(
        sigma,
        num_samples,
        covariance=covariance,
        key=key,
        method=method,
        orthogonal=orthogonal,
        chunk_size=chunk_size,
        noise_table=noise_table,
    )
    opt = smoother if base is None else optax.chain(smoother, base)
    rule = get_rule(covariance)
    key_data, key_impl = key_for_state(key)
    num_points = estimator.evaluations_per_estimate(method, num_samples)

    def smoothing_state(state: Any) -> AGSState:
        found = state if base is None else (state[0] if isinstance(state, tuple) else None)
        if not isinstance(found, AGSState):
            raise TypeError(
                "agsopt.ask_tell: state must come from this optimizer's init (or tell); got "
                f"{type(state).__name__}"
            )
        return found

    @jax.jit
    def points_of(state: Any, params: PyTree) -> tuple[PyTree, jax.Array]:
        # The step's key, σ and Σ exactly as ags's update derives them from its state.
        own = smoothing_state(state)
        _, step_key = split_state_key(own.key, key_impl)
        sigma_now = sigma(own.count) if callable(sigma) else sigma
        matrix = rule.matrix(own.rule_state, sigma_now)
        batch = estimator.points(
            params,
            step_key,
            matrix,
            num_samples=num_samples,
            method=method,
            orthogonal=orthogonal,
            chunk_size=chunk_size,
            noise_table=noise_table,
        )
        return batch, _sigma_is_valid(sigma_now)

    @jax.jit
    def update_with(state: Any, params: PyTree, values: jax.Array) -> tuple[PyTree, Any]:
        updates = jax.tree.map(jnp.zeros_like, params)
        return opt.update(updates, state, params, value_fn=estimator.TabulatedValues(values))

    def ask_fn(state: Any, params: PyTree) -> tuple[PyTree, Ticket]:
        check_ags_state(smoothing_state(state), params, rule, key_data.shape)
        batch, sigma_ok = points_of(state, params)
        batch = jax.tree.map(np.array, batch)  # writable copies: a simulator may edit them
        count = num_points
        if not bool(sigma_ok):  # the step is skipped: nothing to evaluate
            batch = jax.tree.map(lambda x: x[:0], batch)
            count = 0
        return batch, Ticket(state, params, count)

    def tell_fn(ticket: Ticket, values: Any) -> tuple[PyTree, Any]:
        array = _check_values(values, _check_ticket(ticket, "agsopt.ask_tell").num_points)
        dtype = estimator._noise_dtype(ticket.params)
        if ticket.num_points == 0:  # σ invalid: ags skips the step without reading values
            array = np.full((num_points,), np.nan)
        return update_with(ticket.state, ticket.params, jnp.asarray(array, dtype))

    return AskTell(opt.init, ask_fn, tell_fn)


def dgs_ask_tell(radius: Any, **dgs_kwargs: Any) -> AskTell:
    """:func:`agsopt.dgs` with an ask/tell interface (the directional Gauss–Hermite
    estimator, arXiv:2002.03001, with ASGF's adaptation, arXiv:2006.10887).

    ``ask`` returns the ``(M − 1) + (k − 1)(M' − 1) + 1`` points of the step
    (:func:`agsopt.smoothing.directional.directional_points`: x, then each direction's
    nodes), ``tell`` runs ``dgs``'s own ``update`` with their values: the same state
    (best point, counters, ``stop``) and the same updates as the jitted ``value_fn`` path for
    the same values (up to XLA's fusion, see the module doc). Keyword arguments are
    :func:`agsopt.dgs`'s; ``radius`` may be a function of d, as there.
    """
    tx = dgs(radius, **dgs_kwargs)
    num_directions = dgs_kwargs.get("num_directions")
    num_nodes = dgs_kwargs.get("num_nodes", 5)
    lateral_nodes = dgs_kwargs.get("lateral_nodes")
    key_data, key_impl = key_for_state(dgs_kwargs.get("key", 0))
    anisotropic = bool(dgs_kwargs.get("anisotropic", False))
    metric = dgs_kwargs.get("metric", inspect.signature(dgs).parameters["metric"].default)

    def own_state(state: Any) -> DGSState:
        if not isinstance(state, DGSState):
            raise TypeError(
                "agsopt.dgs_ask_tell: state must come from this optimizer's init (or tell); "
                f"got {type(state).__name__}"
            )
        return state

    def directions_of(state: DGSState) -> int:
        dim = state.direction.shape[0]
        return dim if num_directions is None else num_directions

    @jax.jit
    def points_of(state: DGSState, params: PyTree) -> PyTree:
        _, _, directions, radii = step_directions(state, directions_of(state), key_impl)
        return directional.directional_points(
            params, directions, radii, num_nodes=num_nodes, lateral_nodes=lateral_nodes
        )

    @jax.jit
    def update_with(state: DGSState, params: PyTree, values: jax.Array) -> tuple[PyTree, Any]:
        updates = jax.tree.map(jnp.zeros_like, params)
        return tx.update(updates, state, params, value_fn=estimator.TabulatedValues(values))

    def ask_fn(state: Any, params: PyTree) -> tuple[PyTree, Ticket]:
        own = own_state(state)
        full = uses_full_metric(anisotropic, metric, tree_size(params))
        check_state(own, params, key_data.shape, full)
        batch = jax.tree.map(np.array, points_of(own, params))  # writable copies
        count = directional.evaluations_per_step(directions_of(own), num_nodes, lateral_nodes)
        return batch, Ticket(state, params, count)

    def tell_fn(ticket: Ticket, values: Any) -> tuple[PyTree, Any]:
        array = _check_values(values, _check_ticket(ticket, "agsopt.dgs_ask_tell").num_points)
        dtype = own_state(ticket.state).direction.dtype
        return update_with(ticket.state, ticket.params, jnp.asarray(array, dtype))

    return AskTell(tx.init, ask_fn, tell_fn)


def dgs_blackbox_ask_tell(lower: Any, upper: Any, **recipe_kwargs: Any) -> AskTell:
    """:func:`agsopt.dgs_blackbox` (the black-box recipe from the box alone) with an
    ask/tell interface: :func:`dgs_ask_tell` with the recipe's radius and defaults, for a
    function evaluated outside JAX. ``recipe_kwargs`` are :func:`agsopt.dgs_blackbox`'s
    keywords (``key``, ``num_directions``, ``lateral_nodes``, ...); the same state and
    updates as ``dgs_blackbox``'s jitted ``value_fn`` path for the same values."""
    try:
        bound = inspect.signature(dgs_blackbox).bind(lower, upper, **recipe_kwargs)
    except TypeError as error:
        raise TypeError(
            f"agsopt.dgs_blackbox_ask_tell: {error} (dgs_blackbox's keywords)"
        ) from None
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    radius = _box_radius(_box_width(arguments.pop("lower"), arguments.pop("upper")))
    return dgs_ask_tell(radius, **arguments)
