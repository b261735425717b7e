"""Rows kernels: x is (R, M) C-contiguous, statistics per row.

Serves layer/RMS norm (fused rows_fwd/rows_bwd, the row stays in cache between its passes)
and, through rows_moments / rows_scale_shift / rows_dot / rows_bwd_apply, every channels-first
batch/group/instance norm viewed as (N*C, S) or (N*G, C/G*S) rows. Twins: fastnorm.reference.
Data is read through ``ld`` and written through ``st`` (half precision as bits: _jit.py).
"""
import numpy as np
from numba import prange

from ._jit import big, helper, kernel, lane, lanes, ld, row_moments, st, sumsq_safe


@helper
def dot_centered(dy, x, m):
    """(sum(dy), sum(dy * (x - m))) of two contiguous 1-D arrays, float64 accumulation."""
    s = 0.0
    sx = 0.0
    for i in range(x.size):
        d = np.float64(ld(dy[i]))
        s += d
        sx += d * (ld(x[i]) - m)
    return s, sx


@helper
def split(v, like):
    """v (float64) as hi + lo in like's arithmetic type: ``(x - hi) - lo`` is exact where x
    is near v."""
    hi = lane(like, v)
    return hi, lane(like, v - hi)


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
            ss = lanes(xr)
            for i in range(M):
                v = ld(xr[i])
                ss += v * v
            var = np.float64(ss) / M
            if not np.isfinite(var):  # the lanes overflowed (|x| > ~1.8e19 in float32)
                var = sumsq_safe(xr) / M
        else:
            mu, m2 = row_moments(xr, lanes(xr))  # row in cache: x's arithmetic lanes
            var = m2 / M
        r64 = 1.0 / np.sqrt(var + eps)
        mean[r] = mu
        rstd[r] = r64
        if not rms and np.sqrt(var * M) > big(xr):
            # |x - mean| <= sqrt(M2) may pass the lanes' range (data spanning float32's):
            # this row in float64 (never on data of a sane range)
            for i in range(M):
                v = (np.float64(ld(xr[i])) - mu) * r64
                if weight is not None:
                    v *= weight[i]
                if bias is not None:
                    v += bias[i]
                yr[i] = st(yr, v)
            continue
        hi, lo = split(mu, xr)
        rs = lane(xr, r64)
        # Scalar math: y = ((x - hi) - lo) * (rstd * w) + b: the mean kept inside, no
        # cancellation (ARCHITECTURE.md §5), in x's arithmetic lanes.
        if weight is None:
            if bias is None:
                for i in range(M):
                    yr[i] = st(yr, ((ld(xr[i]) - hi) - lo) * rs)
            else:
                for i in range(M):
                    yr[i] = st(yr, ((ld(xr[i]) - hi) - lo) * rs + bias[i])
        else:
            if bias is None:
                for i in range(M):
                    yr[i] = st(yr, ((ld(xr[i]) - hi) - lo) * (rs * weight[i]))
            else:
                for i in range(M):
                    yr[i] = st(yr, ((ld(xr[i]) - hi) - lo) * (rs * weight[i]) + bias[i])


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
        mu, m2 = row_moments(xf[r], lanes(xf))   # row in cache: x's arithmetic lanes
        r64 = 1.0 / np.sqrt(m2 / (K * S) + eps)
        hi, lo = split(mu, xf)
        rs = lane(xf, r64)
        g = r % G
        wide = np.sqrt(m2) > big(xf)              # as in rows_fwd: then in float64
        for k in range(K):
            xs = x[r, k]
            ys = y[r, k]
            a = rs if weight is None else rs * weight[g, k]
            b = lanes(xf) if bias is None else bias[g, k]
            if wide:
                a64 = r64 if weight is None else r64 * weight[g, k]
                for i in range(S):
                    ys[i] = st(ys, (np.float64(ld(xs[i])) - mu) * a64 + b)
                continue
            for i in range(S):
                ys[i] = st(ys, ((ld(xs[i]) - hi) - lo) * a + b)
        mean[r] = mu
        rstd[r] = r64


