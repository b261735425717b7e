"""One Python body, two compiled kernels: serial (small inputs, forked children) and parallel.

Numba names its cache files after ``__qualname__``, so the serial twin gets its own name;
otherwise the two compilations would share a cache entry and load each other's code.

Half precision: Numba has no float16 on the CPU (0.68: NotImplementedError) and knows
nothing of ml_dtypes' bfloat16, so the kernels see the bits -- float16 data as a uint16
view, bfloat16 as an int16 view (fastnorm._numba's entries make the views) -- and every
body reads its data through ``ld`` and writes it through ``st``, which are the identity for
float32/float64 arrays and convert for the bit views: float16 by LLVM's ``fpext half`` /
``fptrunc`` (one vcvtph2ps / vcvtps2ph per vector on an F16C CPU: measured vectorized, a
1M-element half scale 0.49x the float32 time), bfloat16 as the high half of a float32.
``lanes(a)`` / ``lane(a, v)`` give the arithmetic type of array ``a`` (float32 for half
data), where the bodies used ``a.dtype.type``. The specialization is by array type, so the
float32/float64 code is what it was. (Numba's cache does not see edits to this module:
clear ``__pycache__`` after changing a helper.)
"""
import math
import types

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types as nbtypes
from numba.extending import intrinsic, overload

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

F16, BF16 = nbtypes.uint16, nbtypes.int16   # the bit views of float16 and bfloat16 data


@intrinsic
def _f16_to_f32(typingctx, h):
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return nbtypes.float32(F16), codegen


@intrinsic
def _f32_to_f16(typingctx, f):
    def codegen(context, builder, sig, args):  # fptrunc rounds to nearest even
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return F16(nbtypes.float32), codegen


@intrinsic
def _bf16_to_f32(typingctx, h):
    def codegen(context, builder, sig, args):
        u = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(u, ir.FloatType())
    return nbtypes.float32(BF16), codegen


@intrinsic
def _f32_to_bf16(typingctx, f):
    def codegen(context, builder, sig, args):
        # round to nearest even on the bits; NaN stays a quiet NaN (the rounding add could
        # carry it into inf), as ml_dtypes
        i32 = ir.IntType(32)
        u = builder.bitcast(args[0], i32)
        hi = builder.lshr(u, ir.Constant(i32, 16))
        odd = builder.and_(hi, ir.Constant(i32, 1))
        r = builder.lshr(builder.add(builder.add(u, ir.Constant(i32, 0x7FFF)), odd),
                         ir.Constant(i32, 16))
        nan = builder.fcmp_unordered("uno", args[0], args[0])
        r = builder.select(nan, builder.or_(hi, ir.Constant(i32, 0x40)), r)
        return builder.trunc(r, ir.IntType(16))
    return BF16(nbtypes.float32), codegen


def ld(v):
    """A data element as arithmetic: itself (float32/float64), or half bits as float32."""


def st(a, v):
    """``v`` as an element of array ``a``: itself (the store casts), or half bits."""


def lanes(a):
    """Zero in the arithmetic type of array ``a`` (float32 for half-precision data)."""


def lane(a, v):
    """``v`` in the arithmetic type of array ``a``."""


def exact_sums(a):
    """Whether n copies of one element of ``a`` sum exactly in float64 (not for float64)."""


def big(a):
    """A spread |x - mean| past which x - mean may overflow a's arithmetic type: rows whose
    sqrt(M2) (a bound on it) passes this are applied in float64 (never for float64 data)."""


@overload(ld, inline="always")
def _ld(v):
    if isinstance(v, nbtypes.Float):
        return lambda v: v
    if v == F16:
        return lambda v: _f16_to_f32(v)
    if v == BF16:
        return lambda v: _bf16_to_f32(v)


@overload(st, inline="always")
def _st(a, v):
    if isinstance(a.dtype, nbtypes.Float):
        return lambda a, v: v
    if a.dtype == F16:
        return lambda a, v: _f32_to_f16(np.float32(v))
    if a.dtype == BF16:
        return lambda a, v: _f32_to_bf16(np.float32(v))


