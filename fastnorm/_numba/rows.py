"""Rows kernels: x is (R, M) C-contiguous, statistics per row.

Serves layer/RMS norm (fused rows_fwd/rows_bwd, the row stays in cache between its passes)
and, through rows_moments / rows_scale_shift / rows_dot / rows_bwd_apply, every channels-first
batch/group/instance norm viewed as (N*C, S) or (N*G, C/G*S) rows. Twins: fastnorm.reference.
"""
import numpy as np
from numba import prange

from ._jit import helper, kernel, row_moments


@helper
def dot_centered(dy, x, m):
    """(sum(dy), sum(dy * (x - m))) of two contiguous 1-D arrays, float64 accumulation."""
    s = 0.0
    sx = 0.0
    for i in range(x.size):
        d = np.float64(dy[i])
        s += d
        sx += d * (x[i] - m)
    return s, sx


@helper
def split(v, like):
    """v (float64) as hi + lo in x's dtype: ``(x - hi) - lo`` is exact where x is near v."""
    hi = like.dtype.type(v)
    return hi, like.dtype.type(v - hi)


@kernel
def rows_fwd(x, weight, bias, eps, rms, y, mean, rstd):
    # IN x (R, M), weight/bias (M,) or None, eps, rms   OUT y (R, M), mean/rstd (R,)
    # The row stays in L1/L2 between its passes: one read of x from memory, one write of y.
    R, M = x.shape
    for r in prange(R):
        xr = x[r]
        yr = y[r]
        if rms:
            mu = 0.0
            ss = xr.dtype.type(0)
            for i in range(M):
                ss += xr[i] * xr[i]
            var = np.float64(ss) / M
        else:
            mu, m2 = row_moments(xr, xr.dtype.type(0))  # row in cache: dtype lanes
            var = m2 / M
        r64 = 1.0 / np.sqrt(var + eps)
        hi, lo = split(mu, xr)
        rs = xr.dtype.type(r64)
        # Scalar math: y = ((x - hi) - lo) * (rstd * w) + b: the mean kept inside, no
        # cancellation (ARCHITECTURE.md §5), in x's dtype lanes.
        if weight is None:
            if bias is None:
                for i in range(M):
                    yr[i] = ((xr[i] - hi) - lo) * rs
            else:
                for i in range(M):
                    yr[i] = ((xr[i] - hi) - lo) * rs + bias[i]
        else:
            if bias is None:
                for i in range(M):
                    yr[i] = ((xr[i] - hi) - lo) * (rs * weight[i])
            else:
                for i in range(M):
                    yr[i] = ((xr[i] - hi) - lo) * (rs * weight[i]) + bias[i]
        mean[r] = mu
        rstd[r] = r64


@kernel
def rows_fwd_grouped(x, weight, bias, eps, y, mean, rstd):
    # IN x (R, K, S), weight/bias (G, K) or None, eps   OUT y (R, K, S), mean/rstd (R,)
    # Instance norm (N*C, 1, S) and group norm (N*G, C/G, S), channels-first: the row of a
    # (sample, group) is read from memory once, as in rows_fwd; channel k of row r is scaled
    # by weight[r % G, k].
    R, K, S = x.shape
    G = weight.shape[0] if weight is not None else (bias.shape[0] if bias is not None else 1)
    xf = x.reshape(R, K * S)
    for r in prange(R):
        mu, m2 = row_moments(xf[r], xf.dtype.type(0))   # row in cache: dtype lanes
        r64 = 1.0 / np.sqrt(m2 / (K * S) + eps)
        hi, lo = split(mu, xf)
        rs = xf.dtype.type(r64)
        g = r % G
        for k in range(K):
            xs = x[r, k]
            ys = y[r, k]
            a = rs if weight is None else rs * weight[g, k]
            b = xf.dtype.type(0) if bias is None else bias[g, k]
            for i in range(S):
                ys[i] = ((xs[i] - hi) - lo) * a + b
        mean[r] = mu
        rstd[r] = r64


