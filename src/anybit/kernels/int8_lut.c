/* The fast CPU product y = x Wᵀ for anybit's axis-0 layouts, on integer dot products.
 * Built and loaded by anybit/kernels/build.py; prepared and called by anybit/kernels/cpu_fast.py.
 *
 * Weights, re-laid at load time: every row is cut into segments of `group_size` columns, and every segment
 * into blocks of 64 columns; a block of a b-bit segment takes 8 b bytes. The AVX-512 path (with GFNI) reads
 * them in the stored order (per 8 codes, b bytes, byte q holding bit q of each); the others as b
 * little-endian 64-bit words, word q holding bit q of the block's 64 codes (bit j for column j). At 8 bits
 * a block is the 64 codes themselves, one byte each. A segment's weights are (value - offset) * scale, where value
 * is the code itself (uniform grids: offset is the zero point) or an entry of the segment's table of 2^b
 * unsigned bytes (codebooks: each centroid rounded to scale * (entry - 128), offset 128).
 *
 * Activations: every token's 64-column blocks are rounded with one float scale s per block (absolute maximum ->
 * 127) to two int8 parts, x ~ s (hi + lo / 256): 15 bits, so that one outlying activation does not flatten
 * the rest of its block. A block's product is 256 dot(v, hi) + dot(v, lo), exact in int32, times the scales.
 *
 * Paths, chosen when compiled: AVX-512 (BW, VBMI, VNNI, GFNI): codes transposed from the stored bit planes by
 * vpermb and gf2p8affineqb, tables looked up by vpermb/vpermi2b, products by vpdpbusd; AVX2: codes
 * assembled from plane words, 32 columns at a time, tables of
 * up to 32 entries by pshufb, products by maddubs; portable C otherwise. All paths compute the same integer
 * dot products; only the order of float sums differs.
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
static int omp_thread(void) { return omp_get_thread_num(); }
#else
static int omp_thread(void) { return 0; }
#endif
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512VNNI__) && defined(__GFNI__)
#define PATH_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__)
#define PATH_AVX2 1
#include <immintrin.h>
#endif

#define BLOCK 64
#define MAX_TOKENS 8 /* tokens multiplied per pass over a row's codes */

