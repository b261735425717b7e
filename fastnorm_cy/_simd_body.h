/* Kernel bodies for one data type; included four times per instruction set by _simd_isa.h.
 * Data (x, y, dy, dx) is stored as FN_S and computed as FN_T: float/float, double/double,
 * and for float16 and bfloat16 uint16_t bits computed in float32 lanes, converted on every
 * load (FN_LD1, FN_LDV, FN_LD8) and store (FN_STS, FN_STV, FN_ST8): no array is converted
 * whole. Per-row statistics and weights are FN_T; moments and sums float64.
 * Shapes were checked by the caller (_kernels.pyx); every array is C-contiguous.
 * Names end in FN_SUF (_f32 / _f64 / _f16 / _bf16). Twins: fastnorm/reference.py,
 * fastnorm/_numba/. FN_RESTRICT marks private partial buffers and per-channel coefficients:
 * they never overlap the data or outputs (x and y may be the same array, so those are not
 * marked). */

/* ------------------------------------------------------------------ per-row helpers */

/* Reductions run in four independent vector accumulators (FN_VEC): one accumulator makes
 * every add wait for the previous one (3-4 cycles per vector), which is slower than memory
 * when the block is in cache. The order of the additions depends on n only. */

/* Mean and M2 of n values at stride st, when a fast path's were not finite. Values near the
 * dtype's largest (issue 15), all finite: the two passes again in float64 on x * 2^-e, e
 * the exponent of max |x| (scaling by a power of two is exact), then scaled back -- the mean
 * is then finite, and M2 too unless it is beyond float64 (only float64 data gets there).
 * Data holding inf or NaN: NumPy's answer, mean = sum / n (inf or NaN) and M2 NaN. Never
 * taken on finite data whose sums fit, so it costs the fast paths one test per block. */
FN_TARGET static void FN_NAME(fn_moments_safe)(const FN_S *x, ptrdiff_t n, ptrdiff_t st,
                                               double *mu, double *m2)
{
    double amax = 0.0, sc, s = 0.0, t = 0.0, q = 0.0, m;
    ptrdiff_t i;
    int e, bad = 0;
    for (i = 0; i < n; i++) {
        const double v = (double)FN_LD1(x + i * st);
        s += v;
        bad |= !isfinite(v);
        amax = fabs(v) > amax ? fabs(v) : amax;
    }
    if (bad) { /* inf or NaN in the data */
        *mu = s / (double)n;
        *m2 = NAN;
        return;
    }
    s = 0.0;
    frexp(amax, &e);
    sc = ldexp(1.0, -e);
    for (i = 0; i < n; i++)
        s += (double)FN_LD1(x + i * st) * sc;
    m = s / (double)n;
    for (i = 0; i < n; i++) { /* corrected two-pass, as fn_block_moments_lanes */
        const double d = (double)FN_LD1(x + i * st) * sc - m;
        t += d;
        q += d * d;
    }
    q -= t * t / (double)n;
    *mu = (m + t / (double)n) / sc;
    *m2 = (q < 0.0 ? 0.0 : q) / sc / sc;
}

/* Mean and M2 of a short contiguous block: two-pass, float64 accumulation. For float64 data
 * the second pass also sums d = x - m and the mean is corrected to m + sum(d)/n: a constant
 * block's mean is then exactly that constant (its output exactly beta; issue 15) where the
 * rounded sum of n float64 copies is not (n copies of a float32 or half value sum exactly in
 * float64, n < 2^29, and skip it). M2 stays the sum of d*d, the bits it had. */
FN_TARGET FN_INLINE void FN_NAME(fn_block_moments)(const FN_S *x, ptrdiff_t n, double *mu,
                                                   double *m2)
{
    double s = 0.0, q = 0.0, t = 0.0, m;
    ptrdiff_t i = 0;
#if FN_VEC
    FN_VD a0 = FN_SPLAT(0), a1 = a0, a2 = a0, a3 = a0, mv;
    for (; i + 4 * FN_LD <= n; i += 4 * FN_LD) {
        a0 += FN_LD8(x + i);
        a1 += FN_LD8(x + i + FN_LD);
        a2 += FN_LD8(x + i + 2 * FN_LD);
        a3 += FN_LD8(x + i + 3 * FN_LD);
    }
    a0 = (a0 + a1) + (a2 + a3);
    s = FN_HSUM(double, FN_LD, a0);
#endif
    for (; i < n; i++)
        s += (double)FN_LD1(x + i);
    m = s / (double)n;
    i = 0;
#if FN_VEC
    mv = FN_SPLAT(m);
    a0 = a1 = a2 = a3 = FN_SPLAT(0);
#if FN_EXACT_SUMS
    for (; i + 4 * FN_LD <= n; i += 4 * FN_LD) {
        FN_PREFETCH(x + n + i, 4 * FN_LD * sizeof(FN_S));
        const FN_VD d0 = FN_LD8(x + i) - mv, d1 = FN_LD8(x + i + FN_LD) - mv;
        const FN_VD d2 = FN_LD8(x + i + 2 * FN_LD) - mv, d3 = FN_LD8(x + i + 3 * FN_LD) - mv;
        a0 += d0 * d0;
        a1 += d1 * d1;
        a2 += d2 * d2;
        a3 += d3 * d3;
    }
#else
    FN_VD b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    for (; i + 4 * FN_LD <= n; i += 4 * FN_LD) {
        FN_PREFETCH(x + n + i, 4 * FN_LD * sizeof(FN_S));
        const FN_VD d0 = FN_LD8(x + i) - mv, d1 = FN_LD8(x + i + FN_LD) - mv;
        const FN_VD d2 = FN_LD8(x + i + 2 * FN_LD) - mv, d3 = FN_LD8(x + i + 3 * FN_LD) - mv;
        a0 += d0 * d0;
        a1 += d1 * d1;
        a2 += d2 * d2;
        a3 += d3 * d3;
        b0 += d0;
        b1 += d1;
        b2 += d2;
        b3 += d3;
    }
    b0 = (b0 + b1) + (b2 + b3);
    t = FN_HSUM(double, FN_LD, b0);
#endif
    a0 = (a0 + a1) + (a2 + a3);
    q = FN_HSUM(double, FN_LD, a0);
#endif
    for (; i < n; i++) {
        double d = (double)FN_LD1(x + i) - m;
        q += d * d;
        t += d;
    }
    *mu = FN_EXACT_SUMS ? m : m + t / (double)n;
    *m2 = q;
    if (!FN_EXACT_SUMS && !(isfinite(*mu) && isfinite(q))) /* float64 beyond ~1e154 */
        FN_NAME(fn_moments_safe)(x, n, 1, mu, m2);
}

/* s = sum(dy), t = sum(dy * (x - m)) over n contiguous values, float64 accumulation in two
 * independent vector accumulators per sum (rows_dot, rows_bwd_grouped) */
