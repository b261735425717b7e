/* One instruction set's kernels: _simd_body.h for float, double, float16 and bfloat16, at
 * the vector width and with the target attribute the includer (_simd.h) set; its parameters
 * are undefined at the end, ready for the next set.
 *
 * Half precision (FN_S = uint16_t bits, FN_T = float): every load converts to float32 in
 * registers and every store rounds back (nearest even), so no array is ever converted
 * whole. float16 uses F16C (vcvtph2ps / vcvtps2ph: one instruction per vector, x86-64-v3
 * and up); bfloat16 is the high half of a float32 (widen and shift on load, FN_BF16_ROUND
 * on store). The baseline body (no F16C) and the portable build convert in software. */

/* ------------------------------------------------------------------ conversions, scalar */

#define FN_H2F FN_CAT(fn_h2f, FN_ISUF)
#define FN_F2H FN_CAT(fn_f2h, FN_ISUF)
FN_TARGET FN_INLINE float FN_H2F(uint16_t h)
{
#if FN_ISA >= 3
    return _cvtsh_ss(h);
#else
    return fn_f16_to_f32(h);
#endif
}

FN_TARGET FN_INLINE uint16_t FN_F2H(float f)
{
#if FN_ISA >= 3
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    return fn_f32_to_f16(f);
#endif
}

/* ------------------------------------------------------------------ conversions, vectors
 * fn_ldv_*: FN_LF halves -> FN_VF; fn_stv_*: FN_VF -> FN_LF halves (FN_VHN);
 * fn_ldh_*: FN_LD halves -> FN_VFH; fn_sth_*: FN_VFH -> FN_LD halves (FN_VHD) */
#if FN_VEC
FN_TARGET FN_INLINE FN_VF FN_CAT(fn_ldv_f16, FN_ISUF)(const uint16_t *p)
{
#if FN_ISA == 4
    __m256i h;
    memcpy(&h, p, sizeof h);
    return (FN_VF)_mm512_cvtph_ps(h);
#elif FN_ISA == 3
    __m128i h;
    memcpy(&h, p, sizeof h);
    return (FN_VF)_mm256_cvtph_ps(h);
#else
    FN_VF v;
    int k;
    for (k = 0; k < FN_LF; k++)
        v[k] = fn_f16_to_f32(p[k]);
    return v;
#endif
}

FN_TARGET FN_INLINE FN_VHN FN_CAT(fn_stv_f16, FN_ISUF)(FN_VF v)
{
#if FN_ISA == 4
    return (FN_VHN)_mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif FN_ISA == 3
    return (FN_VHN)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#else
    FN_VHN h;
    int k;
    for (k = 0; k < FN_LF; k++)
        h[k] = fn_f32_to_f16(v[k]);
    return h;
#endif
}

FN_TARGET FN_INLINE FN_VFH FN_CAT(fn_ldh_f16, FN_ISUF)(const uint16_t *p)
{
#if FN_ISA == 4
    __m128i h;
    memcpy(&h, p, sizeof h);
    return (FN_VFH)_mm256_cvtph_ps(h);
#elif FN_ISA == 3
    __m128i h = _mm_setzero_si128();
    memcpy(&h, p, FN_LD * sizeof(uint16_t));
    return (FN_VFH)_mm_cvtph_ps(h);
#else
    FN_VFH v;
    int k;
    for (k = 0; k < FN_LD; k++)
        v[k] = fn_f16_to_f32(p[k]);
    return v;
#endif
}