/* Which code path this build has: 2 AVX-512, 1 AVX2, 0 portable. */
int anybit_fast_path(void) {
#if defined(PATH_AVX512)
    return 2;
#elif defined(PATH_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* Where a token's block of rounded activations sits: its 64 high parts, then its 64 low parts. */
#define XQ(xq, cols, t, k) ((xq) + 2 * ((t) * (cols) + (k) * BLOCK))

/* Round each token's 64-column blocks: parts at XQ(xq, cols, t, k), steps xs[t, k] = s / 256, and each block's
 * sum of (256 hi + lo) times its step, bsum[t, k]. */
void anybit_fast_quantize_input(const float *x, int64_t tokens, int64_t cols, int8_t *xq, float *xs, float *bsum) {
    const int64_t blocks = cols / BLOCK;
    for (int64_t t = 0; t < tokens; t++) {
        for (int64_t k = 0; k < blocks; k++) {
            const float *v = x + t * cols + k * BLOCK;
            int8_t *hi = XQ(xq, cols, t, k), *lo = hi + BLOCK;
            float amax = 0.0f;
            for (int j = 0; j < BLOCK; j++) amax = fmaxf(amax, fabsf(v[j]));
            const float step = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
            int sum = 0;
            for (int j = 0; j < BLOCK; j++) {
                const float scaled = v[j] * inverse;
                int h = (int)lrintf(scaled);
                h = h > 127 ? 127 : (h < -127 ? -127 : h);
                int l = (int)lrintf((scaled - (float)h) * 256.0f);
                l = l > 127 ? 127 : (l < -127 ? -127 : l);
                hi[j] = (int8_t)h, lo[j] = (int8_t)l;
                sum += 256 * h + l;
            }
            xs[t * blocks + k] = step / 256.0f;
            bsum[t * blocks + k] = (float)sum * step / 256.0f;
        }
    }
}

#if defined(PATH_AVX512)
/* For each width b < 8: byte p of lane j of the spread block takes stored byte j b + 7 - p (plane 7 - p of code
 * group j) where 7 - p < b, and is zero elsewhere. Filled once. */
static uint8_t SPREAD_INDEX[8][64];
static uint64_t SPREAD_MASK[8];

static void init_spread_tables(void) {
    for (int b = 1; b < 8; b++) {
        uint64_t mask = 0;
        for (int j = 0; j < 8; j++)
            for (int p = 0; p < 8; p++)
                if (7 - p < b) {
                    SPREAD_INDEX[b][8 * j + p] = (uint8_t)(j * b + 7 - p);
                    mask |= 1ULL << (8 * j + p);
                }
        SPREAD_MASK[b] = mask;
    }
}
#define spread_index(b) _mm512_loadu_si512(SPREAD_INDEX[b])
#define spread_mask(b) ((__mmask64)SPREAD_MASK[b])

/* The 64 values of one block: its codes, or its codes looked up in the segment's table. */
static inline __m512i block_values(const uint64_t *words, int b, const uint8_t *table) {
    __m512i codes;
    if (b == 8) {
        codes = _mm512_loadu_si512(words);
    } else { /* the stored layout: per 8 codes, b bytes, byte q holding bit q of each. vpermb puts plane q of
              * group j at byte 7 - q of lane j (zeros above the width); gf2p8affineqb then transposes each
              * lane's 8x8 bit matrix, so that byte i of lane j is code 8 j + i. */
        const __m512i raw = _mm512_maskz_loadu_epi8((__mmask64)((1ULL << (8 * b)) - 1), words);
        const __m512i spread = _mm512_maskz_permutexvar_epi8(spread_mask(b), spread_index(b), raw);
        codes = _mm512_gf2p8affine_epi64_epi8(_mm512_set1_epi64((long long)0x8040201008040201ULL), spread, 0);
    }
    if (!table) return codes;
    if (b <= 6) return _mm512_permutexvar_epi8(codes, _mm512_loadu_si512(table));
    __m512i low = _mm512_permutex2var_epi8(_mm512_loadu_si512(table), codes, _mm512_loadu_si512(table + 64));
    if (b == 7) return low;
    __m512i high = _mm512_permutex2var_epi8(_mm512_loadu_si512(table + 128), codes, _mm512_loadu_si512(table + 192));
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(codes), low, high);
}
/* Sixteen int32 partial sums of 256 dot(v, hi) + dot(v, lo) for the two-part activations at hi. */
static inline __m512i block_dot(__m512i v, const int8_t *hi) {
    const __m512i high = _mm512_dpbusd_epi32(_mm512_setzero_si512(), v, _mm512_loadu_si512(hi));
    return _mm512_dpbusd_epi32(_mm512_slli_epi32(high, 8), v, _mm512_loadu_si512(hi + BLOCK));
}
#define OFFSET_BIAS 0
#elif defined(PATH_AVX2)
/* 32 one-bit flags (bit j for byte j) as 32 bytes of 0 or `bit`. */
static inline __m256i spread_bits(uint32_t flags, uint8_t bit) {
    const __m256i pick = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                          3, 3, 3, 3, 3, 3, 3, 3);
    const __m256i select = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)flags), pick);
    v = _mm256_cmpeq_epi8(_mm256_and_si256(v, select), select);
    return _mm256_and_si256(v, _mm256_set1_epi8((char)bit));
}