FN_TARGET FN_INLINE void FN_NAME(fn_dot_centered)(const FN_S *dy, const FN_S *x, ptrdiff_t n,
                                                  double m, double *s, double *t)
{
    double a = 0.0, b = 0.0;
    ptrdiff_t i = 0;
#if FN_VEC
    FN_VD a0 = FN_SPLAT(0), a1 = a0, b0 = a0, b1 = a0, mv = FN_SPLAT(m);
    for (; i + 2 * FN_LD <= n; i += 2 * FN_LD) {
        const FN_VD g0 = FN_LD8(dy + i), g1 = FN_LD8(dy + i + FN_LD);
        a0 += g0;
        a1 += g1;
        b0 += g0 * (FN_LD8(x + i) - mv);
        b1 += g1 * (FN_LD8(x + i + FN_LD) - mv);
    }
    a0 += a1;
    b0 += b1;
    a = FN_HSUM(double, FN_LD, a0);
    b = FN_HSUM(double, FN_LD, b0);
#endif
    for (; i < n; i++) {
        const double d = (double)FN_LD1(dy + i);
        a += d;
        b += d * ((double)FN_LD1(x + i) - m);
    }
    *s = a;
    *t = b;
}

/* ------------------------------------------------------------------ rows kernels */

/* Corrected two-pass mean and M2 of a block in FN_T lanes, for a row held in cache (layer
 * norm): pilot mean, then sums of d = x - pilot and d*d, corrected (Chan, Golub & LeVeque).
 * The float accumulators only hold deviations, so twice the SIMD width of double costs
 * ~1e-7 relative; the same arithmetic as fastnorm/_numba/_jit.py block_moments. */
FN_TARGET FN_INLINE void FN_NAME(fn_block_moments_lanes)(const FN_S *x, ptrdiff_t n, double *mu,
                                                         double *m2)
{
    FN_T s = 0, s1 = 0, s2 = 0, pilot;
    double q;
    ptrdiff_t i;
#pragma omp simd reduction(+:s)
    for (i = 0; i < n; i++)
        s += FN_LD1(x + i);
    pilot = (FN_T)((double)s / (double)n);
    FN_PREFETCH(x + n, n * sizeof(FN_S)); /* the next block (row), while this one is in L1 */
#pragma omp simd reduction(+:s1, s2)
    for (i = 0; i < n; i++) {
        const FN_T d = FN_LD1(x + i) - pilot;
        s1 += d;
        s2 += d * d;
    }
    /* an inf in the block: the mean is that inf (or NaN), as NumPy */
    *mu = isfinite(pilot) ? (double)pilot + (double)s1 / (double)n : (double)pilot;
    q = (double)s2 - (double)s1 * (double)s1 / (double)n;
    *m2 = q < 0.0 ? 0.0 : q; /* clamp, but let NaN through */
    if (!(isfinite(*mu) && isfinite(*m2))) /* FN_T sums overflowed, or inf/NaN data */
        FN_NAME(fn_moments_safe)(x, n, 1, mu, m2);
}

/* fn_block_moments_lanes for a block of 256 or more (a layer-norm or group-norm row): four
 * vector accumulators in the first pass and two pairs in the second, which keep the adds
 * independent (rows_fwd on 512x768 float32 in cache: 0.82-0.89x the time of the one-chain
 * version); shorter blocks keep the short set-up. Same arithmetic. */
FN_TARGET FN_INLINE void FN_NAME(fn_block_moments_lanes_long)(const FN_S *x, ptrdiff_t n,
                                                              double *mu, double *m2)
{
    FN_T s = 0, s1 = 0, s2 = 0, pilot;
    double q;
    ptrdiff_t i = 0;
#if FN_VEC
    const FN_VT zero = {0};
    FN_VT a0 = zero, a1 = zero, a2 = zero, a3 = zero, b0, b1, pv;
    for (; i + 4 * FN_VN <= n; i += 4 * FN_VN) {
        a0 += FN_LDV(x + i);
        a1 += FN_LDV(x + i + FN_VN);
        a2 += FN_LDV(x + i + 2 * FN_VN);
        a3 += FN_LDV(x + i + 3 * FN_VN);
    }
    a0 = (a0 + a1) + (a2 + a3);
    s = FN_HSUM(FN_T, FN_VN, a0);
#endif
    for (; i < n; i++)
        s += FN_LD1(x + i);
    pilot = (FN_T)((double)s / (double)n);
    i = 0;
#if FN_VEC
    pv = zero + pilot;
    a0 = a1 = b0 = b1 = zero;
    for (; i + 2 * FN_VN <= n; i += 2 * FN_VN) {
        FN_PREFETCH(x + n + i, 2 * FN_VN * sizeof(FN_S)); /* the next block, as above */
        const FN_VT d0 = FN_LDV(x + i) - pv, d1 = FN_LDV(x + i + FN_VN) - pv;
        a0 += d0;
        a1 += d1;
        b0 += d0 * d0;
        b1 += d1 * d1;
    }
    a0 += a1;
    b0 += b1;
    s1 = FN_HSUM(FN_T, FN_VN, a0);
    s2 = FN_HSUM(FN_T, FN_VN, b0);
#endif
    for (; i < n; i++) {
        const FN_T d = FN_LD1(x + i) - pilot;
        s1 += d;
        s2 += d * d;
    }
    *mu = isfinite(pilot) ? (double)pilot + (double)s1 / (double)n : (double)pilot;
    q = (double)s2 - (double)s1 * (double)s1 / (double)n;
    *m2 = q < 0.0 ? 0.0 : q; /* clamp, but let NaN through */
    if (!(isfinite(*mu) && isfinite(*m2))) /* FN_T sums overflowed, or inf/NaN data */
        FN_NAME(fn_moments_safe)(x, n, 1, mu, m2);
}

/* Mean and M2 of a contiguous row: blocks of FN_BLOCK merged left to right (Chan); each
 * block in FN_T lanes (``lanes``: a row held in cache) or with float64 accumulation. Half
 * precision always takes the explicit vectors of the long form (the short form's omp simd
 * loops would convert element by element). */
FN_TARGET FN_INLINE void FN_NAME(fn_row_moments)(const FN_S *x, ptrdiff_t n, int lanes, double *mu,
                                                 double *m2)
{
    double cnt = 0.0, mean = 0.0, s2 = 0.0, mb, m2b;
    ptrdiff_t lo, nb;
    for (lo = 0; lo < n || lo == 0; lo += FN_BLOCK) {
        nb = n - lo < FN_BLOCK ? n - lo : FN_BLOCK;
        if (lanes && (nb >= 256 || FN_HALF))
            FN_NAME(fn_block_moments_lanes_long)(x + lo, nb, &mb, &m2b);
        else if (lanes)
            FN_NAME(fn_block_moments_lanes)(x + lo, nb, &mb, &m2b);
        else
            FN_NAME(fn_block_moments)(x + lo, nb, &mb, &m2b);
        if (n <= FN_BLOCK) { /* one block: no merge */
            *mu = mb;
            *m2 = m2b;
            return;
        }
        fn_chan_merge(&cnt, &mean, &s2, (double)nb, mb, m2b);
    }
    *mu = mean;
    *m2 = s2;
}

/* rows_fwd on rows [lo, hi): the row stays in cache between its passes (one read of x,
 * one write of y), so the arithmetic runs in FN_T lanes: the mean split as hi + lo,
 * y = ((x - hi) - lo) * (rstd * w) + b, as fastnorm/_numba/rows.py.
 * IN x (R, M), w/b (M,) or NULL, eps, rms   OUT y (R, M), mean/rstd (R,) */
