"""Cython kernels: the same names, arguments and outputs as fastnorm._numba (twins in
fastnorm.reference, whose module docstring is the contract).

Three layers per kernel:

- ``def name(...)`` / ``def name_parallel(...)``: the entries of KERNELS. They check every
  array (type, dtype, ndim, shape, C-contiguity, alignment, byte order, writeable outputs)
  with the NumPy C API and take raw pointers: acquiring a typed memoryview costs ~90 ns per
  array (~170 ns fused) here, ~0.5-1.5 us for a kernel's 6-9 arrays, which a one-row call
  cannot afford. Read-only inputs (shared weights) are accepted: only outputs must be
  writeable. Compiled code never sees an unchecked shape.
- ``_name_t``: one ``nogil`` body for every data type (arrays as ``void *`` and the data's
  kind: float32, float64, float16 or bfloat16) that splits the work into chunks and runs
  them serially or in an OpenMP ``prange``. The partition depends only on the shape, and
  each output element is computed by one chunk in a fixed order, so 1 and N threads give
  the same bits.
- ``fn_name`` in ``_simd.h`` (one call per chunk): picks the body of the data's kind in the
  instruction set in use, whose loops hold the explicit SIMD (AVX-512 / AVX2 / baseline).
  Half-precision data is converted to float32 in registers on every load and rounded back
  on every store; nothing is converted whole.

The serial entries never enter the OpenMP runtime, so they also run in a child forked after
a parallel call (libgomp does not survive fork); the parallel entries fall back to them in
such a child.
"""
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cimport numpy as cnp
from cython.parallel cimport prange

import os

import numpy as np

cnp.import_array()

cdef extern from "_simd.h" nogil:
    const char *fn_simd_clone()
    int fn_simd_select(int want)
    const char *fn_compiler()
    int fn_openmp()
    const char *FN_CYTHON_VERSION
    int FN_DEBUG_CHECKS
    Py_ssize_t FN_STREAM_MIN
    int FN_F32, FN_F64, FN_F16, FN_BF16

    # One entry per kernel, named as the kernel; ``kind`` (FN_F32, FN_F64, FN_F16, FN_BF16)
    # is the data type of x and picks the body. Data (x, y, dy, dx) in that type; ``T``
    # arrays (per-row statistics, weights of the fused kernels) in it too for float32 and
    # float64, float32 for half precision; double arrays are double for every kind.
    void fn_rows_fwd(int kind, const void *x, Py_ssize_t M, const void *w, const void *b,
                     double eps, int rms, void *y, void *mean, void *rstd, Py_ssize_t lo,
                     Py_ssize_t hi)
    void fn_rows_fwd_grouped(int kind, const void *x, Py_ssize_t K, Py_ssize_t S,
                             Py_ssize_t G, const void *w, const void *b, double eps, void *y,
                             void *mean, void *rstd, Py_ssize_t lo, Py_ssize_t hi, int nts)
    void fn_rows_bwd(int kind, const void *dy, const void *x, const void *mean,
                     const void *rstd, const void *w, int rms, Py_ssize_t M, void *dx,
                     double *dwb, double *dbb, Py_ssize_t lo, Py_ssize_t hi, int nts)
    void fn_rows_moments(int kind, const void *x, Py_ssize_t M, double *mean, double *m2,
                         Py_ssize_t lo, Py_ssize_t hi)
    void fn_rows_scale_shift(int kind, const void *x, Py_ssize_t M, const double *mean,
                             const double *alpha, const double *beta, void *y, Py_ssize_t lo,
                             Py_ssize_t hi, int nts)
    void fn_rows_dot(int kind, const void *dy, const void *x, Py_ssize_t M,
                     const double *mean, double *sum_dy, double *sum_dyxc, Py_ssize_t lo,
                     Py_ssize_t hi)
    void fn_rows_bwd_apply(int kind, const void *dy, const void *x, Py_ssize_t M,
                           const double *mean, const double *c1, const double *c2,
                           const double *c3, void *dx, Py_ssize_t lo, Py_ssize_t hi, int nts)
    void fn_rows_bwd_grouped(int kind, const void *dy, const void *x, Py_ssize_t K,
                             Py_ssize_t S, Py_ssize_t G, const double *mean,
                             const double *rstd, const double *w, void *dx, double *sdy,
                             double *sdxh, Py_ssize_t lo, Py_ssize_t hi, int nts)
    void fn_channels_moments(int kind, const void *x, Py_ssize_t n, Py_ssize_t C,
                             double *mu, double *s2)
    void fn_channels_scale_shift(int kind, const void *x, Py_ssize_t n, Py_ssize_t C,
                                 const double *m, const double *a, const double *b, void *y,
                                 int nts)
    void fn_channels_dot(int kind, const void *dy, const void *x, Py_ssize_t n, Py_ssize_t C,
                         const double *m, double *s, double *sx)
    void fn_channels_bwd_apply(int kind, const void *dy, const void *x, Py_ssize_t n,
                               Py_ssize_t C, const double *m, const double *c1,
                               const double *c2, const double *c3, void *dx, int nts)
    void fn_channels_fwd_grouped(int kind, const void *x, Py_ssize_t Q, Py_ssize_t C,
                                 Py_ssize_t G, Py_ssize_t h, const void *w, const void *b,
                                 double eps, void *y, void *mean, void *rstd, double *buf,
                                 int nts)
    void fn_channels_eval_coefs(int kind, const void *mean, const void *var, const void *w,
                                const void *b, double eps, Py_ssize_t C, void *mh, void *ml,
                                void *af, void *bf)
    void fn_channels_eval_apply(int kind, const void *x, Py_ssize_t n, Py_ssize_t C,
                                const void *mh, const void *ml, const void *af,
                                const void *bf, void *y, int nts)
    void fn_channels_moments_merge(Py_ssize_t nb, Py_ssize_t h, Py_ssize_t Q, Py_ssize_t C,
                                   const double *bmean, const double *bm2, double *mean,
                                   double *m2)
    void fn_channels_dot_merge(Py_ssize_t nb, Py_ssize_t C, const double *bs,
                               const double *bsx, double *s, double *sx)


# ------------------------------------------------------------------------ threads, fork

cdef int _num_threads = os.cpu_count() or 1
cdef bint _forked = False


def _after_fork_in_child():
    # libgomp's thread pool does not survive fork(): a child keeps to serial loops.
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_after_fork_in_child)


def set_num_threads(n):
    """Threads used by the ``*_parallel`` kernels (process-wide)."""
    global _num_threads
    n = int(n)
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _num_threads = n


def get_num_threads():
    return _num_threads


cdef inline int _par() noexcept:
    return 1 if _forked else _num_threads


_SIMD_LEVELS = {"v4": 4, "avx512": 4, "v3": 3, "avx2": 3, "v1": 1, "baseline": 1}


def simd_select(level=None):
    """Pick the instruction set the kernels run on: "v4" (AVX-512), "v3" (AVX2+FMA) or
    "v1" (x86-64 baseline); None or one this CPU lacks: the best it has. Returns the name of
    the one in use (as info()["simd_clone"]). Set at import from FASTNORM_SIMD; switching
    while kernels run on other threads is not safe (tests use it between calls)."""
    if level is not None and level not in _SIMD_LEVELS:
        raise ValueError(f"level must be one of {sorted(_SIMD_LEVELS)} or None, got {level!r}")
    fn_simd_select(_SIMD_LEVELS.get(level, 0))
    return fn_simd_clone().decode()