/* The 32 values of half a block (half 0 or 1), as signed bytes value - 128. */
static inline __m256i half_values(const uint64_t *words, int b, const uint8_t *table, int half) {
    __m256i codes = _mm256_setzero_si256();
    if (b == 8)
        codes = _mm256_loadu_si256((const __m256i *)((const uint8_t *)words + 32 * half));
    else
        for (int q = 0; q < b; q++)
            codes = _mm256_or_si256(codes, spread_bits((uint32_t)(words[q] >> (32 * half)), (uint8_t)(1 << q)));
    if (table && b <= 5) {
        const __m256i low = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)table));
        __m256i v = _mm256_shuffle_epi8(low, codes); /* pshufb uses the low 4 bits (bit 7 is never set) */
        if (b == 5) {
            const __m256i high = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(table + 16)));
            const __m256i bit4 = _mm256_slli_epi16(codes, 3); /* bit 4 of each byte moved to bit 7 */
            v = _mm256_blendv_epi8(v, _mm256_shuffle_epi8(high, _mm256_and_si256(codes, _mm256_set1_epi8(15))), bit4);
        }
        codes = v;
    } else if (table) { /* wider tables: looked up one byte at a time */
        uint8_t c[32];
        _mm256_storeu_si256((__m256i *)c, codes);
        for (int j = 0; j < 32; j++) c[j] = table[c[j]];
        codes = _mm256_loadu_si256((const __m256i *)c);
    }
    return _mm256_xor_si256(codes, _mm256_set1_epi8((char)0x80));
}

/* Eight int32 partial sums of the products of 32 signed values w with 32 int8 activations. */
static inline __m256i half_dot8(__m256i w, const int8_t *xq) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}

/* The same with the two-part activations at hi (high parts; low parts BLOCK bytes on): 256 hi + lo. */
static inline __m256i half_dot(__m256i w, const int8_t *hi) {
    return _mm256_add_epi32(_mm256_slli_epi32(half_dot8(w, hi), 8), half_dot8(w, hi + BLOCK));
}
#define OFFSET_BIAS 128 /* the AVX2 path multiplies value - 128 */
#else
#define OFFSET_BIAS 0
#endif

/* The constant tables the code path needs, filled on first use (before any thread starts). */
static void init_tables(void) {
#if defined(PATH_AVX512)
    if (!SPREAD_MASK[1]) init_spread_tables();
#endif
}

/* The exact integer dot product of one block's values with one token's two-part block (portable path). */
static inline int32_t block_dot_portable(const uint64_t *words, int b, const uint8_t *table, const int8_t *xq) {
    int32_t dot = 0;
    for (int j = 0; j < BLOCK; j++) {
        int code = 0;
        if (b == 8)
            code = ((const uint8_t *)words)[j];
        else
            for (int q = 0; q < b; q++) code |= (int)((words[q] >> j) & 1) << q;
        dot += (int32_t)(table ? table[code] : code) * (256 * xq[j] + xq[j + BLOCK]);
    }
    return dot;
}

#if defined(PATH_AVX512)
typedef __m512 accumulator;
#define ACC_ZERO _mm512_setzero_ps()
#elif defined(PATH_AVX2)
typedef __m256 accumulator;
#define ACC_ZERO _mm256_setzero_ps()
#else
typedef float accumulator;
#define ACC_ZERO 0.0f
#endif

/* Adds the blocks k0 .. k0 + nblocks - 1 of one b-bit segment (scale sc) to the tokens' accumulators. Within
 * the segment, each block's integer product is scaled by its activation step alone (a multiply-add with a
 * broadcast operand); the segment's scale multiplies the segment's sum once. With one token, odd blocks add
 * into a second sum, which halves the chain of dependent multiply-adds. Inlined with b and n constant, so
 * the loops unroll and the sums stay in registers. */