@kernel
def rows_bwd(dy, x, mean, rstd, weight, rms, dx, dw_part, db_part):
    # IN dy, x (R, M), mean/rstd (R,), weight (M,)|None   OUT dx (R, M),
    # dw_part/db_part (B, M) float64 | None: block b sums rows [b*R//B, (b+1)*R//B)
    R, M = x.shape
    B = dw_part.shape[0] if dw_part is not None else (
        db_part.shape[0] if db_part is not None else min(R, 64))
    for b in prange(B):
        if dw_part is not None:
            dw_part[b, :] = 0.0
        if db_part is not None:
            db_part[b, :] = 0.0
        for r in range(b * R // B, (b + 1) * R // B):
            xr = x[r]
            dyr = dy[r]
            dxr = dx[r]
            mu = mean[r]               # x's dtype: mean[r] is exactly what forward returned
            rs = rstd[r]
            # sums over the row of g = dy * w and g * xhat, xhat = (x - mean) * rstd; the
            # weight/bias gradient partials of this block ride along in the same pass
            sg = xr.dtype.type(0)
            sgx = xr.dtype.type(0)
            dwb = dw_part[b] if dw_part is not None else None
            dbb = db_part[b] if db_part is not None else None
            for i in range(M):
                xh = (xr[i] - mu) * rs
                g = dyr[i] if weight is None else dyr[i] * weight[i]
                sg += g
                sgx += g * xh
                if dwb is not None:
                    dwb[i] += dyr[i] * xh
                if dbb is not None:
                    dbb[i] += dyr[i]
            mg = xr.dtype.type(0.0 if rms else np.float64(sg) / M)
            mgx = xr.dtype.type(np.float64(sgx) / M)
            # dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (term 1, 2, 3)
            if weight is None:
                for i in range(M):
                    dxr[i] = rs * ((dyr[i] - mg) - ((xr[i] - mu) * rs) * mgx)
            else:
                for i in range(M):
                    dxr[i] = rs * ((dyr[i] * weight[i] - mg) - ((xr[i] - mu) * rs) * mgx)


@kernel
def rows_moments(x, mean, m2):
    # IN x (R, M)   OUT mean, m2 (R,) float64
    R = x.shape[0]
    for r in prange(R):
        mean[r], m2[r] = row_moments(x[r], 0.0)  # memory-bound: float64 is free


@kernel
def rows_scale_shift(x, mean, alpha, beta, y):
    # IN x (R, M), mean/alpha/beta (R,) float64   OUT y = (x - mean) * alpha + beta
    R, M = x.shape
    for r in prange(R):
        xr = x[r]
        yr = y[r]
        m = mean[r]
        a = alpha[r]
        b = beta[r]
        for i in range(M):
            yr[i] = (xr[i] - m) * a + b


@kernel
def rows_dot(dy, x, mean, sum_dy, sum_dyxc):
    # IN dy, x (R, M), mean (R,) float64   OUT sum_dy, sum_dyxc (R,) float64
    R, M = x.shape
    for r in prange(R):
        xr = x[r]
        dyr = dy[r]
        sum_dy[r], sum_dyxc[r] = dot_centered(dyr, xr, mean[r])


@kernel
def rows_bwd_grouped(dy, x, mean, rstd, weight, dx, sum_dy, sum_dyxh):
    # IN dy, x (R, K, S), mean/rstd (R,) float64, weight (G, K) float64 or None
    # OUT dx (R, K, S), sum_dy/sum_dyxh (R, K) float64: per segment sums of dy, dy * xhat
    # The backward of rows_fwd_grouped: a (sample, group) row is read from memory once (its
    # sums, then dx from cache), where rows_dot + rows_bwd_apply read it twice.
    R, K, S = x.shape
    G = weight.shape[0] if weight is not None else 1
    M = K * S
    for r in prange(R):
        mu = mean[r]
        rs = rstd[r]
        g = r % G
        sg = 0.0
        sgx = 0.0
        for k in range(K):
            s, t = dot_centered(dy[r, k], x[r, k], mu)
            wk = 1.0 if weight is None else weight[g, k]
            sum_dy[r, k] = s
            sum_dyxh[r, k] = t * rs
            sg += wk * s
            sgx += wk * t * rs
        # dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) = c1*dy + c2*(x - mean) + c3
        c2 = -rs * rs * (sgx / M)
        c3 = -rs * (sg / M)
        for k in range(K):
            c1 = rs if weight is None else rs * weight[g, k]
            xs = x[r, k]
            dys = dy[r, k]
            dxs = dx[r, k]
            for i in range(S):
                dxs[i] = c1 * dys[i] + c2 * (xs[i] - mu) + c3


@kernel
def rows_bwd_apply(dy, x, mean, c1, c2, c3, dx):
    # IN dy, x (R, M), mean/c1/c2/c3 (R,) float64   OUT dx = c1*dy + c2*(x - mean) + c3
    R, M = x.shape
    for r in prange(R):
        xr = x[r]
        dyr = dy[r]
        dxr = dx[r]
        m = mean[r]
        a = c1[r]
        b = c2[r]
        c = c3[r]
        for i in range(M):
            dxr[i] = a * dyr[i] + b * (xr[i] - m) + c
