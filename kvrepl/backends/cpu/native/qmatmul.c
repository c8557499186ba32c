/* The quantized matmul: out[m, n] (+)= x[m, :] . W[n, :] (+ bias[n]) for 4-bit (u4) and 8-bit
 * (i8) weights, every row count, every instruction set, one sequence of float operations per
 * output.
 *
 * Weights (quant.py, _lanes): rows in groups of 16, block b (32 weights along k) of a group is
 * 16 vectors t = 0..15 of 16-bit pairs, lane r = row r's weights 2t and 2t + 1. Activations:
 * each row of x quantized per block of 32 to int16 with a float step (amax / 32767). Then per
 * output (row n, row m of x) and block b, in block order:
 *     I    = sum of the block's 32 products q * xq, exact in int32 (any order, any split);
 *     acc  = fma(scale[n, b] * step[m, b], float(I), acc)   (blocks of 16: two, one a half)
 *     mins = fma(min[n, b], sum(x[m, block b]), mins)        (weights with a min only)
 * and out = acc + mins, + bias, + the previous value when accumulating. One output is one lane
 * of one register from start to end, so a row of x gives the same bits whichever rows, tiles
 * and threads share its run, and the scalar build (a loop over lanes) the same as AVX2 (8 lanes)
 * and AVX-512 (16): batch invariance and reuse == recompute by construction.
 *
 * Why lanes of rows: a multiply-add of a weight vector with one broadcast pair of x adds 32
 * products to 16 outputs at once, and the float work (a conversion, a multiply, an fma) is done
 * once per block for 16 outputs, not once per 8-lane partial sum of each. On a Zen 4 core a row
 * of x costs about half the instructions of kvrepl-kernels v2's 8-lane dot products, which is
 * what a verified drafted token or a prefill row costs. */
#include "kernels.h"

#define G 16 /* rows of W in a group: the lanes of one AVX-512 register */
#define XROWS 64 /* rows of x an item takes (they stay in cache while the weights stream) */
#define Q_WORK 32768 /* weights x rows of x an item multiplies, about */

typedef struct { /* a quantized weight as the loops read it */
    const uint8_t *q;
    const void *sc; /* per group and block: for each part (sub), 16 scales then 16 mins (only
                     * where the weight has mins: else the 16 scales alone) */
    i64 n, k, nb, gbytes; /* rows; weights per row; blocks of 32; q bytes per group and block */
    int u4, sub, sc16, sc8; /* u4: 1 u4, 2 i6 (4 values a run, as u4), 3 n4 (u4's nibbles, each
                             * an index into IQ4's 16 levels), 4 i5 (u4's nibbles and a high
                             * bit, less off5), 0 i8 */
    int has_min; /* 0: none; 1: stored after the scales; 2: -8 times the scale (Q4_0) */
    const float *dd; /* sc8: the superblocks' floats, [group][k / 256][scales(, mins)][16] */
    int ps; /* scales (and mins) a part: 32 with stored mins, 16 without */
    int off5; /* i5: what a stored value is above the value (16: -16..15; 0: 0..31) */
} Qw;

typedef struct { /* quantized rows of x */
    const int16_t *q;  /* [M][K] */
    const float *d;    /* [M][K/32] steps */
    const float *s16;  /* [M][K/16] sums of x, for the min terms (blocks of 16) */
    const float *s32;  /* [M][K/32] = s16[2b] + s16[2b+1] (blocks of 32) */
} Xq;

typedef int32_t __attribute__((may_alias)) pair_t; /* two int16 of x read as one */

/* ---------------------------------------------------------------- x, quantized */
static inline float amax32(const float *x) {
    v8 a = v_zero(), sign = v_set1(-0.0f);
    for (int i = 0; i < 32; i += 8) {
        v8 v = v_load(x + i);
#ifdef KV_AVX2
        a = v_max(a, _mm256_andnot_ps(sign, v));
#else
        (void)sign;
        LANES(v.f[l_] = fabsf(v.f[l_]));
        a = v_max(a, v);
#endif
    }
    float b[8], m = 0.0f;
    v_store(b, a);
    for (int i = 0; i < 8; i++) m = b[i] > m ? b[i] : m;
    return m;
}
/* 32 values x * inv to int16, nearest even, saturated (cvtps2dq then packssdw) */
static inline void q16_block(int16_t *q, const float *x, float inv) {
#ifdef KV_AVX2
    __m256 f = _mm256_set1_ps(inv);
    for (int i = 0; i < 32; i += 16) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(v_load(x + i), f));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(v_load(x + i + 8), f));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permute4x64_epi64(_mm256_packs_epi32(a, b), 0xD8));
    }
#else
    for (int i = 0; i < 32; i++) {
        float r = nearbyintf(x[i] * inv);
        q[i] = (int16_t)(r > 32767.0f ? 32767.0f : r < -32768.0f ? -32768.0f : r);
    }