static inline __attribute__((always_inline)) const uint64_t *
segment_blocks(const uint64_t *words, const int b, const uint8_t *table, float sc, int64_t k0, int64_t nblocks,
               const int8_t *xq, const float *xs, int64_t cols, int64_t t0, const int n, accumulator *acc) {
    const int64_t blocks = cols / BLOCK;
#if defined(PATH_AVX512)
    __m512 sum[MAX_TOKENS], odd = _mm512_setzero_ps();
    for (int t = 0; t < n; t++) sum[t] = _mm512_setzero_ps();
    int64_t k = k0;
    if (n == 1) /* two blocks per step, into two sums */
        for (; k + 1 < k0 + nblocks; k += 2, words += 2 * b) {
            const __m512i v0 = block_values(words, b, table), v1 = block_values(words + b, b, table);
            const __m512 d0 = _mm512_cvtepi32_ps(block_dot(v0, XQ(xq, cols, t0, k)));
            const __m512 d1 = _mm512_cvtepi32_ps(block_dot(v1, XQ(xq, cols, t0, k + 1)));
            sum[0] = _mm512_fmadd_ps(d0, _mm512_set1_ps(xs[t0 * blocks + k]), sum[0]);
            odd = _mm512_fmadd_ps(d1, _mm512_set1_ps(xs[t0 * blocks + k + 1]), odd);
        }
    for (; k < k0 + nblocks; k++, words += b) {
        const __m512i v = block_values(words, b, table);
        for (int t = 0; t < n; t++) {
            const int64_t tt = t0 + t;
            const __m512 dot = _mm512_cvtepi32_ps(block_dot(v, XQ(xq, cols, tt, k)));
            sum[t] = _mm512_fmadd_ps(dot, _mm512_set1_ps(xs[tt * blocks + k]), sum[t]);
        }
    }
    if (n == 1) sum[0] = _mm512_add_ps(sum[0], odd);
    for (int t = 0; t < n; t++) acc[t] = _mm512_fmadd_ps(sum[t], _mm512_set1_ps(sc), acc[t]);
#elif defined(PATH_AVX2)
    __m256 sum[MAX_TOKENS];
    for (int t = 0; t < n; t++) sum[t] = _mm256_setzero_ps();
    for (int64_t k = k0; k < k0 + nblocks; k++, words += b) {
        const __m256i v0 = half_values(words, b, table, 0), v1 = half_values(words, b, table, 1);
        for (int t = 0; t < n; t++) {
            const int64_t tt = t0 + t;
            const int8_t *xb = XQ(xq, cols, tt, k);
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(half_dot(v0, xb), half_dot(v1, xb + 32)));
            sum[t] = _mm256_fmadd_ps(dot, _mm256_set1_ps(xs[tt * blocks + k]), sum[t]);
        }
    }
    for (int t = 0; t < n; t++) acc[t] = _mm256_fmadd_ps(sum[t], _mm256_set1_ps(sc), acc[t]);
#else
    for (int64_t k = k0; k < k0 + nblocks; k++, words += b)
        for (int t = 0; t < n; t++) {
            const int64_t tt = t0 + t;
            const int32_t dot = block_dot_portable(words, b, table, XQ(xq, cols, tt, k));
            acc[t] += (float)dot * sc * xs[tt * blocks + k];
        }
#endif
    return words;
}

/* y[t, r] for the tokens t0 .. t0 + n - 1 of one row r (inlined with n constant: see row_product_n). */
static inline __attribute__((always_inline)) void row_product(const uint8_t *codes, const uint8_t *bits, const uint8_t *tables, const int64_t *table_off,
                        const int16_t *offset, const float *scale, int64_t groups, int64_t group_blocks, int64_t r,
                        const int8_t *xq, const float *xs, const float *bsum, int64_t cols, int64_t t0, const int n,
                        float *y, int64_t rows) {
    const int64_t blocks = cols / BLOCK;
    float total[MAX_TOKENS] = {0};
    accumulator acc[MAX_TOKENS];
    for (int t = 0; t < n; t++) acc[t] = ACC_ZERO;
    const uint64_t *words = (const uint64_t *)codes;
    for (int64_t g = 0; g < groups; g++) {
        const int64_t s = r * groups + g;
        const uint8_t *table = tables ? tables + table_off[s] : NULL;
        const float sc = scale[s];
        const int64_t k0 = g * group_blocks;
        for (int t = 0; t < n; t++) {
            const float *sums = bsum + (t0 + t) * blocks;
            float segment_sum = 0.0f;
            for (int64_t k = k0; k < k0 + group_blocks; k++) segment_sum += sums[k];
            total[t] -= sc * (float)(offset[s] - OFFSET_BIAS) * segment_sum;
        }
#define SEGMENT(B) segment_blocks(words, B, table, sc, k0, group_blocks, xq, xs, cols, t0, n, acc)
        switch (bits[s]) {
        case 1: words = SEGMENT(1); break;
        case 2: words = SEGMENT(2); break;
        case 3: words = SEGMENT(3); break;
        case 4: words = SEGMENT(4); break;
        case 5: words = SEGMENT(5); break;
        case 6: words = SEGMENT(6); break;
        case 7: words = SEGMENT(7); break;
        default: words = SEGMENT(8); break;
        }
#undef SEGMENT
    }
#if defined(PATH_AVX512)
    for (int t = 0; t < n; t++) total[t] += _mm512_reduce_add_ps(acc[t]);
#elif defined(PATH_AVX2)
    for (int t = 0; t < n; t++) {
        float lanes[8];
        _mm256_storeu_ps(lanes, acc[t]);
        for (int e = 0; e < 8; e++) total[t] += lanes[e];
    }
#else
    for (int t = 0; t < n; t++) total[t] += acc[t];
#endif
    for (int t = 0; t < n; t++) y[(t0 + t) * rows + r] = total[t];
}

