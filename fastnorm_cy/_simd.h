/* Inner loops of the Cython backend, written for SIMD.
 *
 * Each exported function handles a range of rows (rows kernels) or one block of rows
 * (channels kernels), so a parallel loop in _kernels.pyx makes one call per chunk and the
 * per-element loops are inlined into it. On x86-64 Linux the kernels are compiled three
 * times, once per instruction set with the vector width it holds in registers (x86-64-v4 =
 * AVX-512, 64 bytes; x86-64-v3 = AVX2+FMA, 32; baseline, 16), and fn_simd_select picks the
 * best the CPU runs at import (FASTNORM_SIMD=v3 etc. to choose): one build runs on any
 * x86-64. Other architectures/compilers build the portable path (one version, 64 bytes).
 *
 * GCC does not vectorize float reductions without reassociation (ARCHITECTURE.md §6), so each
 * reduction is either a `#pragma omp simd reduction(+:s)` loop or explicit vectors (below)
 * with several accumulators: the lanes hold partial sums added at the end, an order that
 * depends on the clone and the shape only (never on the thread count).
 *
 * Measured on the 2-core EPYC (AVX-512) box, 32x56x56x64 float32, one thread, what the
 * explicit code buys over GCC 12's own vectorization: the channels apply 1.7 -> 1.3 ms
 * (float32 -> float64 conversion without re-packing), channels_dot 2.6 -> 1.3 ms (register
 * accumulators), channels statistics 1.4 -> 1.1 ms (next-block prefetch), non-temporal stores
 * ~17% off an apply pass from memory; -fno-wrapv (setup.py) 1.8 -> 1.3 ms on the statistics.
 *
 * Numerics mirror fastnorm/_numba: float64 accumulation in the memory-bound statistics,
 * two-pass block moments merged with Chan's formula left to right, `(x - mean) * alpha +
 * beta` with the mean kept inside (the folded form cancels). No `restrict` on data: y may be
 * x (in-place forward).
 *
 * The body is in _simd_body.h, included (by _simd_isa.h) once for float (suffix _f32) and
 * once for double, per instruction set (suffixes _v4, _v3, _v1; see the bottom of this file).
 */
#ifndef FASTNORM_SIMD_H
#define FASTNORM_SIMD_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && defined(__x86_64__) && defined(__linux__) && \
    (!defined(__clang__) || __clang_major__ >= 14) && !defined(FN_NO_CLONES) && \
    (defined(__clang__) || __GNUC__ >= 12)
#define FN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define FN_HAVE_CLONES 1
#else
#define FN_CLONES
#define FN_HAVE_CLONES 0
#endif

#ifndef FN_CYTHON_VERSION /* set by setup.py */
#define FN_CYTHON_VERSION "unknown"
#endif
#ifndef FN_DEBUG_CHECKS /* FASTNORM_CYTHON_DEBUG=1 at build time */
#define FN_DEBUG_CHECKS 0
#endif

#if defined(__GNUC__) || defined(_MSC_VER)
#define FN_RESTRICT __restrict
#else
#define FN_RESTRICT
#endif

#define FN_INLINE static inline __attribute__((always_inline))

/* Explicit vectors: GCC/clang vector extensions, FN_LD float64 lanes (FN_VD) and FN_LF
 * float32 lanes (FN_VF) per vector. The vector width is set per instruction set where each
 * body is included (bottom of this file): 64 bytes for AVX-512 (x86-64-v4), 32 for AVX2
 * (x86-64-v3), 16 for the x86-64 baseline -- the widths those CPUs hold in registers (a
 * 64-byte vector on an AVX2 target lives in memory: GCC 12 made the AVX2 statistics 4-10x
 * slower than AVX-512 that way). GCC's own vectorization of these loops loads 16 floats,
 * splits, converts and re-packs them: the channels apply of 32x56x56x64 float32 took 1.7 ms
 * that way and 1.3 ms (Numba's speed) this way. memcpy is the portable unaligned load/store;
 * it compiles to one vmovups. Elsewhere FN_VEC is 0 and the scalar loop after each vector
 * loop does all the work. */
