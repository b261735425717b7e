"""Channels kernels: x is (P, Q, C) C-contiguous, statistics per (p, c) over q.

Serves channels-last batch norm (1, N*S, C) and channels-last group/instance norm (N, S, C).
The inner loop runs along c (contiguous), so it vectorizes without reassociation. Q is cut
into blocks whose size depends only on the shape, never on the thread count; block partials
are merged in block order, so every thread count gives the same bits. Twins: reference.
Data is read through ``ld`` and written through ``st`` (half precision as bits: _jit.py).
"""
import numpy as np
from numba import prange

from ._jit import big, chan_merge, exact_sums, helper, kernel, ld, moments_safe, st


@helper
def block_rows(Q, C):
    """Rows per block: about 64 KiB of float64 partial work, so a block's 2nd pass hits L2."""
    return max(1, min(Q, 8192 // max(C, 1)))


@helper
def block_col_moments(xs, mu, s2):
    """Two-pass mean and M2 of each column of a block xs (n, C) held in cache -> mu, s2.

    float64 data is shifted by the block's first row in the first pass, so that a constant
    column's mean is exactly that constant (n float64 copies do not sum exactly; float32 and
    half ones do, and skip the shift), and columns whose float64 sums overflowed are redone
    by moments_safe.
    """
    n, C = xs.shape
    exact = exact_sums(xs)
    mu[:] = 0.0
    s2[:] = 0.0
    # four rows per sweep of the accumulators: a quarter of the per-row loop overhead and
    # accumulator traffic (C is often small, e.g. 64)
    n4 = n - n % 4
    first = xs[0]
    for q in range(0, n4, 4):
        r0, r1, r2, r3 = xs[q], xs[q + 1], xs[q + 2], xs[q + 3]
        for c in range(C):
            k = 0.0 if exact else np.float64(ld(first[c]))
            mu[c] += (((np.float64(ld(r0[c])) - k) + (ld(r1[c]) - k))
                      + ((np.float64(ld(r2[c])) - k) + (ld(r3[c]) - k)))
    for q in range(n4, n):
        row = xs[q]
        for c in range(C):
            k = 0.0 if exact else np.float64(ld(first[c]))
            mu[c] += np.float64(ld(row[c])) - k
    for c in range(C):
        k = 0.0 if exact else np.float64(ld(first[c]))
        mu[c] = k + mu[c] / n
    for q in range(0, n4, 4):
        r0, r1, r2, r3 = xs[q], xs[q + 1], xs[q + 2], xs[q + 3]
        for c in range(C):
            m = mu[c]
            d0, d1, d2, d3 = ld(r0[c]) - m, ld(r1[c]) - m, ld(r2[c]) - m, ld(r3[c]) - m
            s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for q in range(n4, n):
        row = xs[q]
        for c in range(C):
            d = ld(row[c]) - mu[c]
            s2[c] += d * d
    if not exact:
        for c in range(C):
            if not (np.isfinite(mu[c]) and np.isfinite(s2[c])):
                mu[c], s2[c] = moments_safe(xs[:, c])


@helper
def merge_blocks(bmean, bm2, Q, h, mean, m2):
    """Chan-merge block moments (nb, C) in block order (block b = rows [b*h, (b+1)*h))."""
    nb, C = bmean.shape
    for c in range(C):
        cnt = 0.0
        mu_ = 0.0
        s2_ = 0.0
        for b in range(nb):
            n = min(Q, (b + 1) * h) - b * h
            cnt, mu_, s2_ = chan_merge(cnt, mu_, s2_, np.float64(n), bmean[b, c], bm2[b, c])
        mean[c] = mu_ if Q > 0 else np.nan
        m2[c] = s2_ if Q > 0 else np.nan


@kernel
def channels_moments(x, mean, m2):
    # IN x (P, Q, C)   OUT mean, m2 (P, C) float64
    P, Q, C = x.shape
    h = block_rows(Q, C)
    nb = (Q + h - 1) // h
    bmean = np.empty((P, nb, C))
    bm2 = np.empty((P, nb, C))
    for t in prange(P * nb):
        p = t // nb
        b = t % nb
        block_col_moments(x[p, b * h:min(Q, (b + 1) * h)], bmean[p, b], bm2[p, b])
    # merge blocks in order (fixed, thread-count independent)
    for p in prange(P):
        merge_blocks(bmean[p], bm2[p], Q, h, mean[p], m2[p])


@kernel
def channels_fwd_grouped(x, weight, bias, eps, y, mean, rstd):
    # IN x (P, Q, C), weight/bias (C,) or None, eps   OUT y (P, Q, C), mean/rstd (P, G)
    # Instance norm (G = C) and group norm channels-last: one sample's (Q, C) slab (~800 KB
    # for 56x56x64 float32) stays in L2 (spilling into L3) between the statistics and the
    # apply, so x is read from memory once. Samples are split over threads whole.
    P, Q, C = x.shape
    G = mean.shape[1]
    K = C // G
    h = block_rows(Q, C)
    nb = (Q + h - 1) // h
    for p in prange(P):
        bmean = np.empty((nb, C))
        bm2 = np.empty((nb, C))
        for b in range(nb):
            block_col_moments(x[p, b * h:min(Q, (b + 1) * h)], bmean[b], bm2[b])
        mc = np.empty(C)
        m2c = np.empty(C)
        merge_blocks(bmean, bm2, Q, h, mc, m2c)
        m = np.empty(C)
        a = np.empty(C)
        be = np.zeros(C)
        wide = False
        for g in range(G):  # columns of a group have equal counts: reference.merge_equal
            # the average of the K column means shifted by the first: K equal means (a
            # constant group) average to that mean exactly
            m0 = mc[g * K]
            mg = 0.0
            for k in range(K):
                mg += mc[g * K + k] - m0
            mg = m0 + mg / K
            s2 = 0.0
            dev = 0.0
            for k in range(K):
                s2 += m2c[g * K + k]
                d = mc[g * K + k] - mg
                dev += d * d
            var = (s2 + Q * dev) / (Q * K)
            r64 = 1.0 / np.sqrt(max(var, 0.0) + eps if var == var else var)
            # |x - mean| <= sqrt(M2): past big(), x - mean may overflow the lanes
            wide = wide or np.sqrt(var * Q * K) > big(x)
            for k in range(K):
                c = g * K + k
                m[c] = mg
                a[c] = r64 if weight is None else r64 * weight[c]
                if bias is not None:
                    be[c] = bias[c]
            mean[p, g] = mg
            rstd[p, g] = r64
        xs = x[p]
        ys = y[p]
        for q in range(Q):
            xr = xs[q]
            yr = ys[q]
            if wide:   # this sample in float64 (never on data of a sane range)
                for c in range(C):
                    yr[c] = st(yr, (np.float64(ld(xr[c])) - m[c]) * a[c] + be[c])
                continue
            for c in range(C):
                yr[c] = st(yr, (ld(xr[c]) - m[c]) * a[c] + be[c])


@kernel
def channels_scale_shift(x, mean, alpha, beta, y):
    # IN x (P, Q, C), mean/alpha/beta (P, C) float64   OUT y = (x - mean) * alpha + beta
    P, Q, C = x.shape
    h = block_rows(Q, C)
    nb = (Q + h - 1) // h
    for t in prange(P * nb):
        p = t // nb
        b = t % nb
        m = mean[p]
        a = alpha[p]
        be = beta[p]
        xs = x[p, b * h:min(Q, (b + 1) * h)]
        ys = y[p, b * h:min(Q, (b + 1) * h)]
        for q in range(xs.shape[0]):
            xr = xs[q]
            yr = ys[q]
            for c in range(C):
                yr[c] = st(yr, (ld(xr[c]) - m[c]) * a[c] + be[c])


@kernel
def channels_dot(dy, x, mean, sum_dy, sum_dyxc):
    # IN dy, x (P, Q, C), mean (P, C) float64   OUT sum_dy, sum_dyxc (P, C) float64
    P, Q, C = x.shape
    h = block_rows(Q, C)
    nb = (Q + h - 1) // h
    bs = np.zeros((P, nb, C))
    bsx = np.zeros((P, nb, C))
    for t in prange(P * nb):
        p = t // nb
        b = t % nb
        m = mean[p]
        s = bs[p, b]
        sx = bsx[p, b]
        xs = x[p, b * h:min(Q, (b + 1) * h)]
        dys = dy[p, b * h:min(Q, (b + 1) * h)]
        n = xs.shape[0]
        n4 = n - n % 4
        for q in range(0, n4, 4):  # four rows per sweep, as in channels_moments
            x0, x1, x2, x3 = xs[q], xs[q + 1], xs[q + 2], xs[q + 3]
            g0, g1, g2, g3 = dys[q], dys[q + 1], dys[q + 2], dys[q + 3]
            for c in range(C):
                mc = m[c]
                a0, a1, a2, a3 = ld(g0[c]), ld(g1[c]), ld(g2[c]), ld(g3[c])
                s[c] += (np.float64(a0) + a1) + (np.float64(a2) + a3)
                sx[c] += ((a0 * (ld(x0[c]) - mc) + a1 * (ld(x1[c]) - mc))
                          + (a2 * (ld(x2[c]) - mc) + a3 * (ld(x3[c]) - mc)))
        for q in range(n4, n):
            xr = xs[q]
            dyr = dys[q]
            for c in range(C):
                d = np.float64(ld(dyr[c]))
                s[c] += d
                sx[c] += d * (ld(xr[c]) - m[c])
    for p in prange(P):
        sum_dy[p, :] = 0.0
        sum_dyxc[p, :] = 0.0
        for b in range(nb):
            for c in range(C):
                sum_dy[p, c] += bs[p, b, c]
                sum_dyxc[p, c] += bsx[p, b, c]


@kernel
def channels_bwd_apply(dy, x, mean, c1, c2, c3, dx):
    # IN dy, x (P, Q, C), mean/c1/c2/c3 (P, C) float64   OUT dx = c1*dy + c2*(x - mean) + c3
    P, Q, C = x.shape
    h = block_rows(Q, C)
    nb = (Q + h - 1) // h
    for t in prange(P * nb):
        p = t // nb
        b = t % nb
        m = mean[p]
        a = c1[p]
        bb = c2[p]
        cc = c3[p]
        xs = x[p, b * h:min(Q, (b + 1) * h)]
        dys = dy[p, b * h:min(Q, (b + 1) * h)]
        dxs = dx[p, b * h:min(Q, (b + 1) * h)]
        for q in range(xs.shape[0]):
            xr = xs[q]
            dyr = dys[q]
            dxr = dxs[q]
            for c in range(C):
                dxr[c] = st(dxr, a[c] * ld(dyr[c]) + bb[c] * (ld(xr[c]) - m[c]) + cc[c])


@helper
def eval_coefs(mean, var, weight, bias, eps, m, a, be):
    # IN mean/var (C,), weight/bias (C,) or None   OUT m, a, be (C,) float64: the mean,
    # rstd * weight and bias that reference.finalize gives channels_scale_shift. rstd is
    # stored before the weight multiplies it: in one expression, reassoc (fastmath) turns
    # (1 / s) * w into w / s, an ulp away from the composed form.
    C = m.shape[0]
    for c in range(C):
        m[c] = mean[c]
        a[c] = 1.0 / np.sqrt(np.float64(var[c]) + eps)
        be[c] = 0.0 if bias is None else bias[c]
    if weight is not None:
        for c in range(C):
            a[c] *= weight[c]


@kernel
def channels_eval(x, mean, var, weight, bias, eps, y):
    # IN x (Q, C), mean/var (C,), weight/bias (C,) or None, eps   OUT y (Q, C)
    # y = (x - mean) * (rstd * weight) + bias with rstd = 1 / sqrt(var + eps): the
    # coefficients once per call (the bits of the composed form), then one pass over x
    Q, C = x.shape
    m = np.empty(C)
    a = np.empty(C)
    be = np.empty(C)
    eval_coefs(mean, var, weight, bias, eps, m, a, be)
    h = block_rows(Q, C)
    nb = (Q + h - 1) // h
    for b in prange(nb):
        xs = x[b * h:min(Q, (b + 1) * h)]
        ys = y[b * h:min(Q, (b + 1) * h)]
        for q in range(xs.shape[0]):
            xr = xs[q]
            yr = ys[q]
            for c in range(C):
                yr[c] = st(yr, (ld(xr[c]) - m[c]) * a[c] + be[c])