simd_select(os.environ.get("FASTNORM_SIMD") or None)


def info():
    """What this build is: the SIMD clone picked on this CPU, compiler, OpenMP, threads."""
    return {"simd_clone": fn_simd_clone().decode(), "compiler": fn_compiler().decode(),
            "cython": FN_CYTHON_VERSION.decode(), "openmp": fn_openmp(),
            "debug_checks": bool(FN_DEBUG_CHECKS), "threads": _num_threads,
            "forked_child": bool(_forked)}


# ------------------------------------------------------------------------ argument checks

cdef int _F32 = cnp.NPY_FLOAT32
cdef int _F64 = cnp.NPY_FLOAT64
cdef int _F16 = cnp.NPY_FLOAT16
# Per kind (FN_F32, FN_F64, FN_F16, FN_BF16): the NumPy type number of the data, of its T
# arrays (per-row statistics, fused weights: float32 for half precision), and itemsizes.
# bfloat16 is ml_dtypes' type, numbered when ml_dtypes registers it: learnt from the first
# array of it (-1 until then). ml_dtypes is never imported here (it takes ~0.8 s): a caller
# holding a bfloat16 array has imported it.
cdef int _TNUM[4]
cdef int _TTNUM[4]
cdef Py_ssize_t _ISZ[4]
cdef Py_ssize_t _TSZ[4]
_TNUM[:] = [_F32, _F64, _F16, -1]
_TTNUM[:] = [_F32, _F64, _F32, _F32]
_ISZ[:] = [4, 8, 2, 2]
_TSZ[:] = [4, 8, 4, 4]


cdef str _type_name(int t):
    return {_F32: "float32", _F64: "float64", _F16: "float16"}.get(t, "bfloat16")


cdef int _kind(object a, str name, int ndim) except -1:
    """The kind of ``a``, the array that sets a kernel's data type, after checking that it
    is an ndarray of float16, bfloat16, float32 or float64 with ndim dims."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>a), kd
    if t == _F32:
        kd = FN_F32
    elif t == _F64:
        kd = FN_F64
    elif t == _F16:
        kd = FN_F16
    elif t == _TNUM[FN_BF16] or _is_bfloat16(a.dtype):
        _TNUM[FN_BF16] = t
        kd = FN_BF16
    else:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, "
                        f"got dtype {a.dtype}")
    if cnp.PyArray_NDIM(<cnp.ndarray>a) != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return kd


cdef bint _is_bfloat16(object d):
    return (d.name == "bfloat16" and d.itemsize == 2
            and type(d.type).__module__.split(".")[0] in ("ml_dtypes", "builtins")
            and d.type.__module__.split(".")[0] == "ml_dtypes")


cdef void *_data(object a, str name, int t, int ndim, bint write,
                 Py_ssize_t n0, Py_ssize_t n1=0, Py_ssize_t n2=0) except? NULL:
    """Pointer to ``a`` after checking: ndarray of type ``t``, shape (n0[, n1[, n2]]),
    C-contiguous, aligned, native byte order, writeable if ``write``."""
    if not cnp.PyArray_Check(a):
        raise TypeError(f"{name} must be a numpy.ndarray, got {type(a).__name__}")
    cdef cnp.ndarray arr = <cnp.ndarray>a
    if cnp.PyArray_TYPE(arr) != t:
        raise TypeError(f"{name} must have dtype {_type_name(t)}, got {a.dtype}")
    cdef cnp.npy_intp *d = cnp.PyArray_DIMS(arr)
    if (cnp.PyArray_NDIM(arr) != ndim or d[0] != n0 or (ndim > 1 and d[1] != n1)
            or (ndim > 2 and d[2] != n2)):
        want = (n0, n1, n2)[:ndim]
        raise ValueError(f"{name} must have shape {want}, got {a.shape}")
    if not (cnp.PyArray_IS_C_CONTIGUOUS(arr) and cnp.PyArray_ISALIGNED(arr)
            and cnp.PyArray_ISNOTSWAPPED(arr)):
        raise ValueError(f"{name} must be C-contiguous, aligned and in native byte order")
    if write and not cnp.PyArray_ISWRITEABLE(arr):
        raise ValueError(f"{name} is read-only")
    return cnp.PyArray_DATA(arr)


cdef object _param(object a, str name, int kd):
    """A weight, bias or fixed statistic of a fused kernel, to be checked as a T array. For
    half-precision data it may be float32 (mixed precision) or the data's own dtype, which is
    converted to float32 here: C or M values, never the data."""
    if a is None or kd == FN_F32 or kd == FN_F64 or not cnp.PyArray_Check(a):
        return a
    cdef int t = cnp.PyArray_TYPE(<cnp.ndarray>a)
    if t == _TNUM[kd]:
        return a.astype(np.float32)
    if t != _F32:
        raise TypeError(f"{name} must have dtype float32 or {_type_name(_TNUM[kd])} "
                        f"({_type_name(_TNUM[kd])} data), got {a.dtype}")
    return a


cdef int _disjoint_or_same(object out, object a, str name, str other) except -1:
    """ValueError when ``out`` overlaps ``a`` without being ``a`` itself (C-contiguous)."""
    cdef cnp.ndarray o = <cnp.ndarray>out, i = <cnp.ndarray>a
    cdef char *po = cnp.PyArray_BYTES(o)
    cdef char *pi = cnp.PyArray_BYTES(i)
    if po == pi and cnp.PyArray_NBYTES(o) == cnp.PyArray_NBYTES(i):
        return 0
    if po < pi + cnp.PyArray_NBYTES(i) and pi < po + cnp.PyArray_NBYTES(o):
        raise ValueError(f"{name} overlaps {other} without being {other} itself")
    return 0


cdef int _disjoint(object out, object a, str name, str other) except -1:
    """ValueError when ``out`` shares any memory with ``a`` (C-contiguous arrays)."""
    cdef cnp.ndarray o = <cnp.ndarray>out, i = <cnp.ndarray>a
    cdef char *po = cnp.PyArray_BYTES(o)
    cdef char *pi = cnp.PyArray_BYTES(i)
    if (cnp.PyArray_NBYTES(o) and cnp.PyArray_NBYTES(i) and po < pi + cnp.PyArray_NBYTES(i)
            and pi < po + cnp.PyArray_NBYTES(o)):
        raise ValueError(f"{name} must not share memory with {other}")
    return 0


cdef inline void *_opt(object a, str name, int t, int ndim, bint write,
                       Py_ssize_t n0, Py_ssize_t n1=0) except? NULL:
    """NULL for None, else ``_data``."""
    if a is None:
        return NULL
    return _data(a, name, t, ndim, write, n0, n1)


cdef inline Py_ssize_t _dim(object a, int k) noexcept:
    return cnp.PyArray_DIM(<cnp.ndarray>a, k)


cdef inline const void *_at(const void *p, Py_ssize_t i, Py_ssize_t size) noexcept nogil:
    """Element i of an array of ``size``-byte elements (the typed layers hold void *)."""
    return <const char *>p + i * size


cdef inline void *_atw(void *p, Py_ssize_t i, Py_ssize_t size) noexcept nogil:
    return <char *>p + i * size


# ------------------------------------------------------------------------ partitions

cdef inline Py_ssize_t _row_step(Py_ssize_t M) noexcept nogil:
    """Rows per chunk of an elementwise rows kernel: ~16K elements, so a chunk pays one
    call; any partition gives the same bits here (each row is computed whole)."""
    return max(1, 16384 // max(M, 1))


cdef inline Py_ssize_t _block_rows(Py_ssize_t Q, Py_ssize_t C) noexcept nogil:
    """Rows per block of a channels kernel, as fastnorm._numba.channels.block_rows: about
    64 KiB of float64 partial work; a function of the shape only (determinism)."""
    return max(1, min(Q, 8192 // max(C, 1)))


cdef inline int _streaming(Py_ssize_t nbytes) noexcept nogil:
    """Whether an output of ``nbytes`` is written with non-temporal stores (past the caches,
    no read-for-ownership of its lines): only outputs too big to stay in cache for the
    caller's next step. A function of the size only; the values written are the same."""
    return nbytes >= FN_STREAM_MIN