#if defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 9) && !defined(FN_NO_VEC)
#define FN_VEC 1
typedef double fn_vd64 __attribute__((vector_size(64)));
typedef float fn_vf64 __attribute__((vector_size(64)));
typedef float fn_vf32 __attribute__((vector_size(32)));
typedef double fn_vd32 __attribute__((vector_size(32)));
typedef float fn_vf16 __attribute__((vector_size(16)));
typedef double fn_vd16 __attribute__((vector_size(16)));
typedef float fn_vf8 __attribute__((vector_size(8)));
/* half-precision storage (float16 / bfloat16 bits) and the uint32 lanes bfloat16 is widened
 * to: FN_LF or FN_LD of them per vector (FN_VHN / FN_VUN, FN_VHD / FN_VUD, set per
 * instruction set below) */
typedef uint16_t fn_vh32 __attribute__((vector_size(32)));
typedef uint16_t fn_vh16 __attribute__((vector_size(16)));
typedef uint16_t fn_vh8 __attribute__((vector_size(8)));
typedef uint16_t fn_vh4 __attribute__((vector_size(4)));
typedef uint32_t fn_vu64 __attribute__((vector_size(64)));
typedef uint32_t fn_vu32 __attribute__((vector_size(32)));
typedef uint32_t fn_vu16 __attribute__((vector_size(16)));
typedef uint32_t fn_vu8 __attribute__((vector_size(8)));
#define FN_LD8D(p) __extension__({ FN_VD v_; memcpy(&v_, (p), sizeof v_); v_; })
/* float32 -> float64 lane by lane: GCC 12 turns __builtin_convertvector(8 floats -> 8
 * doubles) into two 4-wide converts, an extract and an insert (5 instructions where one
 * does); the lane loop compiles to one vcvtps2pd zmm (x86-64-v4). On data in cache
 * rows_moments, channels_moments and rows_bwd_apply took 0.6x the time, channels_dot 0.5x;
 * from memory batch norm's statistics + apply pair 0.8-0.9x (32x64x56x56 float32). */
#define FN_CVT8F(src, off) __extension__({ FN_VD c_; int k_; \
                                           for (k_ = 0; k_ < FN_LD; k_++) \
                                               c_[k_] = (double)(src)[(off) + k_]; \
                                           c_; })
#define FN_LD8F(p) __extension__({ const float *q_ = (p); FN_CVT8F(q_, 0); })
#define FN_ST8D(p, d) do { FN_VD v_ = (d); memcpy((p), &v_, sizeof v_); } while (0)
#define FN_ST8F(p, d) do { FN_VFH v_ = __builtin_convertvector((d), FN_VFH); \
                           memcpy((p), &v_, sizeof v_); } while (0)
#define FN_SPLAT(s) ((FN_VD){0} + (double)(s))
/* Unroll a loop over the register accumulators of a column chunk whole, so they stay in
 * registers (GCC stopped doing so by itself once FN_CVT8F's lane loop sat inside) */
#define FN_UNROLL _Pragma("GCC unroll 16")
/* Sum of the lanes of vector v (n lanes of type T) by halves: log2(n) dependent adds, where
 * a lane-by-lane sum would chain n of them (the reductions end every row of a layer norm) */
#define FN_HSUM(T, n, v) __extension__({ T t_[n]; int w_, k_; memcpy(t_, &(v), sizeof t_); \
                                         for (w_ = (n) / 2; w_ >= 1; w_ /= 2) \
                                             for (k_ = 0; k_ < w_; k_++) \
                                                 t_[k_] += t_[k_ + w_]; \
                                         t_[0]; })
/* p[0:FN_LF] (float64) += the lanes of v (an FN_VF), converted to float64 */
#define FN_ACC64F(p, v) do { FN_VF a_ = (v); \
                             FN_ST8D((p), FN_LD8D(p) + FN_CVT8F(a_, 0)); \
                             FN_ST8D((p) + FN_LD, FN_LD8D((p) + FN_LD) + FN_CVT8F(a_, FN_LD)); \
                        } while (0)
