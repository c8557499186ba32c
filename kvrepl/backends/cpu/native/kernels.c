/* kvrepl's CPU kernels: quantized matmul, attention over an fp16 or 8-bit cache, norms, rope,
 * activations.
 *
 * Batch invariance by construction: every output element is computed by one fixed sequence of
 * float operations that depends on its own inputs and sizes only, never on how many rows are
 * computed with it, how they are tiled, or how many threads run. So a token's K/V and logits are
 * bit-identical whether it was computed in a prefill chunk of any size or alone in a decode step
 * (reuse equals recompute, bit for bit). The rules that make it so:
 *   - a quantized dot product is one lane from start to end: per block of 32, an exact integer
 *     sum, then one fma (qmatmul.c); a float one accumulates 8 lanes in k order (lane = k mod
 *     8) and ends with one fixed horizontal sum; tiles over rows/columns only change which
 *     outputs run side by side;
 *   - threads split outputs, never a reduction: a job is items of fixed size (pool.c runs them
 *     on however many threads, in any order);
 *   - attention splits a query's keys into blocks at fixed absolute positions (ATT_B), computes
 *     each block's (max, sum, weighted values) and combines blocks in order, whatever ran them;
 *   - no fused multiply-add that the compiler chooses: built with -ffp-contract=off, FMAs are
 *     explicit. The scalar fallback mirrors the AVX2 path operation for operation, and a lane
 *     of the AVX-512 matmul does what a lane of the AVX2 one does (integer sums are exact,
 *     whichever instructions add them).
 *
 * Weights are kept in the file's own quantized values, repacked at load (exactly) into:
 *   U4: 4-bit unsigned per weight, blocks of 32 along k, a float (scale, min) per block:
 *       w = scale * q + min  (GGUF Q4_0, Q4_1, Q4_K);
 *   I8: 8-bit signed, blocks of 32 or 16, a float (scale, min) per block (Q8_0, Q6_K, Q5_x);
 *   both in groups of 16 rows, a row a lane (quant.py, _lanes);
 *   F16 and F32: plain.
 * The K/V cache is fp16 or, with kv_bits 8, int8 rows with a scale (kv8.c stores and reads them).
 * Built and loaded by kvrepl/native/__init__.py; called through ctypes with raw pointers.
 */
#include "kernels.h" /* the vectors and exp; the 8-bit cache's functions are kv8.c's */

#define KV_VERSION 3 /* 3: quantized dot products a lane per output (qmatmul.c) */

/* ---------------------------------------------------------------- weights */
/* Weight and finish: kernels.h. Quantized weights (U4, I8) are qmatmul.c's. Float weights (F16,
 * F32) take float activations: per output, acc = fma(x, w, acc) over k in order (8 lanes, lane =
 * k mod 8), then hsum. */
typedef struct {
    const uint8_t *q;
    i64 k, qrow; /* weights per row; bytes per row */
} Wv;

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
typedef struct {
    const float *x;
    i64 ldx, M, N, ldo, per, chunks; /* tiles per item; items per block of 64 rows */
    const Wv *w;
    float *out;
    const float *bias;
    int acc;
} MmJob;

#define MM_WORK 32768
#define DEF_MM(FMT)                                                                              \
    DEF_fTILE(FMT, 1, 1)                                                                         \
    DEF_fTILE(FMT, 1, 4)                                                                         \
    DEF_fTILE(FMT, 1, 2)                                                                         \
    DEF_fTILE(FMT, 4, 1)                                                                         \
    DEF_fTILE(FMT, 4, 2)                                                                         \
    static void mm1_##FMT(const void *ctx, i64 item) {                                           \
        const MmJob *j = ctx;                                                                    \
        i64 N = j->N, n = item * j->per * 4, end = n + j->per * 4 < N ? n + j->per * 4 : N;      \
        for (; n + 4 <= end; n += 4) ftile_##FMT##_1_4(j->x, j->ldx, j->w, j->out, j->ldo, j->bias, j->acc, 0, n); \
        for (; n < end; n++) ftile_##FMT##_1_1(j->x, j->ldx, j->w, j->out, j->ldo, j->bias, j->acc, 0, n); \
    }                                                                                            \
    static void mmb_##FMT(const void *ctx, i64 item) {                                           \
        const MmJob *j = ctx;                                                                    \
        i64 mb = item / j->chunks * 64, me = mb + 64 < j->M ? mb + 64 : j->M, N = j->N;          \
        i64 n0 = item % j->chunks * j->per * 2, n1 = n0 + j->per * 2 < N ? n0 + j->per * 2 : N;  \
        for (i64 n = n0; n < n1; n += 2) {                                                       \
            int two = n + 2 <= N;                                                                \
            i64 m = mb;                                                                          \
            for (; m + 4 <= me; m += 4)                                                          \
                if (two) ftile_##FMT##_4_2(j->x, j->ldx, j->w, j->out, j->ldo, j->bias, j->acc, m, n); \
                else ftile_##FMT##_4_1(j->x, j->ldx, j->w, j->out, j->ldo, j->bias, j->acc, m, n); \
            for (; m < me; m++)                                                                  \
                if (two) ftile_##FMT##_1_2(j->x, j->ldx, j->w, j->out, j->ldo, j->bias, j->acc, m, n); \
                else ftile_##FMT##_1_1(j->x, j->ldx, j->w, j->out, j->ldo, j->bias, j->acc, m, n); \
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
DEF_MM(f16)
DEF_MM(f32)

/* out[m, n] (+)= x[m, :] . W[n, :] (+ bias[n]), for m < M */
void kv_matmul(const float *x, i64 M, i64 ldx, const Weight *W, float *out, i64 ldo,
               const float *bias, int accumulate) {
    if (M < 1) return;
    if (W->fmt == FMT_U4 || W->fmt == FMT_I8 || W->fmt == FMT_I6 || W->fmt == FMT_N4 || W->fmt == FMT_I5 || W->fmt == FMT_U5) {
        kv_qmatmul(x, M, ldx, W, out, ldo, bias, accumulate);
        return;
    }
    Wv w = {(const uint8_t *)W->q, W->k, W->k * (W->fmt == FMT_F16 ? 2 : 4)};
    MmJob j = {x, ldx, M, W->n, ldo, 0, 0, &w, out, bias, accumulate};
    if (W->fmt == FMT_F16) mm_f16(&j);
    else mm_f32(&j);
}

/* rows of W (embeddings) as floats, times `scale` when it is not 1 */
void kv_rows(const Weight *W, const int64_t *rows, i64 M, float *out, i64 ldo, float scale) {
    Wv w = {(const uint8_t *)W->q, W->k, W->k * (W->fmt == FMT_F16 ? 2 : 4)};
    for (i64 m = 0; m < M; m++) {
        float *o = out + m * ldo;
        if (W->fmt == FMT_U4 || W->fmt == FMT_I8 || W->fmt == FMT_I6 || W->fmt == FMT_N4 || W->fmt == FMT_I5 || W->fmt == FMT_U5) {
            kv_qrow(W, rows[m], o);
        } else {
            for (i64 b = 0; b < W->k / 32; b++) {
                v8 v[4];
                if (W->fmt == FMT_F16) wf_f16(&w, rows[m], b, v);
                else wf_f32(&w, rows[m], b, v);
                for (int i = 0; i < 4; i++) v_store(o + b * 32 + 8 * i, v[i]);
            }
        }
        if (scale != 1.0f)
            for (i64 i = 0; i < W->k; i++) o[i] = o[i] * scale;
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