/* Sum of squares of n contiguous values in float64, scaled by a power of two as
 * fn_moments_safe: RMS norm's fallback when the FN_T lanes overflowed. */
FN_TARGET static double FN_NAME(fn_sumsq_safe)(const FN_S *x, ptrdiff_t n)
{
    double amax = 0.0, sc, q = 0.0;
    ptrdiff_t i;
    int e;
    for (i = 0; i < n; i++) {
        const double v = fabs((double)FN_LD1(x + i));
        amax = v > amax ? v : amax;
    }
    if (!isfinite(amax)) { /* inf or NaN in the row: the plain sum (inf or NaN) */
        for (i = 0; i < n; i++)
            q += (double)FN_LD1(x + i) * (double)FN_LD1(x + i);
        return q;
    }
    frexp(amax, &e);
    sc = ldexp(1.0, -e);
    for (i = 0; i < n; i++) {
        const double v = (double)FN_LD1(x + i) * sc;
        q += v * v;
    }
    return q / sc / sc;
}

FN_TARGET static void FN_NAME(fn_rows_fwd)(const FN_S *x, ptrdiff_t M, const FN_T *w,
                                           const FN_T *b, double eps, int rms, FN_S *y,
                                           FN_T *mean, FN_T *rstd, ptrdiff_t lo, ptrdiff_t hi)
{
    ptrdiff_t r, i;
    for (r = lo; r < hi; r++) {
        const FN_S *xr = x + r * M;
        FN_S *yr = y + r * M;
        double mu, var, rs64;
        FN_T mhi, mlo, rs;
        if (rms) {
            FN_T ss = 0;
            i = 0;
#if FN_VEC
            {   /* four independent accumulators; meanwhile fetch the next row */
                const FN_VT zero = {0};
                FN_VT a0 = zero, a1 = zero, a2 = zero, a3 = zero;
                for (; i + 4 * FN_VN <= M; i += 4 * FN_VN) {
                    const FN_VT v0 = FN_LDV(xr + i), v1 = FN_LDV(xr + i + FN_VN);
                    const FN_VT v2 = FN_LDV(xr + i + 2 * FN_VN);
                    const FN_VT v3 = FN_LDV(xr + i + 3 * FN_VN);
                    FN_PREFETCH(xr + M + i, 4 * FN_VN * sizeof(FN_S));
                    a0 += v0 * v0;
                    a1 += v1 * v1;
                    a2 += v2 * v2;
                    a3 += v3 * v3;
                }
                a0 = (a0 + a1) + (a2 + a3);
                ss = FN_HSUM(FN_T, FN_VN, a0);
            }
#endif
            double st = 0.0; /* the rest (the whole row without vectors) in float64 */
            for (; i < M; i++)
                st += (double)FN_LD1(xr + i) * (double)FN_LD1(xr + i);
            mu = 0.0;
            var = ((double)ss + st) / (double)M;
            if (!isfinite(var)) /* the FN_T squares overflowed (|x| > ~1.8e19 in float32) */
                var = FN_NAME(fn_sumsq_safe)(xr, M) / (double)M;
        } else {
            double m2;
            FN_NAME(fn_row_moments)(xr, M, 1, &mu, &m2);
            var = m2 / (double)M;
        }
        rs64 = 1.0 / sqrt(var + eps);
        if (!rms && sqrt(var * (double)M) > FN_T_BIG) {
            /* |x - mean| <= sqrt(M2) may pass FN_T's range (data spanning float32's):
             * this row in float64, element by element (never on data of a sane range) */
            for (i = 0; i < M; i++)
                yr[i] = FN_STS(((double)FN_LD1(xr + i) - mu) * rs64 * (w ? (double)w[i] : 1.0)
                               + (b ? (double)b[i] : 0.0));
            mean[r] = (FN_T)mu;
            rstd[r] = (FN_T)rs64;
            continue;
        }
        mhi = (FN_T)mu;
        mlo = (FN_T)(mu - (double)mhi);
        rs = (FN_T)rs64;
#if FN_HALF /* explicit vectors: omp simd would convert element by element */
        if (w == NULL && b == NULL)
            FN_APPLYV(i, M, yr, ((FN_LDV(xr + i) - FN_SPLATV(mhi)) - FN_SPLATV(mlo))
                                * FN_SPLATV(rs),
                      ((FN_LD1(xr + i) - mhi) - mlo) * rs, 0);
        else if (w == NULL)
            FN_APPLYV(i, M, yr, ((FN_LDV(xr + i) - FN_SPLATV(mhi)) - FN_SPLATV(mlo))
                                * FN_SPLATV(rs) + FN_LDT(b + i),
                      ((FN_LD1(xr + i) - mhi) - mlo) * rs + b[i], 0);
        else if (b == NULL)
            FN_APPLYV(i, M, yr, ((FN_LDV(xr + i) - FN_SPLATV(mhi)) - FN_SPLATV(mlo))
                                * (FN_SPLATV(rs) * FN_LDT(w + i)),
                      ((FN_LD1(xr + i) - mhi) - mlo) * (rs * w[i]), 0);
        else
            FN_APPLYV(i, M, yr, ((FN_LDV(xr + i) - FN_SPLATV(mhi)) - FN_SPLATV(mlo))
                                * (FN_SPLATV(rs) * FN_LDT(w + i)) + FN_LDT(b + i),
                      ((FN_LD1(xr + i) - mhi) - mlo) * (rs * w[i]) + b[i], 0);
#else
        if (w == NULL && b == NULL) {
#pragma omp simd
            for (i = 0; i < M; i++)
                yr[i] = ((xr[i] - mhi) - mlo) * rs;
        } else if (w == NULL) {
#pragma omp simd
            for (i = 0; i < M; i++)
                yr[i] = ((xr[i] - mhi) - mlo) * rs + b[i];
        } else if (b == NULL) {
#pragma omp simd
            for (i = 0; i < M; i++)
                yr[i] = ((xr[i] - mhi) - mlo) * (rs * w[i]);
        } else {
#pragma omp simd
            for (i = 0; i < M; i++)
                yr[i] = ((xr[i] - mhi) - mlo) * (rs * w[i]) + b[i];
        }
#endif
        mean[r] = (FN_T)mu;
        rstd[r] = (FN_T)rs64;
    }
}

/* rows_fwd_grouped on rows [lo, hi): instance/group norm channels-first, the row of a
 * (sample, group) read from memory once, statistics and apply in FN_T lanes (as
 * fastnorm/_numba); channel k of row r scaled by w[(r % G) * K + k].
 * IN x (R, K, S), w/b (G, K) or NULL, eps   OUT y (R, K, S), mean/rstd (R,) */
