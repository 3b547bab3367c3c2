"""Standard optimization test functions, for benchmarking the optimizers in this package.

Every function maps a point ``x`` of shape ``(d,)`` to a scalar, for any dimension ``d ≥ 1``,
and is a pure ``jax.numpy`` function: it works under ``jit``, ``vmap`` and ``grad``, in
float32 and float64, and returns the floating dtype of its input (integer inputs are
promoted to JAX's default float). The definitions follow the usual ones, e.g. those of the
Virtual Library of Simulation Experiments (Surjanovic & Bingham); each function's docstring
states its formula, with indices ``i = 1..d``.

Each function is wrapped in a :class:`TestFunction` that also knows its standard search box
(the same ``[lower, upper]`` in every coordinate), its global minimizer as a function of
``d`` where one is known, and its minimum value. The wrappers are collected in
:data:`REGISTRY` and looked up with :func:`get`::

    f = get("rastrigin")
    f(jnp.zeros(3))                               # 0.0
    f.minimizer(3), f.minimum(3)                  # array([0., 0., 0.]), 0.0
    x0 = sample_starts(f, jax.random.key(0), num_starts=8, dim=3)   # (8, 3), in f.domain

Rotated and shifted variants
----------------------------
:func:`rotated` builds, for a fixed dimension ``d``, the function

    g(x) = f(Q (x − o) + c),

with ``Q`` a random orthogonal matrix (Haar-distributed; QR of a Gaussian matrix with the
signs of ``R``'s diagonal absorbed into ``Q``), ``c`` the pivot, equal to ``f``'s minimizer
``x*`` when one is known for this ``d`` and to the centre of the box otherwise, and ``o`` the
new centre: each ``o_i`` uniform within ``0.2 w`` of ``c_i`` (``w`` the box width) and
within the box, or ``o = c`` with ``shift=False``. Because
``Q(x − o) + c = x*``  ⇔  ``x = o + Qᵀ(x* − c)``, the minimizer of ``g`` is
``o + Qᵀ(x* − c)``, which is ``o`` itself, and the minimum value is unchanged. The
rotation couples the coordinates, so separable functions (ellipsoid, rastrigin,
styblinski_tang, ...) become non-separable, and the rotated ellipsoid is ill-conditioned in
no axis-aligned frame. The box is kept.

Rotated variants are also reachable through :func:`get` by prefixing a name with
``"rotated_"``; they need the dimension, and take ``seed=0`` unless told otherwise::

    g = get("rotated_ellipsoid", dim=10)          # == rotated("ellipsoid", 10, seed=0)

Caveat: ``schwefel`` and ``michalewicz`` have their minimum only on their box (outside it
they reach lower values), and a rotated box sticks out of the original one. For their
rotated variants the stated minimizer and minimum are a local minimum of ``g``; the
smallest value of ``g`` on the box can be lower.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "REGISTRY",
    "TestFunction",
    "ackley",
    "conditioned_rastrigin",
    "ellipsoid",
    "get",
    "griewank",
    "levy",
    "michalewicz",
    "mixed_asymmetric",
    "names",
    "random_rotation",
    "rastrigin",
    "rastrigin_multifrequency",
    "rosenbrock",
    "rotated",
    "rugged_ellipsoid",
    "sample_starts",
    "schwefel",
    "sphere",
    "styblinski_tang",
]

ROTATED_PREFIX = "rotated_"

# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _as_vector(x: jax.Array) -> jax.Array:
    """``x`` as a floating JAX array of shape ``(d,)``, d ≥ 1 (ValueError otherwise; a
    complex ``x`` is a TypeError: casting it to real would drop its imaginary part)."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"test functions take a real point, got dtype {x.dtype}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.result_type(float))
    if x.ndim != 1 or x.shape[0] < 1:
        raise ValueError(
            f"test functions take a point of shape (d,) with d >= 1, got shape {x.shape}; "
            "use jax.vmap for a batch of points"
        )
    return x


def _check_dim(dim: int) -> int:
    if isinstance(dim, bool) or int(dim) != dim or dim < 1:
        raise ValueError(f"dim must be an integer >= 1, got dim={dim!r}")
    return int(dim)