#define FN_ACC64D(p, v) FN_ST8D((p), FN_LD8D(p) + (v))
/* FN_VN lanes of FN_T: FN_LDT loads them from an FN_T array (coefficients, weights);
 * FN_LDV / FN_STV load and store them from and to the data (FN_S), which for float and
 * double is the same memcpy (FN_LDV_RAW) and for half precision converts (_simd_isa.h) */
#define FN_LDT(p) __extension__({ FN_VT v_; memcpy(&v_, (p), sizeof v_); v_; })
#define FN_LDV_RAW FN_LDT
#define FN_STV_RAW(p, v) do { FN_VT v_ = (v); memcpy((p), &v_, sizeof v_); } while (0)
#define FN_SPLATV(s) ((FN_VT){0} + (FN_T)(s))
/* bfloat16 bits of float32 lanes f (uint32 vector type VU): round to nearest even on the
 * bit pattern (the carry out of the mantissa bumps the exponent, up to inf); NaN stays a
 * (quiet) NaN, where the rounding add could carry it into inf. Exact for subnormals, unlike
 * AVX512-BF16's vcvtneps2bf16, which flushes them to zero. */
#define FN_BF16_ROUND(VU, f) __extension__({ VU u_ = (VU)(f), n_ = (VU)((f) != (f)); \
                                             VU r_ = (u_ + 0x7fff + ((u_ >> 16) & 1)) >> 16; \
                                             (r_ & ~n_) | (((u_ >> 16) | 0x40) & n_); })
#else /* no vector extensions: the vector loops below compile to nothing */
#define FN_VEC 0
#define FN_LD8D(p) 0.0
#define FN_LD8F(p) 0.0
#define FN_ST8D(p, d) ((void)(d))
#define FN_ST8F(p, d) ((void)(d))
#define FN_SPLAT(s) 0.0
#define FN_UNROLL
#define FN_LDT(p) 0
#define FN_LDV_RAW(p) 0
#define FN_STV_RAW(p, v) ((void)(v))
#define FN_SPLATV(s) 0
#endif

/* Non-temporal stores (SSE2 movntps, in every x86-64 build): an output larger than the
 * caches is written past them, without first reading each line it overwrites (the
 * read-for-ownership of an ordinary store). The write stream of an apply pass then costs 1x
 * its bytes instead of 2x; measured ~17% off a 24.5 MiB scale-shift from memory, one
 * thread. Only outputs of FN_STREAM_MIN bytes or more (_kernels.pyx: _streaming): a smaller
 * one is likely still in cache when the caller reads it. Each kernel ends with a store
 * fence, so the data is visible to other threads when it returns. A vector narrower than 16
 * bytes is stored normally. */
#define FN_STREAM_MIN ((ptrdiff_t)8 << 20)
#if FN_VEC && defined(__x86_64__) && defined(__SSE2__)
#include <emmintrin.h>
#define FN_HAVE_NT 1
#define FN_STREAM(p, v) do { __typeof__(v) s_ = (v); size_t k_; \
                             if (sizeof s_ < 16) { memcpy((p), &s_, sizeof s_); break; } \
                             for (k_ = 0; k_ < sizeof s_; k_ += 16) { \
                                 __m128 h_; memcpy(&h_, (char *)&s_ + k_, 16); \
                                 _mm_stream_ps((float *)((char *)(p) + k_), h_); } \
                        } while (0)
#define FN_ST8F_NT(p, d) do { FN_VFH w_ = __builtin_convertvector((d), FN_VFH); \
                              FN_STREAM((p), w_); } while (0)
#define FN_ST8D_NT(p, d) do { FN_VD w_ = (d); FN_STREAM((p), w_); } while (0)
#define FN_STV_NT_RAW(p, v) do { FN_VT w_ = (v); FN_STREAM((p), w_); } while (0)
#define FN_SFENCE() _mm_sfence()
#else
#define FN_HAVE_NT 0
#define FN_STREAM(p, v) do { __typeof__(v) s_ = (v); memcpy((p), &s_, sizeof s_); } while (0)
#define FN_ST8F_NT FN_ST8F
#define FN_ST8D_NT FN_ST8D
#define FN_STV_NT_RAW FN_STV_RAW
#define FN_SFENCE() ((void)0)
#endif