FN_TARGET static void FN_NAME(fn_rows_fwd_grouped)(const FN_S *x, ptrdiff_t K, ptrdiff_t S,
                                                   ptrdiff_t G, const FN_T *w, const FN_T *b,
                                                   double eps, FN_S *y, FN_T *mean,
                                                   FN_T *rstd, ptrdiff_t lo, ptrdiff_t hi,
                                                   int nts)
{
    ptrdiff_t r, k, i, M = K * S;
    for (r = lo; r < hi; r++) {
        const FN_S *xr = x + r * M;
        FN_S *yr = y + r * M;
        const ptrdiff_t g = r % G;
        double mu, m2, var, rs;
        FN_NAME(fn_row_moments)(xr, M, 1, &mu, &m2); /* row in cache: FN_T lanes */
        var = m2 / (double)M;
        if (var < 0.0) /* clamp, but let NaN through */
            var = 0.0;
        rs = 1.0 / sqrt(var + eps);
        const FN_T mh = (FN_T)mu, ml = (FN_T)(mu - (double)mh);
        const int wide = sqrt(var * (double)M) > FN_T_BIG; /* as in fn_rows_fwd */
        for (k = 0; wide && k < K; k++) {
            const double a = w ? rs * (double)w[g * K + k] : rs, c = b ? b[g * K + k] : 0.0;
            for (i = 0; i < S; i++)
                yr[k * S + i] = FN_STS(((double)FN_LD1(xr + k * S + i) - mu) * a + c);
        }
        for (k = 0; !wide && k < K; k++) {
            const FN_S *xs = xr + k * S;
            FN_S *ys = yr + k * S;
            const FN_T a = (FN_T)(w ? rs * (double)w[g * K + k] : rs);
            const FN_T c = b ? b[g * K + k] : (FN_T)0;
            FN_APPLYV(i, S, ys, ((FN_LDV(xs + i) - FN_SPLATV(mh)) - FN_SPLATV(ml))
                                * FN_SPLATV(a) + FN_SPLATV(c),
                      ((FN_LD1(xs + i) - mh) - ml) * a + c, nts);
        }
        mean[r] = (FN_T)mu;
        rstd[r] = (FN_T)rs;
    }
    if (nts)
        FN_SFENCE();
}

/* rows_bwd on rows [lo, hi) of one block; adds the block's weight/bias sums into dwb/dbb.
 * The rows are in cache: one pass for the sums (FN_T lanes) and the weight/bias partials
 * (float64), one for dx (FN_T lanes), as fastnorm/_numba/rows.py, FN_BWD_ROWS rows at a time.
 * IN dy, x (R, M), mean/rstd (R,), w (M,) or NULL, rms
 * OUT dx (R, M); dwb/dbb (M,) float64 or NULL, zeroed by the caller */
/* dx of one row from its sums: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) */
FN_TARGET FN_INLINE void FN_NAME(fn_rows_bwd_dx)(const FN_S *dyr, const FN_S *xr, const FN_T *w,
                                                 FN_T mu, FN_T rs, FN_T mg, FN_T mgx, ptrdiff_t M,
                                                 FN_S *dxr, int nts)
{
    ptrdiff_t i;
    if (w == NULL)
        FN_APPLYV(i, M, dxr, FN_SPLATV(rs) * ((FN_LDV(dyr + i) - FN_SPLATV(mg))
                                              - ((FN_LDV(xr + i) - FN_SPLATV(mu))
                                                 * FN_SPLATV(rs)) * FN_SPLATV(mgx)),
                  rs * ((FN_LD1(dyr + i) - mg) - ((FN_LD1(xr + i) - mu) * rs) * mgx), nts);
    else
        FN_APPLYV(i, M, dxr, FN_SPLATV(rs) * ((FN_LDV(dyr + i) * FN_LDT(w + i)
                                               - FN_SPLATV(mg))
                                              - ((FN_LDV(xr + i) - FN_SPLATV(mu))
                                                 * FN_SPLATV(rs)) * FN_SPLATV(mgx)),
                  rs * ((FN_LD1(dyr + i) * w[i] - mg) - ((FN_LD1(xr + i) - mu) * rs) * mgx),
                  nts);
}

/* rows [r, r + nr) of rows_bwd, nr <= FN_BWD_ROWS: one pass over them (in cache for the
 * next) sums g = dy * w and g * xhat, xhat = (x - mean) * rstd, per row in FN_T lanes as
 * fastnorm/_numba, and adds their share of the weight/bias gradients to the float64 partials
 * at once (the partials are read and written once per group of rows instead of once per
 * row), while prefetching the next group; then dx row by row from cache. */
FN_TARGET FN_INLINE void FN_NAME(fn_rows_bwd_group)(const FN_S *dy, const FN_S *x,
                                                    const FN_T *mean, const FN_T *rstd,
                                                    const FN_T *w, int rms, ptrdiff_t M, FN_S *dx,
                                                    double *FN_RESTRICT dwb,
                                                    double *FN_RESTRICT dbb, ptrdiff_t r, int nr,
                                                    int nts)
{
    const FN_S *xr[FN_BWD_ROWS], *dyr[FN_BWD_ROWS];
    FN_T mu[FN_BWD_ROWS], rs[FN_BWD_ROWS], sg[FN_BWD_ROWS], sgx[FN_BWD_ROWS];
    ptrdiff_t i = 0;
    int k;
    for (k = 0; k < nr; k++) {
        sg[k] = sgx[k] = 0;
        xr[k] = x + (r + k) * M;
        dyr[k] = dy + (r + k) * M;
        mu[k] = mean[r + k];
        rs[k] = rstd[r + k];
    }
#if FN_VEC
    {
        const FN_VT zero = {0};
        FN_VT a[FN_BWD_ROWS], bq[FN_BWD_ROWS], muv[FN_BWD_ROWS], rsv[FN_BWD_ROWS];
        for (k = 0; k < nr; k++) {
            a[k] = bq[k] = zero;
            muv[k] = zero + mu[k];
            rsv[k] = zero + rs[k];
        }
        for (; i + FN_VN <= M; i += FN_VN) {
            FN_VT d[FN_BWD_ROWS], h[FN_BWD_ROWS], pdh = zero, pd = zero;
            const FN_VT wv = w ? FN_LDT(w + i) : zero;
#pragma GCC unroll 4
            for (k = 0; k < nr; k++) {
                FN_PREFETCH(dyr[k] + nr * M + i, FN_VN * sizeof(FN_S));
                FN_PREFETCH(xr[k] + nr * M + i, FN_VN * sizeof(FN_S));
                d[k] = FN_LDV(dyr[k] + i);
                h[k] = (FN_LDV(xr[k] + i) - muv[k]) * rsv[k];
                const FN_VT g = w ? d[k] * wv : d[k];
                a[k] += g;
                bq[k] += g * h[k];
                pdh += d[k] * h[k];
                pd += d[k];
            }
            if (dwb != NULL)
                FN_ACC64(dwb + i, pdh);
            if (dbb != NULL)
                FN_ACC64(dbb + i, pd);
        }
        for (k = 0; k < nr; k++) {
            sg[k] = FN_HSUM(FN_T, FN_VN, a[k]);
            sgx[k] = FN_HSUM(FN_T, FN_VN, bq[k]);
        }
    }
#endif
    for (; i < M; i++) {
        FN_T pd = 0, pdh = 0;
        for (k = 0; k < nr; k++) {
            const FN_T d = FN_LD1(dyr[k] + i), h = (FN_LD1(xr[k] + i) - mu[k]) * rs[k];
            const FN_T g = w ? d * w[i] : d;
            sg[k] += g;
            sgx[k] += g * h;
            pd += d;
            pdh += d * h;
        }
        if (dwb != NULL)
            dwb[i] += (double)pdh;
        if (dbb != NULL)
            dbb[i] += (double)pd;
    }
    for (k = 0; k < nr; k++)
        FN_NAME(fn_rows_bwd_dx)(dyr[k], xr[k], w, mu[k], rs[k],
                                rms ? (FN_T)0 : (FN_T)((double)sg[k] / (double)M),
                                (FN_T)((double)sgx[k] / (double)M), M, dx + (r + k) * M, nts);
}

