/* kvrepl's CPU kernels: quantized matmul, attention over an fp16 or 8-bit cache, norms, rope,
 * activations.
 *
 * Batch invariance by construction: every output element is computed by one fixed sequence of
 * float operations that depends on its own inputs and sizes only, never on how many rows are
 * computed with it, how they are tiled, or how many threads run. So a token's K/V and logits are
 * bit-identical whether it was computed in a prefill chunk of any size or alone in a decode step
 * (reuse equals recompute, bit for bit). The rules that make it so:
 *   - a dot product accumulates 8 lanes in k order (lane = k mod 8) and ends with one fixed
 *     horizontal sum; tiles over rows/columns only change which outputs run side by side;
 *   - threads split outputs, never a reduction: a job is items of fixed size (pool.c runs them
 *     on however many threads, in any order);
 *   - attention splits a query's keys into blocks at fixed absolute positions (ATT_B), computes
 *     each block's (max, sum, weighted values) and combines blocks in order, whatever ran them;
 *   - no fused multiply-add that the compiler chooses: built with -ffp-contract=off, FMAs are
 *     explicit. The scalar fallback mirrors the AVX2 path operation for operation; the AVX-512
 *     matmul loops put two weight rows' 8 lanes side by side in one register, each half doing
 *     what the AVX2 path does (integer dot products are exact, whichever instructions add).
 *
 * Weights are kept in the file's own quantized values, repacked at load (exactly) into:
 *   U4: 4-bit unsigned per weight, blocks of 32 along k, a float (scale, min) per block:
 *       w = scale * q + min  (GGUF Q4_0, Q4_1, Q4_K);
 *   I8: 8-bit signed, blocks of 32 or 16, a float (scale, min) per block (Q8_0, Q6_K, Q5_x);
 *   F16 and F32: plain.
 * The K/V cache is fp16 or, with kv_bits 8, int8 rows with a scale (kv8.c stores and reads them).
 * Built and loaded by kvrepl/native/__init__.py; called through ctypes with raw pointers.
 */
#include "kernels.h" /* the vectors and exp; the 8-bit cache's functions are kv8.c's */

#define KV_VERSION 2

/* ---------------------------------------------------------------- weights */
enum { FMT_U4 = 1, FMT_I8 = 2, FMT_F16 = 3, FMT_F32 = 4 };

typedef struct {
    int32_t fmt;
    int32_t block;     /* I8: 32 or 16 weights per (scale, min) */
    i64 n, k;          /* rows (outputs), columns (inputs); k % 32 == 0 */
    const void *q;     /* U4: uint8 [n][k/2]; I8: int8 [n][k]; F16: uint16 [n][k]; F32: float */
    const void *sc;    /* U4, I8: float [n][k/block][2] = (scale, min); float16 with sc16 */
    int32_t has_min;   /* any min is not 0 */
    int32_t group;     /* U4, I8: rows interleaved per block in groups of this many (1 or 4) */
    int32_t sc16;      /* the (scale, min) pairs are float16 (each exactly the float it stands for) */
} Weight;

/* A quantized weight row is blocks of 32 (or 16) integers q with a float (scale, min) each:
 * w = q * scale + min. Activations are quantized per block of 32 to 16-bit integers with a float
 * step (amax / 32767: a relative error of 1.5e-5 of the block's largest value, near float32 and
 * far finer than llama.cpp's 8 bits); the products then run on integer units, exactly:
 *   dot = sum over blocks of fma-accumulated (scale * step) * int_sum + mins * sum(x).
 * Every row of x is quantized the same way whatever runs with it, so this stays batch invariant.
 * Float weights (F16, F32) take float activations: acc = fma(x, w, acc) in k order. */
typedef struct {
    const uint8_t *q;
    const void *sc;    /* float, or float16 with sc16 */
    i64 k, qrow, srow; /* weights per row; bytes of q per row; (scale, min) pairs per row */
    int block, has_min, group, sc16;
} Wv;

/* Row n's q (`bytes` per block of 32) from its block 0; block b is b * bytes * group further.
 * Rows may be interleaved in groups of 4 (quant.py, _planar): block b of rows 4g..4g+3 is one run
 * of 16-bit words, so a tile of 4 rows reads one stream and unpacks it with shifts and masks. *sh:
 * -1 for rows one after the other; else the row's 16 words are at the pointer returned, its
 * weights j at bit sh of word j and 16 + j at bit sh + 4 (u4), or in the low / high byte (i8). */
static inline const uint8_t *qrow(const Wv *w, i64 n, i64 bytes, int *sh) {
    i64 nb = w->k / 32, r = n % 4;
    if (w->group == 1) {
        *sh = -1;
        return w->q + n * nb * bytes;
    }
    const uint8_t *base = w->q + (n / 4) * nb * 4 * bytes;
    *sh = bytes == 16 ? 8 * (int)(r / 2) : 0;
    return base + (bytes == 16 ? 0 : (r / 2) * 64) + (r % 2) * 32;
}
/* the (scale, min) pairs of row n's block b: rows interleaved block by block in their groups */
static inline i64 sblock(const Wv *w, i64 n, i64 b) { /* an index into sc */
    i64 g = w->group, nb = w->k / 32, sub = 32 / w->block;
    return ((n / g) * nb * g + b * g + n % g) * sub * 2;
}
/* cnt scales and mins from index i, as floats (float16 ones convert exactly) */
static inline void sfetch(const Wv *w, i64 i, float *s, int cnt) {
    for (int c = 0; c < cnt; c++) {
        if (!w->sc16) s[c] = ((const float *)w->sc)[i + c];
#ifdef KV_AVX2
        else s[c] = _cvtsh_ss(((const uint16_t *)w->sc)[i + c]);
#else
        else s[c] = h2f(((const uint16_t *)w->sc)[i + c]);
#endif
    }
}

typedef struct { /* quantized rows of x */
    const int16_t *q;  /* [M][K] */
    const float *d;    /* [M][K/32] steps */
    const float *s16;  /* [M][K/16] sums of x, for the min terms (blocks of 16) */
    const float *s32;  /* [M][K/32] = s16[2b] + s16[2b+1] (blocks of 32) */
    i64 k;
} Xq;

#ifdef KV_AVX2
typedef __m256i vi;   /* 8 int32 lanes */
typedef __m256i wv16; /* 16 int16 weights */
/* 32 weights as two vectors of 16 int16 (weights 0-15 and 16-31) */
static inline void w16_u4(const uint8_t *p, int sh, wv16 *w0, wv16 *w1) {
    if (sh >= 0) { /* planar words */
        __m256i v = _mm256_loadu_si256((const __m256i *)p), m = _mm256_set1_epi16(15);
        *w0 = _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(sh)), m);
        *w1 = _mm256_and_si256(_mm256_srl_epi16(v, _mm_cvtsi32_si128(sh + 4)), m);
        return;
    }
    __m128i raw = _mm_loadu_si128((const __m128i *)p), m = _mm_set1_epi8(15);
    *w0 = _mm256_cvtepu8_epi16(_mm_and_si128(raw, m));
    *w1 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), m));
}
static inline void w16_i8(const uint8_t *p, int sh, wv16 *w0, wv16 *w1) {
    if (sh >= 0) { /* planar words: low bytes weights 0-15, high bytes 16-31 */
        __m256i v = _mm256_loadu_si256((const __m256i *)p);
        *w0 = _mm256_srai_epi16(_mm256_slli_epi16(v, 8), 8);
        *w1 = _mm256_srai_epi16(v, 8);
        return;
    }
    *w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    *w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
}
/* 16 int16 as two 8-lane float vectors */
static inline void w16_floats(wv16 a, v8 *lo, v8 *hi) {
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_castsi256_si128(a)));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(a, 1)));
}
/* lane l = w[2l] x[2l] + w[2l+1] x[2l+1], exactly */
static inline vi vi_dot(wv16 w, const int16_t *x) {
    return _mm256_madd_epi16(w, _mm256_loadu_si256((const __m256i *)x));
}
static inline vi vi_add(vi a, vi b) { return _mm256_add_epi32(a, b); }
static inline v8 vi_float(vi a) { return _mm256_cvtepi32_ps(a); }
static inline float v_amax(const float *x) { /* max |x| of 32 */
    __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 a = _mm256_max_ps(_mm256_andnot_ps(sign, v_load(x)), _mm256_andnot_ps(sign, v_load(x + 8)));
    a = _mm256_max_ps(a, _mm256_max_ps(_mm256_andnot_ps(sign, v_load(x + 16)), _mm256_andnot_ps(sign, v_load(x + 24))));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
}
static inline void q16_store(int16_t *q, const float *x, float inv) { /* 32 values, nearest even */
    __m256 f = _mm256_set1_ps(inv);
    for (int i = 0; i < 32; i += 16) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v_load(x + i), f));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(v_load(x + i + 8), f));
        __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8);
        _mm256_storeu_si256((__m256i *)(q + i), p);
    }
}
#else
typedef struct { int32_t l[8]; } vi;
typedef struct { int32_t v[16]; } wv16;
static inline void w16_u4(const uint8_t *p, int sh, wv16 *w0, wv16 *w1) {
    for (int i = 0; i < 16; i++) {
        if (sh >= 0) {
            uint32_t wd = (uint32_t)p[2 * i] | (uint32_t)p[2 * i + 1] << 8;
            w0->v[i] = (wd >> sh) & 15, w1->v[i] = (wd >> (sh + 4)) & 15;
        } else {
            w0->v[i] = p[i] & 15, w1->v[i] = p[i] >> 4;
        }
    }
}
static inline void w16_i8(const uint8_t *p, int sh, wv16 *w0, wv16 *w1) {
    for (int i = 0; i < 16; i++) {
        if (sh >= 0) w0->v[i] = (int8_t)p[2 * i], w1->v[i] = (int8_t)p[2 * i + 1];
        else w0->v[i] = (int8_t)p[i], w1->v[i] = (int8_t)p[16 + i];
    }
}
static inline void w16_floats(wv16 a, v8 *lo, v8 *hi) {
    LANES((lo->f[l_] = (float)a.v[l_], hi->f[l_] = (float)a.v[8 + l_]));
}
static inline vi vi_dot(wv16 w, const int16_t *x) {
    vi r;
    for (int l = 0; l < 8; l++) r.l[l] = w.v[2 * l] * x[2 * l] + w.v[2 * l + 1] * x[2 * l + 1];
    return r;
}
static inline vi vi_add(vi a, vi b) { for (int l = 0; l < 8; l++) a.l[l] += b.l[l]; return a; }
static inline v8 vi_float(vi a) { v8 r; LANES(r.f[l_] = (float)a.l[l_]); return r; }
static inline float v_amax(const float *x) {
    float a = 0.0f;
    for (int i = 0; i < 32; i++) a = fabsf(x[i]) > a ? fabsf(x[i]) : a;
    return a;
}
static inline void q16_store(int16_t *q, const float *x, float inv) {
    for (int i = 0; i < 32; i++) {
        float v = nearbyintf(x[i] * inv);
        q[i] = (int16_t)(v > 32767.0f ? 32767.0f : v < -32768.0f ? -32768.0f : v);
    }
}
#endif