def _safe_sqrt(s: jax.Array) -> jax.Array:
    """``sqrt(s)`` for ``s ≥ 0`` whose gradient at ``s = 0`` is 0 instead of inf/NaN."""
    positive = s > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1)), 0)


def _indices(d: int, dtype: jnp.dtype) -> jax.Array:
    """The 1-based coordinate indices ``1..d`` as floats of ``dtype``."""
    return jnp.arange(1, d + 1, dtype=dtype)


# --------------------------------------------------------------------------------------
# The functions
# --------------------------------------------------------------------------------------


def sphere(x: jax.Array) -> jax.Array:
    """Sphere: f(x) = Σ_i x_i²; box [-5.12, 5.12]; minimum 0 at x = 0."""
    x = _as_vector(x)
    return jnp.sum(x * x)


def ellipsoid(x: jax.Array) -> jax.Array:
    """Ellipsoid: f(x) = Σ_i 10^(6 (i−1)/(d−1)) x_i² (f = x_1² for d = 1); box [-5.12, 5.12].

    Ill-conditioned: the Hessian is diagonal with condition number 10⁶ for every d ≥ 2.
    Minimum 0 at x = 0.
    """
    x = _as_vector(x)
    return jnp.sum(_decades(x.shape[0], 6.0, x.dtype) * x * x)


def _decades(d: int, decades: float, dtype: jnp.dtype) -> jax.Array:
    """``10^(decades·(i−1)/(d−1))``, i = 1..d (ones for d = 1)."""
    return jnp.asarray(10.0 ** (decades * np.arange(d) / max(d - 1, 1)), dtype=dtype)


def rosenbrock(x: jax.Array) -> jax.Array:
    """Rosenbrock: f(x) = Σ_{i<d} [100 (x_{i+1} − x_i²)² + (x_i − 1)²]; box [-5, 10].

    Minimum 0 at x = (1, ..., 1). For d = 1 the sum is empty and f ≡ 0.
    """
    x = _as_vector(x)
    head, tail = x[:-1], x[1:]
    return jnp.sum(100.0 * (tail - head * head) ** 2 + (head - 1.0) ** 2)


def rastrigin(x: jax.Array) -> jax.Array:
    """Rastrigin: f(x) = 10 d + Σ_i [x_i² − 10 cos(2π x_i)]; box [-5.12, 5.12]; minimum 0 at 0."""
    x = _as_vector(x)
    return jnp.sum(x * x + 10.0 * (1.0 - jnp.cos(2.0 * math.pi * x)))


def rugged_ellipsoid(x: jax.Array) -> jax.Array:
    """Rugged ellipsoid: :func:`ellipsoid` plus Rastrigin's ripples; box [-5.12, 5.12].

    f(x) = Σ_i [10^(6 (i−1)/(d−1)) x_i² + 10 (1 − cos(2π x_i))]: an ill-conditioned
    envelope (condition 10⁶, the ellipsoid's) with the same ripples along every coordinate.
    Minimum 0 at x = 0 (both terms are ≥ 0 and vanish only there).
    """
    x = _as_vector(x)
    weights = _decades(x.shape[0], 6.0, x.dtype)
    return jnp.sum(weights * x * x + 10.0 * (1.0 - jnp.cos(2.0 * math.pi * x)))


def conditioned_rastrigin(x: jax.Array) -> jax.Array:
    """Conditioned Rastrigin: :func:`rastrigin` of ``z = Λx``, Λ_ii = 10^((i−1)/(2(d−1)));
    box [-5.12, 5.12].

    The conditioning of the BBOB suite's Rastrigin (its Λ^10, without the oscillation and
    asymmetry transforms): length scales over half a decade, envelope and ripples alike
    (the envelope's Hessian has condition 10). Minimum 0 at x = 0.
    """
    x = _as_vector(x)
    z = _decades(x.shape[0], 0.5, x.dtype) * x
    return jnp.sum(z * z + 10.0 * (1.0 - jnp.cos(2.0 * math.pi * z)))


