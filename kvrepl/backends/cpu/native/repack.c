/* Repacking at load: a weight's values, row after row, into qmatmul.c's lanes layout (lanes.py
 * documents it and keeps the reference in torch: tests compare the two byte for byte). A model's
 * weights pass through here once per load; in torch the same permutes took most of a GGUF
 * file's load (a 1B Q4_K_M file: 11 of its 17 s of repacking, on 2 cores).
 *
 * Values u (bytes, one per weight) are read three ways: bytes plus an offset (mod 256: int8
 * values -off..255-off as 0..255), the nibble pairs of a u4 weight as quant.py packs them (per
 * 32 weights 16 bytes, the low nibble weight j, the high j + 16), or bytes through a table of
 * 256 (IQ4's levels to their indices; 255 marks a byte that is no level: the call returns 1).
 * Rows past n, up to the groups' 16, are zeros. Out, per group of 16 rows and block of 32:
 *   i8  (512 bytes): run c = 0..7, word 2r + e: u(2(2c) + e) | u(2(2c + 1) + e) << 8
 *   u4  (256 bytes): run c = 0..3, word 2r + e: nibbles t = 4c .. 4c + 3 of u(2t + e) & 15
 *   i6  (384): u4's 256, then run h = 0..1, word 2r + e: (u(2(8h + j) + e) >> 4) & 3 at bit 2j
 *   i5  (320): u4's 256, then one run, word 2r + e: (u(2t + e) >> 4) & 1 at bit t
 * (u(k): row 16g + r's value k of the block). */
#include "kernels.h"

enum { FROM_BYTES = 0, FROM_U4 = 1 };
enum { TO_I8 = 0, TO_U4 = 1, TO_I6 = 2, TO_I5 = 3 };
static const int GBYTES[4] = {512, 256, 384, 320};

typedef struct {
    const uint8_t *src;
    i64 n, k;
    int from, off, to;
    const uint8_t *lut; /* or NULL */
    uint8_t *out;
    volatile int bad; /* a byte the table has no entry for (set, never cleared, by any thread) */
} LanesJob;

static inline void put16(uint8_t *o, unsigned w) {
    o[0] = (uint8_t)w;
    o[1] = (uint8_t)(w >> 8);
}

static void lanes_group(const void *ctx, i64 g) {
    LanesJob *j = (LanesJob *)ctx;
    /* locals: the stores below are bytes, which may alias the job as far as the compiler knows */
    const uint8_t *src = j->src, *lut = j->lut;
    const i64 n = j->n, k = j->k, nb = k / 32;
    const int from = j->from, to = j->to, gb = GBYTES[to];
    const uint8_t off = (uint8_t)j->off;
    uint8_t *out = j->out;
    uint8_t u[16][32];
    int bad = 0;
    for (i64 b = 0; b < nb; b++) {
        for (int r = 0; r < 16; r++) {
            i64 row = 16 * g + r;
            uint8_t *ur = u[r];
            if (row >= n) {
                memset(ur, 0, 32);
            } else if (from == FROM_U4) {
                const uint8_t *p = src + row * (k / 2) + b * 16;
                for (int i = 0; i < 16; i++) {
                    ur[i] = p[i] & 15;
                    ur[i + 16] = p[i] >> 4;
                }
            } else if (lut) {
                const uint8_t *p = src + row * k + b * 32;
                for (int i = 0; i < 32; i++) ur[i] = lut[p[i]];
                for (int i = 0; i < 32; i++) bad |= ur[i] == 255;
            } else {
                const uint8_t *p = src + row * k + b * 32;
                for (int i = 0; i < 32; i++) ur[i] = (uint8_t)(p[i] + off);
            }
        }
        uint8_t *o = out + (g * nb + b) * gb;
        if (to == TO_I8) {
            for (int c = 0; c < 8; c++)
                for (int r = 0; r < 16; r++)
                    for (int e = 0; e < 2; e++) {
                        o[64 * c + 4 * r + 2 * e] = u[r][4 * c + e];
                        o[64 * c + 4 * r + 2 * e + 1] = u[r][4 * c + 2 + e];
                    }
            continue;
        }
        for (int c = 0; c < 4; c++)
            for (int r = 0; r < 16; r++)
                for (int e = 0; e < 2; e++) {
                    const uint8_t *v = u[r] + 8 * c + e; /* v[2s]: value t = 4c + s */
                    o[64 * c + 4 * r + 2 * e] = (uint8_t)((v[0] & 15) | (v[2] & 15) << 4);
                    o[64 * c + 4 * r + 2 * e + 1] = (uint8_t)((v[4] & 15) | (v[6] & 15) << 4);
                }
        if (to == TO_I6) {
            for (int h = 0; h < 2; h++)
                for (int r = 0; r < 16; r++)
                    for (int e = 0; e < 2; e++) {
                        unsigned w = 0;
                        for (int q = 0; q < 8; q++) w |= ((u[r][2 * (8 * h + q) + e] >> 4) & 3u) << (2 * q);
                        put16(o + 256 + 64 * h + 2 * (2 * r + e), w);
                    }
        } else if (to == TO_I5) {
            for (int r = 0; r < 16; r++)
                for (int e = 0; e < 2; e++) {
                    unsigned w = 0;
                    for (int t = 0; t < 16; t++) w |= ((u[r][2 * t + e] >> 4) & 1u) << t;
                    put16(o + 256 + 2 * (2 * r + e), w);
                }
        }
    }
    if (bad) j->bad = 1;
}