FN_TARGET FN_INLINE FN_VHD FN_CAT(fn_sth_f16, FN_ISUF)(FN_VFH v)
{
#if FN_ISA == 4
    return (FN_VHD)_mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#elif FN_ISA == 3
    FN_VHD h;
    __m128i w = _mm_cvtps_ph((__m128)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    memcpy(&h, &w, sizeof h);
    return h;
#else
    FN_VHD h;
    int k;
    for (k = 0; k < FN_LD; k++)
        h[k] = fn_f32_to_f16(v[k]);
    return h;
#endif
}

/* bfloat16: widening the 16-bit lanes to 32 with one vpmovzxwd where the instruction set
 * has it (GCC 12 splits __builtin_convertvector's into halves and re-inserts them) */
FN_TARGET FN_INLINE FN_VF FN_CAT(fn_ldv_bf16, FN_ISUF)(const uint16_t *p)
{
#if FN_ISA == 4
    __m256i h;
    memcpy(&h, p, sizeof h);
    return (FN_VF)_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16);
#elif FN_ISA == 3
    __m128i h;
    memcpy(&h, p, sizeof h);
    return (FN_VF)_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
#else
    FN_VHN h;
    memcpy(&h, p, sizeof h);
    return (FN_VF)(__builtin_convertvector(h, FN_VUN) << 16);
#endif
}

FN_TARGET FN_INLINE FN_VHN FN_CAT(fn_stv_bf16, FN_ISUF)(FN_VF v)
{
    return __builtin_convertvector(FN_BF16_ROUND(FN_VUN, v), FN_VHN);
}

FN_TARGET FN_INLINE FN_VFH FN_CAT(fn_ldh_bf16, FN_ISUF)(const uint16_t *p)
{
    FN_VHD h;
    memcpy(&h, p, sizeof h);
    return (FN_VFH)(__builtin_convertvector(h, FN_VUD) << 16);
}

FN_TARGET FN_INLINE FN_VHD FN_CAT(fn_sth_bf16, FN_ISUF)(FN_VFH v)
{
    return __builtin_convertvector(FN_BF16_ROUND(FN_VUD, v), FN_VHD);
}
#endif

/* ------------------------------------------------------------------ the bodies */

/* FN_EXACT_SUMS: n copies of one value sum exactly in float64 (n < 2^29; not for double).
 * FN_T_BIG: a spread |x - mean| past which x - mean may overflow FN_T lanes (rows whose
 * sqrt(M2) passes it are applied in float64; for double data, never) */
#define FN_T float
#define FN_S float
#define FN_HALF 0
#define FN_SUF FN_CAT(_f32, FN_ISUF)
#define FN_T_BIG 1e38
#define FN_EXACT_SUMS 1
#define FN_LD1(p) (*(p))
#define FN_STS(v) ((float)(v))
#define FN_LD8 FN_LD8F
#define FN_ST8 FN_ST8F
#define FN_ST8_NT FN_ST8F_NT
#define FN_LDV FN_LDV_RAW
#define FN_STV FN_STV_RAW
#define FN_STV_NT FN_STV_NT_RAW
#define FN_VT FN_VF
#define FN_VN FN_LF
#define FN_ACC64 FN_ACC64F
#include "_simd_body.h" /* which undefines its parameters */

#define FN_T double
#define FN_S double
#define FN_HALF 0
#define FN_SUF FN_CAT(_f64, FN_ISUF)
#define FN_T_BIG HUGE_VAL
#define FN_EXACT_SUMS 0
#define FN_LD1(p) (*(p))
#define FN_STS(v) ((double)(v))
#define FN_LD8 FN_LD8D
#define FN_ST8 FN_ST8D
#define FN_ST8_NT FN_ST8D_NT
#define FN_LDV FN_LDV_RAW
#define FN_STV FN_STV_RAW
#define FN_STV_NT FN_STV_NT_RAW
#define FN_VT FN_VD
#define FN_VN FN_LD
#define FN_ACC64 FN_ACC64D
#include "_simd_body.h"

/* half precision: the same body on uint16_t bits, float32 lanes (FN_T) */
#if FN_VEC
#define FN_HLD8(LDH, p) __extension__({ FN_VFH f_ = LDH(p); FN_CVT8F(f_, 0); })
#define FN_HST8(STH, p, d) do { FN_VHD h_ = STH(__builtin_convertvector((d), FN_VFH)); \
                                memcpy((p), &h_, sizeof h_); } while (0)