def ackley(x: jax.Array) -> jax.Array:
    """Ackley: f(x) = −a exp(−b √(Σ_i x_i²/d)) − exp(Σ_i cos(c x_i)/d) + a + e, a=20, b=0.2, c=2π.

    Box [-32.768, 32.768]; minimum 0 at x = 0. Evaluated as
    ``−a expm1(−b r) − e expm1(m − 1)`` (r the root-mean-square, m the mean cosine), which
    avoids cancellation near 0 and is exactly 0 at x = 0 when called eagerly; under ``jit``
    XLA rounds the mean differently and ``m − 1`` comes out ±1e-7 there, so the result is
    clipped at 0 (f ≥ 0 everywhere: ``f − f*`` is never negative on a log plot). The
    gradient at x = 0, where f has a cone-shaped kink, is taken as 0.
    """
    a, b, c = 20.0, 0.2, 2.0 * math.pi
    x = _as_vector(x)
    r = _safe_sqrt(jnp.mean(x * x))
    m = jnp.mean(jnp.cos(c * x))
    value = -a * jnp.expm1(-b * r) - math.e * jnp.expm1(m - 1.0)
    return jnp.maximum(value, 0.0)


def griewank(x: jax.Array) -> jax.Array:
    """Griewank: f(x) = Σ_i x_i²/4000 − Π_i cos(x_i/√i) + 1; box [-600, 600]; minimum 0 at 0."""
    x = _as_vector(x)
    i = _indices(x.shape[0], x.dtype)
    return jnp.sum(x * x) / 4000.0 - jnp.prod(jnp.cos(x / jnp.sqrt(i))) + 1.0


def levy(x: jax.Array) -> jax.Array:
    """Levy: f = sin²(πw_1) + Σ_{i<d} (w_i−1)²[1 + 10 sin²(πw_i+1)] + (w_d−1)²[1 + sin²(2πw_d)].

    Here w_i = 1 + (x_i − 1)/4. Box [-10, 10]; minimum 0 at x = (1, ..., 1).
    """
    x = _as_vector(x)
    w = 1.0 + (x - 1.0) / 4.0
    head, last = w[:-1], w[-1]
    first_term = jnp.sin(math.pi * w[0]) ** 2
    middle = jnp.sum((head - 1.0) ** 2 * (1.0 + 10.0 * jnp.sin(math.pi * head + 1.0) ** 2))
    last_term = (last - 1.0) ** 2 * (1.0 + jnp.sin(2.0 * math.pi * last) ** 2)
    return first_term + middle + last_term


SCHWEFEL_CONSTANT = 418.9829
"""The constant of :func:`schwefel`, as conventionally rounded."""

_SCHWEFEL_X = 420.9687463599821  # argmax of t sin(√t) on [0, 500]
_SCHWEFEL_PEAK = 418.98288727243374  # its value, max_t t sin(√t)


def schwefel(x: jax.Array) -> jax.Array:
    """Schwefel: f(x) = 418.9829 d − Σ_i x_i sin(√|x_i|); box [-500, 500].

    Minimizer x_i = 420.968746 (often quoted as 420.9687). With the conventionally rounded
    constant 418.9829 the minimum is not exactly 0 but (418.9829 − 418.98288727...) d
    ≈ 1.27e-5 d, which is what ``minimum(d)`` returns. The gradient at x_i = 0 is taken
    as its limit, 0.
    """
    x = _as_vector(x)
    d = x.shape[0]
    return SCHWEFEL_CONSTANT * d - jnp.sum(x * jnp.sin(_safe_sqrt(jnp.abs(x))))


MICHALEWICZ_M = 10
"""The steepness parameter m of :func:`michalewicz`."""


def michalewicz(x: jax.Array) -> jax.Array:
    """Michalewicz: f(x) = −Σ_i sin(x_i) sin^(2m)(i x_i²/π), m = 10; box [0, π].

    The minimum is known for d ≤ 10 (the function is separable: it is the sum of the
    one-dimensional minima at tabulated coordinates), e.g. −1.8013, −4.687658, −9.66015
    (the literature values) for d = 2, 5, 10; unknown (None) beyond.
    """
    x = _as_vector(x)
    i = _indices(x.shape[0], x.dtype)
    return -jnp.sum(jnp.sin(x) * jnp.sin(i * x * x / math.pi) ** (2 * MICHALEWICZ_M))