/* One row of rows_bwd in float64, element by element: a row whose |x - mean| may pass
 * FN_T's range (see fn_rows_bwd); never taken on data of a sane range. */
FN_TARGET static void FN_NAME(fn_rows_bwd_wide)(const FN_S *dyr, const FN_S *xr, double mu,
                                                double rs, const FN_T *w, int rms,
                                                ptrdiff_t M, FN_S *dxr,
                                                double *FN_RESTRICT dwb,
                                                double *FN_RESTRICT dbb)
{
    double sg = 0.0, sgx = 0.0, mg, mgx;
    ptrdiff_t i;
    for (i = 0; i < M; i++) {
        const double d = (double)FN_LD1(dyr + i), h = ((double)FN_LD1(xr + i) - mu) * rs;
        const double g = w ? d * (double)w[i] : d;
        sg += g;
        sgx += g * h;
        if (dwb != NULL)
            dwb[i] += d * h;
        if (dbb != NULL)
            dbb[i] += d;
    }
    mg = rms ? 0.0 : sg / (double)M;
    mgx = sgx / (double)M;
    for (i = 0; i < M; i++) {
        const double d = (double)FN_LD1(dyr + i), h = ((double)FN_LD1(xr + i) - mu) * rs;
        dxr[i] = FN_STS(rs * (((w ? d * (double)w[i] : d) - mg) - h * mgx));
    }
}

FN_TARGET static void FN_NAME(fn_rows_bwd)(const FN_S *dy, const FN_S *x, const FN_T *mean,
                                           const FN_T *rstd, const FN_T *w, int rms,
                                           ptrdiff_t M, FN_S *dx, double *FN_RESTRICT dwb,
                                           double *FN_RESTRICT dbb,
                                           ptrdiff_t lo, ptrdiff_t hi, int nts)
{
    /* |x - mean| <= sqrt(M) * std < sqrt(M) / rstd: past FN_T_BIG, x - mean may overflow
     * FN_T (data spanning float32's range); such rows go through fn_rows_bwd_wide */
    const double big = FN_T_BIG / sqrt((double)M);
    ptrdiff_t r = lo, k;
    for (; r + FN_BWD_ROWS <= hi; r += FN_BWD_ROWS) { /* nr a constant: the k loops unroll */
        int wide = 0;
        for (k = 0; k < FN_BWD_ROWS; k++)
            wide |= (double)rstd[r + k] * big < 1.0;
        if (!wide) {
            FN_NAME(fn_rows_bwd_group)(dy, x, mean, rstd, w, rms, M, dx, dwb, dbb, r,
                                       FN_BWD_ROWS, nts);
            continue;
        }
        for (k = 0; k < FN_BWD_ROWS; k++)
            if ((double)rstd[r + k] * big < 1.0)
                FN_NAME(fn_rows_bwd_wide)(dy + (r + k) * M, x + (r + k) * M, mean[r + k],
                                          rstd[r + k], w, rms, M, dx + (r + k) * M, dwb, dbb);
            else
                FN_NAME(fn_rows_bwd_group)(dy, x, mean, rstd, w, rms, M, dx, dwb, dbb, r + k,
                                           1, nts);
    }
    for (; r < hi; r++) /* the last rows of the range, one at a time */
        if ((double)rstd[r] * big < 1.0)
            FN_NAME(fn_rows_bwd_wide)(dy + r * M, x + r * M, mean[r], rstd[r], w, rms, M,
                                      dx + r * M, dwb, dbb);
        else
            FN_NAME(fn_rows_bwd_group)(dy, x, mean, rstd, w, rms, M, dx, dwb, dbb, r, 1, nts);
    if (nts)
        FN_SFENCE();
}

/* rows_moments on rows [lo, hi).   IN x (R, M)   OUT mean, m2 (R,) float64 */
FN_TARGET static void FN_NAME(fn_rows_moments)(const FN_S *x, ptrdiff_t M, double *mean,
                                               double *m2, ptrdiff_t lo, ptrdiff_t hi)
{
    ptrdiff_t r;
    for (r = lo; r < hi; r++)
        FN_NAME(fn_row_moments)(x + r * M, M, 0, mean + r, m2 + r);
}

/* rows_scale_shift on rows [lo, hi).
 * IN x (R, M), mean/alpha/beta (R,) float64   OUT y = (x - mean) * alpha + beta */
FN_TARGET static void FN_NAME(fn_rows_scale_shift)(const FN_S *x, ptrdiff_t M,
                                                   const double *mean, const double *alpha,
                                                   const double *beta, FN_S *y,
                                                   ptrdiff_t lo, ptrdiff_t hi, int nts)
{
    ptrdiff_t r, i;
    for (r = lo; r < hi; r++) {
        const FN_S *xr = x + r * M;
        FN_S *yr = y + r * M;
        const FN_T mh = (FN_T)mean[r], ml = (FN_T)(mean[r] - (double)mh);
        const FN_T a = (FN_T)alpha[r], b = (FN_T)beta[r];
        FN_APPLYV(i, M, yr, ((FN_LDV(xr + i) - FN_SPLATV(mh)) - FN_SPLATV(ml)) * FN_SPLATV(a)
                            + FN_SPLATV(b),
                  ((FN_LD1(xr + i) - mh) - ml) * a + b, nts);
    }
    if (nts)
        FN_SFENCE();
}

/* rows_dot on rows [lo, hi).
 * IN dy, x (R, M), mean (R,) float64   OUT sum_dy, sum_dyxc (R,) float64 */
FN_TARGET static void FN_NAME(fn_rows_dot)(const FN_S *dy, const FN_S *x, ptrdiff_t M,
                                           const double *mean, double *sum_dy,
                                           double *sum_dyxc, ptrdiff_t lo, ptrdiff_t hi)
{
    ptrdiff_t r;
    for (r = lo; r < hi; r++) {
        const FN_S *xr = x + r * M, *dyr = dy + r * M;
        FN_NAME(fn_dot_centered)(dyr, xr, M, mean[r], sum_dy + r, sum_dyxc + r);
    }
}

/* rows_bwd_apply on rows [lo, hi).
 * IN dy, x (R, M), mean/c1/c2/c3 (R,) float64   OUT dx = c1*dy + c2*(x - mean) + c3 */