/* dst[i] = SEXPR (stored as FN_S) for i in [0, n), VEXPR (FN_LD float64 lanes of the same
 * formula) where whole vectors fit; non-temporal (nts) from the first 16-byte aligned
 * element. */
#define FN_APPLY(i, n, dst, VEXPR, SEXPR, nts) do { \
        i = 0; \
        if (FN_HAVE_NT && (nts)) { \
            for (; i < (n) && ((size_t)((dst) + i) & 15); i++) \
                (dst)[i] = FN_STS(SEXPR); \
            for (; i + FN_LD <= (n); i += FN_LD) \
                FN_ST8_NT((dst) + i, (VEXPR)); \
        } \
        for (; FN_VEC && i + FN_LD <= (n); i += FN_LD) \
            FN_ST8((dst) + i, (VEXPR)); \
        for (; i < (n); i++) \
            (dst)[i] = FN_STS(SEXPR); \
    } while (0)

/* The same in FN_T lanes (FN_VN per vector): the forward applies, written as
 * y = ((x - mh) - ml) * a + b with mh + ml the float64 mean split in two FN_T (exact where x
 * is near the mean: no cancellation, a constant channel gives exactly b) and a, b rounded
 * to FN_T. For float64 data ml is 0 and this is the float64 formula itself. */
#define FN_APPLYV(i, n, dst, VEXPR, SEXPR, nts) do { \
        i = 0; \
        if (FN_HAVE_NT && (nts)) { \
            for (; i < (n) && ((size_t)((dst) + i) & 15); i++) \
                (dst)[i] = FN_STS(SEXPR); \
            for (; i + FN_VN <= (n); i += FN_VN) \
                FN_STV_NT((dst) + i, (VEXPR)); \
        } \
        for (; FN_VEC && i + FN_VN <= (n); i += FN_VN) \
            FN_STV((dst) + i, (VEXPR)); \
        for (; i < (n); i++) \
            (dst)[i] = FN_STS(SEXPR); \
    } while (0)

/* Prefetch the `bytes` (a multiple of 64) at p into L1. A two-pass block reads memory in its
 * first pass only; its second pass runs from L1 and would leave memory idle, so it fetches
 * the next block meanwhile. Prefetches never fault, so reading past an array is harmless. */
#if defined(__GNUC__)
#define FN_PREFETCH(p, bytes) do { size_t o_; for (o_ = 0; o_ < (bytes); o_ += 64) \
                                       __builtin_prefetch((const char *)(p) + o_, 0, 3); } while (0)
#else
#define FN_PREFETCH(p, bytes) ((void)0)
#endif
#define FN_BLOCK 4096 /* elements per block of a long row, as fastnorm/_numba/_jit.py */
#ifndef FN_BWD_ROWS
#define FN_BWD_ROWS 2 /* rows per pass of fn_rows_bwd: 2 measured faster than 1, 4 and 8 */
#endif

static const char *fn_compiler(void)
{
#if defined(__clang__)
    return "clang " __clang_version__;
#elif defined(__GNUC__)
    return "gcc " __VERSION__;
#elif defined(_MSC_VER)
    return "msvc";
#else
    return "unknown";
#endif
}

static int fn_openmp(void)
{
#if defined(_OPENMP)
    return _OPENMP;
#else
    return 0;
#endif
}

/* Chan et al.: moments of the union of two disjoint sets, (n_a, mean_a, m2_a) += (n_b, ...).
 * Same expressions, same order as fastnorm._numba._jit.chan_merge. */
FN_INLINE void fn_chan_merge(double *n_a, double *mean_a, double *m2_a,
                             double n_b, double mean_b, double m2_b)
{
    double n = *n_a + n_b;
    double delta;
    if (n_b == 0.0)
        return;
    if (*n_a == 0.0) {
        *n_a = n_b;
        *mean_a = mean_b;
        *m2_a = m2_b;
        return;
    }
    delta = mean_b - *mean_a;
    *mean_a = *mean_a + delta * (n_b / n);
    *m2_a = *m2_a + m2_b + delta * delta * (*n_a * (n_b / n));
    *n_a = n;
}