# ------------------------------------------------------------------------ rows_fwd

cdef void _rows_fwd_t(int kd, const void *x, const void *w, const void *b, double eps,
                      int rms, void *y, void *mean, void *rstd, Py_ssize_t R, Py_ssize_t M,
                      int nt) noexcept nogil:
    # IN x (R, M), w/b (M,) or NULL   OUT y (R, M), mean/rstd (R,)
    cdef Py_ssize_t k, step = _row_step(M), nch = (R + step - 1) // step
    if nt > 1 and nch > 1:
        for k in prange(nch, num_threads=nt, schedule="static"):
            fn_rows_fwd(kd, x, M, w, b, eps, rms, y, mean, rstd, k * step,
                        min(R, k * step + step))
    else:
        fn_rows_fwd(kd, x, M, w, b, eps, rms, y, mean, rstd, 0, R)


cdef _rows_fwd(x, weight, bias, double eps, bint rms, y, mean, rstd, int nt):
    cdef int kd = _kind(x, "x", 2)
    cdef int t = _TNUM[kd], tt = _TTNUM[kd]
    cdef Py_ssize_t R = _dim(x, 0), M = _dim(x, 1)
    weight, bias = _param(weight, "weight", kd), _param(bias, "bias", kd)
    cdef void *px = _data(x, "x", t, 2, False, R, M)
    cdef void *pw = _opt(weight, "weight", tt, 1, False, M)
    cdef void *pb = _opt(bias, "bias", tt, 1, False, M)
    cdef void *py = _data(y, "y", t, 2, True, R, M)
    cdef void *pm = _data(mean, "mean", tt, 1, True, R)
    cdef void *pr = _data(rstd, "rstd", tt, 1, True, R)
    with nogil:
        _rows_fwd_t(kd, px, pw, pb, eps, rms, py, pm, pr, R, M, nt)


def rows_fwd(x, weight, bias, eps, rms, y, mean, rstd):
    """Serial rows_fwd (contract: fastnorm.reference.rows_fwd)."""
    _rows_fwd(x, weight, bias, eps, rms, y, mean, rstd, 1)


def rows_fwd_parallel(x, weight, bias, eps, rms, y, mean, rstd):
    """Parallel rows_fwd (contract: fastnorm.reference.rows_fwd)."""
    _rows_fwd(x, weight, bias, eps, rms, y, mean, rstd, _par())


# ---------------------------------------------------------------- rows_fwd_grouped

cdef void _rows_fwd_grouped_t(int kd, const void *x, const void *w, const void *b,
                              double eps, void *y, void *mean, void *rstd, Py_ssize_t R,
                              Py_ssize_t K, Py_ssize_t S, Py_ssize_t G, int nt) noexcept nogil:
    # IN x (R, K, S), w/b (G, K) or NULL   OUT y (R, K, S), mean/rstd (R,)
    cdef Py_ssize_t k, step = _row_step(K * S), nch = (R + step - 1) // step
    cdef int nts = _streaming((R * K * S) * _ISZ[kd])
    if nt > 1 and nch > 1:
        for k in prange(nch, num_threads=nt, schedule="static"):
            fn_rows_fwd_grouped(kd, x, K, S, G, w, b, eps, y, mean, rstd, k * step,
                                min(R, k * step + step), nts)
    else:
        fn_rows_fwd_grouped(kd, x, K, S, G, w, b, eps, y, mean, rstd, 0, R, nts)


cdef _rows_fwd_grouped(x, weight, bias, double eps, y, mean, rstd, int nt):
    cdef int kd = _kind(x, "x", 3)
    cdef int t = _TNUM[kd], tt = _TTNUM[kd]
    cdef Py_ssize_t R = _dim(x, 0), K = _dim(x, 1), S = _dim(x, 2)
    cdef Py_ssize_t G = 1
    if weight is not None:
        G = _dim(weight, 0)
    elif bias is not None:
        G = _dim(bias, 0)
    if G < 1:
        raise ValueError("weight/bias must have at least one row")
    weight, bias = _param(weight, "weight", kd), _param(bias, "bias", kd)
    cdef void *px = _data(x, "x", t, 3, False, R, K, S)
    cdef void *pw = _opt(weight, "weight", tt, 2, False, G, K)
    cdef void *pb = _opt(bias, "bias", tt, 2, False, G, K)
    cdef void *py = _data(y, "y", t, 3, True, R, K, S)
    cdef void *pm = _data(mean, "mean", tt, 1, True, R)
    cdef void *pr = _data(rstd, "rstd", tt, 1, True, R)
    _disjoint_or_same(y, x, "y", "x")
    with nogil:
        _rows_fwd_grouped_t(kd, px, pw, pb, eps, py, pm, pr, R, K, S, G, nt)


def rows_fwd_grouped(x, weight, bias, eps, y, mean, rstd):
    """Serial rows_fwd_grouped (contract: fastnorm.reference.rows_fwd_grouped)."""
    _rows_fwd_grouped(x, weight, bias, eps, y, mean, rstd, 1)


def rows_fwd_grouped_parallel(x, weight, bias, eps, y, mean, rstd):
    """Parallel rows_fwd_grouped (contract: fastnorm.reference.rows_fwd_grouped)."""
    _rows_fwd_grouped(x, weight, bias, eps, y, mean, rstd, _par())


# ------------------------------------------------------------------------ rows_bwd

