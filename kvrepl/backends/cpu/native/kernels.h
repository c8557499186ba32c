/* What kernels.c and kv8.c share: the instruction set chosen at build time, the 8-lane vectors
 * (AVX2 registers or a scalar struct that mirrors them operation for operation), exp, the
 * attention's helpers and block size, and the 8-bit cache's row and functions (kv8.c). */
#ifndef KV_KERNELS_H
#define KV_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ATT_B 256 /* keys per attention block, at absolute positions */

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KV_AVX2 1
#include <immintrin.h>
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define KV_AVX512 1 /* the hot loops on 512-bit registers; the rest stays on the 8-lane path */
#endif
#endif

typedef int64_t i64;

/* ---------------------------------------------------------------- weights */
enum { FMT_U4 = 1, FMT_I8 = 2, FMT_F16 = 3, FMT_F32 = 4, FMT_I6 = 5, FMT_N4 = 6, FMT_I5 = 7, FMT_U5 = 8 };

typedef struct {
    int32_t fmt;
    int32_t block;     /* I8: 32 or 16 weights per (scale, min) */
    i64 n, k;          /* rows (outputs), columns (inputs); k % 32 == 0 */
    const void *q;     /* U4, I8: groups of 16 rows (qmatmul.c); F16: uint16 [n][k]; F32: float */
    const void *sc;    /* U4, I8: per group and block, 16 scales, then 16 mins where has_min
                        * (else none are stored); float16 with sc16 */
    int32_t has_min;   /* 1: the mins are stored (some min is not 0); 2: each min is -8 times
                        * its scale (Q4_0 as u4), not stored; 0: none */
    int32_t group;     /* U4, I8: 16 (the only layout the loops read) */
    int32_t sc16;      /* the scales and mins are float16 (each exactly the float it stands for) */
    const float *dd;   /* with sc8: per group and 256-weight superblock, 16 floats for the scales
                        * then (has_min) 16 for the mins, each row's */
    int32_t sc8;       /* the scales and mins are int8, each times its superblock's float in dd
                        * (an exact product: the float the file's scale is) */
} Weight;

/* ggml's kvalues_iq4nl: the level each 4-bit IQ4_NL and IQ4_XS index stands for (qmatmul.c
 * looks the n4 layout's indices up in it; repack.c reads the files' indices through it) */
static const int8_t IQ4NL[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};

/* an output: r (+ bias[n]) (+ the previous value *prev) */
static inline float finish(float r, const float *bias, i64 n, int accumulate, const float *prev) {
    if (bias) r = r + bias[n];
    return accumulate ? *prev + r : r;
}

/* qmatmul.c: the quantized matmul (U4, I8), and a quantized weight's row as floats */
void kv_qmatmul(const float *x, i64 M, i64 ldx, const Weight *W, float *out, i64 ldo,
                const float *bias, int accumulate);
void kv_qrow(const Weight *W, i64 n, float *out);

/* pool.c: the kernel threads */
typedef void (*kv_task)(const void *ctx, i64 item);
void kv_parallel(kv_task fn, const void *ctx, i64 n);