@helper
def row_bwd_wide(dyr, xr, mu, rs, weight, rms, dxr, dwb, dbb):
    """One row of rows_bwd in float64 (a row whose |x - mean| may pass the lanes' range)."""
    M = xr.size
    sg = 0.0
    sgx = 0.0
    for i in range(M):
        d = np.float64(ld(dyr[i]))
        h = (np.float64(ld(xr[i])) - mu) * rs
        g = d if weight is None else d * weight[i]
        sg += g
        sgx += g * h
        if dwb is not None:
            dwb[i] += d * h
        if dbb is not None:
            dbb[i] += d
    mg = 0.0 if rms else sg / M
    mgx = sgx / M
    for i in range(M):
        d = np.float64(ld(dyr[i]))
        g = d if weight is None else d * weight[i]
        dxr[i] = st(dxr, rs * ((g - mg) - ((np.float64(ld(xr[i])) - mu) * rs) * mgx))


@kernel
def rows_bwd(dy, x, mean, rstd, weight, rms, dx, dw_part, db_part):
    # IN dy, x (R, M), mean/rstd (R,), weight (M,)|None   OUT dx (R, M),
    # dw_part/db_part (B, M) float64 | None: block b sums rows [b*R//B, (b+1)*R//B)
    R, M = x.shape
    B = dw_part.shape[0] if dw_part is not None else (
        db_part.shape[0] if db_part is not None else min(R, 64))
    # |x - mean| <= sqrt(M) * std < sqrt(M) / rstd: rows past big() in float64
    wide_rstd = np.sqrt(M) / big(x)
    for b in prange(B):
        if dw_part is not None:
            dw_part[b, :] = 0.0
        if db_part is not None:
            db_part[b, :] = 0.0
        for r in range(b * R // B, (b + 1) * R // B):
            xr = x[r]
            dyr = dy[r]
            dxr = dx[r]
            mu = mean[r]               # x's lanes: mean[r] is exactly what forward returned
            rs = rstd[r]
            # sums over the row of g = dy * w and g * xhat, xhat = (x - mean) * rstd; the
            # weight/bias gradient partials of this block ride along in the same pass
            sg = lanes(xr)
            sgx = lanes(xr)
            dwb = dw_part[b] if dw_part is not None else None
            dbb = db_part[b] if db_part is not None else None
            if rs < wide_rstd:
                row_bwd_wide(dyr, xr, np.float64(mu), np.float64(rs), weight, rms, dxr, dwb,
                             dbb)
                continue
            for i in range(M):
                d = ld(dyr[i])
                xh = (ld(xr[i]) - mu) * rs
                g = d if weight is None else d * weight[i]
                sg += g
                sgx += g * xh
                if dwb is not None:
                    dwb[i] += d * xh
                if dbb is not None:
                    dbb[i] += d
            mg = lane(xr, 0.0 if rms else np.float64(sg) / M)
            mgx = lane(xr, np.float64(sgx) / M)
            # dx = rstd * (g - mean(g) - xhat * mean(g * xhat))   (term 1, 2, 3)
            if weight is None:
                for i in range(M):
                    dxr[i] = st(dxr, rs * ((ld(dyr[i]) - mg) - ((ld(xr[i]) - mu) * rs) * mgx))
            else:
                for i in range(M):
                    dxr[i] = st(dxr, rs * ((ld(dyr[i]) * weight[i] - mg)
                                           - ((ld(xr[i]) - mu) * rs) * mgx))


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
            yr[i] = st(yr, (ld(xr[i]) - m) * a + b)


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
                dxs[i] = st(dxs, c1 * ld(dys[i]) + c2 * (ld(xs[i]) - mu) + c3)


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
            dxr[i] = st(dxr, a * ld(dyr[i]) + b * (ld(xr[i]) - m) + c)
