"""Mergeable moments: ``(count, mean, m2)`` in float64, from the fast kernels.

``moments(x, axis)`` views x onto the canonical rows ``(R, M)`` or channels ``(P, Q, C)``
problem (the geometry of ``_geometry.py``), runs ``rows_moments``/``channels_moments``
through the dispatch table, and merges what the view leaves over (outer reduced axes) with
the equal-count form of Chan's formula. ``Moments.merge`` combines the moments of disjoint
parts: Chan et al.'s pairwise update, with the operands put in a canonical order first so that
``a.merge(b)`` and ``b.merge(a)`` give the same bits; ``Moments.merge_all`` merges a list in a
fixed balanced tree (the result depends on the list's order only, never on who computes it).
This is what the Dask reduction and the MPI SyncBatchNorm build on.

Accuracy of a merge: each part's mean carries a rounding error of about ``ulp(mean)``; Chan's
formula turns that into a relative error in m2 of order ``ulp(mean) / std / sqrt(n_part)``.
With data well centred (|mean| ~ std) that is ~1e-16; with a large offset (1e8 + N(0, 1))
merged moments are less accurate than a single pass (whose two-pass m2 stays ~1e-16).
"""
import math
import numbers
from typing import NamedTuple

import numpy as np

from . import _checks, _dispatch
from .reference import MOMENTS, merge_equal

_F64 = np.float64


class Moments(NamedTuple):
    """Count, mean and sum of squared deviations (M2) of a set of values, in float64.

    ``count`` is an int64 array broadcastable to ``mean`` (0-d from :func:`moments`);
    an empty set has count 0, mean NaN and m2 0.

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> x = np.arange(10.0)
    >>> a, b = fn.moments(x[:3]), fn.moments(x[3:])
    >>> m = a.merge(b)
    >>> int(m.count), float(m.mean), float(m.var()), float(m.var(ddof=1))
    (10, 4.5, 8.25, 9.166666666666666)
    """

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray

    def merge(self, other):
        """Moments of the union of two disjoint sets (symmetric: same bits either way).

        Examples
        --------
        >>> import numpy as np, fastnorm as fn
        >>> a, b = fn.moments(np.array([1.0, 2.0])), fn.moments(np.array([10.0]))
        >>> a.merge(b) == b.merge(a), float(a.merge(b).mean)
        (True, 4.333333333333333)
        """
        if not isinstance(other, Moments):
            raise TypeError(f"other must be a Moments, got {type(other).__name__}")
        return Moments(*_chan(*_checked(self, "self"), *_checked(other, "other")))

    @classmethod
    def merge_all(cls, parts):
        """Merge a non-empty sequence of Moments in a fixed balanced tree.

        The tree splits the list in halves recursively (``parts[:n//2]``, ``parts[n//2:]``),
        so the bits depend on the order of ``parts`` only.

        Examples
        --------
        >>> import numpy as np, fastnorm as fn
        >>> x = np.random.default_rng(0).normal(size=1000)
        >>> parts = [fn.moments(p) for p in np.array_split(x, 7)]
        >>> m = fn.Moments.merge_all(parts)
        >>> bool(abs(m.var() - x.var()) < 1e-14)
        True
        """
        parts = list(parts)
        if not parts:
            raise ValueError("parts must hold at least one Moments")
        for i, p in enumerate(parts):
            if not isinstance(p, Moments):
                raise TypeError(f"parts[{i}] must be a Moments, got {type(p).__name__}")
        return _tree([_checked(p, f"parts[{i}]") for i, p in enumerate(parts)])

    @classmethod
    def empty(cls, shape=()):
        """The moments of no values: count 0, mean NaN, m2 0 (the merge identity)."""
        return cls(np.zeros((), np.int64), np.full(shape, np.nan), np.zeros(shape))

    def var(self, ddof=0):
        """``m2 / (count - ddof)``; ``ddof=1`` is the unbiased variance. NaN if count <= ddof.

        Examples
        --------
        >>> import numpy as np, fastnorm as fn
        >>> float(fn.moments(np.array([1.0, 3.0])).var(ddof=1))
        2.0
        """
        if not isinstance(ddof, numbers.Integral) or ddof < 0:
            raise ValueError(f"ddof must be a non-negative integer, got {ddof!r}")
        d = np.asarray(self.count, _F64) - ddof
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.maximum(np.asarray(self.m2, _F64), 0.0) / d
        return np.where(d > 0, v, np.nan)[()]

    def std(self, ddof=0):
        """``sqrt(var(ddof))``; ``ddof=1`` is the square root of the unbiased variance."""
        return np.sqrt(self.var(ddof))

    def unbiased_var(self):
        """``var(ddof=1)``: what torch puts into ``running_var``."""
        return self.var(1)

    def unbiased_std(self):
        """``std(ddof=1)``."""
        return self.std(1)