typedef struct {
    const float *x;
    i64 M, ldx, K;
    int16_t *q;
    float *d, *s16, *s32;
} QuantJob;

#define QROWS 8 /* rows of x an item quantizes */

static void quantize_rows(const void *ctx, i64 item) {
    const QuantJob *j = ctx;
    i64 K = j->K, m1 = (item + 1) * QROWS < j->M ? (item + 1) * QROWS : j->M;
    for (i64 m = item * QROWS; m < m1; m++)
        for (i64 b = 0; b < K / 32; b++) {
            const float *xb = j->x + m * j->ldx + b * 32;
            float amax = v_amax(xb);
            j->d[m * (K / 32) + b] = amax / 32767.0f;
            q16_store(j->q + m * K + b * 32, xb, amax > 0.0f ? 32767.0f / amax : 0.0f);
            float *sh = j->s16 + m * (K / 16) + 2 * b;
            for (int h = 0; h < 2; h++) sh[h] = v_hsum(v_add(v_load(xb + 16 * h), v_load(xb + 16 * h + 8)));
            j->s32[m * (K / 32) + b] = sh[0] + sh[1];
        }
}

static void quantize_x(const float *x, i64 M, i64 ldx, i64 K, int16_t *q, float *d, float *s16,
                       float *s32) {
    QuantJob j = {x, M, ldx, K, q, d, s16, s32};
    kv_parallel(quantize_rows, &j, (M + QROWS - 1) / QROWS);
}

static inline float finish(float r, const float *bias, i64 n, int accumulate, const float *prev) {
    if (bias) r = r + bias[n];
    return accumulate ? *prev + r : r;
}

/* Quantized weights: outputs [m0, m0+MT) x [n0, n0+NT). Per output and block: the integer dot of
 * the block's 32 weights with x's 32 int16 (8 exact int32 lanes), acc = fma(scale * step,
 * float(lanes), acc) (once per 16 for blocks of 16), and the mins add min * sum(x) to a scalar.
 * Output = hsum(acc) + mins. The sequence per output is the same in every tile shape. One
 * function per (weight kind, tile shape); a kind fixes the format, SUB (scales per 32) and MIN. */
#define DEF_qTILE(KIND, WFN, BYTES, SUB, MIN, MT, NT)                                            \
    static void qtile_##KIND##_##MT##_##NT(const Xq *x, const Wv *w, float *out, i64 ldo,        \
                                            const float *bias, int accumulate, i64 m0, i64 n0) { \
        v8 acc[NT][MT];                                                                          \
        float mins[NT][MT];                                                                      \
        const uint8_t *wr[NT];                                                                   \
        int sh[NT];                                                                              \
        i64 sr[NT];                                                                              \
        const int16_t *xr[MT];                                                                   \
        const float *dr[MT], *sxr[MT], *sx32[MT];                                                \
        i64 nb = w->k / 32;                                                                      \
        for (int i = 0; i < NT; i++) {                                                           \
            wr[i] = qrow(w, n0 + i, BYTES, &sh[i]);                                              \
            sr[i] = sblock(w, n0 + i, 0);                                                        \
            for (int j = 0; j < MT; j++) acc[i][j] = v_zero(), mins[i][j] = 0.0f;                \
        }                                                                                        \
        for (int j = 0; j < MT; j++) {                                                           \
            xr[j] = x->q + (m0 + j) * w->k;                                                      \
            dr[j] = x->d + (m0 + j) * nb;                                                        \
            sxr[j] = x->s16 + (m0 + j) * (w->k / 16);                                            \
            sx32[j] = x->s32 + (m0 + j) * nb;                                                    \
        }                                                                                        \
        for (i64 b = 0; b < nb; b++) {                                                           \
            _Pragma("GCC unroll 8")                                                              \
            for (int i = 0; i < NT; i++) {                                                       \
                wv16 w0, w1;                                                                     \
                WFN(wr[i] + b * BYTES * w->group, sh[i], &w0, &w1);                              \
                float s[4];                                                                      \
                sfetch(w, sr[i] + b * SUB * 2 * w->group, s, 2 * SUB);                           \
                v8 sc0 = v_set1(s[0]), sc2 = v_set1(s[SUB == 2 ? 2 : 0]);                        \
                _Pragma("GCC unroll 8")                                                          \
                for (int j = 0; j < MT; j++) {                                                   \
                    v8 step = v_set1(dr[j][b]); /* scale * step, per lane */                     \
                    vi p0 = vi_dot(w0, xr[j] + b * 32), p1 = vi_dot(w1, xr[j] + b * 32 + 16);    \
                    if (SUB == 1) {                                                              \
                        acc[i][j] = v_fma(v_mul(sc0, step), vi_float(vi_add(p0, p1)), acc[i][j]); \
                        if (MIN) mins[i][j] = fmaf(s[1], sx32[j][b], mins[i][j]);                \
                    } else {                                                                     \
                        acc[i][j] = v_fma(v_mul(sc0, step), vi_float(p0), acc[i][j]);            \
                        acc[i][j] = v_fma(v_mul(sc2, step), vi_float(p1), acc[i][j]);            \
                        if (MIN) {                                                               \
                            mins[i][j] = fmaf(s[1], sxr[j][2 * b], mins[i][j]);                  \
                            mins[i][j] = fmaf(s[3], sxr[j][2 * b + 1], mins[i][j]);              \
                        }                                                                        \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int i = 0; i < NT; i++)                                                             \
            for (int j = 0; j < MT; j++) {                                                       \
                float *o = out + (m0 + j) * ldo + n0 + i;                                        \
                *o = finish(v_hsum(acc[i][j]) + mins[i][j], bias, n0 + i, accumulate, o);        \
            }                                                                                    \
    }
#ifdef KV_AVX512
/* Two weight rows side by side in one 512-bit register, row i in lanes 0-7 and row i+1 in lanes
 * 8-15: each half does what the 8-lane path does for its row, operation for operation (integer
 * sums are exact whichever instruction adds them), so the results are bit-identical, with about
 * half the instructions. */
static inline __m256i pair128(const uint8_t *a, const uint8_t *b) {
    __m128i lo = _mm_loadu_si128((const __m128i *)a), hi = _mm_loadu_si128((const __m128i *)b);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(lo), hi, 1);
}
/* one block of rows a and b as int16: w0 = [a k0-15 | b k0-15], w1 = [a k16-31 | b k16-31] */
static inline void w2_u4(const uint8_t *a, const uint8_t *b, int sh, __m512i *w0, __m512i *w1) {
    if (sh >= 0) { /* planar: rows 2p, 2p + 1 of a group are the 32 words at a */
        __m512i v = _mm512_loadu_si512(a), m = _mm512_set1_epi16(15);
        *w0 = _mm512_and_si512(_mm512_srl_epi16(v, _mm_cvtsi32_si128(sh)), m);
        *w1 = _mm512_and_si512(_mm512_srl_epi16(v, _mm_cvtsi32_si128(sh + 4)), m);
        return;
    }
    __m256i raw = pair128(a, b), m = _mm256_set1_epi8(15);
    *w0 = _mm512_cvtepu8_epi16(_mm256_and_si256(raw, m));
    *w1 = _mm512_cvtepu8_epi16(_mm256_and_si256(_mm256_srli_epi16(raw, 4), m));
}
static inline void w2_i8(const uint8_t *a, const uint8_t *b, int sh, __m512i *w0, __m512i *w1) {
    if (sh >= 0) {
        __m512i v = _mm512_loadu_si512(a);
        *w0 = _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8);
        *w1 = _mm512_srai_epi16(v, 8);
        return;
    }
    *w0 = _mm512_cvtepi8_epi16(pair128(a, b));
    *w1 = _mm512_cvtepi8_epi16(pair128(a + 16, b + 16));
}
/* 8 * sub floats of sc from index i (a group's block: its 4 rows' pairs), float16 or not */
static inline __m512 scales8(const Wv *w, i64 i, int sub) {
    if (w->sc16) {
        const uint16_t *h = (const uint16_t *)w->sc + i;
        if (sub == 1) return _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)h)));
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)h));
    }
    const float *f = (const float *)w->sc + i;
    return sub == 1 ? _mm512_castps256_ps512(_mm256_loadu_ps(f)) : _mm512_loadu_ps(f);
}
/* the 4 rows of a planar group's block (quant.py, _planar): w0[p], w1[p] for rows 2p, 2p + 1 */
static inline void w4_u4(const uint8_t *q, __m512i w0[2], __m512i w1[2]) {
    __m512i v = _mm512_loadu_si512(q), m = _mm512_set1_epi16(15);
    w0[0] = _mm512_and_si512(v, m);
    w1[0] = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
    w0[1] = _mm512_and_si512(_mm512_srli_epi16(v, 8), m);
    w1[1] = _mm512_srli_epi16(v, 12);
}
static inline void w4_i8(const uint8_t *q, __m512i w0[2], __m512i w1[2]) {
    for (int p = 0; p < 2; p++) {
        __m512i v = _mm512_loadu_si512(q + 64 * p);
        w0[p] = _mm512_srai_epi16(_mm512_slli_epi16(v, 8), 8);
        w1[p] = _mm512_srai_epi16(v, 8);
    }
}
static inline __m512i x_both(const int16_t *x) { /* 16 int16 of x in both halves */
    return _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)x));
}
static inline __m512i dot_both(__m512i w0, __m512i x0, __m512i w1, __m512i x1) { /* p0 + p1 */
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(_mm512_madd_epi16(w0, x0), w1, x1);
#else
    return _mm512_add_epi32(_mm512_madd_epi16(w0, x0), _mm512_madd_epi16(w1, x1));
#endif
}
static inline __m512 halves(float a, float b) { /* a in lanes 0-7, b in 8-15 */
    return _mm512_mask_broadcastss_ps(_mm512_set1_ps(a), 0xFF00, _mm_set_ss(b));
}
static inline v8 half_lo(__m512 a) { return _mm512_castps512_ps256(a); }
static inline v8 half_hi(__m512 a) {
    return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
}

