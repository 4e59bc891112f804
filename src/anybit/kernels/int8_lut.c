/* The fast CPU product y = x Wᵀ for anybit's axis-0 layouts, on integer dot products.
 * Built and loaded by anybit/kernels/build.py; prepared and called by anybit/kernels/cpu_fast.py.
 *
 * Weights, re-laid at load time: every row is cut into segments of `group_size` columns, and every segment
 * into blocks of 64 columns. A block of a b-bit segment is b little-endian 64-bit words, word q holding bit q
 * of the block's 64 codes (bit j for column j). A segment's weights are (value - offset) * scale, where value
 * is the code itself (uniform grids: offset is the zero point) or an entry of the segment's table of 2^b
 * unsigned bytes (codebooks: each centroid rounded to scale * (entry - 128), offset 128).
 *
 * Activations: every token's 64-column blocks are rounded to int8 with one float scale per block (absolute
 * maximum -> 127), so one block's product is an exact integer dot product times two scales.
 *
 * Paths, chosen when compiled: AVX-512 (BW, VBMI, VNNI): codes assembled by masked byte adds from the plane
 * words, tables looked up by vpermb/vpermi2b, products by vpdpbusd; AVX2: 32 columns at a time, tables of
 * up to 32 entries by pshufb, products by maddubs; portable C otherwise. All paths compute the same integer
 * dot products; only the order of float sums differs.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512VNNI__)
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

/* Round each token's 64-column blocks to int8: xq[t, c], block scales xs[t, k], and each block's sum of xq
 * times its scale, bsum[t, k]. */
void anybit_fast_quantize_input(const float *x, int64_t tokens, int64_t cols, int8_t *xq, float *xs, float *bsum) {
    const int64_t blocks = cols / BLOCK;
    for (int64_t t = 0; t < tokens; t++) {
        for (int64_t k = 0; k < blocks; k++) {
            const float *v = x + t * cols + k * BLOCK;
            int8_t *q = xq + t * cols + k * BLOCK;
            float amax = 0.0f;
            for (int j = 0; j < BLOCK; j++) amax = fmaxf(amax, fabsf(v[j]));
            const float scale = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
            int sum = 0;
            for (int j = 0; j < BLOCK; j++) {
                int r = (int)lrintf(v[j] * inverse);
                r = r > 127 ? 127 : (r < -127 ? -127 : r);
                q[j] = (int8_t)r;
                sum += r;
            }
            xs[t * blocks + k] = scale;
            bsum[t * blocks + k] = (float)sum * scale;
        }
    }
}

