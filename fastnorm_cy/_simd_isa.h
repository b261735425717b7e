/* One instruction set's kernels: _simd_body.h for float and for double, at the vector width
 * and with the target attribute the includer (_simd.h) set; its parameters are undefined at
 * the end, ready for the next set. */
#define FN_T float
#define FN_SUF FN_CAT(_f32, FN_ISUF)
#define FN_LD8 FN_LD8F
#define FN_ST8 FN_ST8F
#define FN_ST8_NT FN_ST8F_NT
#define FN_VT FN_VF
#define FN_VN FN_LF
#define FN_ACC64 FN_ACC64F
#include "_simd_body.h" /* which undefines its parameters */

#define FN_T double
#define FN_SUF FN_CAT(_f64, FN_ISUF)
#define FN_LD8 FN_LD8D
#define FN_ST8 FN_ST8D
#define FN_ST8_NT FN_ST8D_NT
#define FN_VT FN_VD
#define FN_VN FN_LD
#define FN_ACC64 FN_ACC64D
#include "_simd_body.h" /* which undefines its parameters */

#undef FN_VD
#undef FN_LD
#undef FN_VF
#undef FN_LF
#undef FN_VFH
#undef FN_TARGET
#undef FN_ISUF