#endif
}

typedef struct {
    const float *x;
    i64 M, ldx, K;
    int16_t *q;
    float *d, *s16, *s32;
} QuantJob;

static void quantize_rows(const void *ctx, i64 item) {
    const QuantJob *j = ctx;
    i64 K = j->K, m1 = (item + 1) * 8 < j->M ? (item + 1) * 8 : j->M;
    for (i64 m = item * 8; m < m1; m++)
        for (i64 b = 0; b < K / 32; b++) {
            const float *xb = j->x + m * j->ldx + b * 32;
            float amax = amax32(xb), inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
            j->d[m * (K / 32) + b] = amax / 32767.0f;
            q16_block(j->q + m * K + b * 32, xb, inv);
            float *sh = j->s16 + m * (K / 16) + 2 * b;
            for (int h = 0; h < 2; h++) sh[h] = v_hsum(v_add(v_load(xb + 16 * h), v_load(xb + 16 * h + 8)));
            j->s32[m * (K / 32) + b] = sh[0] + sh[1];
        }
}

/* the loops' view of a U4 or I8 Weight (groups of 16 rows) */
static Qw qw_of(const Weight *W) {
    int u4 = W->fmt == FMT_U4 ? 1 : W->fmt == FMT_I6 ? 2 : W->fmt == FMT_N4 ? 3
           : W->fmt == FMT_I5 || W->fmt == FMT_U5 ? 4 : 0;
    Qw w = {W->q, W->sc, W->n, W->k, W->k / 32, (u4 == 2 ? 24 : u4 == 4 ? 20 : u4 ? 16 : 32) * G,
            u4, W->block == 16 ? 2 : 1,
            W->sc16, W->sc8, W->has_min, W->dd, W->has_min == 1 ? 32 : 16,
            W->fmt == FMT_I5 ? 16 : 0};
    return w;
}


#ifndef QPF
#define QPF 32 /* blocks ahead the loop asks the memory for (only loads: no result changes). Past
 * a group's last block that is the next group's, which the thread's run reads next: short rows
 * (135M's 576) gained 7% a decode step when they too were prefetched (long rows only before) */
#endif
/* prefetch p + off, the address made as an integer: past the weight's end (the last groups ask
 * for bytes after them) a pointer may not go, and a prefetch never faults */
static inline void prefetch_at(const uint8_t *p, i64 off) {
    prefetch((const void *)((uintptr_t)p + (uintptr_t)off));
}

/* ---------------------------------------------------------------- one group, MT rows of x */
static inline const uint8_t *gq(const Qw *w, i64 g, i64 b) {
    return w->q + (g * w->nb + b) * w->gbytes;
}
static inline i64 gsc(const Qw *w, i64 g, i64 b) { /* index of the first scale */
    return (g * w->nb + b) * w->ps * w->sub;
}
/* sc8: the superblock float of scale index i (gsc's layout: group, block, part, scales or mins,
 * lane), the first of its 16 lanes' */
static inline const float *dd_gb(const Qw *w, i64 g, i64 b, i64 i) {
    i64 sb = g * (w->nb / 8) + b / 8;
    return w->dd + (w->has_min == 1 ? sb * 2 + ((i >> 4) & 1) : sb) * 16;
}
static inline const float *dd_at(const Qw *w, i64 i) {
    i64 gb = i / (w->ps * w->sub);
    return dd_gb(w, gb / w->nb, gb % w->nb, i);
}
static inline float sc_at(const Qw *w, i64 i) {
    if (w->sc8) return dd_at(w, i)[i & 15] * (float)((const int8_t *)w->sc)[i];
    if (!w->sc16) return ((const float *)w->sc)[i];
#ifdef KV_AVX2
    return _cvtsh_ss(((const uint16_t *)w->sc)[i]);
#else
    return h2f(((const uint16_t *)w->sc)[i]);
#endif
}

/* out row m, rows [n0, n0 + cnt) of W: r = acc + mins, finished (bias, previous value) */
static inline void put(float *o, const float *r, const float *bias, i64 n0, int cnt, int accumulate) {
    for (int i = 0; i < cnt; i++) o[i] = finish(r[i], bias, n0 + i, accumulate, o + i);
}

#ifdef KV_AVX512
static inline __m512 sc16v(const Qw *w, i64 g, i64 b, i64 i) { /* scales (or mins) at i */
    if (w->sc8) /* 16 lanes of one part: one superblock float each, times the int8 */
        return _mm512_mul_ps(_mm512_loadu_ps(dd_gb(w, g, b, i)),
                             _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                                 _mm_loadu_si128((const __m128i *)((const int8_t *)w->sc + i)))));
    if (w->sc16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w->sc + i)));
    return _mm512_loadu_ps((const float *)w->sc + i);
}
/* i6's high 2 bits of value t (bits 2 (t % 8) of its run's words) as bits 4-5 */
#define HI6(hw, t) _mm512_and_si512(((t) % 8) >= 2 ? _mm512_srli_epi16(hw, 2 * ((t) % 8) - 4) \
                                                  : _mm512_slli_epi16(hw, 4 - 2 * ((t) % 8)), \
                                    _mm512_set1_epi16(0x30))