_STYBLINSKI_TANG_X = -2.903534027771177  # root of 4t³ − 32t + 5 = 0 in [-5, 5], the argmin
_STYBLINSKI_TANG_MIN = -39.16616570377141  # ½(t⁴ − 16t² + 5t) there


def styblinski_tang(x: jax.Array) -> jax.Array:
    """Styblinski–Tang: f(x) = ½ Σ_i (x_i⁴ − 16 x_i² + 5 x_i); box [-5, 5].

    Minimum −39.16617 d at x_i = −2.903534 (often quoted, slightly off, as −39.16599 d).
    """
    x = _as_vector(x)
    x2 = x * x
    return 0.5 * jnp.sum(x2 * x2 - 16.0 * x2 + 5.0 * x)


MULTIFREQUENCY_RANGE = 4.0
""":func:`rastrigin_multifrequency`'s frequencies run from 1/4 to 4 (this constant)."""


def _frequencies(d: int, dtype: jnp.dtype) -> jax.Array:
    """``ω_i = 4^(2(i−1)/(d−1) − 1)``, i = 1..d (geometric from 1/4 to 4; ω = 1 for d = 1)."""
    if d == 1:
        return jnp.ones(1, dtype)
    exponents = 2.0 * np.arange(d) / (d - 1) - 1.0
    return jnp.asarray(MULTIFREQUENCY_RANGE**exponents, dtype=dtype)


def rastrigin_multifrequency(x: jax.Array) -> jax.Array:
    """Multi-frequency Rastrigin: f(x) = Σ_i [x_i² + 10 (1 − cos(2π ω_i x_i))]; box [-5.12, 5.12].

    The frequencies ``ω_i = 4^(2(i−1)/(d−1) − 1)`` grow geometrically from 1/4 (i = 1) to 4
    (i = d); ω = 1 for d = 1 (then f is :func:`rastrigin`). Minimum 0 at x = 0 (both terms
    are ≥ 0 and vanish only there). The ripples along coordinate i have period 1/ω_i, so the
    structure is direction dependent: smoothed with a diagonal Σ of stds s_i,

        f_Σ(x) = Σ_i [x_i² + s_i² + 10 − 10 cos(2π ω_i x_i) exp(−2π² ω_i² s_i²)],

    every coordinate of f_Σ is convex once ``s_i ≳ 0.52/ω_i``: one isotropic σ either leaves
    the fast coordinates rippled or smooths the slow ones 16 times more than they need.
    """
    x = _as_vector(x)
    omega = _frequencies(x.shape[0], x.dtype)
    return jnp.sum(x * x + 10.0 * (1.0 - jnp.cos(2.0 * math.pi * omega * x)))


def mixed_asymmetric(x: jax.Array) -> jax.Array:
    """Mixed asymmetric: Rastrigin terms on the odd coordinates, exponential walls on the even.

    f(x) = Σ_{i odd} [x_i² + 10 (1 − cos(2π x_i))] + Σ_{i even} 10 (e^{x_i} − 1 − x_i),
    with 1-based i; box [-5.12, 5.12]; minimum 0 at x = 0 (every term is ≥ 0 and vanishes
    only at x_i = 0). The odd coordinates ripple (smoothing helps there); the even ones are
    smooth, convex and asymmetric: steep for x_i > 0, nearly linear for x_i < 0. Smoothing
    an even coordinate with std s gives ``10 (e^{x_i + s²/2} − 1 − x_i)``, whose minimizer
    ``x_i = −s²/2`` is biased away from 0 (by 4.5 at s = 3): a radius that suits the odd
    coordinates misplaces the even ones.
    """
    x = _as_vector(x)
    odd = np.arange(x.shape[0]) % 2 == 0  # 0-based even positions are 1-based odd i
    ripple = x * x + 10.0 * (1.0 - jnp.cos(2.0 * math.pi * x))
    wall = 10.0 * (jnp.expm1(x) - x)
    return jnp.sum(jnp.where(jnp.asarray(odd), ripple, wall))


