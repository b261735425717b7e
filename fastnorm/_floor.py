"""The memory floor of ``python -m fastnorm bench``: streaming loops doing only the
mandatory memory passes.

ARCHITECTURE.md §6 counts bytes per call with S = x.nbytes: training forward 3·S (a statistics pass
reads x, the normalize pass reads x and writes y), eval forward 2·S, backward 5·S (a sums pass
reads dy and x, the apply pass reads dy and x and writes dx), forward+backward 8·S. The floor
of a case is the time of these loops, at the same thread count, on arrays of the same size:

    forward           s = sum(x);           y = x - s/n          (3 passes of S)
    eval                                    y = x - c            (2 passes)
    backward          s = sum(dy * x);      dx = a*dy + s*x      (5 passes)
    forward+backward  the forward loops, then the backward loops  (8 passes)

The loops are Numba ``prange`` over contiguous blocks of the flattened arrays, with the same
``fastmath={'reassoc', 'contract'}`` and float64 accumulation as the kernels, so they
vectorize and stream at the machine's rate; numba's thread count is set by the caller. Outputs
are preallocated and reused: the floor has no page faults (a fresh output does, see the bench's
``out=`` column). Imported lazily by the bench only (it compiles Numba code).
"""
import numba
import numpy as np
from numba import njit, prange

_OPTS = dict(parallel=True, cache=True, fastmath={"reassoc", "contract"}, nogil=True)
_BLOCKS = 64  # blocks per array: enough to balance 2 threads, few enough to cost nothing


@njit(**_OPTS)
def _sum(x):
    """Sum of a contiguous 1-D array, float64 accumulators. # IN x  # OUT the sum"""
    n = x.size
    part = np.zeros(_BLOCKS)
    for b in prange(_BLOCKS):
        xb = x[b * n // _BLOCKS:(b + 1) * n // _BLOCKS]  # a slice: the loop below vectorizes
        s = 0.0
        for i in range(xb.size):
            s += np.float64(xb[i])
        part[b] = s
    return part.sum()


@njit(**_OPTS)
def _shift(x, c, y):
    """y = x - c. # IN x, c  # OUT y"""
    n = x.size
    for b in prange(_BLOCKS):
        lo, hi = b * n // _BLOCKS, (b + 1) * n // _BLOCKS
        xb, yb = x[lo:hi], y[lo:hi]
        for i in range(xb.size):
            yb[i] = xb[i] - c


@njit(**_OPTS)
def _dot(a, x):
    """sum(a * x), float64 accumulators. # IN a, x  # OUT the sum"""
    n = x.size
    part = np.zeros(_BLOCKS)
    for b in prange(_BLOCKS):
        lo, hi = b * n // _BLOCKS, (b + 1) * n // _BLOCKS
        ab, xb = a[lo:hi], x[lo:hi]
        s = 0.0
        for i in range(xb.size):
            s += np.float64(ab[i]) * np.float64(xb[i])
        part[b] = s
    return part.sum()


@njit(**_OPTS)
def _axpby(a, x, ca, cx, y):
    """y = ca*a + cx*x. # IN a, x, ca, cx  # OUT y"""
    n = x.size
    for b in prange(_BLOCKS):
        lo, hi = b * n // _BLOCKS, (b + 1) * n // _BLOCKS
        ab, xb, yb = a[lo:hi], x[lo:hi], y[lo:hi]
        for i in range(xb.size):
            yb[i] = ca * ab[i] + cx * xb[i]


PASSES = {"forward": 3, "eval": 2, "backward": 5, "forward+backward": 8}


def floor_fn(mode, x, dy, threads):
    """A zero-argument callable doing the mandatory passes of ``mode`` on x (and dy).

    x and dy are flattened without a copy (they must be contiguous in some order); the
    outputs are allocated here once and reused by every call.
    """
    if mode not in PASSES:
        raise ValueError(f"mode must be one of {tuple(PASSES)}, got {mode!r}")
    xf = _flat(x)
    dyf = _flat(dy)
    y = np.empty_like(xf)
    dx = np.empty_like(xf)
    n = xf.size
    typ = xf.dtype.type
    threads = min(int(threads), numba.config.NUMBA_NUM_THREADS)

    def forward():
        _shift(xf, typ(_sum(xf) / n), y)

    def backward():
        _axpby(dyf, xf, typ(0.5), typ(_dot(dyf, xf) / n), dx)

    body = {"forward": forward, "eval": lambda: _shift(xf, typ(1.0), y),
            "backward": backward,
            "forward+backward": lambda: (forward(), backward())}[mode]

    def call():
        numba.set_num_threads(threads)  # per calling thread, ~1 us
        body()
    return call


def _flat(a):
    """The memory of ``a`` (contiguous in some axis order, e.g. channels-last) as 1-D, no copy."""
    v = a.transpose(np.argsort(a.strides, kind="stable")[::-1])
    if not v.flags.c_contiguous:
        raise ValueError("the floor needs arrays contiguous in some axis order")
    return v.reshape(-1)