/* vectors t of run c: u4 4 (nibbles), i8 2 (bytes); i6 4: u4's nibbles, their high bits from the
 * runs after the nibbles (p: the group and block's first byte); n4 4: u4's nibbles looked up */
static inline void unpack512(int u4, const uint8_t *p, int c, __m512i *v, int off5) {
    __m512i a = _mm512_loadu_si512(p + 64 * c);
    if (u4 == 4) { /* i5: the high bit of value t at bit t of the run after the nibbles */
        __m512i m = _mm512_set1_epi16(15), o = _mm512_set1_epi16((short)off5);
        __m512i hw = _mm512_loadu_si512(p + 256), h = _mm512_set1_epi16(16);
        for (int s = 0; s < 4; s++) {
            int t = 4 * c + s;
            __m512i lo = _mm512_and_si512(s ? _mm512_srli_epi16(a, 4 * s) : a, m);
            __m512i hi = t >= 4 ? _mm512_srli_epi16(hw, t - 4) : _mm512_slli_epi16(hw, 4 - t);
            v[s] = _mm512_sub_epi16(_mm512_or_si512(lo, _mm512_and_si512(hi, h)), o);
        }
    } else if (u4 == 3) { /* a word's low byte holds nibbles 0 and 1, its high byte 2 and 3 */
        __m512i tbl = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)IQ4NL));
        __m512i m = _mm512_set1_epi8(15);
        __m512i even = _mm512_shuffle_epi8(tbl, _mm512_and_si512(a, m)); /* levels 0 | 2 << 8 */
        __m512i odd = _mm512_shuffle_epi8(tbl, _mm512_and_si512(_mm512_srli_epi16(a, 4), m));
        v[0] = _mm512_srai_epi16(_mm512_slli_epi16(even, 8), 8);
        v[1] = _mm512_srai_epi16(_mm512_slli_epi16(odd, 8), 8);
        v[2] = _mm512_srai_epi16(even, 8);
        v[3] = _mm512_srai_epi16(odd, 8);
    } else if (u4 == 2) {
        __m512i m = _mm512_set1_epi16(15), o = _mm512_set1_epi16(32);
        __m512i hw = _mm512_loadu_si512(p + 256 + 64 * (c >> 1));
        for (int s = 0; s < 4; s++) {
            __m512i lo = _mm512_and_si512(s ? _mm512_srli_epi16(a, 4 * s) : a, m);
            v[s] = _mm512_sub_epi16(_mm512_or_si512(lo, HI6(hw, 4 * c + s)), o);
        }
    } else if (u4) {
        __m512i m = _mm512_set1_epi16(15);
        v[0] = _mm512_and_si512(a, m);
        v[1] = _mm512_and_si512(_mm512_srli_epi16(a, 4), m);
        v[2] = _mm512_and_si512(_mm512_srli_epi16(a, 8), m);
        v[3] = _mm512_srli_epi16(a, 12);
    } else {
        v[0] = _mm512_srai_epi16(_mm512_slli_epi16(a, 8), 8);
        v[1] = _mm512_srai_epi16(a, 8);
    }
}
static inline __m512i madd512(__m512i acc, __m512i w, const pair_t *x) {
#ifdef __AVX512VNNI__
    return _mm512_dpwssd_epi32(acc, w, _mm512_set1_epi32(*x));
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, _mm512_set1_epi32(*x)));
#endif
}
/* I[j][c]: row j's products of part c / CH (t < 8, t >= 8) in CH chains each (exact sums in any
 * order: chains only keep enough sums in flight for the multiply-adds' latency) */