# Coordinate-wise minimizers of Michalewicz (m = 10) on [0, π]: the i-th entry minimizes
# −sin(t) sin^20(i t²/π) over t. Coordinates with i t²/π = π/2 + kπ at t = π/2 are exact.
_MICHALEWICZ_ARGMIN = np.array(
    [
        2.2029055201639234,
        math.pi / 2,
        1.2849915705402493,
        1.923058469859634,
        1.7204697725772549,
        math.pi / 2,
        1.4544139713503035,
        1.756086520937532,
        1.6557174168110769,
        math.pi / 2,
    ]
)
# f is separable, so for d ≤ 10 its minimum is the sum of the one-dimensional minima at
# these points; the sums round to the literature values -1.8013 (d=2), -4.687658 (d=5) and
# -9.66015 (d=10) (a test checks them, and each entry against a fine grid on [0, π]).
_MICHALEWICZ_MIN = dict(
    enumerate(
        np.cumsum(
            -np.sin(_MICHALEWICZ_ARGMIN)
            * np.sin(np.arange(1, 11) * _MICHALEWICZ_ARGMIN**2 / math.pi) ** 20
        ).tolist(),
        start=1,
    )
)


# --------------------------------------------------------------------------------------
# TestFunction and the registry
# --------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TestFunction:
    """A test function with its box, known minimizer and minimum; callable as ``fn``.

    Attributes:
        name: registry name, e.g. ``"rastrigin"`` or ``"rotated_rastrigin"``.
        fn: the function, ``x`` of shape ``(d,)`` to a scalar.
        domain: ``(lower, upper)``, the standard search box, the same in every coordinate.
        minimizer: ``d -> x*`` (a float64 NumPy array of shape ``(d,)``), or None where the
            global minimizer is not known for that ``d``.
        minimum: ``d -> f(x*)``, or None where not known.
        description: the formula, one line.
        dim: the one dimension the function accepts, or None for any ``d ≥ 1``.
        rotation: for rotated variants, the orthogonal matrix ``Q``; else None.
        offset: for rotated variants, the new centre ``o`` (= the minimizer); else None.
    """

    __test__: ClassVar[bool] = False  # not a pytest test class, despite its name

    name: str
    fn: Callable[[jax.Array], jax.Array]
    domain: tuple[float, float]
    minimizer: Callable[[int], np.ndarray | None]
    minimum: Callable[[int], float | None]
    description: str
    dim: int | None = None
    rotation: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)
    offset: np.ndarray | None = dataclasses.field(default=None, compare=False, repr=False)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fn(x)


def _constant_minimizer(value: float) -> Callable[[int], np.ndarray]:
    def minimizer(d: int) -> np.ndarray:
        return np.full(_check_dim(d), value, dtype=np.float64)

    return minimizer


def _linear_minimum(per_coordinate: float) -> Callable[[int], float]:
    def minimum(d: int) -> float:
        return per_coordinate * _check_dim(d)

    return minimum


def _michalewicz_minimizer(d: int) -> np.ndarray | None:
    return _MICHALEWICZ_ARGMIN[:d].copy() if _check_dim(d) in _MICHALEWICZ_MIN else None


def _michalewicz_minimum(d: int) -> float | None:
    return _MICHALEWICZ_MIN.get(_check_dim(d))


def _summary(fn: Callable) -> str:
    return inspect.getdoc(fn).splitlines()[0]


def _make(
    fn: Callable[[jax.Array], jax.Array],
    domain: tuple[float, float],
    minimizer: Callable[[int], np.ndarray | None],
    minimum: Callable[[int], float | None],
) -> TestFunction:
    return TestFunction(fn.__name__, fn, domain, minimizer, minimum, _summary(fn))


_ZERO_AT = _constant_minimizer(0.0)
_ONES_AT = _constant_minimizer(1.0)
_ZERO_MIN = _linear_minimum(0.0)