FN_TARGET static void FN_NAME(fn_rows_bwd_apply)(const FN_S *dy, const FN_S *x, ptrdiff_t M,
                                                 const double *mean, const double *c1,
                                                 const double *c2, const double *c3,
                                                 FN_S *dx, ptrdiff_t lo, ptrdiff_t hi,
                                                 int nts)
{
    ptrdiff_t r, i;
    for (r = lo; r < hi; r++) {
        const FN_S *xr = x + r * M, *dyr = dy + r * M;
        FN_S *dxr = dx + r * M;
        double m = mean[r], a = c1[r], b = c2[r], c = c3[r];
        FN_APPLY(i, M, dxr, FN_SPLAT(a) * FN_LD8(dyr + i)
                            + FN_SPLAT(b) * (FN_LD8(xr + i) - FN_SPLAT(m)) + FN_SPLAT(c),
                 a * (double)FN_LD1(dyr + i) + b * ((double)FN_LD1(xr + i) - m) + c, nts);
    }
    if (nts)
        FN_SFENCE();
}

/* rows_bwd_grouped on rows [lo, hi): the backward of rows_fwd_grouped. A (sample, group) row
 * is read from memory once: its segment sums, then dx from cache (rows_dot + rows_bwd_apply
 * read it twice). Sums in float64 (two vector accumulators each), dx = c1*dy + c2*(x - mean)
 * + c3 in float64 lanes as fn_rows_bwd_apply, as fastnorm/_numba/rows.py.
 * IN dy, x (R, K, S), mean/rstd (R,) float64, w (G, K) float64 or NULL
 * OUT dx (R, K, S); sdy, sdxh (R, K) float64: per segment sums of dy and dy * xhat */
FN_TARGET static void FN_NAME(fn_rows_bwd_grouped)(const FN_S *dy, const FN_S *x,
                                                   ptrdiff_t K, ptrdiff_t S, ptrdiff_t G,
                                                   const double *mean, const double *rstd,
                                                   const double *w, FN_S *dx, double *sdy,
                                                   double *sdxh, ptrdiff_t lo, ptrdiff_t hi,
                                                   int nts)
{
    ptrdiff_t r, k, i, M = K * S;
    for (r = lo; r < hi; r++) {
        const double mu = mean[r], rs = rstd[r];
        const ptrdiff_t g = r % G;
        double sg = 0.0, sgx = 0.0, c2, c3;
        for (k = 0; k < K; k++) {
            const FN_S *xs = x + r * M + k * S, *dys = dy + r * M + k * S;
            double s, t;
            const double wk = w ? w[g * K + k] : 1.0;
            FN_NAME(fn_dot_centered)(dys, xs, S, mu, &s, &t);
            sdy[r * K + k] = s;
            sdxh[r * K + k] = t * rs;
            sg += wk * s;
            sgx += wk * t * rs;
        }
        /* dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) = c1*dy + c2*(x - mean) + c3 */
        c2 = -rs * rs * (sgx / (double)M);
        c3 = -rs * (sg / (double)M);
        for (k = 0; k < K; k++) {
            const double c1 = w ? rs * w[g * K + k] : rs;
            ptrdiff_t i0;
            /* from cache, 256 elements at a time, each chunk fetching the next row's */
            for (i0 = 0; i0 < S; i0 += 256) {
                const ptrdiff_t n = S - i0 < 256 ? S - i0 : 256, o = r * M + k * S + i0;
                const FN_S *xs = x + o, *dys = dy + o;
                FN_S *dxs = dx + o;
                if (r + 1 < hi) {
                    FN_PREFETCH(xs + M, n * sizeof(FN_S));
                    FN_PREFETCH(dys + M, n * sizeof(FN_S));
                }
                FN_APPLY(i, n, dxs, FN_SPLAT(c1) * FN_LD8(dys + i)
                                    + FN_SPLAT(c2) * (FN_LD8(xs + i) - FN_SPLAT(mu))
                                    + FN_SPLAT(c3),
                         c1 * (double)FN_LD1(dys + i) + c2 * ((double)FN_LD1(xs + i) - mu)
                         + c3, nts);
            }
        }
    }
    if (nts)
        FN_SFENCE();
}

/* ------------------------------------------------------------------ channels kernels
 * One call = one block of n rows of width C (rows q of x[p], contiguous). The inner loop
 * runs along c, so it vectorizes without reassociating anything. */

/* Column sums over the n rows of a block, W (a compile-time multiple of 8, <= 64) columns
 * from c0, with W/8 vector accumulators per sum held in registers for the whole block; the
 * remaining columns (C % 8) one by one. Rows are added in order, so the result depends on
 * the block only. */
#define FN_CH_COLS_DO(W, BODY) do { \
        switch (W) { \
        case 8: BODY(8); break; \
        case 16: BODY(16); break; \
        case 24: BODY(24); break; \
        case 32: BODY(32); break; \
        case 40: BODY(40); break; \
        case 48: BODY(48); break; \
        case 56: BODY(56); break; \
        case 64: BODY(64); break; \
        } \
    } while (0)

/* IN x block (n, C)   OUT mu, s2 (C,) float64: the block's mean and M2 per column, two
 * passes (the block is in L1 for the second), float64 accumulation; for float64 data the
 * mean corrected by the second pass's sum of deviations (a constant column's mean exact, as
 * fn_block_moments) and, where its sums overflowed, recomputed scaled (fn_moments_safe) */
FN_TARGET static void FN_NAME(fn_channels_moments)(const FN_S *x, ptrdiff_t n, ptrdiff_t C,
                                                   double *FN_RESTRICT mu,
                                                   double *FN_RESTRICT s2)
{
    ptrdiff_t q, c, c0 = 0;
#if FN_VEC
#if FN_EXACT_SUMS /* t_: the sums of deviations, for float64 data only */
#define FN_MOM_T(j, d) ((void)0)
#define FN_MOM_MEAN(j) m_[j]
#else
#define FN_MOM_T(j, d) (t_[j] += (d))
#define FN_MOM_MEAN(j) (m_[j] + t_[j] / FN_SPLAT(n))
#endif
#define FN_MOM(W) { \
        FN_VD a_[(W) / FN_LD], m_[(W) / FN_LD], t_[(W) / FN_LD]; \
        int j_; \
        FN_UNROLL for (j_ = 0; j_ < (W) / FN_LD; j_++) \
            a_[j_] = t_[j_] = FN_SPLAT(0); \
        for (q = 0; q < n; q++) \
            FN_UNROLL for (j_ = 0; j_ < (W) / FN_LD; j_++) \
                a_[j_] += FN_LD8(x + q * C + c0 + FN_LD * j_); \
        FN_UNROLL for (j_ = 0; j_ < (W) / FN_LD; j_++) { \
            m_[j_] = a_[j_] / FN_SPLAT(n); \
            a_[j_] = FN_SPLAT(0); \
        } \
        for (q = 0; q < n; q++) { /* from L1; meanwhile fetch the next block's row q */ \
            FN_PREFETCH(x + (n + q) * C + c0, (W) * sizeof(FN_S)); \
            FN_UNROLL for (j_ = 0; j_ < (W) / FN_LD; j_++) { \
                const FN_VD d_ = FN_LD8(x + q * C + c0 + FN_LD * j_) - m_[j_]; \
                a_[j_] += d_ * d_; \
                FN_MOM_T(j_, d_); \
            } \
        } \
        FN_UNROLL for (j_ = 0; j_ < (W) / FN_LD; j_++) { \
            FN_ST8D(mu + c0 + FN_LD * j_, FN_MOM_MEAN(j_)); \
            FN_ST8D(s2 + c0 + FN_LD * j_, a_[j_]); \
        } \
    }
    for (; c0 + 8 <= C; c0 += 64) {
        const ptrdiff_t w = (C - c0) / 8 * 8 < 64 ? (C - c0) / 8 * 8 : 64;
        FN_CH_COLS_DO(w, FN_MOM);
        if (w < 64) {
            c0 += w;
            break;
        }
    }