#define IX(t) (((t) >> 3) * CH + ((t) & (CH - 1)))
#define DEF_G512(KIND, U4, SUB, MIN, MT)                                                         \
    static void g512_##KIND##_##MT(const Xq *x, const Qw *w, i64 g, i64 m0, float *out,          \
                                   i64 ldo, const float *bias, int accumulate) {                 \
        enum { CH = MT == 4 ? 1 : 2, PER = U4 ? 4 : 2 };                                         \
        i64 K = w->k, nb = w->nb;                                                                \
        const int16_t *xr[MT];                                                                   \
        __m512 acc[MT], mins[MT];                                                                \
        _Pragma("GCC unroll 4") for (int j = 0; j < MT; j++) {                                   \
            acc[j] = mins[j] = _mm512_setzero_ps();                                              \
            xr[j] = x->q + (m0 + j) * K;                                                         \
        }                                                                                        \
        for (i64 b = 0; b < nb; b++) {                                                           \
            const uint8_t *p = gq(w, g, b);                                                      \
            _Pragma("GCC unroll 8") for (int c = 0; c < (U4 == 2 ? 6 : U4 == 4 ? 5 : U4 ? 4 : 8); c++) \
                prefetch_at(p, QPF * w->gbytes + 64 * c);                                        \
            __m512i I[MT][2 * CH];                                                               \
            _Pragma("GCC unroll 4") for (int j = 0; j < MT; j++)                                 \
                _Pragma("GCC unroll 4") for (int i = 0; i < 2 * CH; i++)                         \
                    I[j][i] = _mm512_setzero_si512();                                            \
            _Pragma("GCC unroll 8") for (int c = 0; c < 16 / PER; c++) {                         \
                __m512i v[4];                                                                    \
                unpack512(U4, p, c, v, w->off5);                                                 \
                _Pragma("GCC unroll 4") for (int s = 0; s < PER; s++)                            \
                    _Pragma("GCC unroll 4") for (int j = 0; j < MT; j++)                         \
                        I[j][IX(c * PER + s)] = madd512(I[j][IX(c * PER + s)], v[s],             \
                            (const pair_t *)(xr[j] + b * 32) + c * PER + s);                     \
            }                                                                                    \
            i64 si = gsc(w, g, b);                                                               \
            _Pragma("GCC unroll 2") for (int h = 0; h < SUB; h++) {                              \
                __m512 sv = sc16v(w, g, b, si + (MIN == 1 ? 32 : 16) * h);                       \
                __m512 mv = MIN == 1 ? sc16v(w, g, b, si + 32 * h + 16)                          \
                          : MIN == 2 ? _mm512_mul_ps(sv, _mm512_set1_ps(-8.0f)) : sv;            \
                _Pragma("GCC unroll 4") for (int j = 0; j < MT; j++) {                           \
                    __m512i n = I[j][(SUB == 1 ? 0 : h) * CH];                                   \
                    _Pragma("GCC unroll 4") for (int i = 1; i < (SUB == 1 ? 2 : 1) * CH; i++)    \
                        n = _mm512_add_epi32(n, I[j][(SUB == 1 ? 0 : h) * CH + i]);              \
                    __m512 step = _mm512_set1_ps(x->d[(m0 + j) * nb + b]);                       \
                    acc[j] = _mm512_fmadd_ps(_mm512_mul_ps(sv, step), _mm512_cvtepi32_ps(n), acc[j]); \
                    if (MIN) {                                                                   \
                        float sx = SUB == 1 ? x->s32[(m0 + j) * nb + b]                          \
                                            : x->s16[(m0 + j) * (K / 16) + 2 * b + h];           \
                        mins[j] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx), mins[j]);              \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        int cnt = w->n - g * G < G ? (int)(w->n - g * G) : G;                                    \
        _Pragma("GCC unroll 4") for (int j = 0; j < MT; j++) {                                   \
            float r[G];                                                                          \
            _mm512_storeu_ps(r, MIN ? _mm512_add_ps(acc[j], mins[j]) : acc[j]);                 \
            put(out + (m0 + j) * ldo + g * G, r, bias, g * G, cnt, accumulate);                  \
        }                                                                                        \
    }
#define DEF_KIND512(KIND, U4, SUB, MIN)                                                          \
    DEF_G512(KIND, U4, SUB, MIN, 1)                                                              \
    DEF_G512(KIND, U4, SUB, MIN, 2)                                                              \
    DEF_G512(KIND, U4, SUB, MIN, 4)                                                              \
    static void rows_##KIND(const Xq *x, const Qw *w, i64 g, i64 m, i64 m1, float *out,          \
                            i64 ldo, const float *bias, int accumulate) {                        \
        for (; m + 4 <= m1; m += 4) g512_##KIND##_4(x, w, g, m, out, ldo, bias, accumulate);     \
        for (; m + 2 <= m1; m += 2) g512_##KIND##_2(x, w, g, m, out, ldo, bias, accumulate);     \
        for (; m < m1; m++) g512_##KIND##_1(x, w, g, m, out, ldo, bias, accumulate);             \
    }
DEF_KIND512(u4, 1, 1, 0)
DEF_KIND512(u4m, 1, 1, 1)
DEF_KIND512(u4d, 1, 1, 2)
DEF_KIND512(i8, 0, 1, 0)
DEF_KIND512(i8m, 0, 1, 1)
DEF_KIND512(i8s, 0, 2, 0)
DEF_KIND512(i8sm, 0, 2, 1)
DEF_KIND512(i6, 2, 1, 0)
DEF_KIND512(i6m, 2, 1, 1)
DEF_KIND512(i6s, 2, 2, 0)
DEF_KIND512(i6sm, 2, 2, 1)
DEF_KIND512(n4, 3, 1, 0)
DEF_KIND512(i5, 4, 1, 0)
DEF_KIND512(i5m, 4, 1, 1)
DEF_KIND512(i5s, 4, 2, 0)
DEF_KIND512(i5sm, 4, 2, 1)
typedef void (*RowsFn)(const Xq *, const Qw *, i64, i64, i64, float *, i64, const float *, int);
static void group_rows(const Xq *x, const Qw *w, i64 g, i64 m0, i64 m1, float *out, i64 ldo,
                       const float *bias, int accumulate) {
    static const RowsFn fns[5][2][2] = {{{rows_i8, rows_i8m}, {rows_i8s, rows_i8sm}},
                                        {{rows_u4, rows_u4m}, {rows_u4, rows_u4m}},
                                        {{rows_i6, rows_i6m}, {rows_i6s, rows_i6sm}},
                                        {{rows_n4, rows_n4}, {rows_n4, rows_n4}},
                                        {{rows_i5, rows_i5m}, {rows_i5s, rows_i5sm}}};
    /* n4: no mins, blocks of 32; mins made from the scales: u4 only (weight() refuses others) */
    if (w->has_min == 2)
        rows_u4d(x, w, g, m0, m1, out, ldo, bias, accumulate);
    else
        fns[w->u4][w->sub == 2][w->has_min != 0](x, w, g, m0, m1, out, ldo, bias, accumulate);
}
#else
/* 8 lanes at a time (AVX2 registers, or the scalar mirror): half hh of the group's 16 rows; the
 * same integer sums and, lane for lane, the same float operations as the AVX-512 loop. */
#ifdef KV_AVX2
typedef __m256i vi8;
static inline vi8 vi_zero(void) { return _mm256_setzero_si256(); }
static inline void unpack8(int u4, const uint8_t *p, int c, vi8 *v, int off5) {
    __m256i a = _mm256_loadu_si256((const __m256i *)(p + 64 * c));
    if (u4 == 4) { /* i5: as unpack512 (p: this half's first byte, its high bits 256 on) */
        __m256i m = _mm256_set1_epi16(15), o = _mm256_set1_epi16((short)off5), h = _mm256_set1_epi16(16);
        __m256i hw = _mm256_loadu_si256((const __m256i *)(p + 256));
        for (int s = 0; s < 4; s++) {
            int t = 4 * c + s;
            __m256i lo = _mm256_and_si256(s ? _mm256_srli_epi16(a, 4 * s) : a, m);
            __m256i hi = t >= 4 ? _mm256_srli_epi16(hw, t - 4) : _mm256_slli_epi16(hw, 4 - t);
            v[s] = _mm256_sub_epi16(_mm256_or_si256(lo, _mm256_and_si256(hi, h)), o);
        }
    } else if (u4 == 3) { /* n4: as unpack512 */
        __m256i tbl = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)IQ4NL));
        __m256i m = _mm256_set1_epi8(15);
        __m256i even = _mm256_shuffle_epi8(tbl, _mm256_and_si256(a, m));
        __m256i odd = _mm256_shuffle_epi8(tbl, _mm256_and_si256(_mm256_srli_epi16(a, 4), m));
        v[0] = _mm256_srai_epi16(_mm256_slli_epi16(even, 8), 8);
        v[1] = _mm256_srai_epi16(_mm256_slli_epi16(odd, 8), 8);
        v[2] = _mm256_srai_epi16(even, 8);
        v[3] = _mm256_srai_epi16(odd, 8);
    } else if (u4 == 2) { /* i6: as unpack512 */
        __m256i m = _mm256_set1_epi16(15), o = _mm256_set1_epi16(32), h = _mm256_set1_epi16(0x30);
        __m256i hw = _mm256_loadu_si256((const __m256i *)(p + 256 + 64 * (c >> 1)));
        for (int s = 0; s < 4; s++) {
            int t = (4 * c + s) % 8;
            __m256i lo = _mm256_and_si256(s ? _mm256_srli_epi16(a, 4 * s) : a, m);
            __m256i hi = t >= 2 ? _mm256_srli_epi16(hw, 2 * t - 4) : _mm256_slli_epi16(hw, 4 - 2 * t);
            v[s] = _mm256_sub_epi16(_mm256_or_si256(lo, _mm256_and_si256(hi, h)), o);
        }
    } else if (u4) {
        __m256i m = _mm256_set1_epi16(15);
        v[0] = _mm256_and_si256(a, m);
        v[1] = _mm256_and_si256(_mm256_srli_epi16(a, 4), m);
        v[2] = _mm256_and_si256(_mm256_srli_epi16(a, 8), m);
        v[3] = _mm256_srli_epi16(a, 12);
    } else {
        v[0] = _mm256_srai_epi16(_mm256_slli_epi16(a, 8), 8);
        v[1] = _mm256_srai_epi16(a, 8);
    }
}
static inline vi8 madd8(vi8 acc, vi8 w, const pair_t *x) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(w, _mm256_set1_epi32(*x)));
}
static inline vi8 vi_add8(vi8 a, vi8 b) { return _mm256_add_epi32(a, b); }
static inline v8 vi_float8(vi8 a) { return _mm256_cvtepi32_ps(a); }
#else
typedef struct { int32_t l[8]; } vi8;
static inline vi8 vi_zero(void) { vi8 r = {{0}}; return r; }
static inline void unpack8(int u4, const uint8_t *p, int c, vi8 *v, int off5) { /* v[s].l[i]: word i's part s */
    const uint8_t *hp = p + 256 + 64 * (c >> 1); /* i6: the high bits' run */
    const uint8_t *h5 = p + 256; /* i5: the high bits' run */
    p += 64 * c;
    for (int i = 0; i < 16; i++) {
        uint32_t wd = (uint32_t)p[2 * i] | (uint32_t)p[2 * i + 1] << 8;
        uint32_t hw = u4 == 2 ? (uint32_t)hp[2 * i] | (uint32_t)hp[2 * i + 1] << 8 : 0;
        uint32_t hw5 = u4 == 4 ? (uint32_t)h5[2 * i] | (uint32_t)h5[2 * i + 1] << 8 : 0;
        for (int s = 0; s < (u4 ? 4 : 2); s++) {
            int32_t val = u4 == 4 ? (int32_t)(((wd >> (4 * s)) & 15) | (((hw5 >> (4 * c + s)) & 1) << 4)) - off5
                        : u4 == 3 ? (int32_t)IQ4NL[(wd >> (4 * s)) & 15]
                        : u4 == 2 ? (int32_t)(((wd >> (4 * s)) & 15) |
                                              (((hw >> (2 * ((4 * c + s) % 8))) & 3) << 4)) - 32
                        : u4 ? (int32_t)((wd >> (4 * s)) & 15) : (int32_t)(int8_t)(wd >> (8 * s));
            /* pairs: lane i / 2 holds words 2l, 2l + 1: kept as two 16-bit halves */
            if (i % 2 == 0) v[s].l[i / 2] = (int32_t)(uint16_t)(int16_t)val;
            else v[s].l[i / 2] |= (int32_t)((uint32_t)(uint16_t)(int16_t)val << 16);
        }
    }
}
static inline vi8 madd8(vi8 acc, vi8 w, const pair_t *x) {
    int16_t x0 = (int16_t)(*x & 0xFFFF), x1 = (int16_t)((uint32_t)*x >> 16);
    for (int l = 0; l < 8; l++) {
        int16_t w0 = (int16_t)(w.l[l] & 0xFFFF), w1 = (int16_t)((uint32_t)w.l[l] >> 16);
        acc.l[l] += (int32_t)w0 * x0 + (int32_t)w1 * x1;
    }
    return acc;
}
static inline vi8 vi_add8(vi8 a, vi8 b) { for (int l = 0; l < 8; l++) a.l[l] += b.l[l]; return a; }
static inline v8 vi_float8(vi8 a) { v8 r; LANES(r.f[l_] = (float)a.l[l_]); return r; }
#endif
static inline v8 sc8v(const Qw *w, i64 g, i64 b, i64 i) { /* 8 lanes' scales (or mins) at i */
    float s[8];
    if (w->sc8) {
        const float *d = dd_gb(w, g, b, i) + (i & 15);
        for (int l = 0; l < 8; l++) s[l] = d[l] * (float)((const int8_t *)w->sc)[i + l];
    } else {
        for (int l = 0; l < 8; l++) s[l] = sc_at(w, i + l);
    }
    return v_load(s);
}
#define DEF_G8(U4, MT)                                                                           \
    static void g8_##U4##_##MT(const Xq *x, const Qw *w, i64 g, int hh, i64 m0, float *out,      \
                               i64 ldo, const float *bias, int accumulate) {                     \
        const int per = U4 ? 4 : 2, sub = w->sub;                                                \
        i64 K = w->k, nb = w->nb;                                                                \
        v8 acc[MT], mins[MT];                                                                    \
        _Pragma("GCC unroll 4")                                                          \
        for (int j = 0; j < MT; j++) acc[j] = mins[j] = v_zero();                                \
        for (i64 b = 0; b < nb; b++) {                                                           \
            const uint8_t *p = gq(w, g, b) + 32 * hh;                                            \
            if (hh == 0) /* the second half reads the group again, from the cache */             \
                for (i64 c = 0; c < w->gbytes; c += 64) prefetch_at(p, QPF * w->gbytes + c);     \
            vi8 I[MT][2];                                                                        \
            _Pragma("GCC unroll 4")                                                      \
            for (int j = 0; j < MT; j++) I[j][0] = I[j][1] = vi_zero();                          \
            _Pragma("GCC unroll 8")                                                              \
            for (int c = 0; c < 16 / per; c++) {                                                 \
                vi8 v[4];                                                                        \
                unpack8(U4, p, c, v, w->off5);                                                   \
                _Pragma("GCC unroll 4")                                                         \
                for (int s = 0; s < per; s++) {                                                 \
                    int t = c * per + s;                                                         \
                    _Pragma("GCC unroll 4")                                                      \
                    for (int j = 0; j < MT; j++)                                                 \
                        I[j][t >> 3] = madd8(I[j][t >> 3], v[s],                                 \
                                             (const pair_t *)(x->q + (m0 + j) * K + b * 32) + t); \
                }                                                                                \
            }                                                                                    \
            i64 si = gsc(w, g, b) + 8 * hh;                                                      \
            _Pragma("GCC unroll 4")                                                      \
            for (int h = 0; h < sub; h++) {                                                      \
                v8 sv = sc8v(w, g, b, si + w->ps * h);                                           \
                v8 mv = w->has_min == 1 ? sc8v(w, g, b, si + w->ps * h + 16)                     \
                      : w->has_min == 2 ? v_mul(sv, v_set1(-8.0f)) : sv;                         \
                _Pragma("GCC unroll 4")                                                  \
                for (int j = 0; j < MT; j++) {                                                   \
                    v8 step = v_set1(x->d[(m0 + j) * nb + b]);                                   \
                    v8 f = vi_float8(sub == 1 ? vi_add8(I[j][0], I[j][1]) : I[j][h]);            \
                    acc[j] = v_fma(v_mul(sv, step), f, acc[j]);                                  \
                    if (w->has_min) {                                                            \
                        float sx = sub == 1 ? x->s32[(m0 + j) * nb + b]                          \
                                            : x->s16[(m0 + j) * (K / 16) + 2 * b + h];           \
                        mins[j] = v_fma(mv, v_set1(sx), mins[j]);                                \
                    }                                                                            \
                }                                                                                \
            }                                                                                    \
        }                                                                                        \
        i64 n0 = g * G + 8 * hh;                                                                 \
        int cnt = w->n - n0 < 8 ? (int)(w->n - n0) : 8;                                          \
        _Pragma("GCC unroll 4")                                                          \
        for (int j = 0; j < MT && cnt > 0; j++) {                                                \
            float r[8];                                                                          \
            v_store(r, w->has_min ? v_add(acc[j], mins[j]) : acc[j]);                            \
            put(out + (m0 + j) * ldo + n0, r, bias, n0, cnt, accumulate);                        \
        }                                                                                        \
    }