REGISTRY: dict[str, TestFunction] = {
    tf.name: tf
    for tf in [
        _make(sphere, (-5.12, 5.12), _ZERO_AT, _ZERO_MIN),
        _make(ellipsoid, (-5.12, 5.12), _ZERO_AT, _ZERO_MIN),
        _make(rosenbrock, (-5.0, 10.0), _ONES_AT, _ZERO_MIN),
        _make(rastrigin, (-5.12, 5.12), _ZERO_AT, _ZERO_MIN),
        _make(rastrigin_multifrequency, (-5.12, 5.12), _ZERO_AT, _ZERO_MIN),
        _make(rugged_ellipsoid, (-5.12, 5.12), _ZERO_AT, _ZERO_MIN),
        _make(conditioned_rastrigin, (-5.12, 5.12), _ZERO_AT, _ZERO_MIN),
        _make(mixed_asymmetric, (-5.12, 5.12), _ZERO_AT, _ZERO_MIN),
        _make(ackley, (-32.768, 32.768), _ZERO_AT, _ZERO_MIN),
        _make(griewank, (-600.0, 600.0), _ZERO_AT, _ZERO_MIN),
        _make(levy, (-10.0, 10.0), _ONES_AT, _ZERO_MIN),
        _make(
            schwefel,
            (-500.0, 500.0),
            _constant_minimizer(_SCHWEFEL_X),
            _linear_minimum(SCHWEFEL_CONSTANT - _SCHWEFEL_PEAK),
        ),
        _make(michalewicz, (0.0, math.pi), _michalewicz_minimizer, _michalewicz_minimum),
        _make(
            styblinski_tang,
            (-5.0, 5.0),
            _constant_minimizer(_STYBLINSKI_TANG_X),
            _linear_minimum(_STYBLINSKI_TANG_MIN),
        ),
    ]
}
"""The plain test functions by name. Rotated variants are built on demand, see :func:`get`."""


def names(*, include_rotated: bool = False) -> list[str]:
    """The sorted names of the registered functions (with their ``rotated_*`` forms if asked)."""
    plain = sorted(REGISTRY)
    if include_rotated:
        plain = sorted(plain + [ROTATED_PREFIX + n for n in plain])
    return plain


def get(name: str, *, dim: int | None = None, seed: int = 0, shift: bool = True) -> TestFunction:
    """The test function called ``name``.

    Plain names (see :func:`names`) return the registered :class:`TestFunction`, for any
    dimension; ``dim`` and ``seed`` are then ignored. A name ``"rotated_<plain name>"``
    returns ``rotated(<plain name>, dim, seed, shift=shift)``, which needs ``dim``.
    Unknown names raise ValueError listing the valid ones.
    """
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith(ROTATED_PREFIX) and name[len(ROTATED_PREFIX) :] in REGISTRY:
        if dim is None:
            raise ValueError(
                f"{name!r} is a rotated variant and needs dim, e.g. get({name!r}, dim=10)"
            )
        return rotated(name[len(ROTATED_PREFIX) :], dim, seed, shift=shift)
    valid = ", ".join(names())
    raise ValueError(
        f"unknown test function {name!r}; valid names are: {valid} "
        f"(and each prefixed with {ROTATED_PREFIX!r}, which needs dim=...)"
    )


def _resolve(fn_or_name: TestFunction | str) -> TestFunction:
    if isinstance(fn_or_name, TestFunction):
        return fn_or_name
    if isinstance(fn_or_name, str):
        return get(fn_or_name)
    raise TypeError(f"expected a TestFunction or a name, got {type(fn_or_name).__name__}")


def sample_starts(
    fn_or_name: TestFunction | str,
    key: jax.Array,
    num_starts: int,
    dim: int,
    dtype: jnp.dtype | None = None,
) -> jax.Array:
    """``num_starts`` points drawn uniformly in the function's box, shape ``(num_starts, dim)``.

    ``dtype`` defaults to JAX's default float. Raises ValueError for ``dim < 1``,
    ``num_starts < 1``, or a ``dim`` that a fixed-dimension (rotated) function does not take.
    """
    tf = _resolve(fn_or_name)
    dim = _check_dim(dim)
    if isinstance(num_starts, bool) or int(num_starts) != num_starts or num_starts < 1:
        raise ValueError(f"num_starts must be an integer >= 1, got num_starts={num_starts!r}")
    if tf.dim is not None and dim != tf.dim:
        raise ValueError(f"{tf.name} is defined for dim={tf.dim} only, got dim={dim}")
    lower, upper = tf.domain
    dtype = jnp.result_type(float) if dtype is None else dtype
    return jax.random.uniform(key, (int(num_starts), dim), dtype=dtype, minval=lower, maxval=upper)