#undef FN_MOM
#undef FN_MOM_T
#undef FN_MOM_MEAN
#endif
    for (c = c0; c < C; c++) { /* the columns left over, one at a time */
        double s = 0.0, t = 0.0, u = 0.0, mc;
        for (q = 0; q < n; q++)
            s += (double)FN_LD1(x + q * C + c);
        mc = s / (double)n;
        for (q = 0; q < n; q++) {
            const double d = (double)FN_LD1(x + q * C + c) - mc;
            t += d * d;
            u += d;
        }
        mu[c] = FN_EXACT_SUMS ? mc : mc + u / (double)n;
        s2[c] = t;
    }
    if (!FN_EXACT_SUMS) /* float64 data: sums beyond ~1e154 overflow (float32, half cannot) */
        for (c = 0; c < C; c++)
            if (!(isfinite(mu[c]) && isfinite(s2[c])))
                FN_NAME(fn_moments_safe)(x + c, n, C, mu + c, s2 + c);
}

/* n rows of w columns, row stride ld: y = ((x - mh) - ml) * af + bf in FN_T lanes (see
 * FN_APPLYV) with FN_T coefficients (w,). y is x (in place) or does not overlap it (checked by
 * the caller); each vector is loaded before it is stored, so both run the same loop. */
FN_TARGET FN_INLINE void FN_NAME(fn_channels_apply)(const FN_S *x, ptrdiff_t n, ptrdiff_t w,
                                                    ptrdiff_t ld, const FN_T *FN_RESTRICT mh,
                                                    const FN_T *FN_RESTRICT ml,
                                                    const FN_T *FN_RESTRICT af,
                                                    const FN_T *FN_RESTRICT bf, FN_S *y, int nts)
{
    ptrdiff_t q, c;
#define FN_CH_ROWS(W) \
    for (q = 0; q < n; q++) { \
        const FN_S *xr = x + q * ld; \
        FN_S *yr = y + q * ld; \
        FN_APPLYV(c, W, yr, ((FN_LDV(xr + c) - FN_LDT(mh + c)) - FN_LDT(ml + c)) \
                            * FN_LDT(af + c) + FN_LDT(bf + c), \
                  ((FN_LD1(xr + c) - mh[c]) - ml[c]) * af[c] + bf[c], nts); \
    }
    /* a row width known at compile time: the coefficients stay in registers */
    switch (w) {
    case 16: FN_CH_ROWS(16); break;
    case 32: FN_CH_ROWS(32); break;
    case 64: FN_CH_ROWS(64); break;
    case 128: FN_CH_ROWS(128); break;
    default: FN_CH_ROWS(w);
    }
#undef FN_CH_ROWS
}

/* IN x block (n, C), m/a/b (C,) float64   OUT y block = (x - m) * a + b, in FN_T lanes: the
 * mean split hi + lo, a and b rounded to FN_T, FN_CH_COLS columns at a time. */
#define FN_CH_COLS 256
FN_TARGET static void FN_NAME(fn_channels_scale_shift)(const FN_S *x, ptrdiff_t n,
                                                       ptrdiff_t C,
                                                       const double *FN_RESTRICT m,
                                                       const double *FN_RESTRICT a,
                                                       const double *FN_RESTRICT b, FN_S *y,
                                                       int nts)
{
    FN_T mh[FN_CH_COLS], ml[FN_CH_COLS], af[FN_CH_COLS], bf[FN_CH_COLS];
    ptrdiff_t c, c0;
    for (c0 = 0; c0 < C; c0 += FN_CH_COLS) {
        const ptrdiff_t w = C - c0 < FN_CH_COLS ? C - c0 : FN_CH_COLS;
        for (c = 0; c < w; c++) {
            mh[c] = (FN_T)m[c0 + c];
            ml[c] = (FN_T)(m[c0 + c] - (double)mh[c]);
            af[c] = (FN_T)a[c0 + c];
            bf[c] = (FN_T)b[c0 + c];
        }
        FN_NAME(fn_channels_apply)(x + c0, n, w, C, mh, ml, af, bf, y + c0, nts);
    }
    if (nts)
        FN_SFENCE();
}

/* IN dy, x blocks (n, C), m (C,) float64   OUT s, sx (C,) float64: sums of dy, dy*(x - m) */
FN_TARGET static void FN_NAME(fn_channels_dot)(const FN_S *dy, const FN_S *x, ptrdiff_t n,
                                               ptrdiff_t C, const double *FN_RESTRICT m,
                                               double *FN_RESTRICT s, double *FN_RESTRICT sx)
{
    ptrdiff_t q, c, c0 = 0;
#if FN_VEC
#define FN_DOT(W) { \
        FN_VD a_[(W) / FN_LD], b_[(W) / FN_LD], m_[(W) / FN_LD]; \
        int j_; \
        FN_UNROLL for (j_ = 0; j_ < (W) / FN_LD; j_++) { \
            a_[j_] = b_[j_] = FN_SPLAT(0); \
            m_[j_] = FN_LD8D(m + c0 + FN_LD * j_); \
        } \
        for (q = 0; q < n; q++) \
            FN_UNROLL for (j_ = 0; j_ < (W) / FN_LD; j_++) { \
                const FN_VD g_ = FN_LD8(dy + q * C + c0 + FN_LD * j_); \
                a_[j_] += g_; \
                b_[j_] += g_ * (FN_LD8(x + q * C + c0 + FN_LD * j_) - m_[j_]); \
            } \
        FN_UNROLL for (j_ = 0; j_ < (W) / FN_LD; j_++) { \
            FN_ST8D(s + c0 + FN_LD * j_, a_[j_]); \
            FN_ST8D(sx + c0 + FN_LD * j_, b_[j_]); \
        } \
    }
    for (; c0 + 8 <= C; c0 += 64) {
        const ptrdiff_t w = (C - c0) / 8 * 8 < 64 ? (C - c0) / 8 * 8 : 64;
        FN_CH_COLS_DO(w, FN_DOT);
        if (w < 64) {
            c0 += w;
            break;
        }
    }
#undef FN_DOT
#endif
    for (c = c0; c < C; c++) { /* the columns left over, one at a time */
        double a = 0.0, t = 0.0;
        for (q = 0; q < n; q++) {
            const double g = (double)FN_LD1(dy + q * C + c);
            a += g;
            t += g * ((double)FN_LD1(x + q * C + c) - m[c]);
        }
        s[c] = a;
        sx[c] = t;
    }
}