cdef inline void _rows_bwd_block(int kd, const void *dy, const void *x, const void *mean,
                                 const void *rstd, const void *w, int rms, void *dx,
                                 double *dw, double *db, Py_ssize_t R, Py_ssize_t M,
                                 Py_ssize_t B, Py_ssize_t blk, int nts) noexcept nogil:
    # block blk: rows [blk*R//B, (blk+1)*R//B); its partial sums go to row blk of dw/db
    cdef double *dwb = NULL
    cdef double *dbb = NULL
    if dw != NULL:
        dwb = dw + blk * M
        memset(dwb, 0, M * sizeof(double))
    if db != NULL:
        dbb = db + blk * M
        memset(dbb, 0, M * sizeof(double))
    fn_rows_bwd(kd, dy, x, mean, rstd, w, rms, M, dx, dwb, dbb, blk * R // B,
                (blk + 1) * R // B, nts)


cdef void _rows_bwd_t(int kd, const void *dy, const void *x, const void *mean,
                      const void *rstd, const void *w, int rms, void *dx, double *dw,
                      double *db, Py_ssize_t R, Py_ssize_t M, Py_ssize_t B,
                      int nt) noexcept nogil:
    # IN dy, x (R, M), mean/rstd (R,), w (M,)|NULL   OUT dx (R, M), dw/db (B, M)|NULL
    cdef Py_ssize_t k
    cdef int nts = _streaming((R * M) * _ISZ[kd])
    if nt > 1 and B > 1:
        for k in prange(B, num_threads=nt, schedule="static"):
            _rows_bwd_block(kd, dy, x, mean, rstd, w, rms, dx, dw, db, R, M, B, k, nts)
    else:
        for k in range(B):
            _rows_bwd_block(kd, dy, x, mean, rstd, w, rms, dx, dw, db, R, M, B, k, nts)


cdef _rows_bwd(dy, x, mean, rstd, weight, bint rms, dx, dw_part, db_part, int nt):
    cdef int kd = _kind(x, "x", 2)
    cdef int t = _TNUM[kd], tt = _TTNUM[kd]
    cdef Py_ssize_t R = _dim(x, 0), M = _dim(x, 1), B
    if dw_part is not None:
        B = _dim(dw_part, 0) if cnp.PyArray_Check(dw_part) and dw_part.ndim == 2 else 0
    elif db_part is not None:
        B = _dim(db_part, 0) if cnp.PyArray_Check(db_part) and db_part.ndim == 2 else 0
    else:
        B = min(R, 64)
    weight = _param(weight, "weight", kd)
    cdef void *pdy = _data(dy, "dy", t, 2, False, R, M)
    cdef void *px = _data(x, "x", t, 2, False, R, M)
    cdef void *pm = _data(mean, "mean", tt, 1, False, R)
    cdef void *pr = _data(rstd, "rstd", tt, 1, False, R)
    cdef void *pw = _opt(weight, "weight", tt, 1, False, M)
    cdef void *pdx = _data(dx, "dx", t, 2, True, R, M)
    cdef double *pdw = <double *>_opt(dw_part, "dw_part", _F64, 2, True, B, M)
    cdef double *pdb = <double *>_opt(db_part, "db_part", _F64, 2, True, B, M)
    with nogil:
        _rows_bwd_t(kd, pdy, px, pm, pr, pw, rms, pdx, pdw, pdb, R, M, B, nt)


def rows_bwd(dy, x, mean, rstd, weight, rms, dx, dw_part, db_part):
    """Serial rows_bwd (contract: fastnorm.reference.rows_bwd)."""
    _rows_bwd(dy, x, mean, rstd, weight, rms, dx, dw_part, db_part, 1)


def rows_bwd_parallel(dy, x, mean, rstd, weight, rms, dx, dw_part, db_part):
    """Parallel rows_bwd (contract: fastnorm.reference.rows_bwd)."""
    _rows_bwd(dy, x, mean, rstd, weight, rms, dx, dw_part, db_part, _par())


# ------------------------------------------------------------------------ rows_moments

cdef void _rows_moments_t(int kd, const void *x, double *mean, double *m2, Py_ssize_t R,
                          Py_ssize_t M, int nt) noexcept nogil:
    # IN x (R, M)   OUT mean, m2 (R,) float64
    cdef Py_ssize_t k, step = _row_step(M), nch = (R + step - 1) // step
    if nt > 1 and nch > 1:
        for k in prange(nch, num_threads=nt, schedule="static"):
            fn_rows_moments(kd, x, M, mean, m2, k * step, min(R, k * step + step))
    else:
        fn_rows_moments(kd, x, M, mean, m2, 0, R)


cdef _rows_moments(x, mean, m2, int nt):
    cdef int kd = _kind(x, "x", 2)
    cdef Py_ssize_t R = _dim(x, 0), M = _dim(x, 1)
    cdef void *px = _data(x, "x", _TNUM[kd], 2, False, R, M)
    cdef double *pm = <double *>_data(mean, "mean", _F64, 1, True, R)
    cdef double *p2 = <double *>_data(m2, "m2", _F64, 1, True, R)
    with nogil:
        _rows_moments_t(kd, px, pm, p2, R, M, nt)


def rows_moments(x, mean, m2):
    """Serial rows_moments (contract: fastnorm.reference.rows_moments)."""
    _rows_moments(x, mean, m2, 1)


def rows_moments_parallel(x, mean, m2):
    """Parallel rows_moments (contract: fastnorm.reference.rows_moments)."""
    _rows_moments(x, mean, m2, _par())


# ------------------------------------------------------------------------ rows_scale_shift

cdef void _rows_scale_shift_t(int kd, const void *x, const double *mean, const double *alpha,
                              const double *beta, void *y, Py_ssize_t R, Py_ssize_t M,
                              int nt) noexcept nogil:
    # IN x (R, M), mean/alpha/beta (R,) float64   OUT y (R, M)
    cdef Py_ssize_t k, step = _row_step(M), nch = (R + step - 1) // step
    cdef int nts = _streaming((R * M) * _ISZ[kd])
    if nt > 1 and nch > 1:
        for k in prange(nch, num_threads=nt, schedule="static"):
            fn_rows_scale_shift(kd, x, M, mean, alpha, beta, y, k * step,
                                min(R, k * step + step), nts)
    else:
        fn_rows_scale_shift(kd, x, M, mean, alpha, beta, y, 0, R, nts)


cdef _rows_scale_shift(x, mean, alpha, beta, y, int nt):
    cdef int kd = _kind(x, "x", 2)
    cdef int t = _TNUM[kd]
    cdef Py_ssize_t R = _dim(x, 0), M = _dim(x, 1)
    cdef void *px = _data(x, "x", t, 2, False, R, M)
    cdef const double *pm = <const double *>_data(mean, "mean", _F64, 1, False, R)
    cdef const double *pa = <const double *>_data(alpha, "alpha", _F64, 1, False, R)
    cdef const double *pb = <const double *>_data(beta, "beta", _F64, 1, False, R)
    cdef void *py = _data(y, "y", t, 2, True, R, M)
    with nogil:
        _rows_scale_shift_t(kd, px, pm, pa, pb, py, R, M, nt)


def rows_scale_shift(x, mean, alpha, beta, y):
    """Serial rows_scale_shift (contract: fastnorm.reference.rows_scale_shift)."""
    _rows_scale_shift(x, mean, alpha, beta, y, 1)


def rows_scale_shift_parallel(x, mean, alpha, beta, y):
    """Parallel rows_scale_shift (contract: fastnorm.reference.rows_scale_shift)."""
    _rows_scale_shift(x, mean, alpha, beta, y, _par())


# ------------------------------------------------------------------------ rows_dot

cdef void _rows_dot_t(int kd, const void *dy, const void *x, const double *mean, double *s,
                      double *sx, Py_ssize_t R, Py_ssize_t M, int nt) noexcept nogil:
    # IN dy, x (R, M), mean (R,) float64   OUT sum_dy, sum_dyxc (R,) float64
    cdef Py_ssize_t k, step = _row_step(M), nch = (R + step - 1) // step
    if nt > 1 and nch > 1:
        for k in prange(nch, num_threads=nt, schedule="static"):
            fn_rows_dot(kd, dy, x, M, mean, s, sx, k * step, min(R, k * step + step))
    else:
        fn_rows_dot(kd, dy, x, M, mean, s, sx, 0, R)


cdef _rows_dot(dy, x, mean, sum_dy, sum_dyxc, int nt):
    cdef int kd = _kind(x, "x", 2)
    cdef int t = _TNUM[kd]
    cdef Py_ssize_t R = _dim(x, 0), M = _dim(x, 1)
    cdef void *pdy = _data(dy, "dy", t, 2, False, R, M)
    cdef void *px = _data(x, "x", t, 2, False, R, M)
    cdef const double *pm = <const double *>_data(mean, "mean", _F64, 1, False, R)
    cdef double *ps = <double *>_data(sum_dy, "sum_dy", _F64, 1, True, R)
    cdef double *psx = <double *>_data(sum_dyxc, "sum_dyxc", _F64, 1, True, R)
    with nogil:
        _rows_dot_t(kd, pdy, px, pm, ps, psx, R, M, nt)


def rows_dot(dy, x, mean, sum_dy, sum_dyxc):
    """Serial rows_dot (contract: fastnorm.reference.rows_dot)."""
    _rows_dot(dy, x, mean, sum_dy, sum_dyxc, 1)


def rows_dot_parallel(dy, x, mean, sum_dy, sum_dyxc):
    """Parallel rows_dot (contract: fastnorm.reference.rows_dot)."""
    _rows_dot(dy, x, mean, sum_dy, sum_dyxc, _par())


# ------------------------------------------------------------------------ rows_bwd_apply

cdef void _rows_bwd_apply_t(int kd, const void *dy, const void *x, const double *mean,
                            const double *c1, const double *c2, const double *c3, void *dx,
                            Py_ssize_t R, Py_ssize_t M, int nt) noexcept nogil:
    # IN dy, x (R, M), mean/c1/c2/c3 (R,) float64   OUT dx (R, M)
    cdef Py_ssize_t k, step = _row_step(M), nch = (R + step - 1) // step
    cdef int nts = _streaming((R * M) * _ISZ[kd])
    if nt > 1 and nch > 1:
        for k in prange(nch, num_threads=nt, schedule="static"):
            fn_rows_bwd_apply(kd, dy, x, M, mean, c1, c2, c3, dx, k * step,
                              min(R, k * step + step), nts)
    else:
        fn_rows_bwd_apply(kd, dy, x, M, mean, c1, c2, c3, dx, 0, R, nts)


cdef _rows_bwd_apply(dy, x, mean, c1, c2, c3, dx, int nt):
    cdef int kd = _kind(x, "x", 2)
    cdef int t = _TNUM[kd]
    cdef Py_ssize_t R = _dim(x, 0), M = _dim(x, 1)
    cdef void *pdy = _data(dy, "dy", t, 2, False, R, M)
    cdef void *px = _data(x, "x", t, 2, False, R, M)
    cdef const double *pm = <const double *>_data(mean, "mean", _F64, 1, False, R)
    cdef const double *p1 = <const double *>_data(c1, "c1", _F64, 1, False, R)
    cdef const double *p2 = <const double *>_data(c2, "c2", _F64, 1, False, R)
    cdef const double *p3 = <const double *>_data(c3, "c3", _F64, 1, False, R)
    cdef void *pdx = _data(dx, "dx", t, 2, True, R, M)
    with nogil:
        _rows_bwd_apply_t(kd, pdy, px, pm, p1, p2, p3, pdx, R, M, nt)


def rows_bwd_apply(dy, x, mean, c1, c2, c3, dx):
    """Serial rows_bwd_apply (contract: fastnorm.reference.rows_bwd_apply)."""
    _rows_bwd_apply(dy, x, mean, c1, c2, c3, dx, 1)


def rows_bwd_apply_parallel(dy, x, mean, c1, c2, c3, dx):
    """Parallel rows_bwd_apply (contract: fastnorm.reference.rows_bwd_apply)."""
    _rows_bwd_apply(dy, x, mean, c1, c2, c3, dx, _par())


# ------------------------------------------------------------------------ rows_bwd_grouped

cdef void _rows_bwd_grouped_t(int kd, const void *dy, const void *x, const double *mean,
                              const double *rstd, const double *w, void *dx, double *sdy,
                              double *sdxh, Py_ssize_t R, Py_ssize_t K, Py_ssize_t S,
                              Py_ssize_t G, int nt) noexcept nogil:
    # IN dy, x (R, K, S), mean/rstd (R,), w (G, K)|NULL   OUT dx (R, K, S), sdy/sdxh (R, K)
    cdef Py_ssize_t k, step = _row_step(K * S), nch = (R + step - 1) // step
    cdef int nts = _streaming((R * K * S) * _ISZ[kd])
    if nt > 1 and nch > 1:
        for k in prange(nch, num_threads=nt, schedule="static"):
            fn_rows_bwd_grouped(kd, dy, x, K, S, G, mean, rstd, w, dx, sdy, sdxh, k * step,
                                min(R, k * step + step), nts)
    else:
        fn_rows_bwd_grouped(kd, dy, x, K, S, G, mean, rstd, w, dx, sdy, sdxh, 0, R, nts)


cdef _rows_bwd_grouped(dy, x, mean, rstd, weight, dx, sum_dy, sum_dyxh, int nt):
    cdef int kd = _kind(x, "x", 3)
    cdef int t = _TNUM[kd]
    cdef Py_ssize_t R = _dim(x, 0), K = _dim(x, 1), S = _dim(x, 2)
    cdef Py_ssize_t G = 1
    if weight is not None:
        if not cnp.PyArray_Check(weight) or cnp.PyArray_NDIM(<cnp.ndarray>weight) != 2:
            raise ValueError("weight must be a 2-D numpy.ndarray (G, K)")
        G = _dim(weight, 0)
    if G < 1:
        raise ValueError("weight must have at least one row")
    cdef void *pdy = _data(dy, "dy", t, 3, False, R, K, S)
    cdef void *px = _data(x, "x", t, 3, False, R, K, S)
    cdef const double *pm = <const double *>_data(mean, "mean", _F64, 1, False, R)
    cdef const double *pr = <const double *>_data(rstd, "rstd", _F64, 1, False, R)
    cdef const double *pw = <const double *>_opt(weight, "weight", _F64, 2, False, G, K)
    cdef void *pdx = _data(dx, "dx", t, 3, True, R, K, S)
    cdef double *ps = <double *>_data(sum_dy, "sum_dy", _F64, 2, True, R, K)
    cdef double *psx = <double *>_data(sum_dyxh, "sum_dyxh", _F64, 2, True, R, K)
    _disjoint_or_same(dx, x, "dx", "x")
    _disjoint_or_same(dx, dy, "dx", "dy")
    with nogil:
        _rows_bwd_grouped_t(kd, pdy, px, pm, pr, pw, pdx, ps, psx, R, K, S, G, nt)


def rows_bwd_grouped(dy, x, mean, rstd, weight, dx, sum_dy, sum_dyxh):
    """Serial rows_bwd_grouped (contract: fastnorm.reference.rows_bwd_grouped)."""
    _rows_bwd_grouped(dy, x, mean, rstd, weight, dx, sum_dy, sum_dyxh, 1)


def rows_bwd_grouped_parallel(dy, x, mean, rstd, weight, dx, sum_dy, sum_dyxh):
    """Parallel rows_bwd_grouped (contract: fastnorm.reference.rows_bwd_grouped)."""
    _rows_bwd_grouped(dy, x, mean, rstd, weight, dx, sum_dy, sum_dyxh, _par())


# ------------------------------------------------------------------------ channels_moments

cdef inline void _channels_moments_block(int kd, const void *x, double *bmean, double *bm2,
                                         Py_ssize_t Q, Py_ssize_t C, Py_ssize_t h,
                                         Py_ssize_t nb, Py_ssize_t task) noexcept nogil:
    # task = p * nb + b: rows [b*h, min(Q, (b+1)*h)) of x[p] -> row `task` of bmean/bm2
    cdef Py_ssize_t p = task // nb, b = task % nb
    cdef Py_ssize_t n = min(Q, b * h + h) - b * h
    fn_channels_moments(kd, _at(x, (p * Q + b * h) * C, _ISZ[kd]), n, C, bmean + task * C,
                        bm2 + task * C)


cdef void _channels_moments_t(int kd, const void *x, double *mean, double *m2, double *buf,
                              Py_ssize_t P, Py_ssize_t Q, Py_ssize_t C, int nt) noexcept nogil:
    # IN x (P, Q, C)   OUT mean, m2 (P, C) float64; buf: 2 * P * nb * C block partials
    cdef Py_ssize_t h = _block_rows(Q, C), nb = (Q + h - 1) // h, k
    cdef double *bmean = buf
    cdef double *bm2 = buf + P * nb * C
    if nt > 1 and P * nb > 1:
        for k in prange(P * nb, num_threads=nt, schedule="static"):
            _channels_moments_block(kd, x, bmean, bm2, Q, C, h, nb, k)
        for k in prange(P, num_threads=nt, schedule="static"):
            fn_channels_moments_merge(nb, h, Q, C, bmean + k * nb * C, bm2 + k * nb * C,
                                      mean + k * C, m2 + k * C)
    else:
        for k in range(P * nb):
            _channels_moments_block(kd, x, bmean, bm2, Q, C, h, nb, k)
        for k in range(P):
            fn_channels_moments_merge(nb, h, Q, C, bmean + k * nb * C, bm2 + k * nb * C,
                                      mean + k * C, m2 + k * C)


cdef double *_partials(Py_ssize_t P, Py_ssize_t Q, Py_ssize_t C) except NULL:
    """malloc'ed room for two (P, nb, C) float64 block-partial arrays."""
    cdef Py_ssize_t h = _block_rows(Q, C), nb = (Q + h - 1) // h
    cdef double *buf = <double *>malloc(max(1, 2 * P * nb * C) * sizeof(double))
    if buf == NULL:
        raise MemoryError()
    return buf


cdef _channels_moments(x, mean, m2, int nt):
    cdef int kd = _kind(x, "x", 3)
    cdef Py_ssize_t P = _dim(x, 0), Q = _dim(x, 1), C = _dim(x, 2)
    cdef void *px = _data(x, "x", _TNUM[kd], 3, False, P, Q, C)
    cdef double *pm = <double *>_data(mean, "mean", _F64, 2, True, P, C)
    cdef double *p2 = <double *>_data(m2, "m2", _F64, 2, True, P, C)
    cdef double *buf = _partials(P, Q, C)
    with nogil:
        _channels_moments_t(kd, px, pm, p2, buf, P, Q, C, nt)
    free(buf)


def channels_moments(x, mean, m2):
    """Serial channels_moments (contract: fastnorm.reference.channels_moments)."""
    _channels_moments(x, mean, m2, 1)


def channels_moments_parallel(x, mean, m2):
    """Parallel channels_moments (contract: fastnorm.reference.channels_moments)."""
    _channels_moments(x, mean, m2, _par())


# ------------------------------------------------------------------------ channels_scale_shift

cdef inline void _channels_scale_shift_block(int kd, const void *x, const double *mean,
                                             const double *alpha, const double *beta,
                                             void *y, Py_ssize_t Q, Py_ssize_t C,
                                             Py_ssize_t h, Py_ssize_t nb, Py_ssize_t task,
                                             int nts) noexcept nogil:
    cdef Py_ssize_t p = task // nb, b = task % nb
    cdef Py_ssize_t n = min(Q, b * h + h) - b * h, off = (p * Q + b * h) * C
    fn_channels_scale_shift(kd, _at(x, off, _ISZ[kd]), n, C, mean + p * C, alpha + p * C,
                            beta + p * C, _atw(y, off, _ISZ[kd]), nts)


cdef void _channels_scale_shift_t(int kd, const void *x, const double *mean,
                                  const double *alpha, const double *beta, void *y,
                                  Py_ssize_t P, Py_ssize_t Q, Py_ssize_t C,
                                  int nt) noexcept nogil:
    # IN x (P, Q, C), mean/alpha/beta (P, C) float64   OUT y (P, Q, C)
    cdef Py_ssize_t h = _block_rows(Q, C), nb = (Q + h - 1) // h, k
    cdef int nts = _streaming((P * Q * C) * _ISZ[kd])
    if nt > 1 and P * nb > 1:
        for k in prange(P * nb, num_threads=nt, schedule="static"):
            _channels_scale_shift_block(kd, x, mean, alpha, beta, y, Q, C, h, nb, k, nts)
    else:
        for k in range(P * nb):
            _channels_scale_shift_block(kd, x, mean, alpha, beta, y, Q, C, h, nb, k, nts)


cdef _channels_scale_shift(x, mean, alpha, beta, y, int nt):
    cdef int kd = _kind(x, "x", 3)
    cdef int t = _TNUM[kd]
    cdef Py_ssize_t P = _dim(x, 0), Q = _dim(x, 1), C = _dim(x, 2)
    cdef void *px = _data(x, "x", t, 3, False, P, Q, C)
    cdef const double *pm = <const double *>_data(mean, "mean", _F64, 2, False, P, C)
    cdef const double *pa = <const double *>_data(alpha, "alpha", _F64, 2, False, P, C)
    cdef const double *pb = <const double *>_data(beta, "beta", _F64, 2, False, P, C)
    cdef void *py = _data(y, "y", t, 3, True, P, Q, C)
    _disjoint_or_same(y, x, "y", "x")
    with nogil:
        _channels_scale_shift_t(kd, px, pm, pa, pb, py, P, Q, C, nt)


def channels_scale_shift(x, mean, alpha, beta, y):
    """Serial channels_scale_shift (contract: fastnorm.reference.channels_scale_shift)."""
    _channels_scale_shift(x, mean, alpha, beta, y, 1)


def channels_scale_shift_parallel(x, mean, alpha, beta, y):
    """Parallel channels_scale_shift (contract: fastnorm.reference.channels_scale_shift)."""
    _channels_scale_shift(x, mean, alpha, beta, y, _par())


# ------------------------------------------------------------------------ channels_dot

cdef inline void _channels_dot_block(int kd, const void *dy, const void *x,
                                     const double *mean, double *bs, double *bsx,
                                     Py_ssize_t Q, Py_ssize_t C, Py_ssize_t h, Py_ssize_t nb,
                                     Py_ssize_t task) noexcept nogil:
    cdef Py_ssize_t p = task // nb, b = task % nb
    cdef Py_ssize_t n = min(Q, b * h + h) - b * h, off = (p * Q + b * h) * C
    fn_channels_dot(kd, _at(dy, off, _ISZ[kd]), _at(x, off, _ISZ[kd]), n, C, mean + p * C,
                    bs + task * C, bsx + task * C)


cdef void _channels_dot_t(int kd, const void *dy, const void *x, const double *mean,
                          double *s, double *sx, double *buf, Py_ssize_t P, Py_ssize_t Q,
                          Py_ssize_t C, int nt) noexcept nogil:
    # IN dy, x (P, Q, C), mean (P, C) float64   OUT sum_dy, sum_dyxc (P, C) float64
    cdef Py_ssize_t h = _block_rows(Q, C), nb = (Q + h - 1) // h, k
    cdef double *bs = buf
    cdef double *bsx = buf + P * nb * C
    if nt > 1 and P * nb > 1:
        for k in prange(P * nb, num_threads=nt, schedule="static"):
            _channels_dot_block(kd, dy, x, mean, bs, bsx, Q, C, h, nb, k)
        for k in prange(P, num_threads=nt, schedule="static"):
            fn_channels_dot_merge(nb, C, bs + k * nb * C, bsx + k * nb * C, s + k * C,
                                  sx + k * C)
    else:
        for k in range(P * nb):
            _channels_dot_block(kd, dy, x, mean, bs, bsx, Q, C, h, nb, k)
        for k in range(P):
            fn_channels_dot_merge(nb, C, bs + k * nb * C, bsx + k * nb * C, s + k * C,
                                  sx + k * C)


cdef _channels_dot(dy, x, mean, sum_dy, sum_dyxc, int nt):
    cdef int kd = _kind(x, "x", 3)
    cdef int t = _TNUM[kd]
    cdef Py_ssize_t P = _dim(x, 0), Q = _dim(x, 1), C = _dim(x, 2)
    cdef void *pdy = _data(dy, "dy", t, 3, False, P, Q, C)
    cdef void *px = _data(x, "x", t, 3, False, P, Q, C)
    cdef const double *pm = <const double *>_data(mean, "mean", _F64, 2, False, P, C)
    cdef double *ps = <double *>_data(sum_dy, "sum_dy", _F64, 2, True, P, C)
    cdef double *psx = <double *>_data(sum_dyxc, "sum_dyxc", _F64, 2, True, P, C)
    cdef double *buf = _partials(P, Q, C)
    with nogil:
        _channels_dot_t(kd, pdy, px, pm, ps, psx, buf, P, Q, C, nt)
    free(buf)


def channels_dot(dy, x, mean, sum_dy, sum_dyxc):
    """Serial channels_dot (contract: fastnorm.reference.channels_dot)."""
    _channels_dot(dy, x, mean, sum_dy, sum_dyxc, 1)


def channels_dot_parallel(dy, x, mean, sum_dy, sum_dyxc):
    """Parallel channels_dot (contract: fastnorm.reference.channels_dot)."""
    _channels_dot(dy, x, mean, sum_dy, sum_dyxc, _par())


# ------------------------------------------------------------------------ channels_bwd_apply

cdef inline void _channels_bwd_apply_block(int kd, const void *dy, const void *x,
                                           const double *mean, const double *c1,
                                           const double *c2, const double *c3, void *dx,
                                           Py_ssize_t Q, Py_ssize_t C, Py_ssize_t h,
                                           Py_ssize_t nb, Py_ssize_t task,
                                           int nts) noexcept nogil:
    cdef Py_ssize_t p = task // nb, b = task % nb
    cdef Py_ssize_t n = min(Q, b * h + h) - b * h, off = (p * Q + b * h) * C
    fn_channels_bwd_apply(kd, _at(dy, off, _ISZ[kd]), _at(x, off, _ISZ[kd]), n, C,
                          mean + p * C, c1 + p * C, c2 + p * C, c3 + p * C,
                          _atw(dx, off, _ISZ[kd]), nts)


cdef void _channels_bwd_apply_t(int kd, const void *dy, const void *x, const double *mean,
                                const double *c1, const double *c2, const double *c3,
                                void *dx, Py_ssize_t P, Py_ssize_t Q, Py_ssize_t C,
                                int nt) noexcept nogil:
    # IN dy, x (P, Q, C), mean/c1/c2/c3 (P, C) float64   OUT dx (P, Q, C)
    cdef Py_ssize_t h = _block_rows(Q, C), nb = (Q + h - 1) // h, k
    cdef int nts = _streaming((P * Q * C) * _ISZ[kd])
    if nt > 1 and P * nb > 1:
        for k in prange(P * nb, num_threads=nt, schedule="static"):
            _channels_bwd_apply_block(kd, dy, x, mean, c1, c2, c3, dx, Q, C, h, nb, k, nts)
    else:
        for k in range(P * nb):
            _channels_bwd_apply_block(kd, dy, x, mean, c1, c2, c3, dx, Q, C, h, nb, k, nts)


cdef _channels_bwd_apply(dy, x, mean, c1, c2, c3, dx, int nt):
    cdef int kd = _kind(x, "x", 3)
    cdef int t = _TNUM[kd]
    cdef Py_ssize_t P = _dim(x, 0), Q = _dim(x, 1), C = _dim(x, 2)
    cdef void *pdy = _data(dy, "dy", t, 3, False, P, Q, C)
    cdef void *px = _data(x, "x", t, 3, False, P, Q, C)
    cdef const double *pm = <const double *>_data(mean, "mean", _F64, 2, False, P, C)
    cdef const double *p1 = <const double *>_data(c1, "c1", _F64, 2, False, P, C)
    cdef const double *p2 = <const double *>_data(c2, "c2", _F64, 2, False, P, C)
    cdef const double *p3 = <const double *>_data(c3, "c3", _F64, 2, False, P, C)
    cdef void *pdx = _data(dx, "dx", t, 3, True, P, Q, C)
    _disjoint(dx, dy, "dx", "dy")
    _disjoint(dx, x, "dx", "x")
    with nogil:
        _channels_bwd_apply_t(kd, pdy, px, pm, p1, p2, p3, pdx, P, Q, C, nt)


def channels_bwd_apply(dy, x, mean, c1, c2, c3, dx):
    """Serial channels_bwd_apply (contract: fastnorm.reference.channels_bwd_apply)."""
    _channels_bwd_apply(dy, x, mean, c1, c2, c3, dx, 1)


def channels_bwd_apply_parallel(dy, x, mean, c1, c2, c3, dx):
    """Parallel channels_bwd_apply (contract: fastnorm.reference.channels_bwd_apply)."""
    _channels_bwd_apply(dy, x, mean, c1, c2, c3, dx, _par())


# ------------------------------------------------------------------------ channels_fwd_grouped

cdef inline Py_ssize_t _grouped_scratch(Py_ssize_t Q, Py_ssize_t C) noexcept nogil:
    """float64 scratch of fn_channels_fwd_grouped for one sample: 2*nb*C + 4*C."""
    cdef Py_ssize_t h = _block_rows(Q, C)
    return (2 * ((Q + h - 1) // h) + 4) * C


cdef void _channels_fwd_grouped_t(int kd, const void *x, const void *w, const void *b,
                                  double eps, void *y, void *mean, void *rstd, double *buf,
                                  Py_ssize_t P, Py_ssize_t Q, Py_ssize_t C, Py_ssize_t G,
                                  int nt) noexcept nogil:
    # IN x (P, Q, C), w/b (C,) or NULL   OUT y (P, Q, C), mean/rstd (P, G)
    # buf: P slices of _grouped_scratch(Q, C) doubles; one sample per task (any thread count
    # computes each sample the same way)
    cdef Py_ssize_t p, h = _block_rows(Q, C), per = _grouped_scratch(Q, C)
    cdef Py_ssize_t isz = _ISZ[kd], tsz = _TSZ[kd]
    cdef int nts = _streaming((P * Q * C) * isz)
    if nt > 1 and P > 1:
        for p in prange(P, num_threads=nt, schedule="static"):
            fn_channels_fwd_grouped(kd, _at(x, p * Q * C, isz), Q, C, G, h, w, b, eps,
                                    _atw(y, p * Q * C, isz), _atw(mean, p * G, tsz),
                                    _atw(rstd, p * G, tsz), buf + p * per, nts)
    else:
        for p in range(P):
            fn_channels_fwd_grouped(kd, _at(x, p * Q * C, isz), Q, C, G, h, w, b, eps,
                                    _atw(y, p * Q * C, isz), _atw(mean, p * G, tsz),
                                    _atw(rstd, p * G, tsz), buf, nts)


cdef _channels_fwd_grouped(x, weight, bias, double eps, y, mean, rstd, int nt):
    cdef int kd = _kind(x, "x", 3)
    cdef int t = _TNUM[kd], tt = _TTNUM[kd]
    cdef Py_ssize_t P = _dim(x, 0), Q = _dim(x, 1), C = _dim(x, 2)
    if not cnp.PyArray_Check(mean) or cnp.PyArray_NDIM(<cnp.ndarray>mean) != 2:
        raise ValueError("mean must be a 2-D numpy.ndarray (P, G)")
    cdef Py_ssize_t G = _dim(mean, 1)
    if G < 1 or C % G or Q < 1:
        raise ValueError(f"mean must be (P, G) with G dividing C = {C} and Q >= 1 rows")
    weight, bias = _param(weight, "weight", kd), _param(bias, "bias", kd)
    cdef void *px = _data(x, "x", t, 3, False, P, Q, C)
    cdef void *pw = _opt(weight, "weight", tt, 1, False, C)
    cdef void *pb = _opt(bias, "bias", tt, 1, False, C)
    cdef void *py = _data(y, "y", t, 3, True, P, Q, C)
    cdef void *pm = _data(mean, "mean", tt, 2, True, P, G)
    cdef void *pr = _data(rstd, "rstd", tt, 2, True, P, G)
    _disjoint_or_same(y, x, "y", "x")
    cdef Py_ssize_t nbuf = _grouped_scratch(Q, C) * (P if nt > 1 else 1)
    cdef double *buf = <double *>malloc(max(1, nbuf) * sizeof(double))
    if buf == NULL:
        raise MemoryError()
    with nogil:
        _channels_fwd_grouped_t(kd, px, pw, pb, eps, py, pm, pr, buf, P, Q, C, G, nt)
    free(buf)


def channels_fwd_grouped(x, weight, bias, eps, y, mean, rstd):
    """Serial channels_fwd_grouped (contract: fastnorm.reference.channels_fwd_grouped)."""
    _channels_fwd_grouped(x, weight, bias, eps, y, mean, rstd, 1)


def channels_fwd_grouped_parallel(x, weight, bias, eps, y, mean, rstd):
    """Parallel channels_fwd_grouped (contract: fastnorm.reference.channels_fwd_grouped)."""
    _channels_fwd_grouped(x, weight, bias, eps, y, mean, rstd, _par())


# ------------------------------------------------------------------------ channels_eval
# Not (yet) in the reference contract: eval-mode normalization with fixed statistics, fused
# so that one-row inference (BN eval on (1, C)) is one call with no NumPy temporaries.
# fastnorm._dispatch composes it from channels_scale_shift for backends without it.
# mean/var/weight/bias are in the data's dtype for float32/float64 data, and float32 (or
# the data's half dtype, converted) for half-precision data.

cdef void _channels_eval_t(int kd, const void *x, const void *mean, const void *var,
                           const void *w, const void *b, double eps, void *y, void *cf,
                           Py_ssize_t Q, Py_ssize_t C, int nt) noexcept nogil:
    # IN x (Q, C), mean/var (C,), w/b (C,)|NULL   OUT y = (x - mean) * (rstd * w) + b
    # cf: room for 4 * C coefficients mh, ml, af, bf (T)
    cdef Py_ssize_t h = _block_rows(Q, C), nb = (Q + h - 1) // h, k, n
    cdef Py_ssize_t isz = _ISZ[kd], tsz = _TSZ[kd]
    cdef int nts = _streaming((Q * C) * isz)
    cdef const void *mh = cf
    cdef const void *ml = _at(cf, C, tsz)
    cdef const void *af = _at(cf, 2 * C, tsz)
    cdef const void *bf = _at(cf, 3 * C, tsz)
    fn_channels_eval_coefs(kd, mean, var, w, b, eps, C, cf, _atw(cf, C, tsz),
                           _atw(cf, 2 * C, tsz), _atw(cf, 3 * C, tsz))
    if nt > 1 and nb > 1:
        for k in prange(nb, num_threads=nt, schedule="static"):
            n = min(Q, k * h + h) - k * h
            fn_channels_eval_apply(kd, _at(x, k * h * C, isz), n, C, mh, ml, af, bf,
                                   _atw(y, k * h * C, isz), nts)
    else:
        for k in range(nb):
            n = min(Q, k * h + h) - k * h
            fn_channels_eval_apply(kd, _at(x, k * h * C, isz), n, C, mh, ml, af, bf,
                                   _atw(y, k * h * C, isz), nts)


cdef _channels_eval(x, mean, var, weight, bias, double eps, y, int nt):
    # x, y: (..., C), any number of leading dims (one (1, size/C, C) grid)
    if not cnp.PyArray_Check(x):
        raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
    cdef int nd = cnp.PyArray_NDIM(<cnp.ndarray>x)
    if nd < 1:
        raise ValueError("x must have at least 1 dimension")
    cdef int kd = _kind(x, "x", nd)
    cdef int t = _TNUM[kd], tt = _TTNUM[kd]
    cdef Py_ssize_t C = _dim(x, nd - 1)
    cdef Py_ssize_t Q = cnp.PyArray_SIZE(<cnp.ndarray>x) // C if C else 0
    if not (cnp.PyArray_Check(y) and cnp.PyArray_SAMESHAPE(<cnp.ndarray>x, <cnp.ndarray>y)):
        raise ValueError(f"y must have the shape of x {x.shape}")
    if not (cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>x)
            and cnp.PyArray_IS_C_CONTIGUOUS(<cnp.ndarray>y)):
        raise ValueError("x and y must be C-contiguous")
    # (Q, C) views of x and y (no copy: both are C-contiguous), kept alive in locals
    xv = x if nd == 2 else x.reshape(Q, C)
    yv = y if nd == 2 else y.reshape(Q, C)
    cdef void *px = _data(xv, "x", t, 2, False, Q, C)
    cdef void *py = _data(yv, "y", t, 2, True, Q, C)
    _disjoint_or_same(y, x, "y", "x")
    mean, var = _param(mean, "mean", kd), _param(var, "var", kd)
    weight, bias = _param(weight, "weight", kd), _param(bias, "bias", kd)
    cdef void *pm = _data(mean, "mean", tt, 1, False, C)
    cdef void *pv = _data(var, "var", tt, 1, False, C)
    cdef void *pw = _opt(weight, "weight", tt, 1, False, C)
    cdef void *pb = _opt(bias, "bias", tt, 1, False, C)
    cdef double *buf = <double *>malloc(max(1, 4 * C) * sizeof(double))  # 4 x C coefficients
    if buf == NULL:
        raise MemoryError()
    with nogil:
        _channels_eval_t(kd, px, pm, pv, pw, pb, eps, py, buf, Q, C, nt)
    free(buf)


def channels_eval(x, mean, var, weight, bias, eps, y):
    """Serial channels_eval: y = (x - mean) * (rstd * weight) + bias, rstd from var."""
    _channels_eval(x, mean, var, weight, bias, eps, y, 1)


def channels_eval_parallel(x, mean, var, weight, bias, eps, y):
    """Parallel channels_eval: y = (x - mean) * (rstd * weight) + bias, rstd from var."""
    _channels_eval(x, mean, var, weight, bias, eps, y, _par())
