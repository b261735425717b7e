"""numba-CUDA backend: the same kernels and the same public functions, on NVIDIA GPUs.

Imported only when used: by ``fastnorm.api`` for arguments with ``__cuda_array_interface__``
(numba device arrays, CuPy, ...) or when the backend resolves to "cuda", and by
``fastnorm._dispatch`` for ``KERNELS``. Needs ``numba-cuda`` (``pip install fastnorm[cuda]``).

Kernels (names and argument order of ``fastnorm.reference``, on device arrays):

- rows: a block per row, grid-stride over rows. Each thread keeps a Welford partial of the
  elements ``t, t + blockDim, ...``; the partials are merged with Chan's formula in a fixed tree
  order (within each warp, then across warps), so results do not depend on timing.
- channels (x is (P, Q, C)): two stages. Thread (p, k, c) reduces chunk k of q into a partial;
  a second launch merges the K partials of each (p, c) in index order. No float atomics, so
  every result is deterministic. K depends on the shape only.
- apply kernels (scale_shift, bwd_apply): elementwise, grid-stride.

One source, two targets: ``USE_SHUFFLE`` (the one flag) selects warp shuffles on a real GPU or,
under the simulator (``NUMBA_ENABLE_CUDASIM=1``, which has no shuffles), the same exchange
through shared memory. The simulator also gets small warps (4) and blocks (8 threads) so the
warp tree and the cross-warp merge are both exercised on tiny test shapes.

The public functions take numba device arrays, objects with ``__cuda_array_interface__`` or,
with the cuda backend selected, host arrays (copied over and back). Device inputs give device
outputs; running statistics given as device arrays are updated in place on the device.
float16 and empty inputs take one round trip through the host (NumPy path).
"""
import math

try:
    import numba_cuda  # noqa: F401  (numba's own bundled cuda target is deprecated)
    from numba import cuda, float64
    from numba.cuda.core import config as _cuda_config
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError("fastnorm's cuda backend needs numba-cuda: "
                      "pip install 'fastnorm[cuda]' (" + str(e) + ")") from e

import numpy as np

from . import _geometry as geo
from . import api as _api

SIMULATOR = bool(_cuda_config.ENABLE_CUDASIM)
USE_SHUFFLE = not SIMULATOR          # warp shuffles on a GPU, shared memory in the simulator
WARP = 4 if SIMULATOR else 32        # lanes of the reduction tree
MAX_TPB = 8 if SIMULATOR else 256    # threads per block (a multiple of WARP, <= WARP**2)
MAX_GRID = 2 if SIMULATOR else 65535 # blocks per launch; kernels are grid-stride loops
SCRATCH = 1 if USE_SHUFFLE else MAX_TPB
FULL_MASK = 0xFFFFFFFF

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _DevArray
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray as _DevArray
    from numba.cuda.cudadrv.devicearray import DeviceNDArrayBase as _DevBase


# ------------------------------------------------------------------- block reductions

@cuda.jit(device=True)
def _merge(na, ma, qa, nb, mb, qb):
    # IN two (count, mean, m2) partials   OUT their union (Chan's formula)
    if nb == 0.0:
        return na, ma, qa
    if na == 0.0:
        return nb, mb, qb
    n = na + nb
    d = mb - ma
    f = nb / n
    return n, ma + d * f, qa + qb + d * d * na * f


@cuda.jit(device=True)
def _shfl3(a, b, c, off, scratch):
    # IN this lane's (a, b, c)   OUT lane + off's values (own values past the warp's end)
    if USE_SHUFFLE:
        return (cuda.shfl_down_sync(FULL_MASK, a, off), cuda.shfl_down_sync(FULL_MASK, b, off),
                cuda.shfl_down_sync(FULL_MASK, c, off))
    t = cuda.threadIdx.x
    scratch[0, t] = a
    scratch[1, t] = b
    scratch[2, t] = c
    cuda.syncthreads()
    if t % WARP + off < WARP:
        a = scratch[0, t + off]
        b = scratch[1, t + off]
        c = scratch[2, t + off]
    cuda.syncthreads()
    return a, b, c


@cuda.jit(device=True)
def _warp_reduce(a, b, c, welford, scratch):
    # IN per-lane partials   OUT lane 0 holds the warp's merge (welford) or sums
    off = WARP // 2
    while off > 0:
        a2, b2, c2 = _shfl3(a, b, c, off, scratch)
        if welford:
            a, b, c = _merge(a, b, c, a2, b2, c2)
        else:
            a, b, c = a + a2, b + b2, c + c2
        off //= 2
    return a, b, c


