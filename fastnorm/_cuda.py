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
from . import reference

SIMULATOR = bool(_cuda_config.ENABLE_CUDASIM)
USE_SHUFFLE = not SIMULATOR          # warp shuffles on a GPU, shared memory in the simulator
WARP = 4 if SIMULATOR else 32        # lanes of the reduction tree
MAX_TPB = 8 if SIMULATOR else 256    # threads per block (a multiple of WARP, <= WARP**2)
MAX_GRID = 2 if SIMULATOR else 65535  # blocks per launch; kernels are grid-stride loops
SCRATCH = 1 if USE_SHUFFLE else MAX_TPB
FULL_MASK = 0xFFFFFFFF

if SIMULATOR:
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray as _DevArray
else:
    from numba.cuda.cudadrv.devicearray import DeviceNDArray as _DevArray


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
def _rows_wgrad_part_k(dy, x, mean, rstd, B, dw_part, db_part):
    # IN dy, x (R, M), mean/rstd (R,), B   OUT dw_part/db_part (B, M)|None: row block b summed
    R, M = x.shape
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
def _grouped_coefs_k(m64, m2, weight, bias, eps, n, G, mean_rk, alpha_rk, beta_rk, mean,
                     rstd):
    # IN m64/m2 (R,) row moments over n elements, weight/bias (G, K) or None
    # OUT mean_rk/alpha_rk/beta_rk (R*K,) per-segment scalars, mean/rstd (R,) x's dtype
    R = m64.shape[0]
    K = mean_rk.shape[0] // R
    for j in range(cuda.grid(1), R * K, cuda.gridsize(1)):
        r = j // K
        k = j - r * K
        rs = 1.0 / math.sqrt(max(m2[r] / n, 0.0) + eps)
        mean_rk[j] = m64[r]
        alpha_rk[j] = rs if weight is None else rs * weight[r % G, k]
        beta_rk[j] = 0.0 if bias is None else bias[r % G, k]
        if k == 0:
            mean[r] = m64[r]
            rstd[r] = rs


@cuda.jit
def _ch_grouped_coefs_k(mg, m2g, weight, bias, eps, n, mean_s, alpha_s, beta_s, mean, rstd):
    # IN mg/m2g (P, G) group moments over n elements, weight/bias (C,) or None
    # OUT mean_s/alpha_s/beta_s (P, C) per-channel scalars, mean/rstd (P, G) x's dtype
    P, C = mean_s.shape
    K = C // mg.shape[1]
    for j in range(cuda.grid(1), P * C, cuda.gridsize(1)):
        p = j // C
        c = j - p * C
        g = c // K
        rs = 1.0 / math.sqrt(max(m2g[p, g] / n, 0.0) + eps)
        mean_s[p, c] = mg[p, g]
        alpha_s[p, c] = rs if weight is None else rs * weight[c]
        beta_s[p, c] = 0.0 if bias is None else bias[c]
        if c == g * K:
            mean[p, g] = mg[p, g]
            rstd[p, g] = rs


