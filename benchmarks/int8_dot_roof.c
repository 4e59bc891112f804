/* The machine's roof for the fast kernel's integer products (benchmarks/cpu_kernel_bandwidth.py): how many
 * multiplies per second the product instruction of the kernel's code path retires on `threads` threads, with
 * twelve independent chains per thread and nothing else to do. AVX-512: vpdpbusd on 64 byte pairs; AVX2:
 * vpmaddwd on 16 pairs of int16; the portable build has no such instruction (0). */
#include <stdint.h>
#include <time.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define CHAINS 12

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Multiplies per product instruction (0: none on this build). */
static int per_instruction(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    return 64;
#elif defined(__AVX2__)
    return 16;
#else
    return 0;
#endif
}

/* `rounds` rounds of CHAINS product instructions; returns a value that depends on them. */
static int64_t chains(int64_t rounds) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
    __m512i acc[CHAINS], u = _mm512_set1_epi8(3), s = _mm512_set1_epi8(5);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_epi32(i);
    for (int64_t k = 0; k < rounds; k++)
        for (int i = 0; i < CHAINS; i++) __asm__ volatile("vpdpbusd %1, %2, %0" : "+v"(acc[i]) : "v"(s), "v"(u));
    int64_t sum = 0;
    for (int i = 0; i < CHAINS; i++) sum += _mm512_reduce_add_epi32(acc[i]);
    return sum;
#elif defined(__AVX2__)
    __m256i acc[CHAINS], u = _mm256_set1_epi16(3), s = _mm256_set1_epi16(5);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_epi32(i);
    for (int64_t k = 0; k < rounds; k++)
        for (int i = 0; i < CHAINS; i++) {
            __m256i p;
            __asm__ volatile("vpmaddwd %1, %2, %0" : "=v"(p) : "v"(s), "v"(u));
            acc[i] = _mm256_add_epi32(acc[i], p);
        }
    int32_t lanes[8];
    int64_t sum = 0;
    for (int i = 0; i < CHAINS; i++) {
        _mm256_storeu_si256((__m256i *)lanes, acc[i]);
        for (int j = 0; j < 8; j++) sum += lanes[j];
    }
    return sum;
#else
    (void)rounds;
    return 0;
#endif
}

/* G multiplies per second on `threads` threads (0 on the portable build); `sink` keeps the work. */
double anybit_dot_roof(int threads, int64_t rounds, int64_t *sink) {
    int64_t total = 0;
    double start = now();
#pragma omp parallel num_threads(threads) reduction(+ : total)
    total += chains(rounds);
    double seconds = now() - start;
    *sink = total;
    return (double)threads * (double)rounds * CHAINS * per_instruction() / seconds / 1e9;
}
