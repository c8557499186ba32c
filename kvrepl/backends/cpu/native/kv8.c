/* The 8-bit K/V cache (kv_bits 8): storing a position's K and V as int8 with a scale, and one
 * query row's attention over such rows (kernels.c's attention calls it for each block of keys).
 *
 * The same rules as kernels.c, so reuse equals recompute bit for bit in this mode too: a row is
 * quantized once, when its position is written, by operations that depend on that row alone;
 * a score or a sum runs one fixed sequence of float operations whatever runs beside it; the
 * scalar build mirrors the vector one (int8 to float is exact; the scales are applied in scalar
 * code, the same products in every build). */
#include "kernels.h"

/* The 8-bit cache (kv_bits 8): a position's row in [kvh][cap] is D int8 values and then their
 * float32 scale (D + 4 bytes, KV8_ROW), x ~ scale * q. absmax / 127 per position and kv head:
 * nothing is clipped, and a row's values never depend on another row's. Each row is quantized
 * once, here, by the same scalar operations in every build (max and a product rounded to
 * nearest even are exact, whichever instructions do them). */
static void q8_row(const float *x, i64 D, int8_t *out) {
    float amax = 0.0f;
    for (i64 i = 0; i < D; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    float scale = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    for (i64 i = 0; i < D; i++) {
        float r = nearbyintf(x[i] * inv);
        out[i] = (int8_t)(r > 127.0f ? 127.0f : r < -127.0f ? -127.0f : r);
    }
    memcpy(out + D, &scale, sizeof scale);
}

/* kv_store into the 8-bit caches [kvh][cap][D + 4] */
void kv_store8(const float *k, const float *v, i64 M, i64 ld, i64 kvh, i64 D, int8_t *kc,
               int8_t *vc, i64 cap, i64 pos0) {
    i64 R = KV8_ROW(D);
    for (i64 m = 0; m < M; m++)
        for (i64 g = 0; g < kvh; g++) {
            q8_row(k + m * ld + g * D, D, kc + (g * cap + pos0 + m) * R);
            q8_row(v + m * ld + g * D, D, vc + (g * cap + pos0 + m) * R);
        }
}

/* The same for the 8-bit cache: keys are rows of KV8_ROW(D) bytes (D int8, then the scale the
 * caller applies); int8 to float is exact, so only the loads differ from qk_##HT. */
#define DEF_QK8(HT)                                                                              \
    static inline void qk8_##HT(const float *q, i64 D, const int8_t *kr, float *s, i64 sstride) { \
        v8 acc[HT][4];                                                                           \
        i64 R = KV8_ROW(D);                                                                      \
        for (int h = 0; h < HT; h++)                                                             \
            for (int k = 0; k < 4; k++) acc[h][k] = v_zero();                                    \
        for (i64 c = 0; c < D; c += 8) {                                                         \
            v8 qv[HT];                                                                           \
            for (int h = 0; h < HT; h++) qv[h] = v_load(q + h * D + c);                          \
            _Pragma("GCC unroll 4")                                                              \
            for (int k = 0; k < 4; k++) {                                                        \
                v8 kv = v_i8(kr + k * R + c);                                                    \
                for (int h = 0; h < HT; h++) acc[h][k] = v_fma(qv[h], kv, acc[h][k]);           \
            }                                                                                    \
        }                                                                                        \
        for (int h = 0; h < HT; h++) store4(s + h * sstride, v_hsum4(acc[h][0], acc[h][1], acc[h][2], acc[h][3])); \
    }
DEF_QK8(1)
DEF_QK8(2)
DEF_QK8(3)

/* The same over the 8-bit cache's values: each weight times its value row's scale (read from the
 * row, beside the values: sum p (s q) = sum (p s) q), then as pv_##HT##_##NC */