def _checked(m, name):
    n = np.asarray(m.count)
    if n.dtype.kind not in "iu":
        raise TypeError(f"{name}.count must be an integer array, got dtype {n.dtype}")
    if np.any(n < 0):
        raise ValueError(f"{name}.count must be >= 0")
    return n.astype(np.int64), np.asarray(m.mean, _F64), np.asarray(m.m2, _F64)


def _chan(na, ma, sa, nb, mb, sb):
    """Chan's merge of two (count, mean, m2) triples, elementwise and symmetric.

    The operands are first put in a canonical order (larger count first, then smaller mean,
    then smaller m2), so swapping them cannot change a bit. The smaller part's correction is
    applied to the larger part's mean: mean = m1 + delta * n2/n; m2 = s1 + s2 +
    delta**2 * n1*n2/n. An empty operand (count 0) leaves the other exactly unchanged.
    """
    count = np.asarray(na + nb)             # keeps the counts' own (broadcast) shape
    na, ma, sa, nb, mb, sb = np.broadcast_arrays(na, ma, sa, nb, mb, sb)
    swap = (nb > na) | ((nb == na) & ((mb < ma) | ((mb == ma) & (sb < sa))))
    n1, n2 = np.where(swap, nb, na), np.where(swap, na, nb)
    m1, m2_ = np.where(swap, mb, ma), np.where(swap, ma, mb)
    s1, s2 = np.where(swap, sb, sa), np.where(swap, sa, sb)
    n = n1 + n2
    with np.errstate(divide="ignore", invalid="ignore"):
        w = n2 / n.astype(_F64)
        delta = m2_ - m1
        mean = m1 + delta * w
        m2 = (s1 + s2) + delta * delta * (n1 * w)
    empty = n2 == 0
    return count, np.where(empty, m1, mean)[()], np.where(empty, s1, m2)[()]


def _tree(parts):
    if len(parts) == 1:
        n, m, s = parts[0]
        return Moments(n, m, s)
    h = len(parts) // 2
    a, b = _tree(parts[:h]), _tree(parts[h:])
    return Moments(*_chan(*a, *b))


# ------------------------------------------------------------------ moments of an array

def _data(x):
    """float32/float64 C-native array: float16 -> float32, integers/bool -> float64."""
    if not isinstance(x, np.ndarray):
        if isinstance(x, (list, tuple, numbers.Number)):
            x = np.asarray(x)
        else:
            raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
    k = x.dtype.kind
    if k == "f":
        if x.dtype.itemsize > 8:
            raise TypeError(f"x must be float16, float32 or float64, got dtype {x.dtype}")
        if x.dtype.itemsize <= 4:
            return x.astype(np.float32, copy=False)
        return x.astype(np.float64, copy=False)
    if k in "iub":
        return x.astype(np.float64)
    raise TypeError(f"x must be a real numeric array, got dtype {x.dtype}")


def _memory_order(x, red):
    """(x or one copy, perm) with x.transpose(perm) C-contiguous."""
    perm = sorted(range(x.ndim), key=lambda i: (-abs(x.strides[i]) if x.shape[i] > 1 else 0, i))
    if x.transpose(perm).flags.c_contiguous:
        return x, perm
    # fits no view: one copy, kept axes outermost so the reduced ones form rows
    perm = [i for i in range(x.ndim) if i not in red] + list(red)
    return np.ascontiguousarray(x.transpose(perm)).transpose(np.argsort(perm)), perm


def _row_split(R, M):
    """Blocks a long row is cut into (a function of the shape only): lets R < 16 rows run in
    parallel. The blocks are merged back with the equal-count formula."""
    if R >= 16:
        return 1
    b = 1
    while b < 64 and M % (2 * b) == 0 and M // (2 * b) >= 1 << 16:
        b *= 2
    return b


def _merge_equal(mean, m2, count, axis):
    """Chan's merge along ``axis`` of groups of equal ``count``: the MERGE_EQUAL kernel on
    the (before, axis, after) view, which removes ``axis``."""
    shape = mean.shape
    P1, K = math.prod(shape[:axis]), shape[axis]
    P2 = mean.size // (P1 * K) if K else 0
    out_mean, out_m2 = np.empty((P1, P2)), np.empty((P1, P2))
    merge_equal(mean.reshape(P1, K, P2), m2.reshape(P1, K, P2), count, out_mean, out_m2)
    rest = shape[:axis] + shape[axis + 1:]
    return out_mean.reshape(rest), out_m2.reshape(rest)