/* Half precision, portable: IEEE float16 and bfloat16 bits <-> float32, round to nearest
 * even, subnormals and NaN kept (the same bits as NumPy's and ml_dtypes' casts). The kernels
 * use F16C instructions instead where the instruction set has them (_simd_isa.h); these
 * serve the x86-64 baseline body, other architectures, scalar tails there, and the
 * conversion of half-precision weights into float32 (_kernels.pyx). */
static inline float fn_bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint32_t fn_f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float fn_f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff;
    if (e == 0x1f) /* inf, NaN */
        return fn_bits_f32(sign | 0x7f800000 | (m << 13));
    if (e == 0) {
        int sh;
        if (m == 0)
            return fn_bits_f32(sign);
        sh = __builtin_clz(m) - 21; /* subnormal: move the leading 1 to bit 10 */
        m = (m << sh) & 0x3ff;
        e = (uint32_t)(1 - sh);     /* may wrap; (e + 112) below is exact modulo 2^32 */
    }
    return fn_bits_f32(sign | ((e + 112) << 23) | (m << 13));
}

static inline uint16_t fn_f32_to_f16(float f)
{
    const uint32_t u = fn_f32_bits(f), a = u & 0x7fffffff;
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t e, mant, sh, q, rem, half;
    if (a > 0x7f800000) /* NaN: quiet, top of the payload kept */
        return sign | 0x7e00 | ((a >> 13) & 0x3ff);
    if (a >= 0x477ff000) /* |f| >= 65520 (rounds past 65504) or inf */
        return sign | 0x7c00;
    if (a >= 0x38800000) { /* a normal float16: rebias the exponent, round at bit 13 */
        const uint32_t r = a - 0x38000000;
        return sign | (uint16_t)((r + 0xfff + ((r >> 13) & 1)) >> 13);
    }
    if (a <= 0x33000000) /* |f| <= 2^-25: half the smallest subnormal or less -> 0 */
        return sign;
    e = a >> 23; /* a float16 subnormal: round |f| * 2^24 to an integer */
    mant = (a & 0x7fffff) | 0x800000;
    sh = 126 - e; /* 14..24 */
    q = mant >> sh;
    rem = mant & ((1u << sh) - 1);
    half = 1u << (sh - 1);
    q += (rem > half) | ((rem == half) & q);
    return sign | (uint16_t)q;
}

static inline float fn_bf16_to_f32(uint16_t h)
{
    return fn_bits_f32((uint32_t)h << 16);
}