def _lane_type(a):
    return a.dtype if a.dtype == nbtypes.float64 else nbtypes.float32


@overload(lanes, inline="always")
def _lanes(a):
    if _lane_type(a) == nbtypes.float64:
        return lambda a: np.float64(0)
    return lambda a: np.float32(0)


@overload(lane, inline="always")
def _lane(a, v):
    if _lane_type(a) == nbtypes.float64:
        return lambda a, v: np.float64(v)
    return lambda a, v: np.float32(v)


@overload(exact_sums, inline="always")
def _exact_sums(a):
    if a.dtype == nbtypes.float64:
        return lambda a: False
    return lambda a: True


@overload(big, inline="always")
def _big(a):
    if a.dtype == nbtypes.float64:
        return lambda a: np.inf
    return lambda a: 1e38


@helper
def moments_safe(x):
    """Mean and M2 of a 1-D array (any stride) whose fast ones were not finite. All values
    finite (near the dtype's largest): the corrected two passes in float64 on x * 2^-e, e the
    exponent of max |x| (exact scaling), scaled back. inf or NaN in the data: NumPy's
    answer, mean = sum / n (inf or NaN) and M2 NaN."""
    n = x.size
    amax = 0.0
    s = 0.0
    bad = False
    for i in range(n):
        v = np.float64(ld(x[i]))
        s += v
        bad = bad or not np.isfinite(v)
        amax = max(amax, abs(v))
    if bad:
        return s / n, np.nan
    sc = math.ldexp(1.0, -math.frexp(amax)[1])
    s = 0.0
    for i in range(n):
        s += np.float64(ld(x[i])) * sc
    m = s / n
    t = 0.0
    q = 0.0
    for i in range(n):
        d = np.float64(ld(x[i])) * sc - m
        t += d
        q += d * d
    q -= t * t / n
    return (m + t / n) / sc, max(q, 0.0) / sc / sc


@helper
def sumsq_safe(x):
    """Sum of squares of a 1-D array in float64, scaled by a power of two as moments_safe
    (RMS norm's fallback when the lanes overflowed); inf/NaN data gives the plain sum."""
    amax = 0.0
    for i in range(x.size):
        amax = max(amax, abs(np.float64(ld(x[i]))))
    q = 0.0
    if not np.isfinite(amax):
        for i in range(x.size):
            v = np.float64(ld(x[i]))
            q += v * v
        return q
    sc = math.ldexp(1.0, -math.frexp(amax)[1])
    for i in range(x.size):
        v = np.float64(ld(x[i])) * sc
        q += v * v
    return q / sc / sc


@helper
def block_moments(x, zero):
    """Corrected two-pass mean and M2 of a contiguous block held in cache.

    Pass 1 finds a pilot mean (in x's arithmetic type); pass 2 sums d = x - pilot and d*d and
    corrects: mean = pilot + sum(d)/n, M2 = sum(d*d) - sum(d)**2/n (Chan, Golub & LeVeque).
    Accumulators have the type of ``zero``: 0.0 (float64) where the loop is memory-bound and
    float64 is free; x's own arithmetic type in the cache-resident layer-norm row, where
    float32 lanes are twice as wide and only ever hold deviations (~1e-7 relative). Sums
    that overflow (values near float32's largest) are redone by moments_safe.
    """
    n = x.size
    s = zero
    for i in range(n):
        s += ld(x[i])
    pilot = lane(x, s / n)
    s1 = zero
    s2 = zero
    for i in range(n):
        d = zero + (ld(x[i]) - pilot)
        s1 += d
        s2 += d * d
    mean = np.float64(pilot) + np.float64(s1) / n
    if not np.isfinite(pilot):  # an inf in the block: the mean is that inf (or NaN), as NumPy
        mean = np.float64(pilot)
    m2 = np.float64(s2) - np.float64(s1) * np.float64(s1) / n
    m2 = max(m2, 0.0) if m2 == m2 else m2
    if not (np.isfinite(mean) and np.isfinite(m2)):
        return moments_safe(x)
    return mean, m2


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
