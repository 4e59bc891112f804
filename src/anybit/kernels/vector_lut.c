/* CPU kernel for vector-coded matrices (anybit/format/vector.py): the decode-time product y = W x.
 * Built and loaded by anybit/kernels/cpu_vector.py.
 *
 * Row r is cut into pieces of 4 columns (in the coded order; the caller permutes x); piece p is
 * scale[r] * table[index[r, p]], the table float32 (entries, 4), the indices re-laid as uint16 at load time.
 * Rows are independent (split over OpenMP threads); each row sums its pieces in one fixed order, so results
 * do not depend on the thread count.
 */
#include <stdint.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_BATCH 8

/* y[b, r] = scale[r] * sum_p <table[index[r, p]], x[b, 4p:4p+4]> for b < batch (batch <= MAX_BATCH) */
void anybit_vector_matvec(const uint16_t *index, const float *table, const float *scale, int64_t rows,
                          int64_t cols, const float *x, int64_t batch, float *y, int threads) {
    const int64_t pieces = cols / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *idx = index + r * pieces;
        for (int64_t b = 0; b < batch; b++) {
            const float *xb = x + b * cols;
            float sum;
#if defined(__AVX2__) && defined(__FMA__)
            __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
            int64_t p = 0;
            for (; p + 4 <= pieces; p += 4) { /* two entries per register, two registers per step */
                __m256 e01 = _mm256_set_m128(_mm_loadu_ps(table + 4 * idx[p + 1]), _mm_loadu_ps(table + 4 * idx[p]));
                __m256 e23 = _mm256_set_m128(_mm_loadu_ps(table + 4 * idx[p + 3]), _mm_loadu_ps(table + 4 * idx[p + 2]));
                acc0 = _mm256_fmadd_ps(e01, _mm256_loadu_ps(xb + 4 * p), acc0);
                acc1 = _mm256_fmadd_ps(e23, _mm256_loadu_ps(xb + 4 * p + 8), acc1);
            }
            __m256 acc = _mm256_add_ps(acc0, acc1);
            __m128 half = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
            half = _mm_add_ps(half, _mm_movehl_ps(half, half));
            half = _mm_add_ss(half, _mm_shuffle_ps(half, half, 1));
            sum = _mm_cvtss_f32(half);
            for (; p < pieces; p++) {
                const float *e = table + 4 * idx[p];
                sum += e[0] * xb[4 * p] + e[1] * xb[4 * p + 1] + e[2] * xb[4 * p + 2] + e[3] * xb[4 * p + 3];
            }
#else
            float acc[4] = {0, 0, 0, 0};
            for (int64_t p = 0; p < pieces; p++) {
                const float *e = table + 4 * idx[p];
                for (int j = 0; j < 4; j++) acc[j] += e[j] * xb[4 * p + j];
            }
            sum = (acc[0] + acc[1]) + (acc[2] + acc[3]);
#endif
            y[b * rows + r] = scale[r] * sum;
        }
    }
}

/* out (rows, cols) = the coded matrix: piece p of row r is scale[r] * table[index[r, p]] */
void anybit_vector_dequantize(const uint16_t *index, const float *table, const float *scale, int64_t rows,
                              int64_t cols, float *out, int threads) {
    const int64_t pieces = cols / 4;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *idx = index + r * pieces;
        float *row = out + r * cols;
        const float s = scale[r];
        for (int64_t p = 0; p < pieces; p++) {
            const float *e = table + 4 * idx[p];
            for (int j = 0; j < 4; j++) row[4 * p + j] = s * e[j];
        }
    }
}