static inline uint16_t fn_f32_to_bf16(float f)
{
    const uint32_t u = fn_f32_bits(f);
    if ((u & 0x7fffffff) > 0x7f800000)
        return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* channels_moments: merge nb block moments (bmean, bm2: (nb, C); block b holds rows
 * [b*h, min(Q, (b+1)*h))) in block order, as repeated fn_chan_merge. OUT mean, m2 (C,) */
FN_CLONES static void fn_channels_moments_merge(ptrdiff_t nb, ptrdiff_t h, ptrdiff_t Q,
                                               ptrdiff_t C, const double *bmean,
                                               const double *bm2, double *mean, double *m2)
{
    ptrdiff_t b, c;
    double cnt, n_b, n, f, g;
    if (nb == 0) { /* Q == 0: no data */
        for (c = 0; c < C; c++) {
            mean[c] = NAN;
            m2[c] = NAN;
        }
        return;
    }
    for (c = 0; c < C; c++) { /* merging into an empty set copies */
        mean[c] = bmean[c];
        m2[c] = bm2[c];
    }
    cnt = (double)(Q < h ? Q : h);
    for (b = 1; b < nb; b++) {
        n_b = (double)((Q < (b + 1) * h ? Q : (b + 1) * h) - b * h);
        n = cnt + n_b;
        f = n_b / n;
        g = cnt * (n_b / n);
#pragma omp simd
        for (c = 0; c < C; c++) {
            double delta = bmean[b * C + c] - mean[c];
            mean[c] = mean[c] + delta * f;
            m2[c] = m2[c] + bm2[b * C + c] + delta * delta * g;
        }
        cnt = n;
    }
}

/* channels_dot: add nb block sums (bs, bsx: (nb, C)) in block order. OUT s, sx (C,) */
FN_CLONES static void fn_channels_dot_merge(ptrdiff_t nb, ptrdiff_t C, const double *bs,
                                            const double *bsx, double *s, double *sx)
{
    ptrdiff_t b, c;
    for (c = 0; c < C; c++) {
        s[c] = 0.0;
        sx[c] = 0.0;
    }
    for (b = 0; b < nb; b++) {
#pragma omp simd
        for (c = 0; c < C; c++) {
            s[c] += bs[b * C + c];
            sx[c] += bsx[b * C + c];
        }
    }
}

#define FN_CAT2(a, b) a##b
#define FN_CAT(a, b) FN_CAT2(a, b)
#define FN_NAME(name) FN_CAT(name, FN_SUF)

/* The bodies: _simd_isa.h includes _simd_body.h once per data type -- float (names ending
 * in _f32), double (_f64), float16 (_f16) and bfloat16 (_bf16) bits -- then FN_ISUF, at the
 * vector width FN_VD/FN_LD (float64) and FN_VF/FN_LF (float32, FN_VFH: FN_LD floats), each
 * function with the attribute FN_TARGET; FN_ISA (4, 3, 1; 0 portable) says which
 * instructions the half-precision conversions may use. */
#if FN_HAVE_CLONES
#include <immintrin.h>
/* One body per instruction set, each at the width that set holds in registers, and the
 * exported names (those _kernels.pyx calls) pick one through fn_isa, set once at import by
 * fn_simd_select. target_clones cannot do this: its clones share one source, so one vector
 * width. */
#define FN_VD fn_vd64
#define FN_LD 8
#define FN_VF fn_vf64
#define FN_LF 16
#define FN_VFH fn_vf32
#define FN_VHN fn_vh32
#define FN_VHD fn_vh16
#define FN_VUN fn_vu64
#define FN_VUD fn_vu32
#define FN_TARGET __attribute__((target("arch=x86-64-v4")))
#define FN_ISUF _v4
#define FN_ISA 4
#include "_simd_isa.h"
#define FN_VD fn_vd32
#define FN_LD 4
#define FN_VF fn_vf32
#define FN_LF 8
#define FN_VFH fn_vf16
#define FN_VHN fn_vh16
#define FN_VHD fn_vh8
#define FN_VUN fn_vu32
#define FN_VUD fn_vu16
#define FN_TARGET __attribute__((target("arch=x86-64-v3")))
#define FN_ISUF _v3
#define FN_ISA 3
#include "_simd_isa.h"
#define FN_VD fn_vd16
#define FN_LD 2
#define FN_VF fn_vf16
#define FN_LF 4
#define FN_VFH fn_vf8
#define FN_VHN fn_vh8
#define FN_VHD fn_vh4
#define FN_VUN fn_vu16
#define FN_VUD fn_vu8
#define FN_TARGET
#define FN_ISUF _v1
#define FN_ISA 1
#include "_simd_isa.h"

static int fn_isa = 1; /* the body in use: 4 (AVX-512), 3 (AVX2+FMA) or 1 (baseline) */
#define FN_PICK(f) (fn_isa == 4 ? f##_v4 : fn_isa == 3 ? f##_v3 : f##_v1)

/* The best body this CPU runs, or ``want`` (4, 3, 1) when the CPU runs it (tests, and
 * FASTNORM_SIMD); returns the level now in use. Called at import, before any kernel. */
static int fn_simd_select(int want)
{
    int best;
    __builtin_cpu_init();
    best = __builtin_cpu_supports("x86-64-v4") ? 4 : __builtin_cpu_supports("x86-64-v3") ? 3 : 1;
    fn_isa = (want == 4 || want == 3 || want == 1) && want <= best ? want : best;
    return fn_isa;
}

static const char *fn_simd_clone(void)
{
    return fn_isa == 4 ? "x86-64-v4 (AVX-512, 64-byte vectors)"
         : fn_isa == 3 ? "x86-64-v3 (AVX2+FMA, 32-byte vectors)"
         : "default (x86-64 baseline, 16-byte vectors)";
}
#else
#define FN_VD fn_vd64
#define FN_LD 8
#define FN_VF fn_vf64
#define FN_LF 16
#define FN_VFH fn_vf32
#define FN_VHN fn_vh32
#define FN_VHD fn_vh16
#define FN_VUN fn_vu64
#define FN_VUD fn_vu32
#define FN_TARGET
#define FN_ISUF
#define FN_ISA 0
#include "_simd_isa.h"
#define FN_PICK(f) f

static int fn_simd_select(int want)
{
    (void)want;
    return 0;
}

static const char *fn_simd_clone(void)
{
    return "portable (no multiversioning on this platform)";
}
#endif

/* ------------------------------------------------------------------ the exported kernels
 * One entry per kernel, named as the kernel (fn_rows_fwd for rows_fwd): ``kind`` (FN_F32,
 * FN_F64, FN_F16, FN_BF16: the data type of x) picks the body of that type in the
 * instruction set in use. Data arrays (x, y, dy, dx) hold FN_S; per-row statistics, weights
 * and eval coefficients hold FN_T: the data type for float and double, float32 for half
 * precision; moments, sums and coefficients passed as double stay double. */
enum { FN_F32 = 0, FN_F64 = 1, FN_F16 = 2, FN_BF16 = 3 };
#define FN_BY_KIND(kind, CALL) do { \
        switch (kind) { \
        case FN_F32: CALL(_f32, float, float); break; \
        case FN_F64: CALL(_f64, double, double); break; \
        case FN_F16: CALL(_f16, uint16_t, float); break; \
        default: CALL(_bf16, uint16_t, float); break; \
        } \
    } while (0)

