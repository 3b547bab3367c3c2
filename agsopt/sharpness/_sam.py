"""Sharpness-aware minimization (SAM, arXiv:2010.01412) and its adaptive form (ASAM,
arXiv:2102.11600) as an Optax gradient transformation.

SAM minimizes ``max_{‖ε‖≤ρ} L(w + ε)``. Its one-step approximation of the inner maximum is

    ε = ρ g / (‖g‖ + eps),        g = ∇L(w)                       (SAM)
    ε = ρ T_w² g / (‖T_w g‖ + eps),  T_w = |w| + η  elementwise     (ASAM)

(ASAM's ``T_w`` may be restricted to some leaves, ``T = 1`` on the rest: the authors' code
scales weights but not biases.) ρ may be an Optax schedule of the step count.

and the gradient handed to the base optimizer is ``g_s = ∇L(w + ε)``, which then steps
the *original* ``w``. The perturbation uses the minibatch of ``g``: the caller's
``value_fn`` closes over it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from agsopt import _validation as validation
from agsopt._control_flow import choose_branch
from agsopt.sharpness._perturbation import (
    Mask,
    Radius,
    check_gradient_call,
    check_radius,
    mean_over_shards,
    perturbed_gradient,
    radius_at,
    sam_perturbation,
)

PyTree = Any

#: The leaf names SamsungLabs/ASAM scales by ``|w| + η``: PyTorch's ``weight`` and its Flax
#: counterparts (``kernel`` of Linear/Conv, ``scale`` of the norms, ``embedding``).
ASAM_WEIGHT_NAMES = ("weight", "kernel", "scale", "embedding")


class SAMState(NamedTuple):
    """State of :func:`sam`.

    Attributes:
      count: the number of steps taken (the argument of a ρ schedule).
      num_skipped: steps skipped — zero update, ``value_fn`` not evaluated — because a
        scheduled or injected ρ was not finite and ≥ 0 at that step.
    """

    count: jax.Array
    num_skipped: jax.Array


def _leaf_name(path: tuple[Any, ...]) -> str | None:
    """The name nearest to a leaf on its path: a dict key or attribute name (list and
    tuple indices are skipped, so ``{"kernel": [a, b]}`` names both leaves ``kernel``)."""
    for key in reversed(path):
        if isinstance(key, jax.tree_util.DictKey) and isinstance(key.key, str):
            return key.key
        if isinstance(key, jax.tree_util.GetAttrKey):
            return key.name
    return None


def asam_weight_mask(names: Sequence[str] = ASAM_WEIGHT_NAMES) -> Callable[[PyTree], PyTree]:
    """An ``adaptive_mask`` for :func:`sam` that selects leaves by name (ASAM,
    arXiv:2102.11600, as SamsungLabs/ASAM runs it).

    The returned ``mask(params)`` is True on a leaf whose name — the dict key or attribute
    nearest to it on its path, e.g. ``kernel`` in ``params["dense"]["kernel"]`` — is one of
    ``names``, and False elsewhere: ASAM then uses ``T = |w| + η`` on the selected leaves and
    ``T = 1`` on the others (biases, and names such as ``gain`` or ``cls_token`` that the
    reference does not scale). The default names are PyTorch's ``weight`` and Flax's
    ``kernel``, ``scale`` and ``embedding``. The reference tests ``'weight' in name`` on
    PyTorch's dotted parameter names (``bn1.weight`` is a norm's scale); on trees whose
    leaves are named as above the two select the same parameters::

        opt = agsopt.sam(0.5, adaptive=True, eta=0.01, eps=1e-16,
                         adaptive_mask=agsopt.sharpness.asam_weight_mask())

    Args:
      names: the leaf names to scale (a sequence of strings, not one string).

    Raises:
      TypeError: ``names`` is a string or holds a non-string.
      ValueError: ``names`` is empty.
    """
    if isinstance(names, str | bytes) or not isinstance(names, Sequence | set | frozenset):
        raise TypeError(f"names must be a sequence of strings, e.g. ('kernel',), got {names!r}")
    chosen = frozenset(names)
    if not chosen:
        raise ValueError("names must name at least one leaf, got an empty sequence")
    if not all(isinstance(n, str) for n in chosen):
        raise TypeError(f"names must be strings, got {sorted(map(repr, chosen))}")

    def mask(params: PyTree) -> PyTree:
        return jax.tree_util.tree_map_with_path(lambda path, _: _leaf_name(path) in chosen, params)

    return mask


def radius_is_static(rho: Radius) -> bool:
    """ρ was checked at construction: a concrete number, neither a schedule nor traced."""
    return not callable(rho) and validation.is_concrete(rho)


def radius_is_valid(*radii: jax.Array | float) -> jax.Array:
    """Is every radius of this step finite and ≥ 0? (a traced boolean scalar)"""
    checks = [jnp.all(jnp.isfinite(jnp.asarray(r)) & (jnp.asarray(r) >= 0)) for r in radii]
    return jnp.all(jnp.stack(checks))


def count_skip(num_skipped: jax.Array, ok: jax.Array) -> jax.Array:
    """``num_skipped`` plus one where the step was skipped (``ok`` False), saturating."""
    return jnp.where(ok, num_skipped, optax.safe_increment(num_skipped))


def skip_unless(
    ok: jax.Array | None, compute: Callable[[], PyTree], static: bool
) -> tuple[PyTree, jax.Array]:
    """``compute()`` when the step is valid, zeros of its shapes (nothing evaluated) when
    not; with ``static`` the step is valid by construction and ``compute`` runs as is.
    Returns ``(result, ok)``."""
    if static:
        return compute(), jnp.asarray(True)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(compute))
    return choose_branch(ok, compute, lambda: zeros), ok


def sam(
    rho: Radius = 0.05,
    *,
    adaptive: bool = False,
    eta: float = 0.01,
    eps: float = 1e-12,
    adaptive_mask: Mask | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SAM (Foret et al., arXiv:2010.01412); ``adaptive=True`` gives ASAM (arXiv:2102.11600).

    Chain it in front of any Optax optimizer::

        opt = optax.chain(agsopt.sam(rho=0.05), optax.sgd(0.1, momentum=0.9))
        grads = jax.grad(loss)(params, batch)
        updates, state = opt.update(grads, state, params,
                                    value_fn=lambda p: loss(p, batch))

    ``update`` receives ``g = ∇L(w)`` as its updates and returns ``∇L(w + ε)`` with

        ε = ρ g / (‖g‖ + eps)                                   (SAM)
        ε = ρ T² g / (‖T g‖ + eps),  T = |w| + η on the leaves   (ASAM)
            ``adaptive_mask`` selects, T = 1 on the others

    (see :func:`sam_perturbation`). Clipping belongs *after* this transformation (clipping
    ``g`` has no effect once it is normalized).

    Settings that reproduce the public implementations (same ε to rounding):

    - davda54/sam ``SAM(rho=ρ)``: ``sam(ρ)`` (its eps is 1e-12, as here).
    - davda54/sam ``SAM(rho=ρ, adaptive=True)``: ``sam(ρ, adaptive=True, eta=0.0)``: it
      scales every parameter, biases included, by ``|w|`` with no offset (its README
      suggests ρ = 2).
    - SamsungLabs/ASAM ``ASAM(rho=0.5, eta=0.01)``: ``sam(0.5, adaptive=True, eta=0.01,
      eps=1e-16, adaptive_mask=asam_weight_mask())``: :func:`asam_weight_mask` selects the
      parameters PyTorch names ``weight`` (Flax: ``kernel``, ``scale``, ``embedding``);
      biases and any other name keep ``T = 1``. Its ``SAM`` class is ``sam(ρ, eps=1e-16)``.

    Args:
      rho: radius of the ascent step (≥ 0): a number or an Optax schedule ``count -> ρ``
        evaluated at this transformation's step count (0 on the first step). ρ = 0 returns
        the plain gradient (with one extra gradient evaluation). A schedule is checked at
        ``count = 0`` at construction and again at every step: a step whose ρ (scheduled,
        or injected by ``optax.inject_hyperparams``) is not finite and ≥ 0 is skipped —
        zero update, ``value_fn`` not evaluated — and counted in ``state.num_skipped``.
      adaptive: use ASAM's scale-invariant ascent.
      eta: ASAM's offset η ≥ 0 (ignored unless ``adaptive``).
      eps: added to the norm, so a zero gradient gives a finite update.
      adaptive_mask: which leaves ASAM scales by ``|w| + η`` (Optax's mask convention: a
        pytree of bools shaped like the parameters or a prefix of them, or a callable
        ``params -> such a pytree``); unselected leaves use ``T = 1``. None (default):
        every leaf, as in the ASAM paper's ``T_w`` and davda54/sam. Ignored unless
        ``adaptive``.
      axis_name: m-sharpness under ``shard_map``/``pmap``: each shard perturbs with its own
        ĝ (so pass the *local*, un-reduced gradient) and the perturbed gradients are
        averaged over ``axis_name``.

    SAM on some layers only: chain ``sam`` inside ``optax.masked`` or one group of
    ``optax.multi_transform`` and pass ``value_fn=agsopt.fill_masked_params(loss, params)``
    (those wrappers hide the other groups' parameters from ``sam``). ε then lives on the
    selected leaves, with the norm over them; the other leaves keep their plain gradient.

    BatchNorm-style state: make ``value_fn`` a function of the parameters only, closing
    over the statistics of the first (unperturbed) pass and discarding those of the
    second; see the README.

    Raises:
      ValueError / TypeError: a ``rho`` that is not a finite number ≥ 0 or a schedule
        returning one at count 0; a negative ``eta``; a non-positive ``eps``.
    """
    check_radius("rho", rho)
    validation.check_positive("eta", eta, allow_zero=True)
    validation.check_positive("eps", eps)

    static = radius_is_static(rho)

    def init_fn(params: PyTree) -> SAMState:
        del params
        # one buffer per field: a step with donated state must not get one array twice
        return SAMState(count=jnp.zeros((), jnp.int32), num_skipped=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
        del extra_args
        value_fn = validation.require_value_fn(value_fn, "agsopt.sam")
        validation.check_state_fields(state, SAMState, "agsopt.sam")
        if params is None:
            raise TypeError("agsopt.sam: update() needs params")
        check_gradient_call(updates, params, value_fn, "agsopt.sam")
        rho_now = radius_at(rho, state.count)

        def sharp_gradient() -> PyTree:
            perturbation = sam_perturbation(
                updates,
                params,
                rho_now,
                adaptive=adaptive,
                eta=eta,
                eps=eps,
                adaptive_mask=adaptive_mask,
            )
            return perturbed_gradient(value_fn, params, perturbation)

        ok = None if static else radius_is_valid(rho_now)
        sharp_grads, ok = skip_unless(ok, sharp_gradient, static)
        sharp_grads = mean_over_shards(sharp_grads, axis_name)
        new_state = SAMState(
            count=optax.safe_increment(state.count),
            num_skipped=count_skip(state.num_skipped, ok),
        )
        return sharp_grads, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