#define ROW_ARGS codes, bits, tables, table_off, offset, scale, groups, group_blocks, r, xq, xs, bsum, cols, t0
/* row_product with the number of tokens a constant, one copy per count. */
static void row_product_n(const uint8_t *codes, const uint8_t *bits, const uint8_t *tables, const int64_t *table_off,
                          const int16_t *offset, const float *scale, int64_t groups, int64_t group_blocks, int64_t r,
                          const int8_t *xq, const float *xs, const float *bsum, int64_t cols, int64_t t0, int n,
                          float *y, int64_t rows) {
    switch (n) {
    case 1: row_product(ROW_ARGS, 1, y, rows); break;
    case 2: row_product(ROW_ARGS, 2, y, rows); break;
    case 3: row_product(ROW_ARGS, 3, y, rows); break;
    case 4: row_product(ROW_ARGS, 4, y, rows); break;
    case 5: row_product(ROW_ARGS, 5, y, rows); break;
    case 6: row_product(ROW_ARGS, 6, y, rows); break;
    case 7: row_product(ROW_ARGS, 7, y, rows); break;
    default: row_product(ROW_ARGS, 8, y, rows); break;
    }
}

/* y (tokens, rows) = x (tokens, cols) Wᵀ, rows split over `threads` threads in the order `order` (rows of one
 * width together, so that the branch on the width is predicted), MAX_TOKENS tokens per pass.
 * `tables` is NULL for uniform grids. Scratch for the rounded activations is allocated here; returns 0, or -1
 * when it cannot be. */
int anybit_fast_matmul(const uint8_t *codes, const int64_t *row_off, const int64_t *order, const uint8_t *bits,
                       const uint8_t *tables, const int64_t *table_off, const int16_t *offset, const float *scale,
                       int64_t rows,
                       int64_t cols, int64_t group_size, const float *x, int64_t tokens, float *y, int threads) {
    const int64_t blocks = cols / BLOCK, groups = cols / group_size, group_blocks = group_size / BLOCK;
    init_tables();
    int8_t *xq = malloc((size_t)(2 * tokens * cols) + 64);
    float *xs = malloc(sizeof(float) * (size_t)(tokens * blocks));
    float *bsum = malloc(sizeof(float) * (size_t)(tokens * blocks));
    if (!xq || !xs || !bsum) {
        free(xq), free(xs), free(bsum);
        return -1;
    }
    anybit_fast_quantize_input(x, tokens, cols, xq, xs, bsum);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < rows; i++) {
        const int64_t r = order[i];
        for (int64_t t0 = 0; t0 < tokens; t0 += MAX_TOKENS) {
            const int n = (int)(tokens - t0 < MAX_TOKENS ? tokens - t0 : MAX_TOKENS);
            row_product_n(codes + row_off[r], bits, tables, table_off, offset, scale, groups, group_blocks, r, xq, xs,
                        bsum, cols, t0, n, y, rows);
        }
    }
    free(xq), free(xs), free(bsum);
    return 0;
}