/* src's n rows of k values -> out, (n + 15) / 16 * (k / 32) * GBYTES[to] bytes. Returns 1 where
 * lut maps some byte to 255 (out is then partly written: the caller takes another layout). */
int kv_lanes(const uint8_t *src, i64 n, i64 k, int from, int off, const uint8_t *lut, int to,
             uint8_t *out) {
    LanesJob j = {src, n, k, from, off, to, lut, out, 0};
    kv_parallel(lanes_group, &j, (n + 15) / 16);
    return j.bad;
}

/* ---------------------------------------------------------------- GGUF blocks' values
 * The integer values of GGUF blocks as quant.py's numpy packers compute them (tests compare the
 * two on random blocks of every type): int8 values, one per weight, or for Q4_K the nibble pairs
 * quant.py packs u4 weights in (per 32 weights 16 bytes: low nibble weight j, high j + 16).
 * A value is a field of its block: `bits` wide, in a run of `chunk` bytes from `at`, each run
 * read as 8 / bits planes, lowest bits first (ggufblocks.fields). */
enum { G_Q5_0, G_Q5_1, G_Q2_K, G_Q3_K, G_Q4_K, G_Q5_K, G_Q6_K, G_IQ4_NL, G_IQ4_XS };
static const int G_BYTES[] = {22, 24, 84, 110, 144, 176, 210, 18, 136};
static const int G_SIZE[] = {32, 32, 256, 256, 256, 256, 256, 32, 256};

/* v[0 .. n) = the block's `bits`-wide fields at `at` (runs of `chunk` bytes, planes lowest first) */
static inline void fields(uint8_t *v, const uint8_t *b, int at, int chunk, int bits, int n) {
    int planes = 8 / bits, mask = (1 << bits) - 1;
    for (int c = 0; c < n / (chunk * planes); c++)
        for (int p = 0; p < planes; p++)
            for (int i = 0; i < chunk; i++)
                v[(c * planes + p) * chunk + i] = (uint8_t)((b[at + chunk * c + i] >> (bits * p)) & mask);
}

typedef struct {
    const uint8_t *raw;
    i64 blocks;
    int type;
    uint8_t *out;
} ValuesJob;

#define VALUES_PER_ITEM 4096 /* blocks an item decodes */

static void values_item(const void *ctx, i64 item) {
    const ValuesJob *j = ctx;
    int t = j->type, nbytes = G_BYTES[t], size = G_SIZE[t];
    i64 b1 = (item + 1) * VALUES_PER_ITEM < j->blocks ? (item + 1) * VALUES_PER_ITEM : j->blocks;
    for (i64 bi = item * VALUES_PER_ITEM; bi < b1; bi++) {
        const uint8_t *b = j->raw + bi * nbytes;
        int8_t v[256];
        uint8_t lo[256], hi[256];
        switch (t) {
        case G_Q5_0:
        case G_Q5_1: {
            int off = t == G_Q5_1 ? 4 : 2, sub = t == G_Q5_0 ? 16 : 0;
            uint32_t qh = b[off] | (uint32_t)b[off + 1] << 8 | (uint32_t)b[off + 2] << 16 | (uint32_t)b[off + 3] << 24;
            fields(lo, b, off + 4, 16, 4, 32);
            for (int f = 0; f < 32; f++) v[f] = (int8_t)((lo[f] | ((qh >> f) & 1) << 4) - sub);
            break;
        }
        case G_Q2_K:
            fields((uint8_t *)v, b, 16, 32, 2, 256);
            break;
        case G_Q3_K:
            fields(lo, b, 32, 32, 2, 256);
            fields(hi, b, 0, 32, 1, 256);
            for (int f = 0; f < 256; f++) v[f] = (int8_t)(lo[f] - 4 * (1 - hi[f]));
            break;
        case G_Q4_K:
            fields((uint8_t *)v, b, 16, 32, 4, 256);
            break;
        case G_Q5_K:
            fields(lo, b, 48, 32, 4, 256);
            fields(hi, b, 16, 32, 1, 256);
            for (int f = 0; f < 256; f++) v[f] = (int8_t)(lo[f] | hi[f] << 4);
            break;
        case G_Q6_K:
            fields(lo, b, 0, 64, 4, 256);
            fields(hi, b, 128, 32, 2, 256);
            for (int f = 0; f < 256; f++) v[f] = (int8_t)((lo[f] | hi[f] << 4) - 32);
            break;
        case G_IQ4_NL:
        case G_IQ4_XS:
            fields(lo, b, t == G_IQ4_NL ? 2 : 8, 16, 4, size);
            for (int f = 0; f < size; f++) v[f] = IQ4NL[lo[f]];
            break;
        }
        if (t == G_Q4_K) { /* u4's nibble pairs, 16 bytes per 32 */
            uint8_t *o = j->out + bi * 128;
            for (int s = 0; s < 8; s++)
                for (int i = 0; i < 16; i++) o[16 * s + i] = (uint8_t)(v[32 * s + i] | v[32 * s + 16 + i] << 4);
        } else {
            memcpy(j->out + bi * size, v, (size_t)size);
        }
    }
}

/* `blocks` GGUF blocks of type `type` (G_*) -> their values: int8, one a weight, or Q4_K's
 * nibble pairs (half a byte a weight) */
void kv_gguf_values(const uint8_t *raw, i64 blocks, int type, uint8_t *out) {
    ValuesJob j = {raw, blocks, type, out};
    kv_parallel(values_item, &j, (blocks + VALUES_PER_ITEM - 1) / VALUES_PER_ITEM);
}