@cuda.jit(device=True)
def _block_reduce(a, b, c, welford, scratch, parts):
    # IN per-thread partials, called by every thread of the block   OUT block total, everywhere
    t = cuda.threadIdx.x
    lane = t % WARP
    a, b, c = _warp_reduce(a, b, c, welford, scratch)
    if lane == 0:
        w = t // WARP
        parts[0, w] = a
        parts[1, w] = b
        parts[2, w] = c
    cuda.syncthreads()
    if lane < cuda.blockDim.x // WARP:
        a, b, c = parts[0, lane], parts[1, lane], parts[2, lane]
    else:
        a, b, c = 0.0, 0.0, 0.0
    a, b, c = _warp_reduce(a, b, c, welford, scratch)   # every warp, only warp 0's is used
    cuda.syncthreads()
    if t == 0:
        parts[0, 0] = a
        parts[1, 0] = b
        parts[2, 0] = c
    cuda.syncthreads()
    a, b, c = parts[0, 0], parts[1, 0], parts[2, 0]
    cuda.syncthreads()                                  # parts is reused by the next call
    return a, b, c


@cuda.jit(device=True)
def _row_welford(xr, M):
    # IN row xr (M,)   OUT this thread's (count, mean, m2) over elements t, t + blockDim, ...
    n = 0.0
    m = 0.0
    q = 0.0
    for i in range(cuda.threadIdx.x, M, cuda.blockDim.x):
        v = float(xr[i])
        n += 1.0
        d = v - m
        m += d / n
        q += d * (v - m)
    return n, m, q


# ------------------------------------------------------------------------- rows kernels

@cuda.jit
def _rows_fwd_k(x, weight, bias, eps, rms, y, mean, rstd):
    # IN x (R, M), weight/bias (M,)|None, eps, rms   OUT y (R, M), mean/rstd (R,)
    scratch = cuda.shared.array((3, SCRATCH), float64)
    parts = cuda.shared.array((3, WARP), float64)
    R, M = x.shape
    t = cuda.threadIdx.x
    for r in range(cuda.blockIdx.x, R, cuda.gridDim.x):
        xr = x[r]
        if rms:
            ss = 0.0
            for i in range(t, M, cuda.blockDim.x):
                v = float(xr[i])
                ss += v * v
            ss, _a, _b = _block_reduce(ss, 0.0, 0.0, False, scratch, parts)
            mu = 0.0
            var = ss / M
        else:
            n, mu, q = _row_welford(xr, M)
            n, mu, q = _block_reduce(n, mu, q, True, scratch, parts)
            var = max(q / M, 0.0)
        rs = 1.0 / math.sqrt(var + eps)
        yr = y[r]
        for i in range(t, M, cuda.blockDim.x):
            a = rs if weight is None else rs * weight[i]
            v = (xr[i] - mu) * a
            if bias is not None:
                v += bias[i]
            yr[i] = v
        if t == 0:
            mean[r] = mu
            rstd[r] = rs


@cuda.jit
def _rows_bwd_dx_k(dy, x, mean, rstd, weight, rms, dx):
    # IN dy, x (R, M), mean/rstd (R,), weight (M,)|None   OUT dx (R, M)
    scratch = cuda.shared.array((3, SCRATCH), float64)
    parts = cuda.shared.array((3, WARP), float64)
    R, M = x.shape
    t = cuda.threadIdx.x
    for r in range(cuda.blockIdx.x, R, cuda.gridDim.x):
        mu = float(mean[r])
        rs = float(rstd[r])
        xr = x[r]
        dyr = dy[r]
        sg = 0.0                       # sums over the row of g = dy * w and g * xhat
        sgx = 0.0
        for i in range(t, M, cuda.blockDim.x):
            g = float(dyr[i]) if weight is None else dyr[i] * float(weight[i])
            sg += g
            sgx += g * ((xr[i] - mu) * rs)
        sg, sgx, _a = _block_reduce(sg, sgx, 0.0, False, scratch, parts)
        mg = 0.0 if rms else sg / M
        mgx = sgx / M
        dxr = dx[r]
        for i in range(t, M, cuda.blockDim.x):
            g = float(dyr[i]) if weight is None else dyr[i] * float(weight[i])
            # term 1: g, term 2: -mean(g), term 3: -xhat * mean(g * xhat)
            dxr[i] = (g - mg - ((xr[i] - mu) * rs) * mgx) * rs