/* ---- A whole decoder step of the Llama family, with no Python per layer --------------------------------
 * x (tokens at positions pos .. pos + T - 1, already embedded) runs through every layer: RMS norm, q/k/v
 * products (optionally per-head RMS norms of q and k), rotary embedding from precomputed cos/sin tables,
 * attention over the float32 KV cache (grouped heads, optional sliding window), the output product, the
 * gated SiLU MLP, residual adds; then the final norm and the head product for the last token only (without a
 * head, the normed state is the output). One
 * OpenMP parallel region per step: products and attention split over threads, the small vector work done
 * by one thread between barriers. */

typedef struct {
    const uint8_t *codes;
    const int64_t *row_off;
    const int64_t *order; /* the rows in the order they are multiplied */
    const uint8_t *bits;
    const uint8_t *tables; /* NULL for uniform grids */
    const int64_t *table_off;
    const int16_t *offset;
    const float *scale;
    int64_t rows, cols, group_size;
    const int64_t *perm;     /* coded column j reads input column perm[j]; NULL: identity */
    const float *col_scale;  /* the input is divided by it (original column order) before coding; NULL: none */
    int64_t n_outliers;
    const int64_t *outlier_rows, *outlier_cols;
    const float *outlier_deltas; /* stored - decoded, times x[col], added to y[row] */
    const float *bias;           /* NULL: none */
} anybit_matrix;

typedef struct {
    anybit_matrix q, k, v, o, gate, up, down;
    const float *attn_norm, *mlp_norm;
    const float *q_norm, *k_norm; /* per-head RMS norms (Qwen3); NULL: none */
} anybit_layer;

typedef struct {
    int64_t n_layers, hidden, heads, kv_heads, head_dim, intermediate, max_len, window, vocab;
    float eps, attn_scale;
    const anybit_layer *layers;
    const float *final_norm;
    const anybit_matrix *head;
    const float *cos, *sin;   /* (max_len, head_dim) */
    float *k_cache, *v_cache; /* (layers, kv_heads, max_len, head_dim) */
} anybit_model;

typedef struct { /* one matrix's rounded input */
    int8_t *xq;
    float *xs, *bsum, *coded;
} coded_input;

/* Round the input of `count` matrices (sharing x, T tokens); one thread. */
static void code_inputs(const anybit_matrix *const *m, int count, const float *x, int64_t T, coded_input *in) {
    for (int i = 0; i < count; i++) {
        const int64_t cols = m[i]->cols;
        const float *src = x;
        if (m[i]->perm || m[i]->col_scale) {
            for (int64_t t = 0; t < T; t++)
                for (int64_t j = 0; j < cols; j++) {
                    const int64_t c = m[i]->perm ? m[i]->perm[j] : j;
                    in[i].coded[t * cols + j] = x[t * cols + c] / (m[i]->col_scale ? m[i]->col_scale[c] : 1.0f);
                }
            src = in[i].coded;
        }
        anybit_fast_quantize_input(src, T, cols, in[i].xq, in[i].xs, in[i].bsum);
    }
}

/* y[i] (T, rows_i) = x (T, cols) W_iᵀ for `count` matrices sharing x; called by every thread of the region. */
static void products(const anybit_matrix *const *m, int count, const float *x, int64_t T, float *const *y,
                     coded_input *in) {
#pragma omp single
    code_inputs(m, count, x, T, in);
    int64_t total = 0;
    for (int i = 0; i < count; i++) total += m[i]->rows;
#pragma omp for schedule(static)
    for (int64_t R = 0; R < total; R++) {
        int i = 0;
        int64_t r = R;
        while (r >= m[i]->rows) r -= m[i++]->rows;
        const anybit_matrix *w = m[i];
        r = w->order[r];
        const int64_t groups = w->cols / w->group_size, group_blocks = w->group_size / BLOCK;
        for (int64_t t0 = 0; t0 < T; t0 += MAX_TOKENS) {
            const int n = (int)(T - t0 < MAX_TOKENS ? T - t0 : MAX_TOKENS);
            row_product_n(w->codes + w->row_off[r], w->bits, w->tables, w->table_off, w->offset, w->scale, groups,
                          group_blocks, r, in[i].xq, in[i].xs, in[i].bsum, w->cols, t0, n, y[i], w->rows);
        }
    }
    int extras = 0; /* outliers or biases: every thread sees the same, so all skip the barrier together */
    for (int i = 0; i < count; i++) extras |= m[i]->n_outliers > 0 || m[i]->bias;
    if (!extras) return;
#pragma omp single
    for (int i = 0; i < count; i++) {
        const anybit_matrix *w = m[i];
        for (int64_t t = 0; t < T; t++) {
            float *yt = y[i] + t * w->rows;
            const float *xt = x + t * w->cols;
            for (int64_t e = 0; e < w->n_outliers; e++)
                yt[w->outlier_rows[e]] += w->outlier_deltas[e] * xt[w->outlier_cols[e]];
            if (w->bias)
                for (int64_t r = 0; r < w->rows; r++) yt[r] += w->bias[r];
        }
    }
}