#if defined(PATH_AVX512)
/* The 64 values of one block: its codes, or its codes looked up in the segment's table. */
static inline __m512i block_values(const uint64_t *words, int b, const uint8_t *table) {
    __m512i codes = _mm512_setzero_si512();
    for (int q = 0; q < b; q++)
        codes = _mm512_mask_add_epi8(codes, (__mmask64)words[q], codes, _mm512_set1_epi8((char)(1 << q)));
    if (!table) return codes;
    if (b <= 6) return _mm512_permutexvar_epi8(codes, _mm512_loadu_si512(table));
    __m512i low = _mm512_permutex2var_epi8(_mm512_loadu_si512(table), codes, _mm512_loadu_si512(table + 64));
    if (b == 7) return low;
    __m512i high = _mm512_permutex2var_epi8(_mm512_loadu_si512(table + 128), codes, _mm512_loadu_si512(table + 192));
    return _mm512_mask_blend_epi8((__mmask64)words[7], low, high);
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
static inline __m256i half_dot(__m256i w, const int8_t *xq) {
    const __m256i x = _mm256_loadu_si256((const __m256i *)xq);
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
#define OFFSET_BIAS 128 /* the AVX2 path multiplies value - 128 */
#else
#define OFFSET_BIAS 0
#endif

/* The exact integer dot product of one block's values with one token's int8 block (portable path). */
static inline int32_t block_dot_portable(const uint64_t *words, int b, const uint8_t *table, const int8_t *xq) {
    int32_t dot = 0;
    for (int j = 0; j < BLOCK; j++) {
        int code = 0;
        for (int q = 0; q < b; q++) code |= (int)((words[q] >> j) & 1) << q;
        dot += (int32_t)(table ? table[code] : code) * xq[j];
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

/* Adds the blocks k0 .. k0 + nblocks - 1 of one b-bit segment (scale sc) to the tokens' accumulators; with
 * one token, odd blocks go to `odd`, which halves the chain of dependent multiply-adds. Inlined with b and
 * n constant, so the loops unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) const uint64_t *
segment_blocks(const uint64_t *words, const int b, const uint8_t *table, float sc, int64_t k0, int64_t nblocks,
               const int8_t *xq, const float *xs, int64_t cols, int64_t t0, const int n, accumulator *acc,
               accumulator *odd) {
    const int64_t blocks = cols / BLOCK;
    for (int64_t k = k0; k < k0 + nblocks; k++, words += b) {
#if defined(PATH_AVX512)
        const __m512i v = block_values(words, b, table);
        for (int t = 0; t < n; t++) {
            const int64_t tt = t0 + t;
            const __m512i x = _mm512_loadu_si512(xq + tt * cols + k * BLOCK);
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_setzero_si512(), v, x));
            const __m512 step = _mm512_set1_ps(sc * xs[tt * blocks + k]);
            if (n == 1 && (k & 1))
                *odd = _mm512_fmadd_ps(dot, step, *odd);
            else
                acc[t] = _mm512_fmadd_ps(dot, step, acc[t]);
        }
#elif defined(PATH_AVX2)
        const __m256i v0 = half_values(words, b, table, 0), v1 = half_values(words, b, table, 1);
        for (int t = 0; t < n; t++) {
            const int64_t tt = t0 + t;
            const int8_t *xb = xq + tt * cols + k * BLOCK;
            const __m256 dot = _mm256_cvtepi32_ps(_mm256_add_epi32(half_dot(v0, xb), half_dot(v1, xb + 32)));
            const __m256 step = _mm256_set1_ps(sc * xs[tt * blocks + k]);
            if (n == 1 && (k & 1))
                *odd = _mm256_fmadd_ps(dot, step, *odd);
            else
                acc[t] = _mm256_fmadd_ps(dot, step, acc[t]);
        }
#else
        (void)odd;
        for (int t = 0; t < n; t++) {
            const int64_t tt = t0 + t;
            const int32_t dot = block_dot_portable(words, b, table, xq + tt * cols + k * BLOCK);
            acc[t] += (float)dot * sc * xs[tt * blocks + k];
        }
#endif
    }
    return words;
}

/* y[t, r] for the tokens t0 .. t0 + n - 1 of one row r (inlined with n constant: see row_product_n). */
static inline __attribute__((always_inline)) void row_product(const uint8_t *codes, const uint8_t *bits, const uint8_t *tables, const int64_t *table_off,
                        const int16_t *offset, const float *scale, int64_t groups, int64_t group_blocks, int64_t r,
                        const int8_t *xq, const float *xs, const float *bsum, int64_t cols, int64_t t0, const int n,
                        float *y, int64_t rows) {
    const int64_t blocks = cols / BLOCK;
    float total[MAX_TOKENS] = {0};
    accumulator acc[MAX_TOKENS], odd = ACC_ZERO;
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
#define SEGMENT(B) segment_blocks(words, B, table, sc, k0, group_blocks, xq, xs, cols, t0, n, acc, &odd)
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
    acc[0] = _mm512_add_ps(acc[0], odd);
    for (int t = 0; t < n; t++) total[t] += _mm512_reduce_add_ps(acc[t]);
#elif defined(PATH_AVX2)
    acc[0] = _mm256_add_ps(acc[0], odd);
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

/* y (tokens, rows) = x (tokens, cols) Wᵀ, rows split over `threads` threads, MAX_TOKENS tokens per pass.
 * `tables` is NULL for uniform grids. Scratch for the rounded activations is allocated here; returns 0, or -1
 * when it cannot be. */
int anybit_fast_matmul(const uint8_t *codes, const int64_t *row_off, const uint8_t *bits, const uint8_t *tables,
                       const int64_t *table_off, const int16_t *offset, const float *scale, int64_t rows,
                       int64_t cols, int64_t group_size, const float *x, int64_t tokens, float *y, int threads) {
    const int64_t blocks = cols / BLOCK, groups = cols / group_size, group_blocks = group_size / BLOCK;
    int8_t *xq = malloc((size_t)(tokens * cols) + 64);
    float *xs = malloc(sizeof(float) * (size_t)(tokens * blocks));
    float *bsum = malloc(sizeof(float) * (size_t)(tokens * blocks));
    if (!xq || !xs || !bsum) {
        free(xq), free(xs), free(bsum);
        return -1;
    }
    anybit_fast_quantize_input(x, tokens, cols, xq, xs, bsum);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++)
        for (int64_t t0 = 0; t0 < tokens; t0 += MAX_TOKENS) {
            const int n = (int)(tokens - t0 < MAX_TOKENS ? tokens - t0 : MAX_TOKENS);
            row_product_n(codes + row_off[r], bits, tables, table_off, offset, scale, groups, group_blocks, r, xq, xs,
                        bsum, cols, t0, n, y, rows);
        }
    free(xq), free(xs), free(bsum);
    return 0;
}