/* IN dy, x blocks (n, C), m/c1/c2/c3 (C,) float64   OUT dx = c1*dy + c2*(x - m) + c3
 * dx does not overlap dy or x (checked by the caller). */
FN_TARGET static void FN_NAME(fn_channels_bwd_apply)(const FN_S *FN_RESTRICT dy,
                                                     const FN_S *FN_RESTRICT x, ptrdiff_t n,
                                                     ptrdiff_t C, const double *FN_RESTRICT m,
                                                     const double *FN_RESTRICT c1,
                                                     const double *FN_RESTRICT c2,
                                                     const double *FN_RESTRICT c3,
                                                     FN_S *FN_RESTRICT dx, int nts)
{
    ptrdiff_t q, c;
    for (q = 0; q < n; q++) {
        const FN_S *FN_RESTRICT xr = x + q * C, *FN_RESTRICT dyr = dy + q * C;
        FN_S *FN_RESTRICT dxr = dx + q * C;
        FN_APPLY(c, C, dxr, FN_LD8D(c1 + c) * FN_LD8(dyr + c)
                            + FN_LD8D(c2 + c) * (FN_LD8(xr + c) - FN_LD8D(m + c))
                            + FN_LD8D(c3 + c),
                 c1[c] * (double)FN_LD1(dyr + c) + c2[c] * ((double)FN_LD1(xr + c) - m[c])
                 + c3[c], nts);
    }
    if (nts)
        FN_SFENCE();
}

/* channels_fwd_grouped for one sample: IN x (Q, C), w/b (C,) or NULL, G groups of K = C/G
 * columns, h rows per block, eps   OUT y (Q, C), mean/rstd (G,)
 * buf: 2*nb*C + 4*C float64 of scratch, nb = ceil(Q/h). The slab stays in L2 (spilling into
 * L3) between the statistics and the apply, so x is read from memory once. Per-column block
 * moments merged in block order (as channels_moments), then the K columns of a group merged
 * as equal-count sets (as fastnorm._geometry.merge_equal), as fastnorm/_numba. */
FN_TARGET static void FN_NAME(fn_channels_fwd_grouped)(const FN_S *x, ptrdiff_t Q,
                                                       ptrdiff_t C, ptrdiff_t G, ptrdiff_t h,
                                                       const FN_T *w, const FN_T *b,
                                                       double eps, FN_S *y, FN_T *mean,
                                                       FN_T *rstd, double *FN_RESTRICT buf,
                                                       int nts)
{
    const ptrdiff_t nb = (Q + h - 1) / h, K = C / G;
    double *bmean = buf, *bm2 = buf + nb * C, *m = bm2 + nb * C, *m2 = m + C;
    double *a = m2 + C, *be = a + C;
    ptrdiff_t blk, g, k, q;
    int wide = 0;
    for (blk = 0; blk < nb; blk++) {
        const ptrdiff_t lo = blk * h, n = (Q - lo < h ? Q - lo : h);
        FN_NAME(fn_channels_moments)(x + lo * C, n, C, bmean + blk * C, bm2 + blk * C);
    }
    fn_channels_moments_merge(nb, h, Q, C, bmean, bm2, m, m2);
    for (g = 0; g < G; g++) {
        /* the average of the K column means shifted by the first: K equal means (a constant
         * group) average to that mean exactly */
        const double m0 = m[g * K];
        double mg = 0.0, s2 = 0.0, dev = 0.0, var, r64;
        for (k = 0; k < K; k++)
            mg += m[g * K + k] - m0;
        mg = m0 + mg / (double)K;
        for (k = 0; k < K; k++) {
            const double d = m[g * K + k] - mg;
            s2 += m2[g * K + k];
            dev += d * d;
        }
        var = (s2 + (double)Q * dev) / (double)(Q * K);
        r64 = var == var ? 1.0 / sqrt((var < 0.0 ? 0.0 : var) + eps) : var;
        wide |= sqrt(var * (double)(Q * K)) > FN_T_BIG; /* |x - mean| <= sqrt(M2) */
        for (k = 0; k < K; k++) { /* group g's entries of m are consumed: reuse them */
            const ptrdiff_t c = g * K + k;
            m[c] = mg;
            a[c] = w ? r64 * (double)w[c] : r64;
            be[c] = b ? (double)b[c] : 0.0;
        }
        mean[g] = (FN_T)mg;
        rstd[g] = (FN_T)r64;
    }
    if (wide) { /* x - mean may pass FN_T's range: the sample in float64 (see fn_rows_fwd) */
        for (q = 0; q < Q; q++)
            for (k = 0; k < C; k++)
                y[q * C + k] = FN_STS(((double)FN_LD1(x + q * C + k) - m[k]) * a[k] + be[k]);
        return;
    }
    FN_NAME(fn_channels_scale_shift)(x, Q, C, m, a, be, y, nts);
}

/* Eval-mode coefficients from fixed statistics (channels_eval): IN mean/var (C,), w/b (C,)
 * or NULL, eps   OUT mh, ml, af, bf (C,) FN_T for fn_channels_eval_apply. The values
 * fn_channels_scale_shift would convert from the API's NumPy coefficients (rstd = 1 / sqrt(var +
 * eps) and a = rstd * w in float64, then rounded), so fused and composed give the same bits;
 * the mean is already FN_T, so its low part is 0. */
FN_TARGET static void FN_NAME(fn_channels_eval_coefs)(const FN_T *mean, const FN_T *var,
                                                      const FN_T *w, const FN_T *b, double eps,
                                                      ptrdiff_t C, FN_T *mh, FN_T *ml, FN_T *af,
                                                      FN_T *bf)
{
    ptrdiff_t c;
#pragma omp simd
    for (c = 0; c < C; c++) {
        double rs = 1.0 / sqrt((double)var[c] + eps);
        mh[c] = mean[c];
        ml[c] = 0;
        af[c] = (FN_T)(w == NULL ? rs : rs * (double)w[c]);
        bf[c] = b == NULL ? (FN_T)0 : b[c];
    }
}

/* channels_eval on a block of n rows (n, C) with the coefficients of fn_channels_eval_coefs */
FN_TARGET static void FN_NAME(fn_channels_eval_apply)(const FN_S *x, ptrdiff_t n,
                                                      ptrdiff_t C, const FN_T *mh,
                                                      const FN_T *ml, const FN_T *af,
                                                      const FN_T *bf, FN_S *y, int nts)
{
    FN_NAME(fn_channels_apply)(x, n, C, C, mh, ml, af, bf, y, nts);
    if (nts)
        FN_SFENCE();
}

/* this inclusion's parameters, set by _simd_isa.h */
#undef FN_T
#undef FN_S
#undef FN_HALF
#undef FN_EXACT_SUMS
#undef FN_T_BIG
#undef FN_SUF
#undef FN_LD1
#undef FN_STS
#undef FN_LD8
#undef FN_ST8
#undef FN_ST8_NT
#undef FN_LDV
#undef FN_STV
#undef FN_STV_NT
#undef FN_VT
#undef FN_VN
#undef FN_ACC64