def _view_moments(xm, runs, backend):
    """Moments over the 'r' runs of a C-contiguous array xm, runs = [(label, size)].

    Returns (mean, m2) with one axis per remaining run, outer runs first, and the count
    per cell; the caller merges any 'r' axes still left.
    """
    sizes = [s for _, s in runs]
    if not runs or runs[-1][0] == "r":      # rows (R, M): stats per row
        M = sizes[-1] if runs else 1
        R = xm.size // M
        B = _row_split(R, M)
        mean, m2 = np.empty(R * B), np.empty(R * B)
        xv = xm.reshape(R * B, M // B)
        _dispatch.kernel(MOMENTS["rows"], backend, xm.size)(xv, mean, m2)
        if B > 1:
            mean, m2 = _merge_equal(mean.reshape(R, B), m2.reshape(R, B), M // B, 1)
        grid, count = runs[:-1], M
    else:                                   # channels (P, Q, C): stats per (p, c)
        C = sizes[-1]
        Q = sizes[-2] if len(runs) >= 2 else 1
        P = xm.size // (Q * C)
        mean, m2 = np.empty((P, C)), np.empty((P, C))
        _dispatch.kernel(MOMENTS["channels"], backend, xm.size)(xm.reshape(P, Q, C), mean, m2)
        grid, count = runs[:-2] + runs[-1:], Q
    return mean.reshape([s for _, s in grid]), m2.reshape([s for _, s in grid]), grid, count


def moments(x, axis=None, *, keepdims=False, backend=None):
    """Count, mean and M2 of ``x`` over ``axis``, in float64, from the fast kernels.

    Parameters
    ----------
    x : ndarray
        float16/32/64; integer and bool
        arrays are converted to float64 (one copy). Any memory layout: it is reduced where it
        lies when the reduced axes form a rows or channels view, else copied once.
        Results are float64 either way; float32 data is as accurate as the kernels sum its
        deviations (~1e-7 relative: float32 lanes per cache block, blocks merged in float64).
    axis : None, int or tuple of ints
        Axes to reduce (None: all).
    keepdims : bool
        Keep the reduced axes as size 1 in ``mean``/``m2``.
    backend : str, optional
        "cython", "numba" or "numpy" (the float64 reference).

    Returns
    -------
    Moments
        ``count`` (0-d int64: the number of values per output element), ``mean`` and
        ``m2`` (sum of squared deviations), float64 arrays of the kept shape. Merge with
        :meth:`Moments.merge`; variances with :meth:`Moments.var`.

    Examples
    --------
    >>> import numpy as np, fastnorm as fn
    >>> x = np.random.default_rng(0).normal(5, 2, (1000, 3)).astype(np.float32)
    >>> m = fn.moments(x, axis=0)
    >>> int(m.count), m.mean.shape, m.mean.dtype
    (1000, (3,), dtype('float64'))
    >>> bool(np.allclose(m.var(), x.astype(np.float64).var(axis=0), rtol=1e-6))
    True
    """
    x = _data(x)
    red = _checks.reduction_axes(axis, x.ndim)
    backend = _dispatch.resolve(backend)
    kept = [i for i in range(x.ndim) if i not in red]
    out_shape = tuple(1 if i in red else x.shape[i] for i in range(x.ndim)) if keepdims \
        else tuple(x.shape[i] for i in kept)
    count = math.prod(x.shape[i] for i in red)
    n = np.asarray(count, np.int64)
    if count == 0:
        return Moments(n, np.full(out_shape, np.nan), np.zeros(out_shape))
    if x.size == 0:
        return Moments(n, np.empty(out_shape), np.empty(out_shape))
    if not x.flags.aligned:  # e.g. a buffer deserialized off the network: kernels need alignment
        x = x.copy(order="K")
    xm, perm = _memory_order(x, red)
    xm = xm.transpose(perm)                 # C-contiguous, axes in memory order
    runs = []                               # consecutive reduced/kept axes merged
    for i in perm:
        if x.shape[i] == 1:
            continue
        lab = "r" if i in red else "k"
        if runs and runs[-1][0] == lab:
            runs[-1] = (lab, runs[-1][1] * x.shape[i])
        else:
            runs.append((lab, x.shape[i]))
    mean, m2, grid, cnt = _view_moments(xm, runs, backend)
    # merge the reduced runs the view left outside, innermost first (equal counts)
    for j in range(len(grid) - 1, -1, -1):
        if grid[j][0] == "r":
            mean, m2 = _merge_equal(mean, m2, cnt, j)
            cnt *= grid[j][1]
    # kept axes: memory order -> the user's order
    kmem = [i for i in perm if i in kept and x.shape[i] > 1]
    mean = mean.reshape([x.shape[i] for i in kmem])
    m2 = m2.reshape(mean.shape)
    order = [kmem.index(i) for i in sorted(kmem)]
    mean = np.ascontiguousarray(mean.transpose(order)).reshape(out_shape)
    m2 = np.ascontiguousarray(m2.transpose(order)).reshape(out_shape)
    return Moments(n, mean, m2)