DEF_G8(1, 1)
DEF_G8(1, 2)
DEF_G8(0, 1)
DEF_G8(0, 2)
DEF_G8(2, 1)
DEF_G8(2, 2)
DEF_G8(3, 1)
DEF_G8(3, 2)
DEF_G8(4, 1)
DEF_G8(4, 2)
static void group_rows(const Xq *x, const Qw *w, i64 g, i64 m0, i64 m1, float *out, i64 ldo,
                       const float *bias, int accumulate) {
    for (int hh = 0; hh < 2 && g * G + 8 * hh < w->n; hh++) {
        i64 m = m0;
        if (w->u4 == 4) {
            for (; m + 2 <= m1; m += 2) g8_4_2(x, w, g, hh, m, out, ldo, bias, accumulate);
            for (; m < m1; m++) g8_4_1(x, w, g, hh, m, out, ldo, bias, accumulate);
        } else if (w->u4 == 3) {
            for (; m + 2 <= m1; m += 2) g8_3_2(x, w, g, hh, m, out, ldo, bias, accumulate);
            for (; m < m1; m++) g8_3_1(x, w, g, hh, m, out, ldo, bias, accumulate);
        } else if (w->u4 == 2) {
            for (; m + 2 <= m1; m += 2) g8_2_2(x, w, g, hh, m, out, ldo, bias, accumulate);
            for (; m < m1; m++) g8_2_1(x, w, g, hh, m, out, ldo, bias, accumulate);
        } else if (w->u4) {
            for (; m + 2 <= m1; m += 2) g8_1_2(x, w, g, hh, m, out, ldo, bias, accumulate);
            for (; m < m1; m++) g8_1_1(x, w, g, hh, m, out, ldo, bias, accumulate);
        } else {
            for (; m + 2 <= m1; m += 2) g8_0_2(x, w, g, hh, m, out, ldo, bias, accumulate);
            for (; m < m1; m++) g8_0_1(x, w, g, hh, m, out, ldo, bias, accumulate);
        }
    }
}
#endif