#define DEF_qTILE2(KIND, WFN2, BYTES, SUB, MIN, MT, NT, NAME) /* NT even: rows in pairs */     \
    static void NAME(const Xq *x, const Wv *w, float *out, i64 ldo,                              \
                                            const float *bias, int accumulate, i64 m0, i64 n0) { \
        __m512 acc[NT / 2][MT];                                                                  \
        float mins[NT][MT];                                                                      \
        const uint8_t *wr[NT];                                                                   \
        int sh[NT];                                                                              \
        i64 sr[NT];                                                                              \
        const int16_t *xr[MT];                                                                   \
        const float *dr[MT], *sxr[MT], *sx32[MT];                                                \
        i64 nb = w->k / 32;                                                                      \
        for (int i = 0; i < NT; i++) {                                                           \
            wr[i] = qrow(w, n0 + i, BYTES, &sh[i]);                                              \
            sr[i] = sblock(w, n0 + i, 0);                                                        \
            for (int j = 0; j < MT; j++) acc[i / 2][j] = _mm512_setzero_ps(), mins[i][j] = 0.0f; \
        }                                                                                        \
        for (int j = 0; j < MT; j++) {                                                           \
            xr[j] = x->q + (m0 + j) * w->k;                                                      \
            dr[j] = x->d + (m0 + j) * nb;                                                        \
            sxr[j] = x->s16 + (m0 + j) * (w->k / 16);                                            \
            sx32[j] = x->s32 + (m0 + j) * nb;                                                    \
        }                                                                                        \
        for (i64 b = 0; b < nb; b++) {                                                           \
            _Pragma("GCC unroll 4")                                                              \
            for (int i = 0; i < NT; i += 2) {                                                    \
                __m512i w0, w1;                                                                  \
                WFN2(wr[i] + b * BYTES * w->group, wr[i + 1] + b * BYTES * w->group, sh[i], &w0, &w1); \
                float s[4], t[4];                                                                \
                sfetch(w, sr[i] + b * SUB * 2 * w->group, s, 2 * SUB);                           \
                sfetch(w, sr[i + 1] + b * SUB * 2 * w->group, t, 2 * SUB);                       \
                __m512 sc0 = halves(s[0], t[0]), sc2 = SUB == 2 ? halves(s[2], t[2]) : sc0;      \
                _Pragma("GCC unroll 8")                                                          \
                for (int j = 0; j < MT; j++) {                                                   \
                    __m512 step = _mm512_set1_ps(dr[j][b]); /* scale * step, per lane */         \
                    __m512i x0 = x_both(xr[j] + b * 32), x1 = x_both(xr[j] + b * 32 + 16);       \
                    __m512 *a = &acc[i / 2][j];                                                  \
                    if (SUB == 1) {                                                              \
                        __m512 p = _mm512_cvtepi32_ps(dot_both(w0, x0, w1, x1));                 \
                        *a = _mm512_fmadd_ps(_mm512_mul_ps(sc0, step), p, *a);                   \
                        if (MIN) {                                                               \
                            mins[i][j] = fmaf(s[1], sx32[j][b], mins[i][j]);                     \
                            mins[i + 1][j] = fmaf(t[1], sx32[j][b], mins[i + 1][j]);             \
                        }                                                                        \
                    } else {                                                                     \
                        __m512 p0 = _mm512_cvtepi32_ps(_mm512_madd_epi16(w0, x0));               \
                        __m512 p1 = _mm512_cvtepi32_ps(_mm512_madd_epi16(w1, x1));               \
                        *a = _mm512_fmadd_ps(_mm512_mul_ps(sc0, step), p0, *a);                  \
                        *a = _mm512_fmadd_ps(_mm512_mul_ps(sc2, step), p1, *a);                  \
                        if (MIN) {                                                               \
                            mins[i][j] = fmaf(s[1], sxr[j][2 * b], mins[i][j]);                  \
                            mins[i][j] = fmaf(s[3], sxr[j][2 * b + 1], mins[i][j]);              \
                            mins[i + 1][j] = fmaf(t[1], sxr[j][2 * b], mins[i + 1][j]);          \
                            mins[i + 1][j] = fmaf(t[3], sxr[j][2 * b + 1], mins[i + 1][j]);      \
                        }                                                                        \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int i = 0; i < NT; i++)                                                             \
            for (int j = 0; j < MT; j++) {                                                       \
                float *o = out + (m0 + j) * ldo + n0 + i;                                        \
                v8 h = i % 2 ? half_hi(acc[i / 2][j]) : half_lo(acc[i / 2][j]);                  \
                *o = finish(v_hsum(h) + mins[i][j], bias, n0 + i, accumulate, o);                \
            }                                                                                    \
    }
/* Blocks ahead that the decode loop asks the memory for, in rows long enough (2 * QPF blocks) to
 * stream: 1B-shape decode 24.5 -> 22.2 ms a step on a 2-core Zen 4; short rows (the 135M's
 * 576) ran no faster with it. Only loads: no result changes. */
#define QPF 32
/* Up to MT rows of x (decode, or a few drafted tokens) against 4 weight rows interleaved in a
 * group (w->group == 4): block b of the 4 rows is one run of bytes and of (scale, min) pairs, so
 * it is unpacked once for every row of x, the 4 rows' scales are one vector (times each row's
 * step) and their mins one fma per row of x (lane 2r+1 is weight row r's fmaf); every lane as
 * the 8-lane path computes it. */
#define DEF_qDEC4(KIND, WFN4, BYTES, SUB, MIN, MT)                                              \
    static void qdec4_##KIND##_##MT(const Xq *x, const Wv *w, float *out, i64 ldo,               \
                                    const float *bias, int accumulate, i64 m0, i64 n0) {         \
        i64 nb = w->k / 32;                                                                      \
        const uint8_t *q = w->q + n0 * nb * BYTES; /* the group's block 0 */                    \
        i64 sc = sblock(w, n0, 0);                                                               \
        const int far = nb >= 2 * QPF;                                                           \
        __m512 acc[2][MT], mins[MT];                                                             \
        for (int j = 0; j < MT; j++) acc[0][j] = acc[1][j] = mins[j] = _mm512_setzero_ps();      \
        const __m512i pick0 = _mm512_set_epi32(2 * SUB, 2 * SUB, 2 * SUB, 2 * SUB, 2 * SUB, 2 * SUB, 2 * SUB, 2 * SUB, 0, 0, 0, 0, 0, 0, 0, 0); \
        const __m512i pick1 = _mm512_add_epi32(pick0, _mm512_set1_epi32(4 * SUB));              \
        const __m512i two = _mm512_set1_epi32(2);                                                \
        const __m512i up2 = _mm512_set_epi32(15, 15, 15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2); \
        for (i64 b = 0; b < nb; b++, q += 4 * BYTES, sc += 8 * SUB) {                            \
            __m512i w0[2], w1[2];                                                                \
            if (far) prefetch(q + QPF * 4 * BYTES);                                              \
            if (far && BYTES == 32) prefetch(q + QPF * 4 * BYTES + 64);                          \
            WFN4(q, w0, w1);                                                                     \
            __m512 sv = scales8(w, sc, SUB);                                                     \
            __m512 s0[2] = {_mm512_permutexvar_ps(pick0, sv), _mm512_permutexvar_ps(pick1, sv)}; \
            __m512 s2[2] = {s0[0], s0[1]};                                                       \
            if (SUB == 2) {                                                                      \
                s2[0] = _mm512_permutexvar_ps(_mm512_add_epi32(pick0, two), sv);                 \
                s2[1] = _mm512_permutexvar_ps(_mm512_add_epi32(pick1, two), sv);                 \
            }                                                                                    \
            __m512 sv2 = SUB == 2 && MIN ? _mm512_permutexvar_ps(up2, sv) : sv;                  \
            _Pragma("GCC unroll 4")                                                              \
            for (int j = 0; j < MT; j++) {                                                       \
                const int16_t *xr = x->q + (m0 + j) * w->k + b * 32;                             \
                __m512 step = _mm512_set1_ps(x->d[(m0 + j) * nb + b]); /* scale * step */        \
                __m512i x0 = x_both(xr), x1 = x_both(xr + 16);                                   \
                _Pragma("GCC unroll 2")                                                          \
                for (int p = 0; p < 2; p++) {                                                    \
                    if (SUB == 1) {                                                              \
                        __m512 d = _mm512_cvtepi32_ps(dot_both(w0[p], x0, w1[p], x1));           \
                        acc[p][j] = _mm512_fmadd_ps(_mm512_mul_ps(s0[p], step), d, acc[p][j]);   \
                    } else {                                                                     \
                        __m512 d0 = _mm512_cvtepi32_ps(_mm512_madd_epi16(w0[p], x0));            \
                        __m512 d1 = _mm512_cvtepi32_ps(_mm512_madd_epi16(w1[p], x1));            \
                        acc[p][j] = _mm512_fmadd_ps(_mm512_mul_ps(s0[p], step), d0, acc[p][j]);  \
                        acc[p][j] = _mm512_fmadd_ps(_mm512_mul_ps(s2[p], step), d1, acc[p][j]);  \
                    }                                                                            \
                }                                                                                \
                if (MIN && SUB == 1)                                                             \
                    mins[j] = _mm512_fmadd_ps(sv, _mm512_set1_ps(x->s32[(m0 + j) * nb + b]), mins[j]); \
                if (MIN && SUB == 2) {                                                           \
                    const float *sx = x->s16 + (m0 + j) * (w->k / 16) + 2 * b;                   \
                    mins[j] = _mm512_fmadd_ps(sv, _mm512_set1_ps(sx[0]), mins[j]);               \
                    mins[j] = _mm512_fmadd_ps(sv2, _mm512_set1_ps(sx[1]), mins[j]);              \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int j = 0; j < MT; j++) {                                                           \
            float m[16];                                                                         \
            _mm512_storeu_ps(m, mins[j]);                                                        \
            for (int r = 0; r < 4; r++) {                                                        \
                v8 h = r % 2 ? half_hi(acc[r / 2][j]) : half_lo(acc[r / 2][j]);                  \
                float *o = out + (m0 + j) * ldo + n0 + r;                                        \
                float mn = MIN ? m[r * 2 * SUB + 1] : 0.0f;                                      \
                *o = finish(v_hsum(h) + mn, bias, n0 + r, accumulate, o);                        \
            }                                                                                    \
        }                                                                                        \
    }
/* M <= 4 rows of x against the 4 weight rows at n0, as few passes over the weights as fit */
#define DEF_qSMALL(KIND, WFN4, BYTES, SUB, MIN)                                                 \
    DEF_qDEC4(KIND, WFN4, BYTES, SUB, MIN, 1)                                                    \
    DEF_qDEC4(KIND, WFN4, BYTES, SUB, MIN, 2)                                                    \
    DEF_qDEC4(KIND, WFN4, BYTES, SUB, MIN, 4)                                                    \
    static void qsmall_##KIND(const Xq *x, const Wv *w, float *out, i64 ldo, const float *bias,  \
                              int accumulate, i64 M, i64 n0) {                                   \
        i64 m = 0;                                                                               \
        for (; m + 4 <= M; m += 4) qdec4_##KIND##_4(x, w, out, ldo, bias, accumulate, m, n0);    \
        for (; m + 2 <= M; m += 2) qdec4_##KIND##_2(x, w, out, ldo, bias, accumulate, m, n0);    \
        for (; m < M; m++) qdec4_##KIND##_1(x, w, out, ldo, bias, accumulate, m, n0);            \
    }
#define DEF_qKIND(KIND, WFN, WFN2, WFN4, BYTES, SUB, MIN)                                        \
    DEF_qTILE(KIND, WFN, BYTES, SUB, MIN, 1, 1)                                                  \
    DEF_qSMALL(KIND, WFN4, BYTES, SUB, MIN)                                                      \
    DEF_qTILE2(KIND, WFN2, BYTES, SUB, MIN, 1, 4, qtile_##KIND##_1_4)                           \
    DEF_qTILE2(KIND, WFN2, BYTES, SUB, MIN, 1, 2, qtile_##KIND##_1_2)                           \
    DEF_qTILE(KIND, WFN, BYTES, SUB, MIN, 4, 1)                                                  \
    DEF_qTILE2(KIND, WFN2, BYTES, SUB, MIN, 4, 2, qtile_##KIND##_4_2)
#else
#define DEF_qKIND(KIND, WFN, WFN2, WFN4, BYTES, SUB, MIN)                                        \
    DEF_qTILE(KIND, WFN, BYTES, SUB, MIN, 1, 1)                                                  \
    DEF_qTILE(KIND, WFN, BYTES, SUB, MIN, 1, 4)                                                  \
    DEF_qTILE(KIND, WFN, BYTES, SUB, MIN, 1, 2)                                                  \
    DEF_qTILE(KIND, WFN, BYTES, SUB, MIN, 4, 1)                                                  \
    DEF_qTILE(KIND, WFN, BYTES, SUB, MIN, 4, 2)
#endif
DEF_qKIND(u4, w16_u4, w2_u4, w4_u4, 16, 1, 1)
DEF_qKIND(u4n, w16_u4, w2_u4, w4_u4, 16, 1, 0)
DEF_qKIND(i8, w16_i8, w2_i8, w4_i8, 32, 1, 0)
DEF_qKIND(i8m, w16_i8, w2_i8, w4_i8, 32, 1, 1)
DEF_qKIND(i8s, w16_i8, w2_i8, w4_i8, 32, 2, 0)
DEF_qKIND(i8sm, w16_i8, w2_i8, w4_i8, 32, 2, 1)

/* Float weights: per output, acc = fma(x, w, acc) over k in order, then hsum. */
static inline void wf_f16(const Wv *w, i64 n, i64 b, v8 o[4]) {
    const uint16_t *q = (const uint16_t *)(w->q + n * w->qrow) + b * 32;
    for (int i = 0; i < 4; i++) o[i] = v_h16(q + 8 * i);
}
static inline void wf_f32(const Wv *w, i64 n, i64 b, v8 o[4]) {
    const float *q = (const float *)(w->q + n * w->qrow) + b * 32;
    for (int i = 0; i < 4; i++) o[i] = v_load(q + 8 * i);
}
#define DEF_fTILE(FMT, MT, NT)                                                                   \
    static void ftile_##FMT##_##MT##_##NT(const float *x, i64 ldx, const Wv *w, float *out,      \
                                           i64 ldo, const float *bias, int accumulate, i64 m0,   \
                                           i64 n0) {                                             \
        v8 acc[NT][MT];                                                                          \
        for (int i = 0; i < NT; i++)                                                             \
            for (int j = 0; j < MT; j++) acc[i][j] = v_zero();                                   \
        for (i64 b = 0; b < w->k / 32; b++) {                                                    \
            _Pragma("GCC unroll 8")                                                              \
            for (int i = 0; i < NT; i++) {                                                       \
                v8 q[4];                                                                         \
                wf_##FMT(w, n0 + i, b, q);                                                       \
                _Pragma("GCC unroll 8")                                                          \
                for (int j = 0; j < MT; j++) {                                                   \
                    const float *xr = x + (m0 + j) * ldx + b * 32;                               \
                    v8 a = acc[i][j];                                                            \
                    for (int c = 0; c < 4; c++) a = v_fma(v_load(xr + 8 * c), q[c], a);          \
                    acc[i][j] = a;                                                               \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        for (int i = 0; i < NT; i++)                                                             \
            for (int j = 0; j < MT; j++) {                                                       \
                float *o = out + (m0 + j) * ldo + n0 + i;                                        \
                *o = finish(v_hsum(acc[i][j]), bias, n0 + i, accumulate, o);                     \
            }                                                                                    \
    }

/* The loops over tiles: decode (M = 1) 4 outputs at a time; otherwise 64 rows of x at a time
 * (kept in cache while W streams past), in tiles of 4 rows x 2 outputs. An item is a fixed run
 * of tiles (about MM_WORK products), so threads share a matrix whatever their number. */
typedef void (*QSmall)(const Xq *x, const Wv *w, float *out, i64 ldo, const float *bias,
                       int accumulate, i64 M, i64 n0);
typedef struct {
    const Xq *xq;
    const float *x;
    i64 ldx, M, N, ldo, per, chunks; /* tiles per item; items per block of 64 rows */
    const Wv *w;
    float *out;
    const float *bias;
    int acc;
    QSmall small; /* AVX-512: the loop for M <= 4 rows over interleaved weights */
} MmJob;

#define MM_WORK 32768
#define XQ j->xq
#define XF j->x, j->ldx
#define DEF_MM(KIND, FMT, XPASS)                                                                 \
    static void mm1_##FMT(const void *ctx, i64 item) {                                           \
        const MmJob *j = ctx;                                                                    \
        i64 N = j->N, n = item * j->per * 4, end = n + j->per * 4 < N ? n + j->per * 4 : N;      \
        for (; n + 4 <= end; n += 4) KIND##tile_##FMT##_1_4(XPASS, j->w, j->out, j->ldo, j->bias, j->acc, 0, n); \
        for (; n < end; n++) KIND##tile_##FMT##_1_1(XPASS, j->w, j->out, j->ldo, j->bias, j->acc, 0, n); \
    }                                                                                            \
    static void mmb_##FMT(const void *ctx, i64 item) {                                           \
        const MmJob *j = ctx;                                                                    \
        i64 mb = item / j->chunks * 64, me = mb + 64 < j->M ? mb + 64 : j->M, N = j->N;          \
        i64 n0 = item % j->chunks * j->per * 2, n1 = n0 + j->per * 2 < N ? n0 + j->per * 2 : N;  \
        for (i64 n = n0; n < n1; n += 2) {                                                       \
            int two = n + 2 <= N;                                                                \
            i64 m = mb;                                                                          \
            for (; m + 4 <= me; m += 4)                                                          \
                if (two) KIND##tile_##FMT##_4_2(XPASS, j->w, j->out, j->ldo, j->bias, j->acc, m, n); \
                else KIND##tile_##FMT##_4_1(XPASS, j->w, j->out, j->ldo, j->bias, j->acc, m, n); \
            for (; m < me; m++)                                                                  \
                if (two) KIND##tile_##FMT##_1_2(XPASS, j->w, j->out, j->ldo, j->bias, j->acc, m, n); \
                else KIND##tile_##FMT##_1_1(XPASS, j->w, j->out, j->ldo, j->bias, j->acc, m, n); \
        }                                                                                        \
    }                                                                                            \
    static void mm_##FMT(MmJob *j) {                                                             \
        i64 K = j->w->k;                                                                         \
        if (j->M == 1) {                                                                         \
            j->per = MM_WORK / (4 * K) > 1 ? MM_WORK / (4 * K) : 1;                              \
            kv_parallel(mm1_##FMT, j, ((j->N + 3) / 4 + j->per - 1) / j->per);                   \
            return;                                                                              \
        }                                                                                        \
        i64 rows = j->M < 64 ? j->M : 64;                                                        \
        j->per = 8 * MM_WORK / (2 * rows * K) > 1 ? 8 * MM_WORK / (2 * rows * K) : 1;            \
        j->chunks = ((j->N + 1) / 2 + j->per - 1) / j->per;                                      \
        kv_parallel(mmb_##FMT, j, (j->M + 63) / 64 * j->chunks);                                 \
    }
#define DEF_fKIND(FMT)                                                                           \
    DEF_fTILE(FMT, 1, 1)                                                                         \
    DEF_fTILE(FMT, 1, 4)                                                                         \
    DEF_fTILE(FMT, 1, 2)                                                                         \
    DEF_fTILE(FMT, 4, 1)                                                                         \
    DEF_fTILE(FMT, 4, 2)
DEF_fKIND(f16)
DEF_fKIND(f32)
#ifdef KV_AVX512
static void mm_small(const void *ctx, i64 item) { /* item: a run of `per` groups of 4 outputs */
    const MmJob *j = ctx;
    i64 n = item * j->per * 4, end = n + j->per * 4 < j->N ? n + j->per * 4 : j->N;
    for (; n < end; n += 4) j->small(j->xq, j->w, j->out, j->ldo, j->bias, j->acc, j->M, n);
}
#endif
DEF_MM(q, u4, XQ)
DEF_MM(q, u4n, XQ)
DEF_MM(q, i8, XQ)
DEF_MM(q, i8m, XQ)
DEF_MM(q, i8s, XQ)
DEF_MM(q, i8sm, XQ)
DEF_MM(f, f16, XF)
DEF_MM(f, f32, XF)

static Wv view(const Weight *W) {
    Wv w = {(const uint8_t *)W->q, W->sc, W->k, 0, 0, W->block, 0, W->group > 1 ? W->group : 1,
            W->sc16};
    switch (W->fmt) {
    case FMT_U4: w.qrow = W->k / 2; w.srow = W->k / 32; w.block = 32; break;
    case FMT_I8: w.qrow = W->k; w.srow = W->k / W->block; break;
    case FMT_F16: w.qrow = W->k * 2; w.block = 32; break;
    default: w.qrow = W->k * 4; w.block = 32;
    }
    w.has_min = W->has_min;
    return w;
}

/* out[m, n] (+)= x[m, :] . W[n, :] (+ bias[n]), for m < M */
void kv_matmul(const float *x, i64 M, i64 ldx, const Weight *W, float *out, i64 ldo,
               const float *bias, int accumulate) {
    if (M < 1) return;
    Wv w = view(W);
    MmJob j = {0, x, ldx, M, W->n, ldo, 0, 0, &w, out, bias, accumulate, 0};
    if (W->fmt == FMT_F16) { mm_f16(&j); return; }
    if (W->fmt == FMT_F32) { mm_f32(&j); return; }
    i64 K = W->k, bytes = M * K * 2 + M * (K / 32) * 8 + M * (K / 16) * 4;
    char small[65536], *buf = bytes <= (i64)sizeof small ? small : malloc((size_t)bytes);
    int16_t *q = (int16_t *)buf;
    float *d = (float *)(buf + M * K * 2), *s16 = d + M * (K / 32), *s32 = s16 + M * (K / 16);
    quantize_x(x, M, ldx, K, q, d, s16, s32);
    Xq xq = {q, d, s16, s32, K};
    j.xq = &xq;
#ifdef KV_AVX512
    if (M <= 16 && w.group == 4) { /* decode, drafted tokens: each weight block unpacked once */
        if (W->fmt == FMT_U4) j.small = w.has_min ? qsmall_u4 : qsmall_u4n;
        else if (w.block == 32) j.small = w.has_min ? qsmall_i8m : qsmall_i8;
        else j.small = w.has_min ? qsmall_i8sm : qsmall_i8s;
        j.per = MM_WORK / (4 * K * M) > 1 ? MM_WORK / (4 * K * M) : 1;
        kv_parallel(mm_small, &j, (W->n / 4 + j.per - 1) / j.per);
        if (buf != small) free(buf);
        return;
    }
#endif
    if (W->fmt == FMT_U4 && w.has_min) mm_u4(&j);
    else if (W->fmt == FMT_U4) mm_u4n(&j);
    else if (w.block == 32 && w.has_min) mm_i8m(&j);
    else if (w.block == 32) mm_i8(&j);
    else if (w.has_min) mm_i8sm(&j);
    else mm_i8s(&j);
    if (buf != small) free(buf);
}

/* the 32 weights of block b of row n as floats, w = q * scale + min rounded once */
static void deq32(const Weight *W, i64 n, i64 b, v8 o[4]) {
    Wv w = view(W);
    if (W->fmt == FMT_F16) { wf_f16(&w, n, b, o); return; }
    if (W->fmt == FMT_F32) { wf_f32(&w, n, b, o); return; }
    int sh, bytes = W->fmt == FMT_U4 ? 16 : 32;
    const uint8_t *p = qrow(&w, n, bytes, &sh) + b * bytes * w.group;
    wv16 lo, hi;
    if (W->fmt == FMT_U4) w16_u4(p, sh, &lo, &hi);
    else w16_i8(p, sh, &lo, &hi);
    w16_floats(lo, &o[0], &o[1]);
    w16_floats(hi, &o[2], &o[3]);
    float s[4];
    sfetch(&w, sblock(&w, n, b), s, w.block == 16 ? 4 : 2);
    for (int i = 0; i < 4; i++) {
        const float *si = w.block == 16 ? s + (i / 2) * 2 : s;
        o[i] = v_fma(o[i], v_set1(si[0]), v_set1(si[1]));
    }
}

/* rows of W (embeddings) as floats, times `scale` when it is not 1 */
void kv_rows(const Weight *W, const int64_t *rows, i64 M, float *out, i64 ldo, float scale) {
    for (i64 m = 0; m < M; m++) {
        for (i64 b = 0; b < W->k / 32; b++) {
            v8 w[4];
            deq32(W, rows[m], b, w);
            for (int i = 0; i < 4; i++) {
                v8 v = scale == 1.0f ? w[i] : v_mul(w[i], v_set1(scale));
                v_store(out + m * ldo + b * 32 + 8 * i, v);
            }
        }
    }
}

/* ---------------------------------------------------------------- norms, rope, activations */
static float sum_squares(const float *x, i64 n) {
    v8 acc = v_zero();
    i64 i = 0;
    for (; i + 8 <= n; i += 8) acc = v_fma(v_load(x + i), v_load(x + i), acc);
    float s = v_hsum(acc);
    for (; i < n; i++) s = fmaf(x[i], x[i], s);
    return s;
}

typedef struct {
    const float *x, *w;
    i64 M, ldx, H, n, ldo, per; /* per: head rows an item normalizes */
    float eps, *out;
    int accumulate;
} NormJob;

static void norm_rows(const void *ctx, i64 item) {
    const NormJob *j = ctx;
    i64 H = j->H, n = j->n, r1 = (item + 1) * j->per < j->M * H ? (item + 1) * j->per : j->M * H;
    for (i64 r = item * j->per; r < r1; r++) {
        const float *xr = j->x + (r / H) * j->ldx + (r % H) * n;
        float *o = j->out + (r / H) * j->ldo + (r % H) * n;
        float inv = 1.0f / sqrtf(sum_squares(xr, n) / (float)n + j->eps);
        for (i64 i = 0; i < n; i++) {
            float y = (xr[i] * inv) * j->w[i];
            o[i] = j->accumulate ? o[i] + y : y;
        }
    }
}

/* fn over n items: on the pool when the work is worth a job's hand-over, else here */
static void parallel_if(int worth, kv_task fn, const void *ctx, i64 n) {
    if (worth) kv_parallel(fn, ctx, n);
    else for (i64 i = 0; i < n; i++) fn(ctx, i);
}

#define ROW_WORK 16384 /* floats an item of the row-wise kernels goes through */

/* RMSNorm of the H heads (slices of n) of each of M rows: out = (x * rsqrt(mean(x^2) + eps)) * w,
 * or out += that when accumulate. In place is fine. */
void kv_rmsnorm(const float *x, i64 M, i64 ldx, i64 H, i64 n, const float *w, float eps,
                float *out, i64 ldo, int accumulate) {
    i64 per = ROW_WORK / n > 1 ? ROW_WORK / n : 1;
    NormJob j = {x, w, M, ldx, H, n, ldo, per, eps, out, accumulate};
    parallel_if(M * H * n > 4 * ROW_WORK, norm_rows, &j, (M * H + per - 1) / per);
}

/* Rotate the first rdim dims of each of H heads (of D) in M rows, in place, the way transformers
 * does (halves, not pairs): x*cos + rotate_half(x)*sin; cos/sin rows by absolute position. */
void kv_rope(float *x, i64 M, i64 ld, i64 H, i64 D, i64 rdim, const float *cos_t,
             const float *sin_t, i64 pos0) {
    i64 half = rdim / 2;
    for (i64 m = 0; m < M; m++) {
        const float *c = cos_t + (pos0 + m) * rdim, *s = sin_t + (pos0 + m) * rdim;
        for (i64 h = 0; h < H; h++) {
            float *v = x + m * ld + h * D;
            for (i64 i = 0; i < half; i++) {
                float a = v[i], b = v[i + half];
                v[i] = a * c[i] - b * s[i];
                v[i + half] = b * c[i + half] + a * s[i + half];
            }
        }
    }
}

/* Write M rows of K and V (kvh heads of D each) into fp16 caches [kvh][cap][D] at pos0.. */
void kv_store(const float *k, const float *v, i64 M, i64 ld, i64 kvh, i64 D, uint16_t *kc,
              uint16_t *vc, i64 cap, i64 pos0) {
    for (i64 m = 0; m < M; m++)
        for (i64 g = 0; g < kvh; g++) {
            const float *ks = k + m * ld + g * D, *vs = v + m * ld + g * D;
            uint16_t *kd = kc + (g * cap + pos0 + m) * D, *vd = vc + (g * cap + pos0 + m) * D;
            for (i64 i = 0; i < D; i += 8) {
                v_store_h16(kd + i, v_load(ks + i));
                v_store_h16(vd + i, v_load(vs + i));
            }
        }
}

static inline v8 v_silu(v8 g) { return v_div(g, v_add(v_set1(1.0f), v_exp(v_sub(v_zero(), g)))); }
static inline v8 v_gelu_tanh(v8 g) { /* 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))) */
    v8 u = v_mul(v_set1(0.7978845608028654f), v_fma(v_mul(v_set1(0.044715f), g), v_mul(g, g), g));
    v8 t = v_sub(v_set1(1.0f), v_div(v_set1(2.0f), v_add(v_exp(v_add(u, u)), v_set1(1.0f))));
    return v_mul(v_mul(v_set1(0.5f), g), v_add(v_set1(1.0f), t));
}

typedef struct {
    const float *gu;
    i64 M, ld, F, ldo, per;
    int act;
    float *out;
} ActJob;

static void act_rows(const void *ctx, i64 item) {
    const ActJob *j = ctx;
    i64 m1 = (item + 1) * j->per < j->M ? (item + 1) * j->per : j->M;
    for (i64 m = item * j->per; m < m1; m++)
        for (i64 i = 0; i < j->F; i += 8) {
            v8 g = v_load(j->gu + m * j->ld + i), u = v_load(j->gu + m * j->ld + j->F + i);
            v8 a = j->act == 2 ? v_gelu_tanh(g) : v_silu(g);
            v_store(j->out + m * j->ldo + i, v_mul(a, u));
        }
}

/* out[m, :F] = act(gu[m, :F]) * gu[m, F:2F]; act 1 = SiLU, 2 = GELU (tanh); F % 8 == 0 */
void kv_act_mul(const float *gu, i64 M, i64 ld, i64 F, int act, float *out, i64 ldo) {
    i64 per = ROW_WORK / F > 1 ? ROW_WORK / F : 1;
    ActJob j = {gu, M, ld, F, ldo, per, act, out};
    parallel_if(M * F > 4 * ROW_WORK, act_rows, &j, (M + per - 1) / per);
}

/* ---------------------------------------------------------------- attention */

/* scores of HT heads against 4 keys starting at kr (fp16 rows of D): s[h][0..3]. (Two keys per
 * 512-bit register, and 16 columns per register below, gave the same bits but ran 10-15% slower
 * on Zen 4, whose 512-bit units are 256 bits wide: attention stays on 8 lanes.) */
#define DEF_QK(HT)                                                                               \
    static inline void qk_##HT(const float *q, i64 D, const uint16_t *kr, float *s, i64 sstride) { \
        v8 acc[HT][4];                                                                           \
        for (int h = 0; h < HT; h++)                                                             \
            for (int k = 0; k < 4; k++) acc[h][k] = v_zero();                                    \
        for (i64 c = 0; c < D; c += 8) { /* registers: HT q + 1 k + 4 HT accumulators <= 16 */   \
            v8 qv[HT];                                                                           \
            for (int h = 0; h < HT; h++) qv[h] = v_load(q + h * D + c);                          \
            _Pragma("GCC unroll 4")                                                              \
            for (int k = 0; k < 4; k++) {                                                        \
                v8 kv = v_h16(kr + k * D + c);                                                   \
                for (int h = 0; h < HT; h++) acc[h][k] = v_fma(qv[h], kv, acc[h][k]);           \
            }                                                                                    \
        }                                                                                        \
        for (int h = 0; h < HT; h++) store4(s + h * sstride, v_hsum4(acc[h][0], acc[h][1], acc[h][2], acc[h][3])); \
    }
DEF_QK(1)
DEF_QK(2)
DEF_QK(3)


/* out[h][c0 .. c0+8*NC) = sum over n keys of p[h][j] * v_j, for HT heads */
#define DEF_PV(HT, NC)                                                                           \
    static inline void pv_##HT##_##NC(const float *p, i64 pstride, const uint16_t *vr, i64 D,   \
                                      i64 n, i64 c0, float *out, i64 ostride) {                  \
        v8 acc[HT][NC];                                                                          \
        for (int h = 0; h < HT; h++)                                                             \
            for (int c = 0; c < NC; c++) acc[h][c] = v_zero();                                   \
        for (i64 j = 0; j < n; j++) { /* registers: HT p + 1 v + NC HT accumulators <= 16 */     \
            if (c0 == 0)                                                                         \
                for (i64 pf = 0; pf < D; pf += 32) prefetch(vr + (j + PF_KEYS) * D + pf);        \
            v8 pj[HT];                                                                           \
            for (int h = 0; h < HT; h++) pj[h] = v_set1(p[h * pstride + j]);                     \
            _Pragma("GCC unroll 4")                                                              \
            for (int c = 0; c < NC; c++) {                                                       \
                v8 vv = v_h16(vr + j * D + c0 + 8 * c);                                          \
                for (int h = 0; h < HT; h++) acc[h][c] = v_fma(pj[h], vv, acc[h][c]);           \
            }                                                                                    \
        }                                                                                        \
        for (int h = 0; h < HT; h++)                                                             \
            for (int c = 0; c < NC; c++) v_store(out + h * ostride + c0 + 8 * c, acc[h][c]);     \
    }
DEF_PV(1, 4)
DEF_PV(2, 4)
DEF_PV(3, 4)
DEF_PV(1, 1)
DEF_PV(2, 1)
DEF_PV(3, 1)


/* One query row's part of one block: the n keys at kr/vr (fp16 rows of D, n <= ATT_B); for each
 * of the G heads, part = (max, sum, sum of p * v [D]). A score or a sum never depends on which
 * other keys, heads or rows run beside it, so neither does the result. */
static void att_row(const float *q, int G, i64 D, const uint16_t *kr, const uint16_t *vr, i64 n,
                    float scale, float softcap, float *part) {
    float s[16][ATT_B + 4];
    const uint16_t *kt = kr;
    uint16_t tail[4 * 512]; /* the last < 4 keys, padded, so no read passes the cache's end */
    for (i64 j = 0; j < n; j += 4) {
        for (i64 pf = 0; pf < 4 * D; pf += 32) prefetch(kr + (j + PF_KEYS) * D + pf);
        if (j + 4 > n) {
            memset(tail, 0, sizeof(uint16_t) * 4 * D);
            memcpy(tail, kr + j * D, sizeof(uint16_t) * (n - j) * D);
            kt = tail - j * D;
        }
        for (int h = 0; h < G;) {
            int ht = G - h >= 3 ? 3 : G - h;
            if (ht == 3) qk_3(q + h * D, D, kt + j * D, &s[h][j], ATT_B + 4);
            else if (ht == 2) qk_2(q + h * D, D, kt + j * D, &s[h][j], ATT_B + 4);
            else qk_1(q + h * D, D, kt + j * D, &s[h][j], ATT_B + 4);
            h += ht;
        }
    }
    for (int h = 0; h < G; h++) {
        float *sh = s[h];
        i64 j = 0;
        for (; j + 8 <= n; j += 8) v_store(sh + j, v_mul(v_load(sh + j), v_set1(scale)));
        for (; j < n; j++) sh[j] = sh[j] * scale;
        if (softcap > 0.0f)
            for (j = 0; j < n; j++) sh[j] = tanhf(sh[j] / softcap) * softcap;
        float mx = max_of(sh, n); /* exact, whatever the order */
        v8 lv = v_zero();
        for (j = 0; j + 8 <= n; j += 8) {
            v8 e = v_exp(v_sub(v_load(sh + j), v_set1(mx)));
            v_store(sh + j, e);
            lv = v_add(lv, e);
        }
        float l = v_hsum(lv);
        for (; j < n; j++) {
            sh[j] = s_exp(sh[j] - mx);
            l += sh[j];
        }
        part[h * (D + 2)] = mx;
        part[h * (D + 2) + 1] = l;
    }
    for (int h = 0; h < G;) {
        int ht = G - h >= 3 ? 3 : G - h;
        float *o = part + h * (D + 2) + 2;
        i64 c0 = 0;
        for (; c0 + 32 <= D; c0 += 32) {
            if (ht == 3) pv_3_4(s[h], ATT_B + 4, vr, D, n, c0, o, D + 2);
            else if (ht == 2) pv_2_4(s[h], ATT_B + 4, vr, D, n, c0, o, D + 2);
            else pv_1_4(s[h], ATT_B + 4, vr, D, n, c0, o, D + 2);
        }
        for (; c0 < D; c0 += 8) {
            if (ht == 3) pv_3_1(s[h], ATT_B + 4, vr, D, n, c0, o, D + 2);
            else if (ht == 2) pv_2_1(s[h], ATT_B + 4, vr, D, n, c0, o, D + 2);
            else pv_1_1(s[h], ATT_B + 4, vr, D, n, c0, o, D + 2);
        }
        h += ht;
    }
}

/* Blocks' partials (stride G*(D+2) from one to the next) combined in order into out (G heads) */
static void att_combine(const float *parts, i64 nb, int G, i64 D, float *out, i64 ostride) {
    for (int h = 0; h < G; h++) {
        float mx = parts[h * (D + 2)];
        for (i64 b = 1; b < nb; b++) {
            float m = parts[b * G * (D + 2) + h * (D + 2)];
            mx = m > mx ? m : mx;
        }
        float *o = out + h * ostride;
        float l = 0.0f;
        for (i64 c = 0; c < D; c += 8) v_store(o + c, v_zero());
        for (i64 b = 0; b < nb; b++) {
            const float *p = parts + b * G * (D + 2) + h * (D + 2);
            float f = s_exp(p[0] - mx);
            l = fmaf(p[1], f, l);
            for (i64 c = 0; c < D; c += 8) v_store(o + c, v_fma(v_load(p + 2 + c), v_set1(f), v_load(o + c)));
        }
        for (i64 c = 0; c < D; c += 8) v_store(o + c, v_div(v_load(o + c), v_set1(l)));
    }
}

#define ATT_ROWS 8 /* query rows that go through one block together (it stays in cache) */

/* Causal attention of M query rows at positions pos0.. (H heads of D, row stride ldq) over the
 * fp16 cache [kvh][cap][D], which already holds their own K/V; window > 0: a sliding window of
 * that many keys. out rows have stride ldo. scratch: at least kv_attention_scratch(1, ...)
 * floats; more lets more rows run at once. */
i64 kv_attention_scratch(i64 rows, i64 H, i64 D, i64 ctx) {
    return rows * H * ((ctx + ATT_B - 1) / ATT_B + 1) * (D + 2);
}

typedef struct {
    const float *q;
    const unsigned char *kc, *vc; /* fp16 rows, or the 8-bit ones with q8 */
    float *out, *scratch;
    i64 ldq, kvh, D, cap, pos0, window, ldo, nbmax, r0, rn;
    int G, q8;
    float scale, softcap;
} AttJob;

/* item: ATT_ROWS query rows x one kv head x one block of keys -> their blocks' partials */
static void att_blocks(const void *ctx, i64 it) {
    const AttJob *j = ctx;
    i64 kvh = j->kvh, nbmax = j->nbmax, D = j->D, G = j->G, end = j->r0 + j->rn;
    i64 grp = it / (kvh * nbmax), g = (it / nbmax) % kvh, b = it % nbmax;
    i64 ma = j->r0 + grp * ATT_ROWS, mz = ma + ATT_ROWS < end ? ma + ATT_ROWS : end;
    i64 R = j->q8 ? KV8_ROW(D) : 2 * D; /* bytes per cached row */
    const unsigned char *K = j->kc + g * j->cap * R, *V = j->vc + g * j->cap * R;
    for (i64 m = ma; m < mz; m++) {
        i64 pos = j->pos0 + m, lo = first_key(pos, j->window);
        i64 j0 = b * ATT_B > lo ? b * ATT_B : lo, j1 = (b + 1) * ATT_B < pos + 1 ? (b + 1) * ATT_B : pos + 1;
        if (j0 >= j1) continue;
        float *part = j->scratch + (((m - j->r0) * kvh + g) * nbmax + b) * G * (D + 2);
        const float *q = j->q + m * j->ldq + g * G * D;
        if (j->q8)
            kv_att_row8(q, (int)G, D, (const int8_t *)(K + j0 * R), (const int8_t *)(V + j0 * R),
                        j1 - j0, j->scale, j->softcap, part);
        else
            att_row(q, (int)G, D, (const uint16_t *)(K + j0 * R), (const uint16_t *)(V + j0 * R),
                    j1 - j0, j->scale, j->softcap, part);
    }
}

/* item: one query row x one kv head: its blocks' partials combined, in order */
static void att_rows(const void *ctx, i64 it) {
    const AttJob *j = ctx;
    i64 kvh = j->kvh, D = j->D, G = j->G;
    i64 m = j->r0 + it / kvh, g = it % kvh, pos = j->pos0 + m, b0 = first_key(pos, j->window) / ATT_B;
    const float *parts = j->scratch + (((m - j->r0) * kvh + g) * j->nbmax + b0) * G * (D + 2);
    att_combine(parts, pos / ATT_B - b0 + 1, (int)G, D, j->out + m * j->ldo + g * G * D, D);
}

static void attention(const float *q, i64 M, i64 ldq, i64 H, i64 kvh, i64 D, const void *kc,
                      const void *vc, int q8, i64 cap, i64 pos0, i64 window, float scale,
                      float softcap, float *out, i64 ldo, float *scratch, i64 scratch_floats) {
    int G = (int)(H / kvh);
    i64 nbmax = (pos0 + M - 1) / ATT_B + 1; /* blocks of the last row */
    i64 per_row = kvh * nbmax * G * (D + 2);
    i64 R = scratch_floats / per_row;
    if (R < 1) R = 1; /* the caller sized it for at least one row */
    if (R > M) R = M;
    AttJob j = {q, kc, vc, out, scratch, ldq, kvh, D, cap, pos0, window, ldo, nbmax, 0, 0, G,
                q8, scale, softcap};
    for (j.r0 = 0; j.r0 < M; j.r0 += R) {
        j.rn = j.r0 + R < M ? R : M - j.r0;
        kv_parallel(att_blocks, &j, (j.rn + ATT_ROWS - 1) / ATT_ROWS * kvh * nbmax);
        parallel_if(j.rn * kvh >= 16, att_rows, &j, j.rn * kvh);
    }
}

void kv_attention(const float *q, i64 M, i64 ldq, i64 H, i64 kvh, i64 D, const uint16_t *kc,
                  const uint16_t *vc, i64 cap, i64 pos0, i64 window, float scale, float softcap,
                  float *out, i64 ldo, float *scratch, i64 scratch_floats) {
    attention(q, M, ldq, H, kvh, D, kc, vc, 0, cap, pos0, window, scale, softcap, out, ldo,
              scratch, scratch_floats);
}

/* kv_attention over the 8-bit caches [kvh][cap][KV8_ROW(D)] (kv_store8) */
void kv_attention8(const float *q, i64 M, i64 ldq, i64 H, i64 kvh, i64 D, const int8_t *kc,
                   const int8_t *vc, i64 cap, i64 pos0, i64 window, float scale, float softcap,
                   float *out, i64 ldo, float *scratch, i64 scratch_floats) {
    attention(q, M, ldq, H, kvh, D, kc, vc, 1, cap, pos0, window, scale, softcap, out, ldo,
              scratch, scratch_floats);
}

int kv_version(void) { return KV_VERSION; }
const char *kv_isa(void) { return KV_ISA; }

/* ---------------------------------------------------------------- the whole decoder */
/* One forward of M tokens at positions pos0.. through every layer, with the buffers and caches
 * the caller owns (fastmodel.py): one call per forward instead of a dozen per layer. */
typedef struct {
    const float *attn_norm, *ffn_norm, *post_attn_norm, *post_ffn_norm, *q_norm, *k_norm, *bias;
    Weight qkv[3];
    i64 qkv_col[3];
    int32_t n_qkv, n_gu;
    Weight gate_up[2];
    i64 gu_col[2];
    Weight o, down;
    void *kc, *vc; /* fp16, or 8-bit rows where the model's kv8 says so */
    i64 cap, window;
    const float *cos_t, *sin_t;
} Layer;

typedef struct {
    i64 n_layers, hidden, n_heads, n_kv, head_dim, ffn, rope_dim;
    int32_t act, kv8; /* kv8: the caches hold 8-bit rows (kv_store8) */
    float eps, attn_scale, attn_softcap, embed_scale;
    const Weight *embed, *lm_head;
    const float *final_norm;
    Layer *layers;
    float *x, *h, *qkv, *att, *gu, *act_buf, *logits, *scratch;
    i64 scratch_floats;
} Model;

static void mm_parts(const float *x, i64 M, i64 ldx, const Weight *w, const i64 *cols, int n,
                     float *out, i64 ldo, const float *bias, int accumulate) {
    for (int i = 0; i < n; i++)
        kv_matmul(x, M, ldx, &w[i], out + cols[i], ldo, bias ? bias + cols[i] : 0, accumulate);
}

/* Layers [l0, l1) of the forward; the embedding when l0 == 0, the logits when l1 == n_layers:
 * the last `rows` rows' (1: a decode step's; M: a verification's, every row through one pass
 * over the head, each row's as it would be alone), into logits, a row of the vocabulary each. */
void kv_forward(const Model *md, const int64_t *ids, i64 M, i64 pos0, i64 l0, i64 l1, i64 rows) {
    if (M < 1) return;
    i64 D = md->head_dim, hid = md->hidden, qw = md->n_heads * D, kw = md->n_kv * D;
    i64 width = qw + 2 * kw, F = md->ffn;
    float *x = md->x, *h = md->h, *qkv = md->qkv, *att = md->att, *gu = md->gu, *a = md->act_buf;
    if (l0 == 0) kv_rows(md->embed, ids, M, x, hid, md->embed_scale);
    for (i64 l = l0; l < l1; l++) {
        const Layer *L = &md->layers[l];
        kv_rmsnorm(x, M, hid, 1, hid, L->attn_norm, md->eps, h, hid, 0);
        mm_parts(h, M, hid, L->qkv, L->qkv_col, L->n_qkv, qkv, width, L->bias, 0);
        if (L->q_norm) {
            kv_rmsnorm(qkv, M, width, md->n_heads, D, L->q_norm, md->eps, qkv, width, 0);
            kv_rmsnorm(qkv + qw, M, width, md->n_kv, D, L->k_norm, md->eps, qkv + qw, width, 0);
        }
        kv_rope(qkv, M, width, md->n_heads, D, md->rope_dim, L->cos_t, L->sin_t, pos0);
        kv_rope(qkv + qw, M, width, md->n_kv, D, md->rope_dim, L->cos_t, L->sin_t, pos0);
        if (md->kv8)
            kv_store8(qkv + qw, qkv + qw + kw, M, width, md->n_kv, D, L->kc, L->vc, L->cap, pos0);
        else
            kv_store(qkv + qw, qkv + qw + kw, M, width, md->n_kv, D, L->kc, L->vc, L->cap, pos0);
        attention(qkv, M, width, md->n_heads, md->n_kv, D, L->kc, L->vc, md->kv8, L->cap, pos0,
                  L->window, md->attn_scale, md->attn_softcap, att, qw, md->scratch,
                  md->scratch_floats);
        if (L->post_attn_norm) {
            kv_matmul(att, M, qw, &L->o, h, hid, 0, 0);
            kv_rmsnorm(h, M, hid, 1, hid, L->post_attn_norm, md->eps, x, hid, 1);
        } else {
            kv_matmul(att, M, qw, &L->o, x, hid, 0, 1);
        }
        kv_rmsnorm(x, M, hid, 1, hid, L->ffn_norm, md->eps, h, hid, 0);
        mm_parts(h, M, hid, L->gate_up, L->gu_col, L->n_gu, gu, 2 * F, 0, 0);
        kv_act_mul(gu, M, 2 * F, F, md->act, a, F);
        if (L->post_ffn_norm) {
            kv_matmul(a, M, F, &L->down, h, hid, 0, 0);
            kv_rmsnorm(h, M, hid, 1, hid, L->post_ffn_norm, md->eps, x, hid, 1);
        } else {
            kv_matmul(a, M, F, &L->down, x, hid, 0, 1);
        }
    }
    if (l1 < md->n_layers) return;
    rows = rows < 1 ? 1 : rows > M ? M : rows;
    kv_rmsnorm(x + (M - rows) * hid, rows, hid, 1, hid, md->final_norm, md->eps, h, hid, 0);
    kv_matmul(h, rows, hid, md->lm_head, md->logits, md->lm_head->n, 0, 0);
}