static void fn_rows_fwd(int kind, const void *x, ptrdiff_t M, const void *w, const void *b,
                        double eps, int rms, void *y, void *mean, void *rstd, ptrdiff_t lo,
                        ptrdiff_t hi)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_rows_fwd##SUF)((const S *)x, M, (const T *)w, \
        (const T *)b, eps, rms, (S *)y, (T *)mean, (T *)rstd, lo, hi)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

static void fn_rows_fwd_grouped(int kind, const void *x, ptrdiff_t K, ptrdiff_t S_,
                                ptrdiff_t G, const void *w, const void *b, double eps,
                                void *y, void *mean, void *rstd, ptrdiff_t lo, ptrdiff_t hi,
                                int nts)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_rows_fwd_grouped##SUF)((const S *)x, K, S_, G, \
        (const T *)w, (const T *)b, eps, (S *)y, (T *)mean, (T *)rstd, lo, hi, nts)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

static void fn_rows_bwd(int kind, const void *dy, const void *x, const void *mean,
                        const void *rstd, const void *w, int rms, ptrdiff_t M, void *dx,
                        double *dwb, double *dbb, ptrdiff_t lo, ptrdiff_t hi, int nts)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_rows_bwd##SUF)((const S *)dy, (const S *)x, \
        (const T *)mean, (const T *)rstd, (const T *)w, rms, M, (S *)dx, dwb, dbb, lo, hi, nts)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

static void fn_rows_moments(int kind, const void *x, ptrdiff_t M, double *mean, double *m2,
                            ptrdiff_t lo, ptrdiff_t hi)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_rows_moments##SUF)((const S *)x, M, mean, m2, lo, hi)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

static void fn_rows_scale_shift(int kind, const void *x, ptrdiff_t M, const double *mean,
                                const double *alpha, const double *beta, void *y,
                                ptrdiff_t lo, ptrdiff_t hi, int nts)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_rows_scale_shift##SUF)((const S *)x, M, mean, alpha, \
        beta, (S *)y, lo, hi, nts)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