#define DEF_PV8(HT, NC)                                                                          \
    static inline void pv8_##HT##_##NC(const float *p, i64 pstride, const int8_t *vr, i64 D,    \
                                       i64 n, i64 c0, float *out, i64 ostride) {                 \
        v8 acc[HT][NC];                                                                          \
        i64 R = KV8_ROW(D);                                                                      \
        for (int h = 0; h < HT; h++)                                                             \
            for (int c = 0; c < NC; c++) acc[h][c] = v_zero();                                   \
        for (i64 j = 0; j < n; j++) {                                                            \
            if (c0 == 0)                                                                         \
                for (i64 pf = 0; pf < R; pf += 64) prefetch(vr + (j + PF_KEYS) * R + pf);        \
            v8 pj[HT];                                                                           \
            float vs;                                                                            \
            memcpy(&vs, vr + j * R + D, sizeof vs);                                              \
            for (int h = 0; h < HT; h++) pj[h] = v_set1(p[h * pstride + j] * vs);                \
            _Pragma("GCC unroll 4")                                                              \
            for (int c = 0; c < NC; c++) {                                                       \
                v8 vv = v_i8(vr + j * R + c0 + 8 * c);                                           \
                for (int h = 0; h < HT; h++) acc[h][c] = v_fma(pj[h], vv, acc[h][c]);           \
            }                                                                                    \
        }                                                                                        \
        for (int h = 0; h < HT; h++)                                                             \
            for (int c = 0; c < NC; c++) v_store(out + h * ostride + c0 + 8 * c, acc[h][c]);     \
    }
DEF_PV8(1, 4)
DEF_PV8(2, 4)
DEF_PV8(3, 4)
DEF_PV8(1, 1)
DEF_PV8(2, 1)
DEF_PV8(3, 1)

/* att_row over the 8-bit cache: rows of KV8_ROW(D) bytes, the int8 values then their scale. A
 * score is the dot product with the key's int8 values, times the key's scale, times `scale`;
 * each weight is multiplied by its value row's scale (in pv8) after the sum of the weights is
 * taken. The rest is att_row's, operation for operation. */
void kv_att_row8(const float *q, int G, i64 D, const int8_t *kr, const int8_t *vr, i64 n,
                 float scale, float softcap, float *part) {
    float s[16][ATT_B + 4], ksc[ATT_B + 4];
    i64 R = KV8_ROW(D);
    const int8_t *kt = kr;
    int8_t tail[4 * (512 + 4)]; /* the last < 4 keys, padded, so no read passes the cache's end */
    for (i64 j = 0; j < n; j += 4) {
        for (i64 pf = 0; pf < 4 * R; pf += 64) prefetch(kr + (j + PF_KEYS) * R + pf);
        if (j + 4 > n) {
            memset(tail, 0, 4 * R);
            memcpy(tail, kr + j * R, (n - j) * R);
            kt = tail - j * R;
        }
        for (int h = 0; h < G;) {
            int ht = G - h >= 3 ? 3 : G - h;
            if (ht == 3) qk8_3(q + h * D, D, kt + j * R, &s[h][j], ATT_B + 4);
            else if (ht == 2) qk8_2(q + h * D, D, kt + j * R, &s[h][j], ATT_B + 4);
            else qk8_1(q + h * D, D, kt + j * R, &s[h][j], ATT_B + 4);
            h += ht;
        }
        for (int k = 0; k < 4; k++) /* the keys' scales, while their rows are at hand */
            memcpy(&ksc[j + k], kt + (j + k) * R + D, sizeof(float));
    }
    for (int h = 0; h < G; h++) {
        float *sh = s[h];
        i64 j;
        for (j = 0; j + 8 <= n; j += 8) /* the same two products in every build */
            v_store(sh + j, v_mul(v_mul(v_load(sh + j), v_load(ksc + j)), v_set1(scale)));
        for (; j < n; j++) sh[j] = (sh[j] * ksc[j]) * scale;
        if (softcap > 0.0f)
            for (j = 0; j < n; j++) sh[j] = tanhf(sh[j] / softcap) * softcap;
        float mx = max_of(sh, n);
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
            if (ht == 3) pv8_3_4(s[h], ATT_B + 4, vr, D, n, c0, o, D + 2);
            else if (ht == 2) pv8_2_4(s[h], ATT_B + 4, vr, D, n, c0, o, D + 2);
            else pv8_1_4(s[h], ATT_B + 4, vr, D, n, c0, o, D + 2);
        }
        for (; c0 < D; c0 += 8) {
            if (ht == 3) pv8_3_1(s[h], ATT_B + 4, vr, D, n, c0, o, D + 2);
            else if (ht == 2) pv8_2_1(s[h], ATT_B + 4, vr, D, n, c0, o, D + 2);
            else pv8_1_1(s[h], ATT_B + 4, vr, D, n, c0, o, D + 2);
        }
        h += ht;
    }
}