/* ---------------------------------------------------------------- the job */
typedef struct {
    const Xq *x;
    const Qw *w;
    i64 M, per, runs; /* groups an item takes; items per block of XROWS rows of x */
    float *out;
    i64 ldo;
    const float *bias;
    int acc;
} QJob;

static void q_item(const void *ctx, i64 item) {
    const QJob *j = ctx;
    i64 mb = item / j->runs * XROWS, me = mb + XROWS < j->M ? mb + XROWS : j->M;
    i64 groups = (j->w->n + G - 1) / G, g0 = item % j->runs * j->per;
    i64 g1 = g0 + j->per < groups ? g0 + j->per : groups;
    for (i64 g = g0; g < g1; g++) group_rows(j->x, j->w, g, mb, me, j->out, j->ldo, j->bias, j->acc);
}

/* W: U4 or I8, interleaved in groups of 16 (quant.py); its scales float or float16 */
void kv_qmatmul(const float *x, i64 M, i64 ldx, const Weight *W, float *out, i64 ldo,
                const float *bias, int accumulate) {
    i64 K = W->k, n = W->n, bytes = M * K * 2 + M * (K / 32) * 8 + M * (K / 16) * 4;
    char small[65536], *buf = bytes <= (i64)sizeof small ? small : malloc((size_t)bytes);
    int16_t *xq = (int16_t *)buf;
    float *d = (float *)(buf + M * K * 2), *s16 = d + M * (K / 32), *s32 = s16 + M * (K / 16);
    QuantJob qj = {x, M, ldx, K, xq, d, s16, s32};
    kv_parallel(quantize_rows, &qj, (M + 7) / 8);
    Xq xs = {xq, d, s16, s32};
    Qw w = qw_of(W);
    i64 rows = M < XROWS ? M : XROWS, groups = (n + G - 1) / G;
    i64 per = Q_WORK / (G * K * rows) > 1 ? Q_WORK / (G * K * rows) : 1;
    QJob j = {&xs, &w, M, per, (groups + per - 1) / per, out, ldo, bias, accumulate};
    kv_parallel(q_item, &j, (M + XROWS - 1) / XROWS * j.runs);
    if (buf != small) free(buf);
}

