/* CPU kernels for anybit's packed format on axis 0: the decode-time product y = W x, and decoding W.
 * Built and loaded by anybit/kernels/cpu.py.
 *
 * Each row is cut into segments of `group_size` columns (one segment per row for per-row layouts). A
 * segment's codes are a bit-plane stream: for every 8 codes, `bits[s]` bytes, byte q holding bit q of the 8
 * codes. Its values come from a table of 2^bits entries: its fp16 codebook, or (v - zero) * scale for
 * uniform segments. Rows are independent (split over OpenMP threads); every row sums its columns in one
 * fixed order, so results do not depend on the thread count.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

static uint64_t SPREAD[256]; /* bit i of a byte moved to bit 8*i: eight codes' bit q, one per byte */

static void init_spread(void) {
    for (int v = 0; v < 256; v++) {
        uint64_t s = 0;
        for (int i = 0; i < 8; i++)
            if ((v >> i) & 1) s |= (uint64_t)1 << (8 * i);
        SPREAD[v] = s;
    }
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, out;
    if (exp == 0x1f) {
        out = sign | 0x7f800000 | (man << 13);
    } else if (exp) {
        out = sign | ((exp + 112) << 23) | (man << 13);
    } else if (!man) {
        out = sign;
    } else { /* subnormal half: normalise */
        exp = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            exp--;
        }
        out = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &out, 4);
    return f;
}

/* The eight codes of one block of `b` plane bytes, one per byte of the result. */
static inline uint64_t block_codes(const uint8_t *planes, int b) {
    uint64_t v = 0;
    for (int q = 0; q < b; q++) v |= SPREAD[planes[q]] << q;
    return v;
}

/* The segment's value table: its fp16 codebook, or (v - zero) * scale; entries past 2^b up to 32 are zero. */
static inline void segment_table(float *lut, int b, int uniform, const int64_t *table_addr, const float *scale,
                                 const int32_t *zero, int64_t s) {
    const int n = 1 << b;
    if (uniform) {
        for (int v = 0; v < n; v++) lut[v] = (float)(v - zero[s]) * scale[s];
    } else {
        const uint16_t *book = (const uint16_t *)(intptr_t)table_addr[s];
        for (int v = 0; v < n; v++) lut[v] = half_to_float(book[v]);
    }
    for (int v = n; v < 32; v++) lut[v] = 0.0f; /* the vector path loads 32 entries */
}

/* y[t, r] = sum over the row's segments (groups of `group_size` columns) of their decoded values times x[t]. */
void anybit_segment_matvec(const int64_t *code_addr, const int32_t *bits, const int64_t *table_addr,
                           const float *scale, const int32_t *zero, int uniform, int64_t rows, int64_t cols,
                           int64_t group_size, const float *x, int64_t batch, float *y, int threads) {
    if (!SPREAD[1]) init_spread();
    const int64_t groups = cols / group_size, blocks = group_size / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        float lut[256], acc[8] = {0};
#ifdef __AVX2__
        __m256 vacc[8];
        for (int64_t t = 0; t < batch; t++) vacc[t] = _mm256_setzero_ps();
#endif
        for (int64_t g = 0; g < groups; g++) {
            const int64_t s = r * groups + g;
            const int b = bits[s];
            const uint8_t *planes = (const uint8_t *)(intptr_t)code_addr[s];
            const float *xg = x + g * group_size;
            segment_table(lut, b, uniform, table_addr, scale, zero, s);
            int64_t k = 0;
#ifdef __AVX2__
            if (b <= 5) { /* table in up to four registers; lookups by permutes and blends */
                __m256 tab[4];
                for (int i = 0; i < 4; i++) tab[i] = _mm256_loadu_ps(lut + 8 * i);
                for (; k < blocks; k++, planes += b) {
                    __m256i idx = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128((long long)block_codes(planes, b)));
                    __m256 w = _mm256_permutevar8x32_ps(tab[0], idx);
                    if (b >= 4) { /* bit 3 picks within a register pair, bit 4 the pair */
                        __m256 m3 = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
                        w = _mm256_blendv_ps(w, _mm256_permutevar8x32_ps(tab[1], idx), m3);
                        if (b == 5) {
                            __m256 hi = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tab[2], idx),
                                                         _mm256_permutevar8x32_ps(tab[3], idx), m3);
                            w = _mm256_blendv_ps(w, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 27)));
                        }
                    }
                    for (int64_t t = 0; t < batch; t++)
                        vacc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(xg + t * cols + k * 8), vacc[t]);
                }
            }
#endif
            for (; k < blocks; k++, planes += b) {
                uint64_t v = block_codes(planes, b);
                uint8_t c[8];
                memcpy(c, &v, 8);
                for (int64_t t = 0; t < batch; t++) {
                    const float *xt = xg + t * cols + k * 8;
                    float part = 0.0f;
                    for (int e = 0; e < 8; e++) part += lut[c[e]] * xt[e];
                    acc[t] += part;
                }
            }
        }
#ifdef __AVX2__
        for (int64_t t = 0; t < batch; t++) {
            float lanes[8];
            _mm256_storeu_ps(lanes, vacc[t]);
            for (int e = 0; e < 8; e++) acc[t] += lanes[e];
        }
#endif
        for (int64_t t = 0; t < batch; t++) y[t * rows + r] = acc[t];
    }
}

/* out[r, :] = the decoded row r (float32), for products with many tokens (prefill). */
void anybit_segment_dequantize(const int64_t *code_addr, const int32_t *bits, const int64_t *table_addr,
                               const float *scale, const int32_t *zero, int uniform, int64_t rows, int64_t cols,
                               int64_t group_size, float *out, int threads) {
    if (!SPREAD[1]) init_spread();
    const int64_t groups = cols / group_size, blocks = group_size / 8;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        float lut[256];
        for (int64_t g = 0; g < groups; g++) {
            const int64_t s = r * groups + g;
            const int b = bits[s];
            const uint8_t *planes = (const uint8_t *)(intptr_t)code_addr[s];
            float *o = out + r * cols + g * group_size;
            segment_table(lut, b, uniform, table_addr, scale, zero, s);
            for (int64_t k = 0; k < blocks; k++, planes += b, o += 8) {
                uint64_t v = block_codes(planes, b);
                uint8_t c[8];
                memcpy(c, &v, 8);
                for (int e = 0; e < 8; e++) o[e] = lut[c[e]];
            }
        }
    }
}