@cuda.jit
def _rows_wgrad_part_k(dy, x, mean, rstd, dw_part, db_part):
    # IN dy, x (R, M), mean/rstd (R,)   OUT dw_part/db_part (B, M)|None: rows of block b summed
    R, M = x.shape
    B = dw_part.shape[0] if dw_part is not None else db_part.shape[0]
    for j in range(cuda.grid(1), B * M, cuda.gridsize(1)):
        b = j // M
        m = j - b * M
        sw = 0.0
        sb = 0.0
        for r in range(b * R // B, (b + 1) * R // B):
            d = float(dy[r, m])
            sw += d * ((x[r, m] - float(mean[r])) * float(rstd[r]))
            sb += d
        if dw_part is not None:
            dw_part[b, m] = sw
        if db_part is not None:
            db_part[b, m] = sb


@cuda.jit
def _rows_moments_k(x, mean, m2):
    # IN x (R, M)   OUT mean, m2 (R,) float64
    scratch = cuda.shared.array((3, SCRATCH), float64)
    parts = cuda.shared.array((3, WARP), float64)
    R, M = x.shape
    for r in range(cuda.blockIdx.x, R, cuda.gridDim.x):
        n, mu, q = _row_welford(x[r], M)
        n, mu, q = _block_reduce(n, mu, q, True, scratch, parts)
        if cuda.threadIdx.x == 0:
            mean[r] = mu
            m2[r] = q


@cuda.jit
def _rows_dot_k(dy, x, mean, sum_dy, sum_dyxc):
    # IN dy, x (R, M), mean (R,)   OUT sum_dy, sum_dyxc (R,): sums of dy and dy * (x - mean)
    scratch = cuda.shared.array((3, SCRATCH), float64)
    parts = cuda.shared.array((3, WARP), float64)
    R, M = x.shape
    t = cuda.threadIdx.x
    for r in range(cuda.blockIdx.x, R, cuda.gridDim.x):
        mu = mean[r]
        s1 = 0.0
        s2 = 0.0
        for i in range(t, M, cuda.blockDim.x):
            d = float(dy[r, i])
            s1 += d
            s2 += d * (x[r, i] - mu)
        s1, s2, _a = _block_reduce(s1, s2, 0.0, False, scratch, parts)
        if t == 0:
            sum_dy[r] = s1
            sum_dyxc[r] = s2


@cuda.jit
def _rows_scale_shift_k(x, mean, alpha, beta, y):
    # IN x (R, M), mean/alpha/beta (R,)   OUT y = (x - mean[r]) * alpha[r] + beta[r]
    R, M = x.shape
    for j in range(cuda.grid(1), R * M, cuda.gridsize(1)):
        r = j // M
        i = j - r * M
        y[r, i] = (x[r, i] - mean[r]) * alpha[r] + beta[r]


@cuda.jit
def _rows_bwd_apply_k(dy, x, mean, c1, c2, c3, dx):
    # IN dy, x (R, M), mean/c1/c2/c3 (R,)   OUT dx = c1*dy + c2*(x - mean) + c3
    R, M = x.shape
    for j in range(cuda.grid(1), R * M, cuda.gridsize(1)):
        r = j // M
        i = j - r * M
        dx[r, i] = c1[r] * dy[r, i] + c2[r] * (x[r, i] - mean[r]) + c3[r]


# --------------------------------------------------------------------- channels kernels

@cuda.jit
def _ch_moments_part_k(x, pmean, pm2):
    # IN x (P, Q, C)   OUT pmean/pm2 (P, K, C): Welford over chunk k of q, per (p, c)
    P, Q, C = x.shape
    K = pmean.shape[1]
    for j in range(cuda.grid(1), P * K * C, cuda.gridsize(1)):
        c = j % C
        k = (j // C) % K
        p = j // (C * K)
        n = 0.0
        m = 0.0
        s = 0.0
        for q in range(k * Q // K, (k + 1) * Q // K):
            v = float(x[p, q, c])
            n += 1.0
            d = v - m
            m += d / n
            s += d * (v - m)
        pmean[p, k, c] = m
        pm2[p, k, c] = s


@cuda.jit
def _ch_moments_merge_k(pmean, pm2, Q, mean, m2):
    # IN partials (P, K, C) of chunks of Q   OUT mean, m2 (P, C), merged in index order
    P, K, C = pmean.shape
    for j in range(cuda.grid(1), P * C, cuda.gridsize(1)):
        p = j // C
        c = j - p * C
        n = 0.0
        m = 0.0
        s = 0.0
        for k in range(K):
            nk = float((k + 1) * Q // K - k * Q // K)
            n, m, s = _merge(n, m, s, nk, pmean[p, k, c], pm2[p, k, c])
        mean[p, c] = m
        m2[p, c] = s


@cuda.jit
def _ch_dot_part_k(dy, x, mean, pdy, pdx):
    # IN dy, x (P, Q, C), mean (P, C)   OUT pdy/pdx (P, K, C): sums over chunk k of q
    P, Q, C = x.shape
    K = pdy.shape[1]
    for j in range(cuda.grid(1), P * K * C, cuda.gridsize(1)):
        c = j % C
        k = (j // C) % K
        p = j // (C * K)
        mu = mean[p, c]
        s1 = 0.0
        s2 = 0.0
        for q in range(k * Q // K, (k + 1) * Q // K):
            d = float(dy[p, q, c])
            s1 += d
            s2 += d * (x[p, q, c] - mu)
        pdy[p, k, c] = s1
        pdx[p, k, c] = s2


@cuda.jit
def _sum_mid_k(a, b, out_a, out_b):
    # IN a, b (P, K, C)   OUT out_a, out_b (P, C): sums over k in index order
    P, K, C = a.shape
    for j in range(cuda.grid(1), P * C, cuda.gridsize(1)):
        p = j // C
        c = j - p * C
        s1 = 0.0
        s2 = 0.0
        for k in range(K):
            s1 += a[p, k, c]
            s2 += b[p, k, c]
        out_a[p, c] = s1
        out_b[p, c] = s2


@cuda.jit
def _ch_scale_shift_k(x, mean, alpha, beta, y):
    # IN x (P, Q, C), mean/alpha/beta (P, C)   OUT y = (x - mean) * alpha + beta
    P, Q, C = x.shape
    for j in range(cuda.grid(1), P * Q * C, cuda.gridsize(1)):
        c = j % C
        p = j // (Q * C)
        q = (j // C) % Q
        y[p, q, c] = (x[p, q, c] - mean[p, c]) * alpha[p, c] + beta[p, c]


@cuda.jit
def _ch_bwd_apply_k(dy, x, mean, c1, c2, c3, dx):
    # IN dy, x (P, Q, C), mean/c1/c2/c3 (P, C)   OUT dx = c1*dy + c2*(x - mean) + c3
    P, Q, C = x.shape
    for j in range(cuda.grid(1), P * Q * C, cuda.gridsize(1)):
        c = j % C
        p = j // (Q * C)
        q = (j // C) % Q
        dx[p, q, c] = (c1[p, c] * dy[p, q, c] + c2[p, c] * (x[p, q, c] - mean[p, c])
                       + c3[p, c])


# ----------------------------------------------- glue kernels of the public functions
# Statistics live per "unit" (Pg, G): BN (1, C), IN (N, C), GN (N, G); the apply kernels want
# per (P', C) values, P' the outer extent of the view (BN rows: A, BN channels: 1, IN/GN: N).
# Channel c belongs to group c // cg; unit row pg = p' when Pg > 1, else 0.

@cuda.jit
def _merge_equal_k(mean, m2, count, out_mean, out_m2):
    # IN mean/m2 (P1, K, P2) of groups of equal ``count``   OUT (P1, P2), merged in order
    P1, K, P2 = mean.shape
    for j in range(cuda.grid(1), P1 * P2, cuda.gridsize(1)):
        p = j // P2
        c = j - p * P2
        n = 0.0
        m = 0.0
        s = 0.0
        for k in range(K):
            n, m, s = _merge(n, m, s, float(count), mean[p, k, c], m2[p, k, c])
        out_mean[p, c] = m
        out_m2[p, c] = s


@cuda.jit
def _finalize_k(mean_g, m2_g, count, eps, clamp, weight, bias, cg, mean_s, alpha_s, beta_s,
                mean_out, rstd_out):
    # IN unit stats (Pg, G) (var = m2/count), weight/bias (C,)|None
    # OUT mean_s/alpha_s/beta_s (P', C) float64; mean_out/rstd_out (Po, G) in T, Po in {1, P'}
    Pp, C = mean_s.shape
    Pg = mean_g.shape[0]
    Po = mean_out.shape[0]
    for j in range(cuda.grid(1), Pp * C, cuda.gridsize(1)):
        p = j // C
        c = j - p * C
        g = c // cg
        pg = p if Pg > 1 else 0
        mu = float(mean_g[pg, g])
        var = m2_g[pg, g] / count
        if clamp:
            var = max(var, 0.0)
        rs = 1.0 / math.sqrt(var + eps)
        mean_s[p, c] = mu
        alpha_s[p, c] = rs if weight is None else rs * weight[c]
        beta_s[p, c] = 0.0 if bias is None else float(bias[c])
        if c % cg == 0 and (Po > 1 or p == 0):
            mean_out[p, g] = mu
            rstd_out[p, g] = rs


@cuda.jit
def _running_k(mean_g, m2_g, denom, momentum, rm, rv):
    # IN batch stats (Pn, C): averaged over Pn, var = m2/denom   OUT rm, rv (C,) updated in place
    Pn, C = mean_g.shape
    for c in range(cuda.grid(1), C, cuda.gridsize(1)):
        m = 0.0
        v = 0.0
        for p in range(Pn):
            m += mean_g[p, c]
            v += m2_g[p, c] / denom
        rm[c] = (1.0 - momentum) * rm[c] + momentum * (m / Pn)
        rv[c] = (1.0 - momentum) * rv[c] + momentum * (v / Pn)


@cuda.jit
def _spread_k(v, cg, out):
    # IN v (Pg, G)   OUT out (P', C) float64: out[p, c] = v[p or 0, c // cg]
    Pp, C = out.shape
    Pg = v.shape[0]
    for j in range(cuda.grid(1), Pp * C, cuda.gridsize(1)):
        p = j // C
        c = j - p * C
        out[p, c] = v[p if Pg > 1 else 0, c // cg]


@cuda.jit
def _group_sums_k(sdy, sdx, weight, cg, sg, sgx):
    # IN sums of dy and dy*(x - mean) (P', C)   OUT sg, sgx (Pg, G): sums of g = w*dy and
    # g*(x - mean) over every (p', c) of the unit, in index order
    Pp, C = sdy.shape
    Pg, G = sg.shape
    for j in range(cuda.grid(1), Pg * G, cuda.gridsize(1)):
        pg = j // G
        g = j - pg * G
        lo = pg if Pg > 1 else 0
        hi = pg + 1 if Pg > 1 else Pp
        s1 = 0.0
        s2 = 0.0
        for p in range(lo, hi):
            for c in range(g * cg, (g + 1) * cg):
                w = 1.0 if weight is None else float(weight[c])
                s1 += w * sdy[p, c]
                s2 += w * sdx[p, c]
        sg[pg, g] = s1
        sgx[pg, g] = s2


@cuda.jit
def _bwd_coefs_k(weight, rstd, sg, sgx, n, training, cg, c1, c2, c3):
    # IN rstd/sg/sgx (Pg, G), n elements per unit   OUT c1, c2, c3 (P', C) with
    # dx = c1*dy + c2*(x - mean) + c3 = rstd * (w*dy - sum(g)/n - xhat * sum(g*xhat)/n)
    Pp, C = c1.shape
    Pg = rstd.shape[0]
    for j in range(cuda.grid(1), Pp * C, cuda.gridsize(1)):
        p = j // C
        c = j - p * C
        g = c // cg
        pg = p if Pg > 1 else 0
        rs = float(rstd[pg, g])
        c1[p, c] = rs if weight is None else rs * weight[c]
        if training:
            c2[p, c] = -(rs * rs * rs) * sgx[pg, g] / n
            c3[p, c] = -rs * sg[pg, g] / n
        else:  # running statistics are constants
            c2[p, c] = 0.0
            c3[p, c] = 0.0


@cuda.jit
def _wgrad_k(sdy, sdx, rstd, cg, gw, gb):
    # IN sdy/sdx (P', C), rstd (Pg, G)   OUT gw = sum_p sdx*rstd, gb = sum_p sdy (C,)|None
    Pp, C = sdy.shape
    Pg = rstd.shape[0]
    for c in range(cuda.grid(1), C, cuda.gridsize(1)):
        s1 = 0.0
        s2 = 0.0
        for p in range(Pp):
            s1 += sdy[p, c]
            s2 += sdx[p, c] * rstd[p if Pg > 1 else 0, c // cg]
        if gw is not None:
            gw[c] = s2
        if gb is not None:
            gb[c] = s1


@cuda.jit
def _colsum_k(part, out):
    # IN part (B, M) float64   OUT out (M,): sums over b in index order
    B, M = part.shape
    for m in range(cuda.grid(1), M, cuda.gridsize(1)):
        s = 0.0
        for b in range(B):
            s += part[b, m]
        out[m] = s


# ------------------------------------------------------- launches (the KERNELS entries)

def _flat(kernel, n):
    """kernel configured for a grid-stride loop over n items."""
    return kernel[max(1, min(-(-n // MAX_TPB), MAX_GRID)), MAX_TPB]


def _per_row(kernel, R, M):
    """kernel configured with a block per row: threads a multiple of WARP, about M/4."""
    tpb = WARP
    while tpb < MAX_TPB and tpb * 4 < M:
        tpb *= 2
    return kernel[max(1, min(R, MAX_GRID)), tpb]


def _n_parts(P, Q, C):
    """Chunks of q per (p, c) in the channel reductions: a function of the shape only."""
    if SIMULATOR:   # ragged chunks and a real merge even on tiny test shapes
        return max(1, min(Q, 3))
    return max(1, min(-(-Q // 16), -(-(1 << 17) // max(P * C, 1))))


def rows_fwd(x, weight, bias, eps, rms, y, mean, rstd):
    _per_row(_rows_fwd_k, *x.shape)(x, weight, bias, float(eps), bool(rms), y, mean, rstd)


def rows_bwd(dy, x, mean, rstd, weight, rms, dx, dw_part, db_part):
    R, M = x.shape
    _per_row(_rows_bwd_dx_k, R, M)(dy, x, mean, rstd, weight, bool(rms), dx)
    if dw_part is not None or db_part is not None:
        B = (dw_part if dw_part is not None else db_part).shape[0]
        _flat(_rows_wgrad_part_k, B * M)(dy, x, mean, rstd, dw_part, db_part)


def rows_moments(x, mean, m2):
    _per_row(_rows_moments_k, *x.shape)(x, mean, m2)


def rows_scale_shift(x, mean, alpha, beta, y):
    _flat(_rows_scale_shift_k, x.size)(x, mean, alpha, beta, y)


def rows_dot(dy, x, mean, sum_dy, sum_dyxc):
    _per_row(_rows_dot_k, *x.shape)(dy, x, mean, sum_dy, sum_dyxc)


def rows_bwd_apply(dy, x, mean, c1, c2, c3, dx):
    _flat(_rows_bwd_apply_k, x.size)(dy, x, mean, c1, c2, c3, dx)


def channels_moments(x, mean, m2):
    P, Q, C = x.shape
    K = _n_parts(P, Q, C)
    pmean, pm2 = cuda.device_array((P, K, C)), cuda.device_array((P, K, C))
    _flat(_ch_moments_part_k, P * K * C)(x, pmean, pm2)
    _flat(_ch_moments_merge_k, P * C)(pmean, pm2, Q, mean, m2)


def channels_scale_shift(x, mean, alpha, beta, y):
    _flat(_ch_scale_shift_k, x.size)(x, mean, alpha, beta, y)


def channels_dot(dy, x, mean, sum_dy, sum_dyxc):
    P, Q, C = x.shape
    K = _n_parts(P, Q, C)
    pdy, pdx = cuda.device_array((P, K, C)), cuda.device_array((P, K, C))
    _flat(_ch_dot_part_k, P * K * C)(dy, x, mean, pdy, pdx)
    _flat(_sum_mid_k, P * C)(pdy, pdx, sum_dy, sum_dyxc)


def channels_bwd_apply(dy, x, mean, c1, c2, c3, dx):
    _flat(_ch_bwd_apply_k, x.size)(dy, x, mean, c1, c2, c3, dx)


KERNELS = {name: (globals()[name],) * 2 for name in (
    "rows_fwd", "rows_bwd", "rows_moments", "rows_scale_shift", "rows_dot", "rows_bwd_apply",
    "channels_moments", "channels_scale_shift", "channels_dot", "channels_bwd_apply")}


def set_num_threads(n):
    """The GPU has no thread count to set (the dispatcher's hook for compiled backends)."""


def get_num_threads():
    return 1


def info():
    return {"numba-cuda": numba_cuda.__version__, "simulator": SIMULATOR,
            "shuffles": USE_SHUFFLE, "warp": WARP, "threads_per_block": MAX_TPB}