/* ---------------------------------------------------------------- 8-lane vectors */
#ifdef KV_AVX2
typedef __m256 v8;
static inline v8 v_zero(void) { return _mm256_setzero_ps(); }
static inline v8 v_set1(float a) { return _mm256_set1_ps(a); }
static inline v8 v_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void v_store(float *p, v8 a) { _mm256_storeu_ps(p, a); }
static inline v8 v_add(v8 a, v8 b) { return _mm256_add_ps(a, b); }
static inline v8 v_sub(v8 a, v8 b) { return _mm256_sub_ps(a, b); }
static inline v8 v_mul(v8 a, v8 b) { return _mm256_mul_ps(a, b); }
static inline v8 v_div(v8 a, v8 b) { return _mm256_div_ps(a, b); }
static inline v8 v_fma(v8 a, v8 b, v8 c) { return _mm256_fmadd_ps(a, b, c); }
static inline v8 v_fnma(v8 a, v8 b, v8 c) { return _mm256_fnmadd_ps(a, b, c); }
static inline v8 v_min(v8 a, v8 b) { return _mm256_min_ps(a, b); }
static inline v8 v_max(v8 a, v8 b) { return _mm256_max_ps(a, b); }
static inline v8 v_floor(v8 a) { return _mm256_floor_ps(a); }
static inline v8 v_pow2i(v8 fx) { /* 2^fx for integral fx in [-127, 128] */
    __m256i e = _mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
}
static inline float v_hsum(v8 a) {
    __m128 lo = _mm256_castps256_ps128(a), hi = _mm256_extractf128_ps(a, 1);
    __m128 s4 = _mm_add_ps(lo, hi);
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}
static inline v8 v_h16(const uint16_t *p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }
static inline void v_store_h16(uint16_t *p, v8 a) {
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(a, _MM_FROUND_TO_NEAREST_INT));
}
static inline v8 v_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
/* 32 4-bit weights (16 bytes: low nibbles are k 0..15, high nibbles k 16..31) as 4 vectors */
static inline void v_u4(const uint8_t *p, v8 w[4]) {
    __m128i raw = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(15);
    __m128i lo = _mm_and_si128(raw, m), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), m);
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
}
#if defined(KV_AVX512) && defined(__AVX512VNNI__)
#define KV_ISA "avx512vnni"
#elif defined(KV_AVX512)
#define KV_ISA "avx512"
#else
#define KV_ISA "avx2"
#endif
#else
typedef struct { float f[8]; } v8;
#define LANES(expr) do { for (int l_ = 0; l_ < 8; l_++) { expr; } } while (0)
static inline v8 v_zero(void) { v8 r; LANES(r.f[l_] = 0.0f); return r; }
static inline v8 v_set1(float a) { v8 r; LANES(r.f[l_] = a); return r; }
static inline v8 v_load(const float *p) { v8 r; LANES(r.f[l_] = p[l_]); return r; }
static inline void v_store(float *p, v8 a) { LANES(p[l_] = a.f[l_]); }
static inline v8 v_add(v8 a, v8 b) { v8 r; LANES(r.f[l_] = a.f[l_] + b.f[l_]); return r; }
static inline v8 v_sub(v8 a, v8 b) { v8 r; LANES(r.f[l_] = a.f[l_] - b.f[l_]); return r; }
static inline v8 v_mul(v8 a, v8 b) { v8 r; LANES(r.f[l_] = a.f[l_] * b.f[l_]); return r; }
static inline v8 v_div(v8 a, v8 b) { v8 r; LANES(r.f[l_] = a.f[l_] / b.f[l_]); return r; }
static inline v8 v_fma(v8 a, v8 b, v8 c) { v8 r; LANES(r.f[l_] = fmaf(a.f[l_], b.f[l_], c.f[l_])); return r; }
static inline v8 v_fnma(v8 a, v8 b, v8 c) { v8 r; LANES(r.f[l_] = fmaf(-a.f[l_], b.f[l_], c.f[l_])); return r; }
/* x86 min/max semantics: the second operand when either is NaN */
static inline v8 v_min(v8 a, v8 b) { v8 r; LANES(r.f[l_] = a.f[l_] < b.f[l_] ? a.f[l_] : b.f[l_]); return r; }
static inline v8 v_max(v8 a, v8 b) { v8 r; LANES(r.f[l_] = a.f[l_] > b.f[l_] ? a.f[l_] : b.f[l_]); return r; }
static inline v8 v_floor(v8 a) { v8 r; LANES(r.f[l_] = floorf(a.f[l_])); return r; }
static inline v8 v_pow2i(v8 fx) {
    v8 r;
    for (int l = 0; l < 8; l++) {
        uint32_t bits = (uint32_t)((int32_t)fx.f[l] + 127) << 23;
        memcpy(&r.f[l], &bits, 4);
    }
    return r;
}
static inline float v_hsum(v8 a) {
    float s4[4], s2[2];
    for (int i = 0; i < 4; i++) s4[i] = a.f[i] + a.f[i + 4];
    s2[0] = s4[0] + s4[2];
    s2[1] = s4[1] + s4[3];
    return s2[0] + s2[1];
}
static inline float h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 31, m = h & 1023, bits;
    if (e == 0) {
        if (m == 0) bits = s;
        else { /* subnormal: normalise */
            e = 113;
            while (!(m & 1024)) { m <<= 1; e--; }
            bits = s | (e << 23) | ((m & 1023) << 13);
        }
    } else if (e == 31) bits = s | 0x7f800000 | (m << 13);
    else bits = s | ((e + 112) << 23) | (m << 13);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}