@cuda.jit
def _expand_k(v, K, out):
    # IN v (R,)   OUT out (R*K,): out[j] = v[j // K]
    for j in range(cuda.grid(1), out.shape[0], cuda.gridsize(1)):
        out[j] = v[j // K]


@cuda.jit
def _grouped_bwd_coefs_k(sdy, sdx, mean, rstd, weight, G, K, n, c1, c2, c3, sum_dy,
                         sum_dyxh):
    # IN sdy/sdx (R*K,) segment sums of dy, dy*(x - mean); mean/rstd (R,); weight (G, K)|None
    # OUT c1/c2/c3 (R*K,) for rows_bwd_apply; sum_dy/sum_dyxh (R, K)
    R = mean.shape[0]
    for r in range(cuda.grid(1), R, cuda.gridsize(1)):
        rs = rstd[r]
        sg = 0.0
        sgx = 0.0
        for k in range(K):
            j = r * K + k
            wk = 1.0 if weight is None else weight[r % G, k]
            sum_dy[r, k] = sdy[j]
            sum_dyxh[r, k] = sdx[j] * rs
            sg += wk * sdy[j]
            sgx += wk * sdx[j] * rs
        for k in range(K):
            j = r * K + k
            c1[j] = rs if weight is None else rs * weight[r % G, k]
            c2[j] = -rs * rs * (sgx / n)
            c3[j] = -rs * (sg / n)


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
        pq = j // C               # two integer divisions per element (64-bit: not free)
        c = j - pq * C
        p = pq // Q
        q = pq - p * Q
        y[p, q, c] = (x[p, q, c] - mean[p, c]) * alpha[p, c] + beta[p, c]


@cuda.jit
def _ch_bwd_apply_k(dy, x, mean, c1, c2, c3, dx):
    # IN dy, x (P, Q, C), mean/c1/c2/c3 (P, C)   OUT dx = c1*dy + c2*(x - mean) + c3
    P, Q, C = x.shape
    for j in range(cuda.grid(1), P * Q * C, cuda.gridsize(1)):
        pq = j // C               # two integer divisions per element (64-bit: not free)
        c = j - pq * C
        p = pq // Q
        q = pq - p * Q
        dx[p, q, c] = (c1[p, c] * dy[p, q, c] + c2[p, c] * (x[p, q, c] - mean[p, c])
                       + c3[p, c])


# ----------------------------------------------- glue kernels of the public functions
# Statistics live per "unit" (Pg, G): BN (1, C), IN (N, C), GN (N, G); the apply kernels want
# per (P', C) values, P' the outer extent of the view (BN rows: A, BN channels: 1, IN/GN: N).
# Channel c belongs to group c // cg; unit row pg = p' when Pg > 1, else 0.

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


def rows_fwd_grouped(x, weight, bias, eps, y, mean, rstd):
    # composed on the device: row moments, per-segment scalars, then the rows apply
    R, K, S = x.shape
    m64, m2 = cuda.device_array(R), cuda.device_array(R)
    rows_moments(x.reshape(R, K * S), m64, m2)
    mean_rk, alpha_rk, beta_rk = (cuda.device_array(R * K) for _ in range(3))
    G = weight.shape[0] if weight is not None else (bias.shape[0] if bias is not None else 1)
    _flat(_grouped_coefs_k, R * K)(m64, m2, weight, bias, float(eps), float(K * S), G,
                                   mean_rk, alpha_rk, beta_rk, mean, rstd)
    rows_scale_shift(x.reshape(R * K, S), mean_rk, alpha_rk, beta_rk, y.reshape(R * K, S))


def rows_bwd(dy, x, mean, rstd, weight, rms, dx, dw_part, db_part):
    R, M = x.shape
    _per_row(_rows_bwd_dx_k, R, M)(dy, x, mean, rstd, weight, bool(rms), dx)
    if dw_part is not None or db_part is not None:
        B = (dw_part if dw_part is not None else db_part).shape[0]
        _flat(_rows_wgrad_part_k, B * M)(dy, x, mean, rstd, B, dw_part, db_part)


def rows_moments(x, mean, m2):
    _per_row(_rows_moments_k, *x.shape)(x, mean, m2)


def rows_scale_shift(x, mean, alpha, beta, y):
    _flat(_rows_scale_shift_k, x.size)(x, mean, alpha, beta, y)


def rows_dot(dy, x, mean, sum_dy, sum_dyxc):
    _per_row(_rows_dot_k, *x.shape)(dy, x, mean, sum_dy, sum_dyxc)


def rows_bwd_apply(dy, x, mean, c1, c2, c3, dx):
    _flat(_rows_bwd_apply_k, x.size)(dy, x, mean, c1, c2, c3, dx)


def rows_bwd_grouped(dy, x, mean, rstd, weight, dx, sum_dy, sum_dyxh):
    # composed on the device: segment sums (rows_dot on (R*K, S)), coefficients, rows apply
    R, K, S = x.shape
    G = weight.shape[0] if weight is not None else 1
    mean_rk, sdy, sdx, c1, c2, c3 = (cuda.device_array(R * K) for _ in range(6))
    _flat(_expand_k, R * K)(mean, K, mean_rk)
    rows_dot(dy.reshape(R * K, S), x.reshape(R * K, S), mean_rk, sdy, sdx)
    _flat(_grouped_bwd_coefs_k, R)(sdy, sdx, mean, rstd, weight, G, K, float(K * S),
                                   c1, c2, c3, sum_dy, sum_dyxh)
    rows_bwd_apply(dy.reshape(R * K, S), x.reshape(R * K, S), mean_rk, c1, c2, c3,
                   dx.reshape(R * K, S))


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


def channels_fwd_grouped(x, weight, bias, eps, y, mean, rstd):
    # composed on the device: per-(p, c) moments, merged into groups, then the channels apply
    P, Q, C = x.shape
    G = mean.shape[1]
    m64, m2 = cuda.device_array((P, C)), cuda.device_array((P, C))
    channels_moments(x, m64, m2)
    mg, m2g = _merge_equal(m64.reshape(P * G, C // G, 1), m2.reshape(P * G, C // G, 1), Q)
    coefs = [cuda.device_array((P, C)) for _ in range(3)]
    _flat(_ch_grouped_coefs_k, P * C)(mg.reshape(P, G), m2g.reshape(P, G), weight, bias,
                                      float(eps), float(Q * (C // G)), *coefs, mean, rstd)
    channels_scale_shift(x, *coefs, y)


KERNELS = {name: (globals()[name],) * 2 for name in reference.KERNELS}


def set_num_threads(n):
    """The GPU has no thread count to set (the dispatcher's hook for compiled backends)."""


def get_num_threads():
    return 1


def info():
    """What ``python -m fastnorm info`` prints for this backend."""
    d = {"numba-cuda": numba_cuda.__version__, "simulator": SIMULATOR,
         "shuffles": USE_SHUFFLE, "warp": WARP, "threads_per_block": MAX_TPB}
    if not SIMULATOR:
        try:
            dev = cuda.get_current_device()
            d["device"] = dev.name.decode() if isinstance(dev.name, bytes) else str(dev.name)
        except Exception as e:  # noqa: BLE001 - no driver or no GPU: say why
            d["device"] = f"none ({type(e).__name__})"
    return d


# --------------------------------------------------------------------- device arrays

def _is_dev(a):
    return isinstance(a, _DevArray) or hasattr(a, "__cuda_array_interface__")


def _dev(a):
    """a numba device array for a device-array-like (numba, CuPy, ...)."""
    return a if isinstance(a, _DevArray) else cuda.as_cuda_array(a)


def _permute(d, perm):
    """View of device array ``d`` with its axes in the order ``perm`` (no copy)."""
    if SIMULATOR:
        return d.transpose(tuple(perm))
    return _DevArray(tuple(d.shape[i] for i in perm), tuple(d.strides[i] for i in perm),
                     d.dtype, stream=d.stream, gpu_data=d.gpu_data)


def _fits(shape, strides, itemsize, perm):
    """True when the axes in the order ``perm`` are C-contiguous (size-1 axes ignored)."""
    step = itemsize
    for i in reversed(perm):
        if shape[i] != 1 and strides[i] != step:
            return False
        step *= shape[i]
    return True


def _dev_layout(x, axis, batch_outer):
    """(x as a C-contiguous device array in memory order, Layout): a copy only if needed.

    The same candidate orders as ``_geometry.layout`` (natural, channels-last,
    channels-first), judged from the strides.
    """
    ndim = x.ndim
    perms = geo._candidates(ndim, 0 if axis is None else axis)
    if axis is None:
        perms = perms[:1]
    for perm in perms:
        if _fits(x.shape, x.strides, x.dtype.itemsize, perm) and (
                not batch_outer or (perm[0] == 0 and perm.index(axis) in (1, ndim - 1))):
            return _permute(x, perm), geo.Layout(x.shape, perm)
    perm = perms[0]
    if batch_outer and axis not in (1, ndim - 1):
        perm = perms[2]
    lay = geo.Layout(x.shape, perm)
    xm = cuda.device_array([x.shape[i] for i in perm], x.dtype)
    _permute(xm, lay.inv)[...] = x      # one strided device copy
    return xm, lay


class _Call:
    """One public call: where the input lives, its layout, and moving results back."""

    def __init__(self, input, axis, batch_outer, min_ndim):
        if _is_dev(input):
            x = _dev(input)
            if np.dtype(x.dtype) not in (np.dtype(np.float32), np.dtype(np.float64)):
                raise TypeError("input must be float16, float32 or float64, "
                                f"got dtype {x.dtype}")
            if x.ndim < min_ndim:
                raise ValueError(f"input must have at least {min_ndim} dimensions, "
                                 f"got shape {tuple(x.shape)}")
            self.host = False
        else:
            x = _api._input(input, "input", min_ndim)
            self.host = True
        self.shape, self.ndim, self.T = tuple(x.shape), x.ndim, np.dtype(x.dtype)
        self.ax = None if axis is None else _api._axis(axis, x.ndim)
        self.x, self.batch_outer = x, batch_outer

    def layout(self):
        """(x in memory order on the device, Layout)."""
        if self.host:
            xw, lay = geo.layout(self.x, self.ax, self.batch_outer)
            return cuda.to_device(np.ascontiguousarray(xw.transpose(lay.perm))), lay
        return _dev_layout(self.x, self.ax, self.batch_outer)

    def like(self, a, lay, name):
        """grad_out in x's memory order on the device."""
        if _is_dev(a):
            a = _dev(a)
            if tuple(a.shape) != self.shape:
                raise ValueError(f"{name} must have the input's shape {self.shape}, "
                                 f"got {tuple(a.shape)}")
            if np.dtype(a.dtype) != self.T:
                raise TypeError(f"{name} must have the input's dtype {self.T}, got {a.dtype}")
            if _fits(a.shape, a.strides, a.dtype.itemsize, lay.perm):
                return _permute(a, lay.perm)
            am = cuda.device_array([self.shape[i] for i in lay.perm], self.T)
            _permute(am, lay.inv)[...] = a
            return am
        a = _api._input(a, name)
        if a.shape != self.shape:
            raise ValueError(f"{name} must have the input's shape {self.shape}, got {a.shape}")
        return cuda.to_device(np.ascontiguousarray(a.astype(self.T, copy=False)
                                                   .transpose(lay.perm)))

    def output(self, out, lay):
        """(y in memory order on the device to compute into, out or None)."""
        mshape = [self.shape[i] for i in lay.perm]
        if out is None:
            return cuda.device_array(mshape, self.T), None
        if _is_dev(out):
            o = _dev(out)
            if tuple(o.shape) != self.shape or np.dtype(o.dtype) != self.T:
                raise ValueError(f"out must have shape {self.shape} and dtype {self.T}, "
                                 f"got {tuple(o.shape)} and {o.dtype}")
            if _fits(o.shape, o.strides, o.dtype.itemsize, lay.perm):
                return _permute(o, lay.perm), out
            return cuda.device_array(mshape, self.T), out
        if not isinstance(out, np.ndarray):
            raise TypeError(f"out must be a numpy.ndarray or a device array, "
                            f"got {type(out).__name__}")
        if out.shape != self.shape or out.dtype != self.T:
            raise ValueError(f"out must have shape {self.shape} and dtype {self.T}, "
                             f"got {out.shape} and {out.dtype}")
        if not out.flags.writeable:
            raise ValueError("out is read-only")
        return cuda.device_array(mshape, self.T), out

    def finish(self, y, out, lay):
        """y (memory order, device) -> the array to return, in x's shape and layout."""
        if out is not None:
            if _is_dev(out):
                o = _dev(out)
                if not _fits(o.shape, o.strides, o.dtype.itemsize, lay.perm):
                    o[...] = _permute(y, lay.inv)
            else:
                out[...] = y.copy_to_host().transpose(lay.inv)
            return out
        if self.host:
            return y.copy_to_host().transpose(lay.inv)
        return _permute(y, lay.inv)

    def back(self, *arrays):
        """Statistics/gradients: device arrays stay, host calls get host arrays."""
        if not self.host:
            return arrays
        return tuple(None if a is None else a.copy_to_host() for a in arrays)


def _vec(a, name, shape, dtype):
    """weight/bias/mean/rstd on the device: None, or a float array of exactly ``shape``."""
    if a is None:
        return None
    if _is_dev(a):
        d = _dev(a)
        if np.dtype(d.dtype).kind != "f":
            raise TypeError(f"{name} must be a float array, got dtype {d.dtype}")
        if tuple(d.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(d.shape)}")
        if not _fits(d.shape, d.strides, d.dtype.itemsize, range(d.ndim)):
            c = cuda.device_array(d.shape, d.dtype)
            c[...] = d
            d = c
        return d
    return cuda.to_device(_api._param(a, name, shape, dtype))


def _running_pair(rm, rv, C, update):
    """(rm, rv) on the device and a function that writes host originals back after updates."""
    pair = []
    for a, name in ((rm, "running_mean"), (rv, "running_var")):
        if a is None or not _is_dev(a):
            pair.append(_api._running(a, name, C, update))
            continue
        d = _dev(a)
        if np.dtype(d.dtype).kind != "f":
            raise TypeError(f"{name} must be a float array, got dtype {d.dtype}")
        if tuple(d.shape) != (C,):
            raise ValueError(f"{name} must have shape ({C},), got {tuple(d.shape)}")
        pair.append(d)
    if (pair[0] is None) != (pair[1] is None):
        raise ValueError("running_mean and running_var must be given together")
    return pair


def _update_running(rm, rv, mean_g, m2_g, denom, momentum, num_batches_tracked):
    """torch's rule on the device: new = (1 - momentum) * old + momentum * batch, in place.

    Host running stats are copied over, updated and copied back into the caller's arrays.
    """
    if num_batches_tracked is not None:
        num_batches_tracked += 1
    if momentum is None:
        momentum = 1.0 / float(num_batches_tracked)
    dm, dv = [a if _is_dev(a) else cuda.to_device(np.ascontiguousarray(a)) for a in (rm, rv)]
    dm, dv = _dev(dm), _dev(dv)
    if not _fits(dm.shape, dm.strides, dm.dtype.itemsize, (0,)) or not _fits(
            dv.shape, dv.strides, dv.dtype.itemsize, (0,)):
        raise ValueError("running_mean and running_var device arrays must be contiguous")
    _flat(_running_k, mean_g.shape[1])(mean_g, m2_g, float(denom), float(momentum), dm, dv)
    for a, d in ((rm, dm), (rv, dv)):
        if not _is_dev(a):
            a[...] = d.copy_to_host()


def _spread(v, cg, Pp, C):
    out = cuda.device_array((Pp, C))
    _flat(_spread_k, Pp * C)(v, cg, out)
    return out


def _via_host(fn, args, kw, running=()):
    """float16 or empty input: the NumPy path on host copies, results moved back."""
    device = any(_is_dev(a) for a in args)
    hargs = [_dev(a).copy_to_host() if _is_dev(a) else a for a in args]
    out = kw.get("out")
    if out is not None and _is_dev(out):
        kw = dict(kw, out=None)
    res = getattr(_api, fn)(*hargs, **dict(kw, backend="numpy"))
    if out is not None and _is_dev(out):
        y = res[0] if isinstance(res, tuple) else res
        _dev(out)[...] = cuda.to_device(np.ascontiguousarray(y))
        res = (out,) + res[1:] if isinstance(res, tuple) else out
    for i in running:
        if _is_dev(args[i]):
            _dev(args[i]).copy_to_device(hargs[i])
    if not device:
        return res

    def to_dev(r):
        return r if r is None or _is_dev(r) else cuda.to_device(np.ascontiguousarray(r))
    return tuple(map(to_dev, res)) if isinstance(res, tuple) else to_dev(res)


def _needs_host(input):
    x = _dev(input) if _is_dev(input) else np.asarray(input)
    return x.size == 0 or np.dtype(x.dtype) == np.float16


def _flat_if(kind, a):
    """(P', C) per-unit values as the kernel wants them: rows (P'*C,), channels (P', C)."""
    return a.reshape(a.size) if kind == "rows" else a


def _apply_forward(kind, xv, yv, mean_g, m2_g, count, eps, training, w, b, cg, Pp, C, Po, T):
    """y = (x - mean) * (rstd * w) + b from unit statistics; returns mean, rstd (Po, G) in T."""
    G = C // cg
    mean_s, alpha_s, beta_s = (cuda.device_array((Pp, C)) for _ in range(3))
    mean_out, rstd_out = cuda.device_array((Po, G), T), cuda.device_array((Po, G), T)
    _flat(_finalize_k, Pp * C)(mean_g, m2_g, float(count), eps, training, w, b, cg,
                               mean_s, alpha_s, beta_s, mean_out, rstd_out)
    KERNELS[kind + "_scale_shift"][0](xv, *[_flat_if(kind, a) for a in (mean_s, alpha_s, beta_s)],
                                      yv)
    return mean_out, rstd_out


def _unit_backward(kind, dyv, xv, dxv, mean, rstd, w, cg, Pp, C, n, training, has_bias, T):
    """dx into dxv and (grad_weight, grad_bias) for unit statistics mean/rstd (Pg, G)."""
    Pg, G = mean.shape
    mean_s = _spread(mean, cg, Pp, C)
    sdy, sdx = cuda.device_array((Pp, C)), cuda.device_array((Pp, C))
    KERNELS[kind + "_dot"][0](dyv, xv, _flat_if(kind, mean_s), _flat_if(kind, sdy),
                              _flat_if(kind, sdx))
    sg, sgx = cuda.device_array((Pg, G)), cuda.device_array((Pg, G))
    _flat(_group_sums_k, Pg * G)(sdy, sdx, w, cg, sg, sgx)
    c1, c2, c3 = (cuda.device_array((Pp, C)) for _ in range(3))
    _flat(_bwd_coefs_k, Pp * C)(w, rstd, sg, sgx, float(n), bool(training), cg, c1, c2, c3)
    KERNELS[kind + "_bwd_apply"][0](dyv, xv, _flat_if(kind, mean_s),
                                    *[_flat_if(kind, c) for c in (c1, c2, c3)], dxv)
    gw = None if w is None else cuda.device_array(C, T)
    gb = cuda.device_array(C, T) if has_bias else None
    if gw is not None or gb is not None:
        _flat(_wgrad_k, C)(sdy, sdx, rstd, cg, gw, gb)
    return gw, gb


def _moments(kind, xv, P, C):
    """float64 (mean, m2) as (P, C): rows (P*C,) reshaped, channels as they come."""
    mean, m2 = cuda.device_array((P, C)), cuda.device_array((P, C))
    KERNELS[kind + "_moments"][0](xv, _flat_if(kind, mean), _flat_if(kind, m2))
    return mean, m2


def _merge_equal(mean, m2, count):
    """(P1, K, P2) groups of equal count -> (P1, P2) (the device twin of geo.merge_equal)."""
    P1, K, P2 = mean.shape
    om, oq = cuda.device_array((P1, P2)), cuda.device_array((P1, P2))
    # the chunk merge with Q = K * count: every chunk holds exactly ``count`` elements
    _flat(_ch_moments_merge_k, P1 * P2)(mean, m2, K * int(count), om, oq)
    return om, oq


# ------------------------------------------------------------------- public functions

def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False,
               momentum=0.1, eps=1e-5, *, axis=1, out=None, return_stats=False,
               num_batches_tracked=None, backend=None):
    """Device twin of :func:`fastnorm.batch_norm` (same arguments and semantics)."""
    args = (input, running_mean, running_var, weight, bias, training, momentum, eps)
    if _needs_host(input):
        return _via_host("batch_norm", args, dict(
            axis=axis, out=out, return_stats=return_stats,
            num_batches_tracked=num_batches_tracked), running=(1, 2))
    call = _Call(input, axis, False, 2)
    ax, T = call.ax, call.T
    C = call.shape[ax]
    w = _vec(weight, "weight", (C,), np.float64)
    b = _vec(bias, "bias", (C,), np.float64)
    rm, rv = _running_pair(running_mean, running_var, C, training)
    eps = _api._eps(eps)
    count = math.prod(call.shape) // C
    if training:
        if count == 1:
            raise ValueError("Expected more than 1 value per channel when training, "
                             f"got input size {call.shape}")
        if rm is not None:
            _api._momentum(momentum, num_batches_tracked)
    elif rm is None:
        raise ValueError("running_mean and running_var are required when training=False")
    xd, lay = call.layout()
    kind, shape, A = geo.batch_geometry(lay, ax)
    y, final = call.output(out, lay)
    xv, yv = xd.reshape(shape), y.reshape(shape)
    Pp = A if kind == "rows" else 1
    if training:
        mean_g, m2_g = _moments(kind, xv, Pp, C)
        if kind == "rows":   # (A, C) rows of count/A elements: merge over A
            mean_g, m2_g = _merge_equal(mean_g.reshape(1, A, C), m2_g.reshape(1, A, C),
                                        count // A)
        if rm is not None:
            _update_running(rm, rv, mean_g, m2_g, count - 1, momentum, num_batches_tracked)
        mean_o, rstd_o = _apply_forward(kind, xv, yv, mean_g, m2_g, count, eps, True, w, b,
                                        1, Pp, C, 1, T)
    else:
        rmd, rvd = (_dev(a) if _is_dev(a) else cuda.to_device(np.ascontiguousarray(a))
                    for a in (rm, rv))
        mean_o, rstd_o = _apply_forward(kind, xv, yv, rmd.reshape(1, C), rvd.reshape(1, C), 1,
                                        eps, False, w, b, 1, Pp, C, 1, T)
    y = call.finish(y, final, lay)
    if not return_stats:
        return y
    return (y,) + call.back(mean_o.reshape(C), rstd_o.reshape(C))


def batch_norm_backward(grad_out, input, mean, rstd, weight=None, training=True, *, axis=1,
                        has_bias=True, backend=None):
    """Device twin of :func:`fastnorm.batch_norm_backward`."""
    if _needs_host(input):
        return _via_host("batch_norm_backward", (grad_out, input, mean, rstd, weight, training),
                         dict(axis=axis, has_bias=has_bias))
    call = _Call(input, axis, False, 2)
    ax, T = call.ax, call.T
    C = call.shape[ax]
    mean = _vec(mean, "mean", (C,), np.float64)
    rstd = _vec(rstd, "rstd", (C,), np.float64)
    w = _vec(weight, "weight", (C,), np.float64)
    xd, lay = call.layout()
    dyd = call.like(grad_out, lay, "grad_out")
    kind, shape, A = geo.batch_geometry(lay, ax)
    dx = cuda.device_array([call.shape[i] for i in lay.perm], T)
    Pp = A if kind == "rows" else 1
    count = math.prod(call.shape) // C
    gw, gb = _unit_backward(kind, dyd.reshape(shape), xd.reshape(shape), dx.reshape(shape),
                            mean.reshape(1, C), rstd.reshape(1, C), w, 1, Pp, C, count,
                            training, has_bias, T)
    return (call.finish(dx, None, lay),) + call.back(gw, gb)


def _nc_view(call, lay):
    kind, N, C, S = geo.instance_geometry(lay, call.ax)
    shape = (N * C, S) if kind == "rows" else (N, S, C)
    return kind, N, C, S, shape


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None,
                  use_input_stats=True, momentum=0.1, eps=1e-5, *, axis=1, out=None,
                  return_stats=False, num_batches_tracked=None, backend=None):
    """Device twin of :func:`fastnorm.instance_norm`."""
    args = (input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    if _needs_host(input):
        return _via_host("instance_norm", args, dict(
            axis=axis, out=out, return_stats=return_stats,
            num_batches_tracked=num_batches_tracked), running=(1, 2))
    call = _Call(input, axis, True, 2)
    if call.ax == 0:
        raise ValueError("axis must be the channel axis, not the batch axis 0")
    C, T = call.shape[call.ax], call.T
    w = _vec(weight, "weight", (C,), np.float64)
    b = _vec(bias, "bias", (C,), np.float64)
    update = use_input_stats and running_mean is not None
    rm, rv = _running_pair(running_mean, running_var, C, update)
    eps = _api._eps(eps)
    if not use_input_stats and rm is None:
        raise ValueError("running_mean and running_var are required when "
                         "use_input_stats=False")
    if update:
        _api._momentum(momentum, num_batches_tracked)
    xd, lay = call.layout()
    kind, N, C, S, shape = _nc_view(call, lay)
    if use_input_stats and S == 1:
        raise ValueError("Expected more than 1 spatial element when training, "
                         f"got input size {call.shape}")
    y, final = call.output(out, lay)
    xv, yv = xd.reshape(shape), y.reshape(shape)
    if use_input_stats:
        mean_g, m2_g = _moments(kind, xv, N, C)
        if update:
            _update_running(rm, rv, mean_g, m2_g, S - 1, momentum, num_batches_tracked)
        mean_o, rstd_o = _apply_forward(kind, xv, yv, mean_g, m2_g, S, eps, True, w, b, 1,
                                        N, C, N, T)
    else:
        rmd, rvd = (_dev(a) if _is_dev(a) else cuda.to_device(np.ascontiguousarray(a))
                    for a in (rm, rv))
        mean_o, rstd_o = _apply_forward(kind, xv, yv, rmd.reshape(1, C), rvd.reshape(1, C), 1,
                                        eps, False, w, b, 1, N, C, N, T)
    y = call.finish(y, final, lay)
    return (y,) + call.back(mean_o, rstd_o) if return_stats else y


def _nc_backward(grad_out, input, mean, rstd, weight, axis, has_bias, groups, training):
    """Shared backward of instance norm (groups=None) and group norm (groups=G)."""
    call = _Call(input, axis, True, 2)
    xd, lay = call.layout()
    kind, N, C, S, shape = _nc_view(call, lay)
    G = C if groups is None else groups
    mean = _vec(mean, "mean", (N, G), np.float64)
    rstd = _vec(rstd, "rstd", (N, G), np.float64)
    w = _vec(weight, "weight", (C,), np.float64)
    dyd = call.like(grad_out, lay, "grad_out")
    dx = cuda.device_array([call.shape[i] for i in lay.perm], call.T)
    cg = C // G
    gw, gb = _unit_backward(kind, dyd.reshape(shape), xd.reshape(shape), dx.reshape(shape),
                            mean, rstd, w, cg, N, C, cg * S, training, has_bias, call.T)
    return (call.finish(dx, None, lay),) + call.back(gw, gb)


def instance_norm_backward(grad_out, input, mean, rstd, weight=None, use_input_stats=True, *,
                           axis=1, has_bias=True, backend=None):
    """Device twin of :func:`fastnorm.instance_norm_backward`."""
    if _needs_host(input):
        return _via_host("instance_norm_backward",
                         (grad_out, input, mean, rstd, weight, use_input_stats),
                         dict(axis=axis, has_bias=has_bias))
    return _nc_backward(grad_out, input, mean, rstd, weight, axis, has_bias, None,
                        use_input_stats)


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, *, axis=1, out=None,
               return_stats=False, backend=None):
    """Device twin of :func:`fastnorm.group_norm`."""
    if _needs_host(input):
        return _via_host("group_norm", (input, num_groups, weight, bias, eps),
                         dict(axis=axis, out=out, return_stats=return_stats))
    call = _Call(input, axis, True, 2)
    if call.ax == 0:
        raise ValueError("axis must be the channel axis, not the batch axis 0")
    C, T = call.shape[call.ax], call.T
    G = _api._groups(num_groups, C, call.shape)
    w = _vec(weight, "weight", (C,), np.float64)
    b = _vec(bias, "bias", (C,), np.float64)
    eps = _api._eps(eps)
    xd, lay = call.layout()
    kind, N, C, S, shape = _nc_view(call, lay)
    y, final = call.output(out, lay)
    cg = C // G
    if kind == "rows":   # statistics on (N*G, C/G*S) rows: a reshape of (N*C, S)
        mean_g, m2_g = _moments("rows", xd.reshape(N * G, cg * S), N, G)
    else:                # per (n, c) columns, merged into groups of C/G columns
        mean_c, m2_c = _moments("channels", xd.reshape(shape), N, C)
        mean_g, m2_g = _merge_equal(mean_c.reshape(N * G, cg, 1), m2_c.reshape(N * G, cg, 1), S)
        mean_g, m2_g = mean_g.reshape(N, G), m2_g.reshape(N, G)
    mean_o, rstd_o = _apply_forward(kind, xd.reshape(shape), y.reshape(shape), mean_g, m2_g,
                                    cg * S, eps, True, w, b, cg, N, C, N, T)
    y = call.finish(y, final, lay)
    return (y,) + call.back(mean_o, rstd_o) if return_stats else y


def group_norm_backward(grad_out, input, mean, rstd, weight=None, *, num_groups, axis=1,
                        has_bias=True, backend=None):
    """Device twin of :func:`fastnorm.group_norm_backward`."""
    if _needs_host(input):
        return _via_host("group_norm_backward", (grad_out, input, mean, rstd, weight),
                         dict(num_groups=num_groups, axis=axis, has_bias=has_bias))
    shape = tuple(_dev(input).shape if _is_dev(input) else np.shape(input))
    C = shape[_api._axis(axis, len(shape))] if len(shape) >= 2 else 0
    G = _api._groups(num_groups, C, shape)
    return _nc_backward(grad_out, input, mean, rstd, weight, axis, has_bias, G, True)


# --------------------------------------------------------------------- layer / RMS norm

class _Shape:
    """Just enough of an array for ``api._rows_shape``: ndim and shape."""

    def __init__(self, shape):
        self.shape, self.ndim = tuple(shape), len(shape)


def _rows_forward(input, normalized_shape, weight, bias, eps, rms, out, return_stats):
    call = _Call(input, None, False, 1)
    ns, lead, R, M = _api._rows_shape(_Shape(call.shape), normalized_shape)
    T = call.T
    w = _vec(weight, "weight", ns, T)
    b = _vec(bias, "bias", ns, T)
    eps = _api._eps(eps)
    xd, lay = call.layout()
    y, final = call.output(out, lay)
    mean, rstd = cuda.device_array(R, T), cuda.device_array(R, T)
    rows_fwd(xd.reshape(R, M), None if w is None else w.reshape(M),
             None if b is None else b.reshape(M), eps, rms, y.reshape(R, M), mean, rstd)
    y = call.finish(y, final, lay)
    if not return_stats:
        return y
    if rms:
        return (y,) + call.back(rstd.reshape(lead))
    return (y,) + call.back(mean.reshape(lead), rstd.reshape(lead))


def _rows_backward(grad_out, input, mean, rstd, weight, normalized_shape, rms, has_bias):
    call = _Call(input, None, False, 1)
    T = call.T
    if normalized_shape is None:
        rank = len(rstd.shape) if _is_dev(rstd) else np.ndim(rstd)
        normalized_shape = call.shape[rank:]
    ns, lead, R, M = _api._rows_shape(_Shape(call.shape), normalized_shape)
    if rms:
        mean = cuda.to_device(np.zeros(R, T))
    else:
        mean = _vec(mean, "mean", lead, T).reshape(R)
    rstd = _vec(rstd, "rstd", lead, T).reshape(R)
    w = _vec(weight, "weight", ns, T)
    xd, lay = call.layout()
    dyd = call.like(grad_out, lay, "grad_out")
    dx = cuda.device_array(xd.shape, T)
    B = _api._row_blocks(R)
    dw_part = None if w is None else cuda.device_array((B, M))
    db_part = cuda.device_array((B, M)) if has_bias else None
    rows_bwd(dyd.reshape(R, M), xd.reshape(R, M), mean, rstd,
             None if w is None else w.reshape(M), rms, dx.reshape(R, M), dw_part, db_part)
    grads = []
    for part in (dw_part, db_part):
        if part is None:
            grads.append(None)
        else:
            g = cuda.device_array(M, T)
            _flat(_colsum_k, M)(part, g)
            grads.append(g.reshape(ns))
    return (call.finish(dx, None, lay),) + call.back(*grads)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, out=None,
               return_stats=False, backend=None):
    """Device twin of :func:`fastnorm.layer_norm`."""
    if _needs_host(input):
        return _via_host("layer_norm", (input, normalized_shape, weight, bias, eps),
                         dict(out=out, return_stats=return_stats))
    return _rows_forward(input, normalized_shape, weight, bias, eps, False, out, return_stats)


def layer_norm_backward(grad_out, input, mean, rstd, weight=None, *, normalized_shape=None,
                        has_bias=True, backend=None):
    """Device twin of :func:`fastnorm.layer_norm_backward`."""
    if _needs_host(input):
        return _via_host("layer_norm_backward", (grad_out, input, mean, rstd, weight),
                         dict(normalized_shape=normalized_shape, has_bias=has_bias))
    return _rows_backward(grad_out, input, mean, rstd, weight, normalized_shape, False,
                          has_bias)


def rms_norm(input, normalized_shape, weight=None, eps=None, *, out=None, return_stats=False,
             backend=None):
    """Device twin of :func:`fastnorm.rms_norm` (``eps=None``: the dtype's machine epsilon)."""
    if _needs_host(input):
        return _via_host("rms_norm", (input, normalized_shape, weight, eps),
                         dict(out=out, return_stats=return_stats))
    if eps is None:
        dt = _dev(input).dtype if _is_dev(input) else _api._input(input).dtype
        eps = float(np.finfo(dt).eps)
    return _rows_forward(input, normalized_shape, weight, None, eps, True, out, return_stats)


def rms_norm_backward(grad_out, input, rstd, weight=None, *, normalized_shape=None,
                      backend=None):
    """Device twin of :func:`fastnorm.rms_norm_backward`."""
    if _needs_host(input):
        return _via_host("rms_norm_backward", (grad_out, input, rstd, weight),
                         dict(normalized_shape=normalized_shape))
    gx, gw, _ = _rows_backward(grad_out, input, None, rstd, weight, normalized_shape, True,
                               False)
    return gx, gw