# --------------------------------------------------------------------------------------
# Rotated and shifted variants
# --------------------------------------------------------------------------------------


def random_rotation(dim: int, seed: int | np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal ``(dim, dim)`` float64 matrix: QR of a Gaussian, signs fixed.

    The signs of ``R``'s diagonal are moved into ``Q`` so that the result is uniformly
    distributed over the orthogonal group (and ``Q R`` stays the factorization).
    """
    dim = _check_dim(dim)
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
    signs = np.where(np.diag(r) < 0, -1.0, 1.0)
    return q * signs  # scales column j by sign(r_jj)


def rotated(
    fn_or_name: TestFunction | str, dim: int, seed: int = 0, *, shift: bool = True
) -> TestFunction:
    """``g(x) = f(Q (x − o) + c)`` for a fixed ``dim``: a rotated, shifted copy of ``f``.

    ``Q`` is :func:`random_rotation` of ``dim``; ``c`` is ``f``'s minimizer for ``dim`` if
    known, else the centre of the box; each ``o_i`` is uniform on
    ``[c_i − 0.2 w, c_i + 0.2 w] ∩ [lower, upper]`` (``w`` the box width), or ``o = c`` if
    ``shift=False``. All are drawn from ``numpy.random.default_rng(seed)``, so a seed fixes
    the function. The minimizer of ``g`` is ``o + Qᵀ(x* − c) = o`` and its minimum is
    ``f``'s; the box is kept. The result is named ``"rotated_<name>"``, has ``dim`` set,
    and exposes ``Q`` and ``o`` as ``rotation`` and ``offset``.
    """
    base = _resolve(fn_or_name)
    dim = _check_dim(dim)
    if base.dim is not None and base.dim != dim:
        raise ValueError(f"{base.name} is defined for dim={base.dim} only, got dim={dim}")
    rng = np.random.default_rng(seed)
    q = random_rotation(dim, rng)
    lower, upper = base.domain
    known = base.minimizer(dim)
    pivot = np.full(dim, 0.5 * (lower + upper)) if known is None else np.asarray(known, float)
    offset = pivot.copy()
    if shift:
        reach = 0.2 * (upper - lower)
        low = np.maximum(pivot - reach, lower)
        high = np.minimum(pivot + reach, upper)
        offset = rng.uniform(low, high)
    minimizer_point = None if known is None else offset + q.T @ (known - pivot)
    minimum_value = base.minimum(dim)
    inner = base.fn

    def fn(x: jax.Array) -> jax.Array:
        x = _as_vector(x)
        if x.shape[0] != dim:
            raise ValueError(f"rotated_{base.name} takes points of shape ({dim},), got {x.shape}")
        qx = jnp.asarray(q, dtype=x.dtype)
        y = qx @ (x - jnp.asarray(offset, dtype=x.dtype)) + jnp.asarray(pivot, dtype=x.dtype)
        return inner(y)

    fn.__name__ = f"rotated_{base.name}"
    fn.__doc__ = f"g(x) = {base.name}(Q (x − o) + c) in dimension {dim} (seed {seed})."

    def minimizer(d: int) -> np.ndarray | None:
        if _check_dim(d) != dim or minimizer_point is None:
            return None
        return minimizer_point.copy()

    def minimum(d: int) -> float | None:
        return minimum_value if _check_dim(d) == dim else None

    return TestFunction(
        name=ROTATED_PREFIX + base.name,
        fn=fn,
        domain=base.domain,
        minimizer=minimizer,
        minimum=minimum,
        description=f"g(x) = f(Q (x − o) + c), d = {dim}, for {base.description}",
        dim=dim,
        rotation=q,
        offset=offset,
    )