static void rms_norm(const float *x, const float *weight, int64_t n, float eps, float *out) {
    double sum = 0.0;
    for (int64_t j = 0; j < n; j++) sum += (double)x[j] * x[j];
    const float inv = 1.0f / sqrtf((float)(sum / n) + eps);
    for (int64_t j = 0; j < n; j++) out[j] = x[j] * inv * weight[j];
}

/* Rotary embedding of one head vector at one position: x1 cos - x2 sin, x2 cos + x1 sin (halves). */
static void rotate(float *v, const float *cos, const float *sin, int64_t d) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = v[i], b = v[i + h];
        v[i] = a * cos[i] - b * sin[i];
        v[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/* One attention head for one token at position p over cached positions lo .. p; out (head_dim). */
static void attend(const float *q, const float *keys, const float *values, int64_t lo, int64_t p, int64_t d,
                   float scale, float *scores, float *out) {
    float top = -INFINITY;
    for (int64_t j = lo; j <= p; j++) {
        float s = 0.0f;
        for (int64_t i = 0; i < d; i++) s += q[i] * keys[j * d + i];
        scores[j] = s * scale;
        top = fmaxf(top, scores[j]);
    }
    float total = 0.0f;
    for (int64_t j = lo; j <= p; j++) total += scores[j] = expf(scores[j] - top);
    for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
    for (int64_t j = lo; j <= p; j++) {
        const float w = scores[j] / total;
        for (int64_t i = 0; i < d; i++) out[i] += w * values[j * d + i];
    }
}

#define SCRATCH_INPUTS 3 /* matrices sharing one input at most: q, k, v */

/* Runs T tokens (embedded in x, T × hidden, overwritten) at positions pos ..; writes the last token's logits
 * (vocab). Returns 0, or -1 when scratch memory cannot be allocated. */
int anybit_decode_step(const anybit_model *M, float *x, int64_t T, int64_t pos, float *logits, int threads) {
    init_tables();
    const int64_t H = M->hidden, hd = M->head_dim, q_dim = M->heads * hd, kv_dim = M->kv_heads * hd;
    const int64_t wide = H > M->intermediate ? H : M->intermediate, group = M->heads / M->kv_heads;
    float *normed = malloc(sizeof(float) * T * wide), *q = malloc(sizeof(float) * T * q_dim);
    float *k = malloc(sizeof(float) * T * kv_dim), *v = malloc(sizeof(float) * T * kv_dim);
    float *attn = malloc(sizeof(float) * T * q_dim), *out = malloc(sizeof(float) * T * H);
    float *gate = malloc(sizeof(float) * T * M->intermediate), *up = malloc(sizeof(float) * T * M->intermediate);
    float *scores = malloc(sizeof(float) * (size_t)threads * M->max_len);
    coded_input in[SCRATCH_INPUTS];
    int failed = !normed || !q || !k || !v || !attn || !out || !gate || !up || !scores;
    for (int i = 0; i < SCRATCH_INPUTS; i++) {
        in[i].xq = malloc((size_t)(2 * T * wide) + 64);
        in[i].xs = malloc(sizeof(float) * T * (wide / BLOCK));
        in[i].bsum = malloc(sizeof(float) * T * (wide / BLOCK));
        in[i].coded = malloc(sizeof(float) * T * wide);
        failed |= !in[i].xq || !in[i].xs || !in[i].bsum || !in[i].coded;
    }
    if (!failed) {
#pragma omp parallel num_threads(threads)
        {
            for (int64_t l = 0; l < M->n_layers; l++) {
                const anybit_layer *L = M->layers + l;
                float *kc = M->k_cache + l * M->kv_heads * M->max_len * hd;
                float *vc = M->v_cache + l * M->kv_heads * M->max_len * hd;
#pragma omp single
                for (int64_t t = 0; t < T; t++) rms_norm(x + t * H, L->attn_norm, H, M->eps, normed + t * H);
                const anybit_matrix *qkv[3] = {&L->q, &L->k, &L->v};
                float *qkv_out[3] = {q, k, v};
                products(qkv, 3, normed, T, qkv_out, in);
#pragma omp single
                for (int64_t t = 0; t < T; t++) {
                    const int64_t p = pos + t;
                    for (int64_t h = 0; h < M->heads; h++) {
                        float *qh = q + t * q_dim + h * hd;
                        if (L->q_norm) rms_norm(qh, L->q_norm, hd, M->eps, qh);
                        rotate(qh, M->cos + p * hd, M->sin + p * hd, hd);
                    }
                    for (int64_t h = 0; h < M->kv_heads; h++) {
                        float *kh = k + t * kv_dim + h * hd;
                        if (L->k_norm) rms_norm(kh, L->k_norm, hd, M->eps, kh);
                        rotate(kh, M->cos + p * hd, M->sin + p * hd, hd);
                        memcpy(kc + (h * M->max_len + p) * hd, kh, sizeof(float) * hd);
                        memcpy(vc + (h * M->max_len + p) * hd, v + t * kv_dim + h * hd, sizeof(float) * hd);
                    }
                }
#pragma omp for schedule(static)
                for (int64_t th = 0; th < T * M->heads; th++) {
                    const int64_t t = th / M->heads, h = th % M->heads, p = pos + t, kvh = h / group;
                    const int64_t lo = M->window > 0 && p - M->window + 1 > 0 ? p - M->window + 1 : 0;
                    float *own = scores + (int64_t)omp_thread() * M->max_len;
                    attend(q + t * q_dim + h * hd, kc + kvh * M->max_len * hd, vc + kvh * M->max_len * hd, lo, p, hd,
                           M->attn_scale, own, attn + t * q_dim + h * hd);
                }
                const anybit_matrix *o[1] = {&L->o};
                float *o_out[1] = {out};
                products(o, 1, attn, T, o_out, in);
#pragma omp single
                for (int64_t t = 0; t < T; t++) {
                    for (int64_t j = 0; j < H; j++) x[t * H + j] += out[t * H + j];
                    rms_norm(x + t * H, L->mlp_norm, H, M->eps, normed + t * H);
                }
                const anybit_matrix *gu[2] = {&L->gate, &L->up};
                float *gu_out[2] = {gate, up};
                products(gu, 2, normed, T, gu_out, in);
#pragma omp for schedule(static)
                for (int64_t j = 0; j < T * M->intermediate; j++) gate[j] = gate[j] / (1.0f + expf(-gate[j])) * up[j];
                const anybit_matrix *down[1] = {&L->down};
                float *down_out[1] = {out};
                products(down, 1, gate, T, down_out, in);
#pragma omp single
                for (int64_t j = 0; j < T * H; j++) x[j] += out[j];
            }
#pragma omp single
            rms_norm(x + (T - 1) * H, M->final_norm, H, M->eps, M->head ? normed : logits);
            if (M->head) { /* else the caller multiplies the normed state by its own head */
                const anybit_matrix *head[1] = {M->head};
                float *head_out[1] = {logits};
                products(head, 1, normed, 1, head_out, in);
            }
        }
    }
    free(normed), free(q), free(k), free(v), free(attn), free(out), free(gate), free(up), free(scores);
    for (int i = 0; i < SCRATCH_INPUTS; i++) free(in[i].xq), free(in[i].xs), free(in[i].bsum), free(in[i].coded);
    return failed ? -1 : 0;
}