#define FN_HST8_NT(STH, p, d) do { FN_VHD h_ = STH(__builtin_convertvector((d), FN_VFH)); \
                                   FN_STREAM((p), h_); } while (0)
#define FN_HSTV(STV, p, v) do { FN_VHN h_ = STV(v); memcpy((p), &h_, sizeof h_); } while (0)
#define FN_HSTV_NT(STV, p, v) do { FN_VHN h_ = STV(v); FN_STREAM((p), h_); } while (0)
#else
#define FN_HLD8(LDH, p) 0.0
#define FN_HST8(STH, p, d) ((void)(d))
#define FN_HST8_NT(STH, p, d) ((void)(d))
#define FN_HSTV(STV, p, v) ((void)(v))
#define FN_HSTV_NT(STV, p, v) ((void)(v))
#endif

#define FN_T float
#define FN_S uint16_t
#define FN_HALF 1
#define FN_SUF FN_CAT(_f16, FN_ISUF)
#define FN_T_BIG 1e38
#define FN_EXACT_SUMS 1
#define FN_LD1(p) FN_H2F(*(p))
#define FN_STS(v) FN_F2H((float)(v))
#define FN_LD8(p) FN_HLD8(FN_CAT(fn_ldh_f16, FN_ISUF), p)
#define FN_ST8(p, d) FN_HST8(FN_CAT(fn_sth_f16, FN_ISUF), p, d)
#define FN_ST8_NT(p, d) FN_HST8_NT(FN_CAT(fn_sth_f16, FN_ISUF), p, d)
#define FN_LDV(p) FN_CAT(fn_ldv_f16, FN_ISUF)(p)
#define FN_STV(p, v) FN_HSTV(FN_CAT(fn_stv_f16, FN_ISUF), p, v)
#define FN_STV_NT(p, v) FN_HSTV_NT(FN_CAT(fn_stv_f16, FN_ISUF), p, v)
#define FN_VT FN_VF
#define FN_VN FN_LF
#define FN_ACC64 FN_ACC64F
#include "_simd_body.h"

#define FN_T float
#define FN_S uint16_t
#define FN_HALF 1
#define FN_SUF FN_CAT(_bf16, FN_ISUF)
#define FN_T_BIG 1e38
#define FN_EXACT_SUMS 1
#define FN_LD1(p) fn_bf16_to_f32(*(p))
#define FN_STS(v) fn_f32_to_bf16((float)(v))
#define FN_LD8(p) FN_HLD8(FN_CAT(fn_ldh_bf16, FN_ISUF), p)
#define FN_ST8(p, d) FN_HST8(FN_CAT(fn_sth_bf16, FN_ISUF), p, d)
#define FN_ST8_NT(p, d) FN_HST8_NT(FN_CAT(fn_sth_bf16, FN_ISUF), p, d)
#define FN_LDV(p) FN_CAT(fn_ldv_bf16, FN_ISUF)(p)
#define FN_STV(p, v) FN_HSTV(FN_CAT(fn_stv_bf16, FN_ISUF), p, v)
#define FN_STV_NT(p, v) FN_HSTV_NT(FN_CAT(fn_stv_bf16, FN_ISUF), p, v)
#define FN_VT FN_VF
#define FN_VN FN_LF
#define FN_ACC64 FN_ACC64F
#include "_simd_body.h"

#undef FN_HLD8
#undef FN_HST8
#undef FN_HST8_NT
#undef FN_HSTV
#undef FN_HSTV_NT
#undef FN_H2F
#undef FN_F2H
#undef FN_VD
#undef FN_LD
#undef FN_VF
#undef FN_LF
#undef FN_VFH
#undef FN_VHN
#undef FN_VHD
#undef FN_VUN
#undef FN_VUD
#undef FN_TARGET
#undef FN_ISUF
#undef FN_ISA