static void fn_rows_dot(int kind, const void *dy, const void *x, ptrdiff_t M,
                        const double *mean, double *sum_dy, double *sum_dyxc, ptrdiff_t lo,
                        ptrdiff_t hi)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_rows_dot##SUF)((const S *)dy, (const S *)x, M, mean, \
        sum_dy, sum_dyxc, lo, hi)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

static void fn_rows_bwd_apply(int kind, const void *dy, const void *x, ptrdiff_t M,
                              const double *mean, const double *c1, const double *c2,
                              const double *c3, void *dx, ptrdiff_t lo, ptrdiff_t hi, int nts)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_rows_bwd_apply##SUF)((const S *)dy, (const S *)x, M, \
        mean, c1, c2, c3, (S *)dx, lo, hi, nts)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

static void fn_rows_bwd_grouped(int kind, const void *dy, const void *x, ptrdiff_t K,
                                ptrdiff_t S_, ptrdiff_t G, const double *mean,
                                const double *rstd, const double *w, void *dx, double *sdy,
                                double *sdxh, ptrdiff_t lo, ptrdiff_t hi, int nts)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_rows_bwd_grouped##SUF)((const S *)dy, (const S *)x, K, \
        S_, G, mean, rstd, w, (S *)dx, sdy, sdxh, lo, hi, nts)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

static void fn_channels_moments(int kind, const void *x, ptrdiff_t n, ptrdiff_t C, double *mu,
                                double *s2)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_channels_moments##SUF)((const S *)x, n, C, mu, s2)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

static void fn_channels_scale_shift(int kind, const void *x, ptrdiff_t n, ptrdiff_t C,
                                    const double *m, const double *a, const double *b,
                                    void *y, int nts)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_channels_scale_shift##SUF)((const S *)x, n, C, m, a, b, \
        (S *)y, nts)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

static void fn_channels_dot(int kind, const void *dy, const void *x, ptrdiff_t n, ptrdiff_t C,
                            const double *m, double *s, double *sx)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_channels_dot##SUF)((const S *)dy, (const S *)x, n, C, \
        m, s, sx)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

static void fn_channels_bwd_apply(int kind, const void *dy, const void *x, ptrdiff_t n,
                                  ptrdiff_t C, const double *m, const double *c1,
                                  const double *c2, const double *c3, void *dx, int nts)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_channels_bwd_apply##SUF)((const S *)dy, (const S *)x, \
        n, C, m, c1, c2, c3, (S *)dx, nts)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

static void fn_channels_fwd_grouped(int kind, const void *x, ptrdiff_t Q, ptrdiff_t C,
                                    ptrdiff_t G, ptrdiff_t h, const void *w, const void *b,
                                    double eps, void *y, void *mean, void *rstd, double *buf,
                                    int nts)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_channels_fwd_grouped##SUF)((const S *)x, Q, C, G, h, \
        (const T *)w, (const T *)b, eps, (S *)y, (T *)mean, (T *)rstd, buf, nts)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

static void fn_channels_eval_coefs(int kind, const void *mean, const void *var,
                                   const void *w, const void *b, double eps, ptrdiff_t C,
                                   void *mh, void *ml, void *af, void *bf)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_channels_eval_coefs##SUF)((const T *)mean, \
        (const T *)var, (const T *)w, (const T *)b, eps, C, (T *)mh, (T *)ml, (T *)af, (T *)bf)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

static void fn_channels_eval_apply(int kind, const void *x, ptrdiff_t n, ptrdiff_t C,
                                   const void *mh, const void *ml, const void *af,
                                   const void *bf, void *y, int nts)
{
#define FN_CALL(SUF, S, T) FN_PICK(fn_channels_eval_apply##SUF)((const S *)x, n, C, \
        (const T *)mh, (const T *)ml, (const T *)af, (const T *)bf, (S *)y, nts)
    FN_BY_KIND(kind, FN_CALL);
#undef FN_CALL
}

#endif /* FASTNORM_SIMD_H */
