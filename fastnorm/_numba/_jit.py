"""One Python body, two compiled kernels: serial (small inputs, forked children) and parallel.

Numba names its cache files after ``__qualname__``, so the serial twin gets its own name;
otherwise the two compilations would share a cache entry and load each other's code.
"""
import types

import numpy as np
from numba import njit

# reassoc lets LLVM vectorize float reductions; no 'nnan'/'ninf': NaN must propagate.
FASTMATH = {"reassoc", "contract"}
OPTS = dict(cache=True, fastmath=FASTMATH, nogil=True, error_model="numpy")  # 0/0 -> nan, not raise
BLOCK = 4096  # elements per block of a long row (a block is re-read from L1 in its 2nd pass)


def _renamed(fn, suffix):
    g = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix,
                           fn.__defaults__, fn.__closure__)
    g.__qualname__ = fn.__qualname__ + suffix
    g.__module__ = fn.__module__
    g.__doc__ = fn.__doc__
    return g


def kernel(fn):
    """fn -> (serial, parallel) dispatchers compiled from the same body."""
    serial = njit(**OPTS)(_renamed(fn, "_serial"))
    parallel = njit(parallel=True, **OPTS)(fn)
    return serial, parallel


helper = njit(inline="always", **OPTS)


@helper
def block_moments(x, zero):
    """Corrected two-pass mean and M2 of a contiguous block held in cache.

    Pass 1 finds a pilot mean (in x's dtype); pass 2 sums d = x - pilot and d*d and corrects:
    mean = pilot + sum(d)/n, M2 = sum(d*d) - sum(d)**2/n (Chan, Golub & LeVeque).
    Accumulators have the type of ``zero``: 0.0 (float64) where the loop is memory-bound and
    float64 is free; x's own dtype in the cache-resident layer-norm row, where float32 lanes
    are twice as wide and only ever hold deviations (~1e-7 relative).
    """
    n = x.size
    s = zero
    for i in range(n):
        s += x[i]
    pilot = x.dtype.type(s / n)
    s1 = zero
    s2 = zero
    for i in range(n):
        d = zero + (x[i] - pilot)
        s1 += d
        s2 += d * d
    mean = np.float64(pilot) + np.float64(s1) / n
    if not np.isfinite(pilot):  # an inf in the block: the mean is that inf (or NaN), as NumPy
        mean = np.float64(pilot)
    m2 = np.float64(s2) - np.float64(s1) * np.float64(s1) / n
    return mean, max(m2, 0.0) if m2 == m2 else m2


@helper
def chan_merge(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Chan et al.: moments of the union of two disjoint sets, (n_a, mean, m2) + (n_b, ...)."""
    n = n_a + n_b
    if n_b == 0:
        return n_a, mean_a, m2_a
    if n_a == 0:
        return n_b, mean_b, m2_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (n_b / n)
    m2 = m2_a + m2_b + delta * delta * (n_a * (n_b / n))
    return n, mean, m2


@helper
def row_moments(x, zero):
    """Mean and M2 of a contiguous 1-D row: blocks of BLOCK merged left to right."""
    n = x.size
    if n <= BLOCK:
        return block_moments(x, zero)
    cnt = 0.0
    mean = 0.0
    m2 = 0.0
    for lo in range(0, n, BLOCK):
        xb = x[lo:lo + BLOCK]
        mb, m2b = block_moments(xb, zero)
        cnt, mean, m2 = chan_merge(cnt, mean, m2, np.float64(xb.size), mb, m2b)
    return mean, m2