/* row n of W as floats: w = fma(q, scale, min), one rounding (gguf-py's q * scale + min) */
void kv_qrow(const Weight *W, i64 n, float *out) {
    Qw w = qw_of(W);
    int u4 = w.u4;
    i64 g = n / G, r = n % G;
    for (i64 b = 0; b < w.nb; b++) {
        const uint8_t *p = gq(&w, g, b);
        for (int t = 0; t < 16; t++)
            for (int e = 0; e < 2; e++) {
                int per = u4 ? 4 : 2, c = t / per, s = t % per;
                const uint8_t *wd = p + 64 * c + 2 * (2 * r + e);
                uint32_t word = (uint32_t)wd[0] | (uint32_t)wd[1] << 8;
                float v = u4 == 3 ? (float)IQ4NL[(word >> (4 * s)) & 15]
                        : u4 ? (float)((word >> (4 * s)) & 15) : (float)(int8_t)(word >> (8 * s));
                if (u4 == 4) { /* i5: the high bit, and the offset */
                    const uint8_t *hd = p + 256 + 2 * (2 * r + e);
                    uint32_t hw = (uint32_t)hd[0] | (uint32_t)hd[1] << 8;
                    v = (float)((int)(((word >> (4 * s)) & 15) | (((hw >> t) & 1) << 4)) - w.off5);
                }
                if (u4 == 2) { /* i6: the high 2 bits, and the offset */
                    const uint8_t *hd = p + 256 + 64 * (t / 8) + 2 * (2 * r + e);
                    uint32_t hw = (uint32_t)hd[0] | (uint32_t)hd[1] << 8;
                    v = (float)((int)(((word >> (4 * s)) & 15) | (((hw >> (2 * (t % 8))) & 3) << 4)) - 32);
                }
                int k = 2 * t + e, h = w.sub == 2 && k >= 16;
                i64 si = gsc(&w, g, b) + w.ps * h + r;
                /* no mins: q * scale, as gguf-py computes Q8_0 or Q6_K */
                float f = sc_at(&w, si);
                out[b * 32 + k] = w.has_min == 1 ? fmaf(v, f, sc_at(&w, si + 16))
                                : w.has_min == 2 ? fmaf(v, f, -8.0f * f) : v * f;
            }
    }
}