static inline uint16_t f2h(float f) { /* round to nearest even, as vcvtps2ph */
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t s = (x >> 16) & 0x8000, e = (x >> 23) & 255, m = x & 0x7fffff;
    if (e == 255) return (uint16_t)(s | 0x7c00 | (m ? 0x200 | (m >> 13) : 0));
    int32_t he = (int32_t)e - 112;
    if (he >= 31) return (uint16_t)(s | 0x7c00);
    if (he <= 0) {
        if (he < -10) return (uint16_t)s;
        m |= 0x800000;
        uint32_t shift = (uint32_t)(14 - he), r = m >> shift, rem = m & ((1u << shift) - 1),
                 half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(s | r);
    }
    uint32_t r = ((uint32_t)he << 10) | (m >> 13), rem = m & 0x1fff;
    if (rem > 0x1000 || (rem == 0x1000 && (r & 1))) r++;
    return (uint16_t)(s | r);
}
static inline v8 v_h16(const uint16_t *p) { v8 r; LANES(r.f[l_] = h2f(p[l_])); return r; }
static inline void v_store_h16(uint16_t *p, v8 a) { LANES(p[l_] = f2h(a.f[l_])); }
static inline v8 v_i8(const int8_t *p) { v8 r; LANES(r.f[l_] = (float)p[l_]); return r; }
static inline void v_u4(const uint8_t *p, v8 w[4]) {
    for (int l = 0; l < 8; l++) {
        w[0].f[l] = (float)(p[l] & 15);
        w[1].f[l] = (float)(p[8 + l] & 15);
        w[2].f[l] = (float)(p[l] >> 4);
        w[3].f[l] = (float)(p[8 + l] >> 4);
    }
}
#define KV_ISA "scalar"
#endif

/* exp, Cephes' polynomial: the same operations on every lane and in every caller */
static inline v8 v_exp(v8 x) {
    x = v_min(x, v_set1(88.3762626647949f));
    x = v_max(x, v_set1(-88.3762626647949f));
    v8 fx = v_floor(v_fma(x, v_set1(1.44269504088896341f), v_set1(0.5f)));
    x = v_fnma(fx, v_set1(0.693359375f), x);
    x = v_fnma(fx, v_set1(-2.12194440e-4f), x);
    v8 y = v_set1(1.9875691500e-4f);
    y = v_fma(y, x, v_set1(1.3981999507e-3f));
    y = v_fma(y, x, v_set1(8.3334519073e-3f));
    y = v_fma(y, x, v_set1(4.1665795894e-2f));
    y = v_fma(y, x, v_set1(1.6666665459e-1f));
    y = v_fma(y, x, v_set1(5.0000001201e-1f));
    y = v_fma(y, v_mul(x, x), x);
    y = v_add(y, v_set1(1.0f));
    return v_mul(y, v_pow2i(fx));
}
static inline float s_exp(float x) { /* lane 0 of v_exp */
    float b[8];
    v_store(b, v_exp(v_set1(x)));
    return b[0];
}

/* ---------------------------------------------------------------- attention helpers */
/* Lane i of the result (i < 4) is the sum of a[i]'s 8 lanes, in the tree
 * ((0+1)+(2+3))+((4+5)+(6+7)); the scalar fallback follows the same tree. */
#ifdef KV_AVX2
static inline __m128 v_hsum4(v8 a0, v8 a1, v8 a2, v8 a3) {
    __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    return _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1));
}
static inline void store4(float *p, __m128 v) { _mm_storeu_ps(p, v); }
#else
typedef struct { float f[4]; } v4;
static inline v4 v_hsum4(v8 a0, v8 a1, v8 a2, v8 a3) {
    v4 r;
    const v8 *a[4] = {&a0, &a1, &a2, &a3};
    for (int i = 0; i < 4; i++) {
        const float *x = a[i]->f;
        r.f[i] = ((x[0] + x[1]) + (x[2] + x[3])) + ((x[4] + x[5]) + (x[6] + x[7]));
    }
    return r;
}
static inline void store4(float *p, v4 v) { memcpy(p, v.f, 16); }
#endif

static inline void prefetch(const void *p) { __builtin_prefetch(p, 0, 3); }
#define PF_KEYS 16 /* keys ahead that the attention loops ask the memory for */

static inline i64 first_key(i64 pos, i64 window) {
    return window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0;
}

static inline float max_of(const float *x, i64 n) {
    i64 j = 0;
    float mx = x[0];
    if (n >= 8) {
        v8 m = v_load(x);
        for (j = 8; j + 8 <= n; j += 8) m = v_max(m, v_load(x + j));
        float b[8];
        v_store(b, m);
        for (int i = 0; i < 8; i++) mx = b[i] > mx ? b[i] : mx;
    }
    for (; j < n; j++) mx = x[j] > mx ? x[j] : mx;
    return mx;
}

/* ---------------------------------------------------------------- the 8-bit cache (kv8.c) */
/* A position's row of one kv head: D int8 values, then their float32 scale (kv_bits 8) */
#define KV8_ROW(D) ((D) + 4)
void kv_store8(const float *k, const float *v, i64 M, i64 ld, i64 kvh, i64 D, int8_t *kc,
               int8_t *vc, i64 cap, i64 pos0);
void kv_att_row8(const float *q, int G, i64 D, const int8_t *kr, const int8_t *vr, i64 n,
                 float scale, float softcap, float *part);

#endif
