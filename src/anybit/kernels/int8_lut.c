/* The fast CPU product y = x Wᵀ for anybit's layouts, on integer dot products.
 * Built and loaded by anybit/kernels/build.py; prepared and called by anybit/kernels/cpu_fast.py.
 *
 * Weights, re-laid at load time: every row is cut into segments of `group_size` columns, and every segment into
 * blocks of 64 columns; a block of a b-bit segment takes 8 b bytes. The AVX-512 path (with GFNI) reads them in
 * the stored order (per 8 codes, b bytes, byte q holding bit q of each), 8 bits included. The AVX2 path splits
 * each code's bits into parts of 4, 2 and 1 bits from the low bits up (b = 3: 2 + 1; 5: 4 + 1; 6: 4 + 2; 7: 4 + 2
 * + 1), each part of the block's codes p[0 .. 63] a run of its own: 4 bits in 32 bytes, byte i = p[i] | p[i + 32]
 * << 4; 2 bits in 16 bytes, byte i = p[i] | p[i + 16] << 2 | p[i + 32] << 4 | p[i + 48] << 6; 1 bit in 8 bytes,
 * bit k of byte i = p[i + 8 k] (half_codes). The portable path reads b little-endian 64-bit words, word q holding
 * bit q of the block's 64 codes (bit j for column j). At 8 bits the last two read the 64 codes themselves, one
 * byte each. A segment's weights are (value - offset) * scale, where value is the code itself (uniform grids:
 * offset is the zero point) or an entry of the segment's table of 2^b unsigned bytes (codebooks, offset 128: each
 * centroid c rounded to two parts, c ~ scale ((hi - 128) + (lo - 128) / 256), a high and a low table; with int8
 * tables the low parts are zero, and the row paths skip them: anybit_matrix.high_only; on AVX2 the high byte
 * is then multiplied as a code of offset 128 is).
 *
 * Activations: every token is rounded with one float step s (its absolute maximum -> 127) to two int8 parts,
 * x ~ s (hi + lo / 256): about 15 bits, so that one outlying activation does not flatten the rest of the row.
 * A segment's product is A + B / 256, A the dot product of the (high) values with the high parts, B that with
 * the low parts plus the low table's with the high parts (the product of the two low parts, below 2^-16 of
 * the whole, is left out): integer sums in int32, times s and the segment's scale. The AVX2 path holds the
 * activations as whole int16 values 256 hi + lo and multiplies them with the codes, or with the tables'
 * entries as integers of 12 bits (their high and low bytes in the two tables; cpu_fast._segment_tables), by
 * madd_epi16: one product per weight and token instead of three, the low parts' product included, summed in
 * int32.
 *
 * Paths, chosen when compiled: AVX-512 (BW, VBMI, VNNI, GFNI): codes transposed from the stored bit planes by
 * vpermb and gf2p8affineqb, tables looked up by vpermb/vpermi2b, products by vpdpbusd; AVX2: codes assembled
 * from their part runs, 32 columns at a time, tables of up to 64 entries by pshufb, products by madd_epi16;
 * both multiply prompts of 16 tokens or more in blocks of 16 rows (on AMX tiles where AVX-512 has them; see
 * "Prompts" below), and AVX-512 4-15 tokens in transposed blocks of 16 rows ("Few tokens"); portable C
 * otherwise. All paths compute the same integer dot products, but for the low parts' product on AVX2; the
 * order of float sums differs (the AVX-512 paths multiply the unsigned values and take their bias out with the
 * input's sums, the portable path multiplies value - 128, AVX2 the wide values).
 *
 * Vector-coded matrices (anybit/format/vector.py, prepared by anybit/kernels/cpu_vector.py) share the
 * structure, the input rotation, the threads and the decode step, but multiply the float input: each piece of
 * four weights is a table entry (float32) times the row's scale (vq_row_product). Per-column codebooks (axis 1,
 * CLAQ's layout; anybit/kernels/cpu_columns.py) share them too, with a rounding of their own (one int16 per
 * input, the columns' table steps folded in) and rows in blocks of 32 whose codes run down the columns
 * ("Per-column codebooks").
 */
#include <math.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
static int omp_thread(void) { return omp_get_thread_num(); }
static int omp_threads(void) { return omp_get_num_threads(); }
#else
static int omp_thread(void) { return 0; }
static int omp_threads(void) { return 1; }
#endif
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512BW__) && defined(__AVX512VBMI__) && defined(__AVX512VNNI__) && defined(__GFNI__)
#define PATH_AVX512 1
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PATH_AVX2 1
#include <immintrin.h>
#endif
#if defined(PATH_AVX512) && defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#define PATH_AMX 1 /* tile products for prompts, where the kernel lets the process use the tiles */
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023 /* from the kernel's asm/prctl.h */
#define XFEATURE_XTILEDATA 18
#endif

#if defined(PATH_AVX512) || defined(PATH_AVX2)
#define PATH_BLOCKS 1 /* prompts in blocks of rows (see "Prompts" below) */
#endif

#define BLOCK 64
#define MAX_TOKENS 8 /* tokens multiplied per pass over a row's codes */
/* Codes read this many bytes ahead are fetched into L1 while a single token multiplies: the hardware
 * prefetcher alone left per-row codebooks at 46-57 % of the read bandwidth, 62-69 % with 1024 bytes ahead on
 * the AVX-512 path (cpu_kernel_bandwidth.py, Intel Xeon without AMX); on AVX2 the 8-bit head's product took
 * 2.08 ms on two threads without, 1.55 with. 4096 bytes ahead (a pair of rows reads two streams) decoded
 * SmolLM2 1.05-1.09x as fast as 1024 on both paths; 8192 was no faster, 2048 slower (kernel_ab.py). */
#define PREFETCH_AHEAD 4096

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
#define SCRATCH_INPUTS 3 /* matrices sharing one input at most: q, k, v */
#define FLUSH_BLOCKS 64 /* blocks summed in int32 before a float sum takes them (no overflow up to 4096 columns) */
#if defined(PATH_AVX2) /* the rows' int16 products: 8-bit codes times 2^15 reach 2^26.5 per block, a table's 12-bit
                          * entries (cpu_fast.WIDE_TABLE_MAX) 2^29 */
#define ROW_FLUSH(tabled) ((tabled) == 1 ? 4 : 16)
#else
#define ROW_FLUSH(tabled) FLUSH_BLOCKS
#endif

#if defined(PATH_AVX512)
#define VALUE_BIAS 0 /* the AVX-512 path multiplies the unsigned values (codes, or table entries) */
#else
#define VALUE_BIAS 128 /* the portable path multiplies value - 128, signed */
#endif
/* What segment s's integer sums carry besides its weights, taken out with the input's sums: OFFSET_BIAS per
 * unit of the rounded input's sum (xsum), LOW_BIAS per unit of s times its high parts' sum (hisum). */
#if defined(PATH_AVX2) /* wide values (half_wide_values): the codes themselves, or a table's entries */
#define OFFSET_BIAS(m, s) (WIDE_TABLES(m) ? 0.0 : (double)(m)->offset[s])
#define LOW_BIAS(m) 0.0
#define LOW_TABLE_OFFSET 0.0f /* a low table's byte: the entry's low byte (cpu_fast.low_table_offset) */
#else
#define LOW_TABLE_OFFSET 128.0f /* a low table's byte: its part plus 128 */
#define OFFSET_BIAS(m, s) ((double)((m)->offset[s] - VALUE_BIAS))
#define LOW_BIAS(m) ((m)->tables ? (128.0 - VALUE_BIAS) / 256.0 : 0.0)
#endif
#define ROW_LOW_BIAS(m) (HIGH_ONLY(m) ? 0.0 : LOW_BIAS(m)) /* the row paths skip high-only tables' low parts */

/* One matrix's rounded input: for each token, the two parts of every block (XQ; on AVX2 its wide values), the
 * step s, running sums over the blocks (blocks + 1 per token, from 0) of the rounded x and of s times the
 * high parts, and the same two sums of each block alone (blocks per token). */
typedef struct {
    int8_t *xq;
    float *step;
    double *xsum, *hisum;
    float *xblock, *hiblock;
    float *coded;    /* the input in coded column order, scaled (perm or col_scale); else unused */
    int64_t *picked;   /* per token, the channels compensation picks (cols slots each) */
    int64_t *n_picked; /* per token, how many */
    int8_t *tiles;     /* the parts in tile order (lay_input_tile); NULL when prompts take the row path */
    float *rotated;    /* the input rotated (anybit_matrix.rot_mix); else unused */
} coded_input;

/* max |v[j]| over n floats (fmaxf is a library call that GCC does not vectorize). */
static float abs_max(const float *v, int64_t n) {
    float amax = 0.0f;
    int64_t j = 0;
#if defined(PATH_AVX512)
    __m512 m = _mm512_setzero_ps();
    for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_abs_ps(_mm512_loadu_ps(v + j)));
    amax = _mm512_reduce_max_ps(m);
#elif defined(PATH_AVX2)
    __m256 m = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_loadu_ps(v + j)));
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    for (int e = 0; e < 8; e++) amax = lanes[e] > amax ? lanes[e] : amax;
#endif
    for (; j < n; j++) amax = fmaxf(amax, fabsf(v[j]));
    return amax;
}

/* The wide layout (AVX2): a block's 64 values as int16, in the order in which AVX2's unpacklo and unpackhi
 * interleave the two 32-byte halves of a block's table values ("wide slots": per half of 32 columns, columns
 * 0-7 and 16-23, then 8-15 and 24-31), so that each 16 weights multiply 16 consecutive activations. */
#if defined(PATH_AVX2)
/* One block of quantize_token into the wide layout, eight columns at a time, with the same roundings (vroundps
 * to nearest even, as rintf): its 64 int16 values at `out`, the sums of 256 hi + lo and of hi. */
static void wide_block(const float *v, float inverse, int16_t *out, int64_t *sum, int64_t *high) {
    const __m256 top = _mm256_set1_ps(127.0f), bottom = _mm256_set1_ps(-127.0f);
    __m256i values[8], total = _mm256_setzero_si256(), highs = _mm256_setzero_si256();
    for (int g = 0; g < 8; g++) {
        const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(v + 8 * g), _mm256_set1_ps(inverse));
        const __m256 h = _mm256_min_ps(
            _mm256_max_ps(_mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), bottom), top);
        const __m256 low = _mm256_mul_ps(_mm256_sub_ps(scaled, h), _mm256_set1_ps(256.0f));
        const __m256 l = _mm256_min_ps(
            _mm256_max_ps(_mm256_round_ps(low, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), bottom), top);
        const __m256i hi = _mm256_cvtps_epi32(h);
        values[g] = _mm256_add_epi32(_mm256_slli_epi32(hi, 8), _mm256_cvtps_epi32(l));
        total = _mm256_add_epi32(total, values[g]), highs = _mm256_add_epi32(highs, hi);
    }
    for (int half = 0; half < 2; half++) { /* columns 0-7 and 16-23 of the half, then 8-15 and 24-31 */
        const __m256i *g = values + 4 * half;
        __m256i *to = (__m256i *)(out + 32 * half);
        _mm256_storeu_si256(to, _mm256_permute4x64_epi64(_mm256_packs_epi32(g[0], g[2]), 0xD8));
        _mm256_storeu_si256(to + 1, _mm256_permute4x64_epi64(_mm256_packs_epi32(g[1], g[3]), 0xD8));
    }
    int32_t lanes[8], high_lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, total), _mm256_storeu_si256((__m256i *)high_lanes, highs);
    *sum = *high = 0;
    for (int e = 0; e < 8; e++) *sum += lanes[e], *high += high_lanes[e];
}
#endif

/* Round token t (v, cols columns) with one step s = max|x| / 127 to two int8 parts, x ~ s (hi + lo / 256),
 * stored as the parts (XQ), or on AVX2 as the int16 256 hi + lo in the wide layout (the same 128 bytes). */
static void quantize_token(const float *v, int64_t t, int64_t cols, coded_input *in) {
    const int64_t blocks = cols / BLOCK;
    const float amax = abs_max(v, cols);
    const float step = amax / 127.0f, inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
    double *xsum = in->xsum + t * (blocks + 1), *hisum = in->hisum + t * (blocks + 1);
    float *xblock = in->xblock + t * blocks, *hiblock = in->hiblock + t * blocks;
    xsum[0] = hisum[0] = 0.0;
    for (int64_t k = 0; k < blocks; k++) {
        int8_t *hi = XQ(in->xq, cols, t, k);
        int64_t sum = 0, high = 0;
#if defined(PATH_AVX2)
        wide_block(v + k * BLOCK, inverse, (int16_t *)hi, &sum, &high);
#else
        int8_t *lo = hi + BLOCK;
        for (int j = 0; j < BLOCK; j++) {
            const float scaled = v[k * BLOCK + j] * inverse;
            int h = (int)rintf(scaled); /* rintf (nearest even) inlines; lrintf is a call */
            h = h > 127 ? 127 : (h < -127 ? -127 : h);
            int l = (int)rintf((scaled - (float)h) * 256.0f);
            l = l > 127 ? 127 : (l < -127 ? -127 : l);
            hi[j] = (int8_t)h, lo[j] = (int8_t)l;
            sum += 256 * h + l, high += h;
        }
#endif
        const double block_x = (double)sum * step / 256.0, block_high = (double)high * step;
        xblock[k] = (float)block_x, hiblock[k] = (float)block_high;
        xsum[k + 1] = xsum[k] + block_x;
        hisum[k + 1] = hisum[k] + block_high;
    }
    in->step[t] = step;
}

#if defined(PATH_AVX512)
/* For each width b: byte p of lane j of the spread block takes stored byte j b + 7 - p (plane 7 - p of code
 * group j) where 7 - p < b, and is zero elsewhere. Filled once. */
static uint8_t SPREAD_INDEX[9][64];
static uint64_t SPREAD_MASK[9];

static void init_spread_tables(void) {
    for (int b = 1; b <= 8; b++) {
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

/* The 64 codes of one block, from the stored layout: per 8 codes, b bytes, byte q holding bit q of each.
 * vpermb puts plane q of group j at byte 7 - q of lane j (zeros above the width); gf2p8affineqb then
 * transposes each lane's 8x8 bit matrix, so that byte i of lane j is code 8 j + i. */
static inline __m512i block_codes(const uint8_t *bytes, int b) {
    const __m512i raw = _mm512_maskz_loadu_epi8((__mmask64)(b == 8 ? ~0ULL : (1ULL << (8 * b)) - 1), bytes);
    const __m512i spread = _mm512_maskz_permutexvar_epi8((__mmask64)SPREAD_MASK[b],
                                                         _mm512_loadu_si512(SPREAD_INDEX[b]), raw);
    return _mm512_gf2p8affine_epi64_epi8(_mm512_set1_epi64((long long)0x8040201008040201ULL), spread, 0);
}

/* The codes looked up in a table of 2^b bytes. */
static inline __m512i lookup(__m512i codes, int b, const uint8_t *table) {
    if (b <= 6) return _mm512_permutexvar_epi8(codes, _mm512_loadu_si512(table));
    __m512i low = _mm512_permutex2var_epi8(_mm512_loadu_si512(table), codes, _mm512_loadu_si512(table + 64));
    if (b == 7) return low;
    __m512i high = _mm512_permutex2var_epi8(_mm512_loadu_si512(table + 128), codes, _mm512_loadu_si512(table + 192));
    return _mm512_mask_blend_epi8(_mm512_movepi8_mask(codes), low, high);
}
#define DOT(acc, v, x) _mm512_dpbusd_epi32(acc, v, _mm512_loadu_si512(x))
#elif defined(PATH_AVX2)
/* The 32 codes of half a block (half 0 or 1) from the AVX2 layout (see the top of this file): a 4-bit part
 * from its nibbles, a 2-bit part by a shift per 128-bit lane, a 1-bit part by a shift per 64-bit lane, each
 * moved to its place in the code. Inlined with b constant. */
static inline __attribute__((always_inline)) __m256i half_codes(const uint8_t *block, int b, int half) {
    if (b == 8) return _mm256_loadu_si256((const __m256i *)(block + 32 * half));
    __m256i codes = _mm256_setzero_si256();
    int shift = 0;
    if (b >= 4) {
        const __m256i v = _mm256_loadu_si256((const __m256i *)block);
        codes = _mm256_and_si256(half ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(15));
        block += 32, shift = 4;
    }
    if (b & 2) {
        const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)block));
        const __m256i by = half ? _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6) : _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
        const __m256i part = _mm256_and_si256(_mm256_srlv_epi32(v, by), _mm256_set1_epi8(3));
        codes = shift ? _mm256_or_si256(codes, _mm256_sll_epi16(part, _mm_cvtsi32_si128(shift))) : part;
        block += 16, shift += 2;
    }
    if (b & 1) {
        uint64_t word;
        memcpy(&word, block, sizeof word);
        const __m256i by = half ? _mm256_setr_epi64x(4, 5, 6, 7) : _mm256_setr_epi64x(0, 1, 2, 3);
        const __m256i part = _mm256_and_si256(_mm256_srlv_epi64(_mm256_set1_epi64x((long long)word), by),
                                              _mm256_set1_epi8(1));
        codes = shift ? _mm256_or_si256(codes, _mm256_sll_epi16(part, _mm_cvtsi32_si128(shift))) : part;
    }
    return codes;
}

/* Entries `quarter` * 16 .. + 15 of a table, looked up by the low 4 bits of each code (bit 7 is never set). */
static inline __attribute__((always_inline)) __m256i table_quarter(const uint8_t *table, int quarter,
                                                                   __m256i low_bits) {
    const __m256i entries = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(table + 16 * quarter)));
    return _mm256_shuffle_epi8(entries, low_bits);
}

/* The codes' entries in a table of 2^b bytes (the codes themselves without a table). Tables of up to 64
 * entries by pshufb on each 16 and blends on bits 4 and 5 (moved to bit 7, which blendv reads). */
static inline __attribute__((always_inline)) __m256i half_lookup(__m256i codes, int b, const uint8_t *table) {
    if (table && b <= 6) { /* codes below 16 index pshufb as they are */
        const __m256i low_bits = b <= 4 ? codes : _mm256_and_si256(codes, _mm256_set1_epi8(15));
        const __m256i bit4 = _mm256_slli_epi16(codes, 3), bit5 = _mm256_slli_epi16(codes, 2);
        __m256i v = table_quarter(table, 0, low_bits);
        if (b >= 5) v = _mm256_blendv_epi8(v, table_quarter(table, 1, low_bits), bit4);
        if (b == 6) {
            const __m256i upper = _mm256_blendv_epi8(table_quarter(table, 2, low_bits),
                                                     table_quarter(table, 3, low_bits), bit4);
            v = _mm256_blendv_epi8(v, upper, bit5);
        }
        codes = v;
    } else if (table) { /* wider tables: looked up one byte at a time */
        uint8_t c[32];
        _mm256_storeu_si256((__m256i *)c, codes);
        for (int j = 0; j < 32; j++) c[j] = table[c[j]];
        codes = _mm256_loadu_si256((const __m256i *)c);
    }
    return codes;
}

/* half_lookup as signed bytes value - 128. */
static inline __attribute__((always_inline)) __m256i half_values(__m256i codes, int b, const uint8_t *table) {
    return _mm256_xor_si256(half_lookup(codes, b, table), _mm256_set1_epi8((char)0x80));
}

/* The wide (int16) values of half a block, in wide slots: without a table (`tabled` 0) the codes themselves;
 * with two-part tables (1) the table's 12-bit entries (the high table's byte, signed, and the low table's);
 * with the high part alone (2) the high table's unsigned byte, which multiplies as a code with offset 128. */
static inline __attribute__((always_inline)) void half_wide_values(__m256i codes, int b, const int tabled,
                                                                   const uint8_t *table, __m256i *first,
                                                                   __m256i *second) {
    __m256i low = codes, high = _mm256_setzero_si256();
    if (tabled == 1) low = half_lookup(codes, b, table + (1 << b)), high = half_values(codes, b, table);
    if (tabled == 2) low = half_lookup(codes, b, table);
    *first = _mm256_unpacklo_epi8(low, high), *second = _mm256_unpackhi_epi8(low, high);
}

/* What one unit of a sum of wide values times int16 activations is worth, in the weights' and the
 * activations' units: both are 256 times their values with 12-bit tables, the activations alone otherwise. */
#define WIDE_UNIT(tabled) ((tabled) == 1 ? 65536.0f : 256.0f)

/* A block's four madd_epi16 products summed. */
static inline __attribute__((always_inline)) __m256i int_sum4(const __m256i *p) {
    return _mm256_add_epi32(_mm256_add_epi32(p[0], p[1]), _mm256_add_epi32(p[2], p[3]));
}

#endif

/* Prompts (TILE_MIN_TOKENS tokens or more) on the AVX-512 and AVX2 paths: a block of 16 rows is decoded once
 * per CHUNK_GROUPS token groups (its high and low table values, 64 columns a tile) and multiplied with every
 * group of 16 tokens, whose parts are laid in tile order beforehand (tile row kk holds, for each token n, its
 * 4 values of columns 4 kk .. 4 kk + 3): the same integer dot products as the row path, without decoding the
 * codes again for every 8 tokens and without a horizontal sum per row and token. Multipliers: AMX tiles (16
 * rows by 16 tokens per tile product) where the build has them and Linux gives the process the tile
 * registers (arch_prctl ARCH_REQ_XCOMP_PERM), else vector registers: one row's 4 values broadcast against a
 * tile row, 16 tokens' sums per AVX-512 register (vpdpbusd) or 8 per AVX2 register (maddubs),
 * REGISTER_ROWS rows at a time. anybit_fast_prompt_path turns either off. */
#define TILE 16
#define TILE_MIN_TOKENS 16
#define TILE_BYTES (TILE * 64)
#define PROMPT_ROWS 0
#define PROMPT_REGISTERS 1
#define PROMPT_TILES 2
static int amx_state;         /* 0: not asked yet, 1: in use, -1: not available or turned off */
static int registers_off;     /* the register path turned off: prompts without tiles take the row path */

/* Which path prompts take: PROMPT_TILES, PROMPT_REGISTERS or PROMPT_ROWS. `request` -1 only asks (asking the
 * system for the tiles once); PROMPT_ROWS turns both block paths off, PROMPT_REGISTERS the tiles off,
 * PROMPT_TILES both on where the build and system allow. */
int anybit_fast_prompt_path(int request) {
#if defined(PATH_AMX)
    if (request == PROMPT_ROWS || request == PROMPT_REGISTERS)
        amx_state = -1;
    else if (request == PROMPT_TILES || amx_state == 0)
        amx_state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
#else
    amx_state = -1;
#endif
    if (request >= 0) registers_off = request == PROMPT_ROWS;
#if defined(PATH_BLOCKS)
    if (amx_state > 0) return PROMPT_TILES;
    return registers_off ? PROMPT_ROWS : PROMPT_REGISTERS;
#else
    return PROMPT_ROWS;
#endif
}

/* Whether T tokens multiply in blocks of rows (on tiles or registers) rather than row by row. */
static int block_tokens(int64_t T) {
#if defined(PATH_BLOCKS)
    return T >= TILE_MIN_TOKENS && (amx_state > 0 || !registers_off);
#else
    (void)T;
    return 0;
#endif
}
static int64_t token_groups(int64_t T) { return (T + TILE - 1) / TILE; }

/* The constant tables the code path needs, filled on first use (before any thread starts). */
static void init_tables(void) {
    if (!amx_state) anybit_fast_prompt_path(-1);
#if defined(PATH_AVX512)
    if (!SPREAD_MASK[1]) init_spread_tables();
#endif
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

#if defined(PATH_AVX512) || defined(PATH_AVX2)
/* The sum of a register's lanes. */
static inline float lane_sum(__m256 v) {
    const __m128 four = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_movehdup_ps(two)));
}
#endif

static inline float acc_sum(accumulator acc) {
#if defined(PATH_AVX512)
    return _mm512_reduce_add_ps(acc);
#elif defined(PATH_AVX2)
    return lane_sum(acc);
#else
    return acc;
#endif
}

/* Adds sc (A + B / 256) to the tokens' accumulators for the blocks k0 .. k0 + nblocks - 1 of one b-bit segment,
 * where A sums each block's values times the high parts and B its values times the low parts plus (with a
 * table) the low table's values times the high parts: integer sums, flushed to float every FLUSH_BLOCKS.
 * `table` holds a segment's high table then its low table (2^b bytes each), NULL for uniform grids. Inlined
 * with b, `tabled` and n constant. With one token, even and odd blocks add into separate sums, which halves
 * the chains of dependent dot products. */
static inline __attribute__((always_inline)) const uint8_t *
segment_blocks(const uint8_t *w, const int b, const int tabled, const uint8_t *table, float sc, int64_t k0,
               int64_t nblocks, const int8_t *xq, int64_t cols, int64_t t0, const int n, accumulator *acc) {
#if !defined(PATH_AVX2)
    const uint8_t *low_table = tabled ? table + (1 << b) : NULL;
#endif
    for (int64_t first = k0; first < k0 + nblocks; first += ROW_FLUSH(tabled)) {
        const int64_t end = first + ROW_FLUSH(tabled) < k0 + nblocks ? first + ROW_FLUSH(tabled) : k0 + nblocks;
#if defined(PATH_AVX512)
        __m512i a[MAX_TOKENS], bl[MAX_TOKENS];
        for (int t = 0; t < n; t++) a[t] = bl[t] = _mm512_setzero_si512();
        int64_t k = first;
        if (n == 1) {
            __m512i a1 = _mm512_setzero_si512(), b1 = a1, l0 = a1, l1 = a1;
            const int8_t *x = XQ(xq, cols, t0, k);
            for (; k + 1 < end; k += 2, w += 16 * b, x += 4 * BLOCK) {
                _mm_prefetch((const char *)w + PREFETCH_AHEAD, _MM_HINT_T0);
                const __m512i codes0 = block_codes(w, b), codes1 = block_codes(w + 8 * b, b);
                const __m512i v0 = tabled ? lookup(codes0, b, table) : codes0;
                const __m512i v1 = tabled ? lookup(codes1, b, table) : codes1;
                a[0] = DOT(a[0], v0, x), bl[0] = DOT(bl[0], v0, x + BLOCK);
                a1 = DOT(a1, v1, x + 2 * BLOCK), b1 = DOT(b1, v1, x + 3 * BLOCK);
                if (tabled == 1) {
                    l0 = DOT(l0, lookup(codes0, b, low_table), x);
                    l1 = DOT(l1, lookup(codes1, b, low_table), x + 2 * BLOCK);
                }
            }
            a[0] = _mm512_add_epi32(a[0], a1);
            bl[0] = _mm512_add_epi32(_mm512_add_epi32(bl[0], b1), _mm512_add_epi32(l0, l1));
        }
        for (; k < end; k++, w += 8 * b) {
            const __m512i codes = block_codes(w, b);
            const __m512i v = tabled ? lookup(codes, b, table) : codes;
            const __m512i lv = tabled == 1 ? lookup(codes, b, low_table) : codes;
            for (int t = 0; t < n; t++) {
                const int8_t *x = XQ(xq, cols, t0 + t, k);
                a[t] = DOT(a[t], v, x), bl[t] = DOT(bl[t], v, x + BLOCK);
                if (tabled == 1) bl[t] = DOT(bl[t], lv, x);
            }
        }
        for (int t = 0; t < n; t++) {
            const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(bl[t]), _mm512_set1_ps(1.0f / 256.0f),
                                             _mm512_cvtepi32_ps(a[t]));
            acc[t] = _mm512_fmadd_ps(f, _mm512_set1_ps(sc), acc[t]);
        }
#elif defined(PATH_AVX2)
        /* One product per weight and token: the wide values times the token's int16 activations (madd_epi16,
         * the two low parts' product included), summed in int32 (ROW_FLUSH keeps them from overflowing). */
        __m256i ia[MAX_TOKENS];
        for (int t = 0; t < n; t++) ia[t] = _mm256_setzero_si256();
        for (int64_t k = first; k < end; k++, w += 8 * b) {
            if (n == 1) _mm_prefetch((const char *)w + PREFETCH_AHEAD, _MM_HINT_T0);
            __m256i v[4];
            half_wide_values(half_codes(w, b, 0), b, tabled, table, v, v + 1);
            half_wide_values(half_codes(w, b, 1), b, tabled, table, v + 2, v + 3);
            for (int t = 0; t < n; t++) {
                const __m256i *x = (const __m256i *)XQ(xq, cols, t0 + t, k);
                __m256i p[4];
                for (int q = 0; q < 4; q++) p[q] = _mm256_madd_epi16(v[q], _mm256_loadu_si256(x + q));
                ia[t] = _mm256_add_epi32(ia[t], int_sum4(p));
            }
        }
        for (int t = 0; t < n; t++) /* wide values are 256 times a table's (hi + lo / 256), activations too */
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia[t]), _mm256_set1_ps(sc / WIDE_UNIT(tabled)), acc[t]);
#else
        int64_t a[MAX_TOKENS] = {0}, bl[MAX_TOKENS] = {0};
        for (int64_t k = first; k < end; k++, w += 8 * b) {
            for (int j = 0; j < BLOCK; j++) {
                int code = 0;
                if (b == 8)
                    code = w[j];
                else
                    for (int q = 0; q < b; q++) code |= (int)((((const uint64_t *)w)[q] >> j) & 1) << q;
                const int v = (tabled ? table[code] : code) - VALUE_BIAS;
                const int lv = tabled == 1 ? low_table[code] - VALUE_BIAS : 0;
                for (int t = 0; t < n; t++) {
                    const int8_t *x = XQ(xq, cols, t0 + t, k);
                    a[t] += v * x[j], bl[t] += v * x[BLOCK + j] + lv * x[j];
                }
            }
        }
        for (int t = 0; t < n; t++) acc[t] += sc * (float)((double)a[t] + (double)bl[t] / 256.0);
#endif
    }
    return w;
}

/* A matrix as the fast kernel multiplies it (see anybit/kernels/cpu_fast.py). */
typedef struct {
    const uint8_t *codes;
    const int64_t *row_off;
    const int64_t *order; /* the rows in the order they are multiplied */
    const uint8_t *bits;
    const uint8_t *tables; /* per segment, a high then a low table of 2^b bytes; NULL for uniform grids */
    const int64_t *table_off;
    const int16_t *offset;
    const float *scale;
    int64_t rows, cols, group_size;
    const int64_t *perm;     /* coded column j reads input column perm[j]; NULL: identity */
    const float *col_scale;  /* the input is divided by it (original column order) before coding; NULL: none */
    int64_t n_outliers;
    /* The outliers of the row at position q of `order`: entries outlier_start[q] .. outlier_start[q + 1] - 1, each
     * (stored - decoded) delta times x[col] added to y[row] */
    const int64_t *outlier_start;
    const int32_t *outlier_rows, *outlier_cols;
    const float *outlier_deltas;
    const float *bias;           /* NULL: none */
    /* Dynamic error compensation (anybit/runtime/dec.py; NULL codes: none): per token, the k_chunk · L / 1024
     * input channels of each chunk of L <= 1024 with the largest |x| (times dec_weight when given), or the
     * fixed channels, add x[j] times their 4-bit residual row (codes c: (c - 8) scale[o], two per byte, even
     * output channel in the low nibble) to y. */
    const uint8_t *dec_codes; /* (cols, dec_row_bytes) */
    const float *dec_scales;  /* (rows,) */
    const float *dec_weight;  /* (cols,) factor of the selection score; NULL: |x| alone */
    const int64_t *dec_fixed; /* n_fixed channels for every token; NULL: chosen per token */
    int64_t dec_row_bytes, dec_k_chunk, dec_n_fixed;
    /* An input rotation (anybit/format/rotation.py; NULL mix: none): the coded part multiplies R x, R = (Q ⊗ H_b)
     * diag(s) with s the signs (cols floats of ±1), Q the rot_m × rot_m mix (row-major), b = cols / rot_m. */
    const float *rot_signs, *rot_mix;
    int64_t rot_m;
    /* Vector codebooks (anybit/format/vector.py; NULL vq_codes: the segment layout above): row r is cut into
     * pieces of vq_dim (2 or 4) columns in the coded order, piece p being vq_scale[r] times the table entry in
     * slot c << vq_slot_shift, c its vq_bits-bit code (at most VQ_MAX_BITS). Row r's codes are one little-endian bit
     * stream of vq_row_bytes bytes from vq_codes + r vq_row_bytes (code p in bits p k .. p k + k - 1), followed
     * by 8 readable bytes. These rows multiply the float input (coded order), not its int8 parts. */
    const uint8_t *vq_codes;
    const float *vq_table; /* (slots, vq_dim) */
    const float *vq_scale; /* (rows,) */
    int64_t vq_bits, vq_row_bytes, vq_slot_shift, vq_dim;
    /* Nonzero: the low tables hold zero parts (int8 tables, cpu_fast.prepare), which the row paths skip (a
     * lookup and a product per block and token fewer) and the AVX-512 block paths multiply as they are. On
     * AVX2 (WIDE_TABLES) every path multiplies the high table's unsigned byte as it would a code. */
    int64_t high_only;
    /* Per-column codebooks (axis 1; NULL col_codes: a layout above), see "Per-column codebooks": per block of
     * COLUMN_ROWS rows, col_block_bytes of codes; per column of the coded order, its width, the offset of its
     * table in col_tables and its step. `order` is then the rows in order. */
    const uint8_t *col_codes;
    const uint8_t *col_bits;
    const uint8_t *col_tables;
    const int64_t *col_table_off;
    const float *col_step;
    int64_t col_block_bytes;
    const int64_t *col_runs; /* where each run of columns of one width starts, then cols (col_n_runs + 1) */
    int64_t col_n_runs;
} anybit_matrix;

/* A row path's `tabled` for one segment: 0 without a table, 1 with its high and low parts, 2 with the high
 * part alone (high_only). */
#define HIGH_ONLY(m) ((m)->high_only)
#if defined(PATH_AVX2) /* two-part tables as 12-bit integers; high-only tables multiply as unsigned codes do */
#define WIDE_TABLES(m) ((m)->tables && !HIGH_ONLY(m))
#define BLOCK_TABLED(m) WIDE_TABLES(m)
#else
#define BLOCK_TABLED(m) ((m)->tables != NULL) /* the block paths multiply the low tables, zeros included */
#endif

#define VQ_MAX_BITS 14 /* four codes and the offset of the first one's bit fit one 64-bit load */

/* The table offsets (in floats) of pieces p .. p + 3 of a row's code stream: one unaligned 64-bit load. */
static inline void vq_offsets(const anybit_matrix *m, const uint8_t *row, int64_t p, int64_t *offset) {
    const int64_t bit = p * m->vq_bits;
    uint64_t word;
    memcpy(&word, row + (bit >> 3), sizeof word);
    word >>= bit & 7;
    const uint64_t mask = ((uint64_t)1 << m->vq_bits) - 1;
    const int shift = (int)m->vq_slot_shift + (m->vq_dim == 4 ? 2 : 1); /* slots of vq_dim floats */
    for (int j = 0; j < 4; j++) offset[j] = (int64_t)(((word >> (j * m->vq_bits)) & mask) << shift);
}

#if defined(PATH_AVX512) || defined(PATH_AVX2)
/* Two 2-D table entries (at offsets[0] and offsets[1]) in one 128-bit register. */
static inline __m128 vq2_pair(const float *table, const int64_t *offset) {
    const __m128d low = _mm_load_sd((const double *)(table + offset[0]));
    return _mm_castpd_ps(_mm_loadh_pd(low, (const double *)(table + offset[1])));
}
#endif

#if defined(PATH_AVX512)
typedef __m512 vq_vector;
#define VQ_STEP 4 /* pieces per register */
#define VQ_ZERO _mm512_setzero_ps()
#define VQ_LOAD _mm512_loadu_ps
#define VQ_FMA _mm512_fmadd_ps
/* The table entries at four offsets (vq_offsets), in one register. */
static inline vq_vector vq_entries(const float *table, const int64_t *offset) {
    __m512 e = _mm512_castps128_ps512(_mm_loadu_ps(table + offset[0]));
    e = _mm512_insertf32x4(e, _mm_loadu_ps(table + offset[1]), 1);
    e = _mm512_insertf32x4(e, _mm_loadu_ps(table + offset[2]), 2);
    return _mm512_insertf32x4(e, _mm_loadu_ps(table + offset[3]), 3);
}
static inline float vq_sum(vq_vector a) { return _mm512_reduce_add_ps(a); }
#define VQ2_STEP 8 /* 2-D pieces per register */
/* The 2-D table entries at eight offsets, in one register (loads and inserts, not a gather: gathers are slow
 * where the microcode mitigates Gather Data Sampling). */
static inline vq_vector vq2_entries(const float *table, const int64_t *offset) {
    __m512 e = _mm512_castps128_ps512(vq2_pair(table, offset));
    e = _mm512_insertf32x4(e, vq2_pair(table, offset + 2), 1);
    e = _mm512_insertf32x4(e, vq2_pair(table, offset + 4), 2);
    return _mm512_insertf32x4(e, vq2_pair(table, offset + 6), 3);
}
#elif defined(PATH_AVX2)
typedef __m256 vq_vector;
#define VQ_STEP 2
#define VQ_ZERO _mm256_setzero_ps()
#define VQ_LOAD _mm256_loadu_ps
#define VQ_FMA _mm256_fmadd_ps
/* The table entries at two offsets (vq_offsets), in one register. */
static inline vq_vector vq_entries(const float *table, const int64_t *offset) {
    return _mm256_set_m128(_mm_loadu_ps(table + offset[1]), _mm_loadu_ps(table + offset[0]));
}
#define VQ2_STEP 4
static inline vq_vector vq2_entries(const float *table, const int64_t *offset) {
    return _mm256_set_m128(vq2_pair(table, offset + 2), vq2_pair(table, offset));
}
static inline float vq_sum(vq_vector a) {
    float lanes[8];
    _mm256_storeu_ps(lanes, a);
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}
#endif

/* y[t, r] for the tokens t0 .. t0 + n - 1 of row r of a vector-coded matrix of `dim`-weight pieces: each
 * piece's table entry times the float input, summed in float, times the row's scale. Inlined with n and dim
 * constant; two sets of sums halve the chains of dependent multiply-adds. (Decoding a prompt's rows once for
 * all its passes instead gained 0-7 % at 64 tokens: the multiply-adds bound it, not the lookups.) */
static inline __attribute__((always_inline)) void vq_row_product(const anybit_matrix *m, int64_t r,
                                                                 const coded_input *in, int64_t t0, const int n,
                                                                 float *y, const int dim) {
    const int64_t cols = m->cols, pieces = cols / dim;
    const uint8_t *row = m->vq_codes + r * m->vq_row_bytes;
    const float *table = m->vq_table, *x = in->coded + t0 * cols;
    float sum[MAX_TOKENS];
    int64_t p = 0, offset[16];
#if defined(PATH_AVX512) || defined(PATH_AVX2)
    const int step = dim == 4 ? VQ_STEP : VQ2_STEP; /* pieces per register */
    vq_vector a0[MAX_TOKENS], a1[MAX_TOKENS];
    for (int t = 0; t < n; t++) a0[t] = a1[t] = VQ_ZERO;
    for (; p + 2 * step <= pieces; p += 2 * step) {
        for (int q = 0; q < 2 * step; q += 4) vq_offsets(m, row, p + q, offset + q);
        const vq_vector e0 = dim == 4 ? vq_entries(table, offset) : vq2_entries(table, offset);
        const vq_vector e1 = dim == 4 ? vq_entries(table, offset + step) : vq2_entries(table, offset + step);
        for (int t = 0; t < n; t++) {
            const float *xp = x + t * cols + dim * p;
            a0[t] = VQ_FMA(e0, VQ_LOAD(xp), a0[t]);
            a1[t] = VQ_FMA(e1, VQ_LOAD(xp + dim * step), a1[t]);
        }
    }
    for (int t = 0; t < n; t++) sum[t] = vq_sum(a0[t] + a1[t]);
#else
    for (int t = 0; t < n; t++) sum[t] = 0.0f;
#endif
    for (; p < pieces; p++) {
        vq_offsets(m, row, p, offset); /* reads past the row's last code at most into the 8 bytes that follow */
        const float *e = table + offset[0];
        for (int t = 0; t < n; t++) {
            const float *xp = x + t * cols + dim * p;
            sum[t] += dim == 4 ? (e[0] * xp[0] + e[1] * xp[1]) + (e[2] * xp[2] + e[3] * xp[3])
                               : e[0] * xp[0] + e[1] * xp[1];
        }
    }
    for (int t = 0; t < n; t++) y[(t0 + t) * m->rows + r] = m->vq_scale[r] * sum[t];
}
#define VQ_PIECES_4(m, r, in, t0, n, y) vq_row_product(m, r, in, t0, n, y, 4)
#define VQ_PIECES_2(m, r, in, t0, n, y) vq_row_product(m, r, in, t0, n, y, 2)

/* PRODUCT(m, r, in, t0, N, y) with N the number of tokens n (1 .. MAX_TOKENS) as a constant: one inlined copy
 * of a row product per count. */
#define WITH_TOKEN_COUNT(PRODUCT, m, r, in, t0, n, y)                                                                 \
    switch (n) {                                                                                                      \
    case 1: PRODUCT(m, r, in, t0, 1, y); break;                                                                       \
    case 2: PRODUCT(m, r, in, t0, 2, y); break;                                                                       \
    case 3: PRODUCT(m, r, in, t0, 3, y); break;                                                                       \
    case 4: PRODUCT(m, r, in, t0, 4, y); break;                                                                       \
    case 5: PRODUCT(m, r, in, t0, 5, y); break;                                                                       \
    case 6: PRODUCT(m, r, in, t0, 6, y); break;                                                                       \
    case 7: PRODUCT(m, r, in, t0, 7, y); break;                                                                       \
    default: PRODUCT(m, r, in, t0, 8, y); break;                                                                      \
    }

static void vq_row_product_n(const anybit_matrix *m, int64_t r, const coded_input *in, int64_t t0, int n, float *y) {
    if (m->vq_dim == 2) {
        WITH_TOKEN_COUNT(VQ_PIECES_2, m, r, in, t0, n, y)
    } else {
        WITH_TOKEN_COUNT(VQ_PIECES_4, m, r, in, t0, n, y)
    }
}

/* CALL(B) with the width b as the constant B (1-8), so that what it calls is inlined for that width. */
#define WITH_WIDTH(b, CALL)                                                                                           \
    switch (b) {                                                                                                      \
    case 1: CALL(1); break;                                                                                           \
    case 2: CALL(2); break;                                                                                           \
    case 3: CALL(3); break;                                                                                           \
    case 4: CALL(4); break;                                                                                           \
    case 5: CALL(5); break;                                                                                           \
    case 6: CALL(6); break;                                                                                           \
    case 7: CALL(7); break;                                                                                           \
    default: CALL(8); break;                                                                                          \
    }

/* ---- Per-column codebooks (axis 1: CLAQ; prepared by anybit/kernels/cpu_columns.py) ---------------------------
 * Column j of the coded order (columns of one width together) has a table of int16 entries e_j (at most 12 bits)
 * and a step σ_j (col_step): w[r][j] = σ_j e_j[c_rj]. Each token is rounded once with the steps folded in,
 * x'_j = round(x_j σ_j / s) (int16, s = max_j |x_j σ_j| / 32767, the token's `step`), so that y_r = s Σ_j x'_j
 * e_j[c_rj]: integer products summed in int32 over COLUMN_FLUSH columns, then in float, on every path in the same
 * order (the same results). Rows go in blocks of COLUMN_ROWS; a block's codes column after column, each column's
 * 32 codes in 4 b bytes, in parts of 4, 2 and 1 bits from the low bits up (b = 8: the codes themselves, one byte
 * each): 4 bits in 16 bytes (byte i: row i in its low nibble, row i + 16 in its high), 2 bits in 8 bytes (bits 2q
 * and 2q + 1 of byte i: row i + 8 q), 1 bit in 4 bytes (bit d of byte i: row i + 4 d). A column's table: the low
 * bytes of its entries, then their high bytes, 2^max(b, 4) each. AVX2 (and AVX-512 builds) look the entries up
 * for 32 rows at once by pshufb and multiply two columns per madd_epi16. */
#define COLUMN_ROWS 32
#define COLUMN_FLUSH 32            /* columns summed in int32: 32 · 2047 · 32767 < 2^31 */
#define COLUMN_INPUT_MAX 32767.0f /* |x'| */

static inline int column_entries_bytes(int b) { return b > 4 ? 1 << b : 16; }

/* Token t of a column-coded matrix's input (coded order) as x' (XQ, int16 per column) and its step. */
static void column_token(const anybit_matrix *m, const float *v, int64_t t, coded_input *in) {
    const int64_t cols = m->cols;
    float amax = 0.0f;
    for (int64_t j = 0; j < cols; j++) {
        const float a = fabsf(v[j] * m->col_step[j]);
        amax = a > amax ? a : amax;
    }
    const float inverse = amax > 0.0f ? COLUMN_INPUT_MAX / amax : 0.0f;
    int16_t *q = (int16_t *)XQ(in->xq, cols, t, 0);
    for (int64_t j = 0; j < cols; j++) {
        const float r = rintf(v[j] * m->col_step[j] * inverse);
        q[j] = (int16_t)(r > COLUMN_INPUT_MAX ? COLUMN_INPUT_MAX : (r < -COLUMN_INPUT_MAX ? -COLUMN_INPUT_MAX : r));
    }
    in->step[t] = amax / COLUMN_INPUT_MAX;
}

#if defined(PATH_AVX512) || defined(PATH_AVX2)
/* A column's 32 codes (width b, at p), byte i for row i. */
static inline __attribute__((always_inline)) __m256i column_codes(const uint8_t *p, const int b) {
    if (b == 8) return _mm256_loadu_si256((const __m256i *)p);
    __m256i code = _mm256_setzero_si256();
    int shift = 0;
    if (b & 4) {
        const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
        code = _mm256_and_si256(_mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4)), _mm256_set1_epi8(15));
        p += 16, shift = 4;
    }
    if (b & 2) {
        int64_t w;
        memcpy(&w, p, sizeof w);
        __m256i part = _mm256_srlv_epi64(_mm256_set1_epi64x(w), _mm256_setr_epi64x(0, 2, 4, 6));
        part = _mm256_and_si256(part, _mm256_set1_epi8(3));
        code = _mm256_or_si256(code, _mm256_slli_epi16(part, shift));
        p += 8, shift += 2;
    }
    if (b & 1) {
        int32_t w;
        memcpy(&w, p, sizeof w);
        __m256i part = _mm256_srlv_epi32(_mm256_set1_epi32(w), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
        part = _mm256_and_si256(part, _mm256_set1_epi8(1));
        code = _mm256_or_si256(code, _mm256_slli_epi16(part, shift));
    }
    return code;
}

/* The bytes of a table of 2^max(b, 4) at `table` that 32 codes pick: one pshufb up to 4 bits, else one per 16
 * entries, each kept where the codes' high bits select it. */
static inline __attribute__((always_inline)) __m256i column_lookup(const uint8_t *table, __m256i code, const int b) {
    if (b <= 4) return _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)table)), code);
    const __m256i low = _mm256_and_si256(code, _mm256_set1_epi8(15));
    const __m256i high = _mm256_and_si256(_mm256_srli_epi16(code, 4), _mm256_set1_epi8(15));
    __m256i out = _mm256_setzero_si256();
    for (int k = 0; k < 1 << (b - 4); k++) {
        const __m256i part = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(table + 16 * k)));
        const __m256i picked = _mm256_cmpeq_epi8(high, _mm256_set1_epi8((char)k));
        out = _mm256_or_si256(out, _mm256_and_si256(picked, _mm256_shuffle_epi8(part, low)));
    }
    return out;
}

/* A column's 32 entries as int16: rows 0-7 and 16-23 in *a, rows 8-15 and 24-31 in *c (unpack's lanes). */
static inline __attribute__((always_inline)) void column_values(const uint8_t *p, const uint8_t *table, const int b,
                                                                __m256i *a, __m256i *c) {
    const __m256i code = column_codes(p, b);
    const __m256i lo = column_lookup(table, code, b), hi = column_lookup(table + column_entries_bytes(b), code, b);
    *a = _mm256_unpacklo_epi8(lo, hi), *c = _mm256_unpackhi_epi8(lo, hi);
}

static inline __attribute__((always_inline)) void column_values_of_width(const uint8_t *p, const uint8_t *table, int b,
                                                                         __m256i *a, __m256i *c) {
#define VALUES(B) column_values(p, table, B, a, c)
    WITH_WIDTH(b, VALUES)
#undef VALUES
}

/* Two columns' entries (column_values) into the tokens' sums: interleaved row by row (four registers of 8 rows:
 * rows 0-3 | 16-19, 4-7 | 20-23, 8-11 | 24-27, 12-15 | 28-31), one madd_epi16 with each token's x'_j and x'_j+1;
 * the int32 sums flushed to float after every COLUMN_FLUSH columns and the last. */
static inline __attribute__((always_inline)) void column_pair_sums(__m256i a0, __m256i c0, __m256i a1, __m256i c1,
                                                                   const coded_input *in, int64_t cols, int64_t t0,
                                                                   const int n, int64_t j, __m256i (*acc)[4],
                                                                   __m256 (*sum)[4]) {
    const __m256i e[4] = {_mm256_unpacklo_epi16(a0, a1), _mm256_unpackhi_epi16(a0, a1), _mm256_unpacklo_epi16(c0, c1),
                          _mm256_unpackhi_epi16(c0, c1)};
    for (int t = 0; t < n; t++) {
        int32_t pair;
        memcpy(&pair, XQ(in->xq, cols, t0 + t, 0) + 2 * j, sizeof pair);
        const __m256i x2 = _mm256_set1_epi32(pair);
        for (int k = 0; k < 4; k++) acc[t][k] = _mm256_add_epi32(acc[t][k], _mm256_madd_epi16(e[k], x2));
    }
    if ((j + 2) % COLUMN_FLUSH == 0 || j + 2 == cols)
        for (int t = 0; t < n; t++)
            for (int k = 0; k < 4; k++) {
                sum[t][k] = _mm256_add_ps(sum[t][k], _mm256_cvtepi32_ps(acc[t][k]));
                acc[t][k] = _mm256_setzero_si256();
            }
}

/* Pairs of columns j .. end - 1, all of width b (codes from p, tables from `table`); returns where the codes end.
 * With b constant, the codes and tables advance by constant steps (1.5-2x the speed of a width read per column). */
static inline __attribute__((always_inline)) const uint8_t *column_run(const uint8_t *p, const uint8_t *table,
                                                                      int64_t j, int64_t end, const int b,
                                                                      const coded_input *in, int64_t cols, int64_t t0,
                                                                      const int n, __m256i (*acc)[4],
                                                                      __m256 (*sum)[4]) {
    const int64_t stride = 2 * column_entries_bytes(b);
    for (; j < end; j += 2, p += 8 * b, table += 2 * stride) {
        __m256i a0, c0, a1, c1;
        column_values(p, table, b, &a0, &c0);
        column_values(p + 4 * b, table + stride, b, &a1, &c1);
        column_pair_sums(a0, c0, a1, c1, in, cols, t0, n, j, acc, sum);
    }
    return p;
}

/* y for tokens t0 .. t0 + n - 1 of the rows of block `blk`: the columns two by two, each run of one width in a
 * loop of its own (column_run), a run's odd last column paired with the next run's first. */
static inline __attribute__((always_inline)) void column_block(const anybit_matrix *m, int64_t blk,
                                                               const coded_input *in, int64_t t0, const int n,
                                                               float *y) {
    const int64_t cols = m->cols, r0 = blk * COLUMN_ROWS;
    const uint8_t *p = m->col_codes + blk * m->col_block_bytes;
    __m256i acc[MAX_TOKENS][4];
    __m256 sum[MAX_TOKENS][4];
    for (int t = 0; t < n; t++)
        for (int k = 0; k < 4; k++) acc[t][k] = _mm256_setzero_si256(), sum[t][k] = _mm256_setzero_ps();
    int64_t j = 0;
    for (int64_t r = 0; r < m->col_n_runs; r++) {
        const int64_t end = m->col_runs[r + 1];
        if (j >= end) continue; /* a one-column run, taken with the run before */
        const int64_t paired = j + ((end - j) & ~(int64_t)1);
        const uint8_t *table = m->col_tables + m->col_table_off[j];
#define RUN(B) p = column_run(p, table, j, paired, B, in, cols, t0, n, acc, sum)
        WITH_WIDTH(m->col_bits[j], RUN)
#undef RUN
        j = paired;
        if (j < end) {
            __m256i a0, c0, a1, c1;
            column_values_of_width(p, m->col_tables + m->col_table_off[j], m->col_bits[j], &a0, &c0);
            p += 4 * m->col_bits[j];
            column_values_of_width(p, m->col_tables + m->col_table_off[j + 1], m->col_bits[j + 1], &a1, &c1);
            p += 4 * m->col_bits[j + 1];
            column_pair_sums(a0, c0, a1, c1, in, cols, t0, n, j, acc, sum);
            j += 2;
        }
    }
    for (int t = 0; t < n; t++) {
        const __m256 s = _mm256_set1_ps(in->step[t0 + t]);
        float out[COLUMN_ROWS];
        _mm256_storeu_ps(out, _mm256_mul_ps(_mm256_permute2f128_ps(sum[t][0], sum[t][1], 0x20), s));
        _mm256_storeu_ps(out + 8, _mm256_mul_ps(_mm256_permute2f128_ps(sum[t][2], sum[t][3], 0x20), s));
        _mm256_storeu_ps(out + 16, _mm256_mul_ps(_mm256_permute2f128_ps(sum[t][0], sum[t][1], 0x31), s));
        _mm256_storeu_ps(out + 24, _mm256_mul_ps(_mm256_permute2f128_ps(sum[t][2], sum[t][3], 0x31), s));
        const int64_t valid = m->rows - r0 < COLUMN_ROWS ? m->rows - r0 : COLUMN_ROWS;
        memcpy(y + (t0 + t) * m->rows + r0, out, sizeof(float) * (size_t)valid);
    }
}
#else
/* Code of row i of a column's 32 codes (width b, at p). */
static inline int column_code(const uint8_t *p, int b, int i) {
    if (b == 8) return p[i];
    int code = 0, shift = 0;
    if (b & 4) code = (p[i & 15] >> (i & 16 ? 4 : 0)) & 15, p += 16, shift = 4;
    if (b & 2) code |= ((p[i & 7] >> (2 * (i >> 3))) & 3) << shift, p += 8, shift += 2;
    if (b & 1) code |= ((p[i & 3] >> (i >> 2)) & 1) << shift;
    return code;
}

static inline __attribute__((always_inline)) void column_block(const anybit_matrix *m, int64_t blk,
                                                               const coded_input *in, int64_t t0, const int n,
                                                               float *y) {
    const int64_t cols = m->cols, r0 = blk * COLUMN_ROWS;
    const uint8_t *p = m->col_codes + blk * m->col_block_bytes;
    int32_t acc[MAX_TOKENS][COLUMN_ROWS] = {{0}};
    float sum[MAX_TOKENS][COLUMN_ROWS] = {{0.0f}};
    for (int64_t j = 0; j < cols; j++) {
        const int b = m->col_bits[j];
        const uint8_t *low = m->col_tables + m->col_table_off[j], *high = low + column_entries_bytes(b);
        for (int i = 0; i < COLUMN_ROWS; i++) {
            const int c = column_code(p, b, i), e = (int16_t)(low[c] | high[c] << 8);
            for (int t = 0; t < n; t++) acc[t][i] += e * ((const int16_t *)XQ(in->xq, cols, t0 + t, 0))[j];
        }
        p += 4 * b;
        if ((j + 1) % COLUMN_FLUSH == 0 || j + 1 == cols) /* where the SIMD paths flush their sums */
            for (int t = 0; t < n; t++)
                for (int i = 0; i < COLUMN_ROWS; i++) sum[t][i] += (float)acc[t][i], acc[t][i] = 0;
    }
    for (int t = 0; t < n; t++)
        for (int i = 0; i < COLUMN_ROWS && r0 + i < m->rows; i++)
            y[(t0 + t) * m->rows + r0 + i] = sum[t][i] * in->step[t0 + t];
}
#endif

/* The rows of block `blk` of a column-coded matrix for T tokens: MAX_TOKENS per pass over its codes, the rest in
 * passes of 4, 2 and 1 (four copies of column_block, not eight: each is a loop per width). */
static void column_products(const anybit_matrix *m, int64_t blk, const coded_input *in, int64_t T, float *y) {
    for (int64_t t0 = 0; t0 < T;) {
        const int64_t left = T - t0;
        if (left >= MAX_TOKENS)
            column_block(m, blk, in, t0, MAX_TOKENS, y), t0 += MAX_TOKENS;
        else if (left >= 4)
            column_block(m, blk, in, t0, 4, y), t0 += 4;
        else if (left >= 2)
            column_block(m, blk, in, t0, 2, y), t0 += 2;
        else
            column_block(m, blk, in, t0, 1, y), t0 += 1;
    }
}

/* What segment s (blocks k0 .. k1 - 1) of token t's product carries besides its weights (OFFSET_BIAS and
 * LOW_BIAS), times the segment's scale: the row paths subtract it from their sums. */
static inline float segment_bias(const anybit_matrix *m, int64_t s, const coded_input *in, int64_t t, int64_t k0,
                                 int64_t k1) {
    const int64_t sums = m->cols / BLOCK + 1;
    const double *xsum = in->xsum + t * sums, *hisum = in->hisum + t * sums;
    return m->scale[s] * (float)(OFFSET_BIAS(m, s) * (xsum[k1] - xsum[k0]) + ROW_LOW_BIAS(m) * (hisum[k1] - hisum[k0]));
}

/* The sum of segment_bias over row r's segments for token t. Where a segment is one block, the segments' biases
 * come 16 (AVX-512) or 8 (AVX2) at a time from the blocks' own sums: with one segment per 64 weights, a bias
 * per segment in double cost a fifth of a GPTQ g64 row's product. */
static inline float row_bias(const anybit_matrix *m, int64_t r, const coded_input *in, int64_t t) {
    const int64_t groups = m->cols / m->group_size, group_blocks = m->group_size / BLOCK, s0 = r * groups;
    float bias = 0.0f;
#if !defined(PATH_AVX2) /* one segment per row (per-row codebooks, per-channel grids): no loop. Left out on AVX2,
                          * where it (with pairs' shortcut) made group codebooks' rows 0.8x as fast (kernel_ab) */
    if (groups == 1) return segment_bias(m, r, in, t, 0, group_blocks);
#endif
    if (group_blocks > 1) {
        for (int64_t g = 0; g < groups; g++)
            bias += segment_bias(m, s0 + g, in, t, g * group_blocks, (g + 1) * group_blocks);
        return bias;
    }
    const int64_t blocks = m->cols / BLOCK; /* = groups here */
    const float *scale = m->scale + s0, *xblock = in->xblock + t * blocks, *hiblock = in->hiblock + t * blocks;
    const int16_t *offset = m->offset + s0;
    const float low_bias = (float)ROW_LOW_BIAS(m);
    int64_t g = 0;
#if defined(PATH_AVX512)
    __m512 sum = _mm512_setzero_ps();
    for (; g < groups; g += 16) {
        const __mmask16 lanes = groups - g >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
        const __m512i offsets = _mm512_maskz_loadu_epi16((__mmask32)lanes, offset + g); /* VALUE_BIAS is 0 */
        __m512 per_unit = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(offsets))),
                                        _mm512_maskz_loadu_ps(lanes, xblock + g));
        per_unit = _mm512_fmadd_ps(_mm512_set1_ps(low_bias), _mm512_maskz_loadu_ps(lanes, hiblock + g), per_unit);
        sum = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(lanes, scale + g), per_unit, sum);
    }
    bias = _mm512_reduce_add_ps(sum);
#elif defined(PATH_AVX2)
    if (WIDE_TABLES(m)) return 0.0f; /* 12-bit entries carry no offset */
    __m256 sum = _mm256_setzero_ps();
    for (; g + 8 <= groups; g += 8) {
        const __m128i offsets16 = _mm_loadu_si128((const __m128i *)(offset + g));
        const __m256 offsets = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(offsets16));
        sum = _mm256_fmadd_ps(_mm256_loadu_ps(scale + g), _mm256_mul_ps(offsets, _mm256_loadu_ps(xblock + g)), sum);
    }
    bias = acc_sum(sum);
#endif
    for (; g < groups; g++)
        bias += scale[g] * ((float)OFFSET_BIAS(m, s0 + g) * xblock[g] + low_bias * hiblock[g]);
    return bias;
}

/* y[t, r] for the tokens t0 .. t0 + n - 1 of one row r (inlined with n constant: see row_product_n). A
 * segment's weights are (value - offset) scale; the offsets and the low tables' bias of 128 are taken out
 * with the running sums of the input. */
static inline __attribute__((always_inline)) void row_product(const anybit_matrix *m, int64_t r,
                                                              const coded_input *in, int64_t t0, const int n,
                                                              float *y) {
    const int64_t cols = m->cols, groups = cols / m->group_size, group_blocks = m->group_size / BLOCK;
    float total[MAX_TOKENS];
    accumulator acc[MAX_TOKENS];
    for (int t = 0; t < n; t++) acc[t] = ACC_ZERO, total[t] = -row_bias(m, r, in, t0 + t);
    const uint8_t *w = m->codes + m->row_off[r];
    for (int64_t g = 0; g < groups; g++) {
        const int64_t s = r * groups + g, k0 = g * group_blocks;
        const uint8_t *table = m->tables ? m->tables + m->table_off[s] : NULL;
        const float sc = m->scale[s];
#define SEGMENT_OF(B, NBLOCKS)                                                                                        \
    w = !table          ? segment_blocks(w, B, 0, NULL, sc, k0, NBLOCKS, in->xq, cols, t0, n, acc)                    \
        : HIGH_ONLY(m) ? segment_blocks(w, B, 2, table, sc, k0, NBLOCKS, in->xq, cols, t0, n, acc)                   \
                       : segment_blocks(w, B, 1, table, sc, k0, NBLOCKS, in->xq, cols, t0, n, acc)
#define SEGMENT(B) SEGMENT_OF(B, group_blocks)
#define SEGMENT_ONE_BLOCK(B) SEGMENT_OF(B, 1)
#if defined(PATH_AVX512) /* measured 1.22-1.35x at 8 tokens on AVX-512, 0.87-0.95x on AVX2 (kernel_ab.py) */
        if (group_blocks == 1) {
            WITH_WIDTH(m->bits[s], SEGMENT_ONE_BLOCK)
        } else
#endif
        {
            WITH_WIDTH(m->bits[s], SEGMENT)
        }
#undef SEGMENT_OF
#undef SEGMENT
#undef SEGMENT_ONE_BLOCK
    }
    for (int t = 0; t < n; t++) y[(t0 + t) * m->rows + r] = total[t] + in->step[t0 + t] * acc_sum(acc[t]);
}

static void row_product_n(const anybit_matrix *m, int64_t r, const coded_input *in, int64_t t0, int n, float *y) {
    WITH_TOKEN_COUNT(row_product, m, r, in, t0, n, y)
}

#if defined(PATH_AVX512) || defined(PATH_AVX2)
/* Two rows' segments of one width b over the blocks 0 .. nblocks - 1, one token: segment_blocks for each row
 * (the same sums, flushed in the same order, so the same results), with the token's activations loaded once
 * and the two rows' chains of dot products interleaved. */
static inline __attribute__((always_inline)) void pair_blocks(const uint8_t *wa, const uint8_t *wb, const int b,
                                                              const int tabled, const uint8_t *ta, const uint8_t *tb,
                                                              float sa, float sb, int64_t nblocks, const int8_t *xq,
                                                              accumulator *acc_a, accumulator *acc_b) {
    for (int64_t first = 0; first < nblocks; first += ROW_FLUSH(tabled)) {
        const int64_t end = first + ROW_FLUSH(tabled) < nblocks ? first + ROW_FLUSH(tabled) : nblocks;
#if defined(PATH_AVX512)
        __m512i high_a = _mm512_setzero_si512(), low_a = high_a, high_b = high_a, low_b = high_a;
        for (int64_t k = first; k < end; k++, wa += 8 * b, wb += 8 * b) {
            _mm_prefetch((const char *)wa + PREFETCH_AHEAD, _MM_HINT_T0);
            _mm_prefetch((const char *)wb + PREFETCH_AHEAD, _MM_HINT_T0);
            const int8_t *x = xq + 2 * k * BLOCK;
            const __m512i codes_a = block_codes(wa, b), codes_b = block_codes(wb, b);
            const __m512i va = tabled ? lookup(codes_a, b, ta) : codes_a;
            const __m512i vb = tabled ? lookup(codes_b, b, tb) : codes_b;
            high_a = DOT(high_a, va, x), low_a = DOT(low_a, va, x + BLOCK);
            high_b = DOT(high_b, vb, x), low_b = DOT(low_b, vb, x + BLOCK);
            if (tabled == 1) {
                low_a = DOT(low_a, lookup(codes_a, b, ta + (1 << b)), x);
                low_b = DOT(low_b, lookup(codes_b, b, tb + (1 << b)), x);
            }
        }
        const __m512 fa = _mm512_fmadd_ps(_mm512_cvtepi32_ps(low_a), _mm512_set1_ps(1.0f / 256.0f),
                                          _mm512_cvtepi32_ps(high_a));
        const __m512 fb = _mm512_fmadd_ps(_mm512_cvtepi32_ps(low_b), _mm512_set1_ps(1.0f / 256.0f),
                                          _mm512_cvtepi32_ps(high_b));
        *acc_a = _mm512_fmadd_ps(fa, _mm512_set1_ps(sa), *acc_a);
        *acc_b = _mm512_fmadd_ps(fb, _mm512_set1_ps(sb), *acc_b);
#else
        __m256i ia = _mm256_setzero_si256(), ib = ia;
        for (int64_t k = first; k < end; k++, wa += 8 * b, wb += 8 * b) {
            _mm_prefetch((const char *)wa + PREFETCH_AHEAD, _MM_HINT_T0);
            _mm_prefetch((const char *)wb + PREFETCH_AHEAD, _MM_HINT_T0);
            __m256i va[4], vb[4], pa[4], pb[4];
            half_wide_values(half_codes(wa, b, 0), b, tabled, ta, va, va + 1);
            half_wide_values(half_codes(wa, b, 1), b, tabled, ta, va + 2, va + 3);
            half_wide_values(half_codes(wb, b, 0), b, tabled, tb, vb, vb + 1);
            half_wide_values(half_codes(wb, b, 1), b, tabled, tb, vb + 2, vb + 3);
            const __m256i *x = (const __m256i *)(xq + 2 * k * BLOCK);
            for (int q = 0; q < 4; q++) {
                const __m256i xv = _mm256_loadu_si256(x + q);
                pa[q] = _mm256_madd_epi16(va[q], xv), pb[q] = _mm256_madd_epi16(vb[q], xv);
            }
            ia = _mm256_add_epi32(ia, int_sum4(pa)), ib = _mm256_add_epi32(ib, int_sum4(pb));
        }
        *acc_a = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ia), _mm256_set1_ps(sa / WIDE_UNIT(tabled)), *acc_a);
        *acc_b = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ib), _mm256_set1_ps(sb / WIDE_UNIT(tabled)), *acc_b);
#endif
    }
}

/* pair_product's segments g0 .. g1 - 1 where each is one block and all have one width b: the width chosen once
 * per run of segments rather than once per segment. Inlined with b and `tabled` constant. */
static inline __attribute__((always_inline)) void pair_run(const anybit_matrix *m, int64_t ra, int64_t rb,
                                                           int64_t g0, int64_t g1, const int b, const int tabled,
                                                           const uint8_t *wa, const uint8_t *wb,
                                                           const coded_input *in, accumulator *acc_a,
                                                           accumulator *acc_b) {
    const int64_t groups = m->cols / BLOCK;
    const float *scale_a = m->scale + ra * groups, *scale_b = m->scale + rb * groups;
    for (int64_t g = g0; g < g1; g++, wa += 8 * b, wb += 8 * b) {
        const uint8_t *ta = tabled ? m->tables + m->table_off[ra * groups + g] : NULL;
        const uint8_t *tb = tabled ? m->tables + m->table_off[rb * groups + g] : NULL;
        pair_blocks(wa, wb, b, tabled, ta, tb, scale_a[g], scale_b[g], 1, in->xq + 2 * g * BLOCK, acc_a, acc_b);
    }
}

/* pair_blocks over NBLOCKS blocks of width B with the table kind of the pair's segments (ta, tb: NULL for
 * uniform grids), in pair_product and pair_one_segment, on their locals wa, wb, sa, sb, xq, acc_a, acc_b. */
#define PAIR_OF(B, NBLOCKS)                                                                                           \
    !ta            ? pair_blocks(wa, wb, B, 0, NULL, NULL, sa, sb, NBLOCKS, xq, &acc_a, &acc_b)                       \
    : HIGH_ONLY(m) ? pair_blocks(wa, wb, B, 2, ta, tb, sa, sb, NBLOCKS, xq, &acc_a, &acc_b)                           \
                   : pair_blocks(wa, wb, B, 1, ta, tb, sa, sb, NBLOCKS, xq, &acc_a, &acc_b)

/* row_product for two rows whose segments have the same widths (see pairs), token 0 alone. */
static void pair_product(const anybit_matrix *m, int64_t ra, int64_t rb, const coded_input *in, float *y) {
    const int64_t groups = m->cols / m->group_size, group_blocks = m->group_size / BLOCK;
    const float total_a = -row_bias(m, ra, in, 0), total_b = -row_bias(m, rb, in, 0);
    accumulator acc_a = ACC_ZERO, acc_b = ACC_ZERO;
    const uint8_t *wa = m->codes + m->row_off[ra], *wb = m->codes + m->row_off[rb];
    if (group_blocks == 1) { /* runs of segments of one width (prepare lays a shared bit map's widths in runs) */
        const uint8_t *bits = m->bits + ra * groups;
        for (int64_t g0 = 0, g1; g0 < groups; g0 = g1) {
            g1 = g0 + 1;
            while (g1 < groups && bits[g1] == bits[g0]) g1++;
#define RUN(B)                                                                                                         \
    !m->tables     ? pair_run(m, ra, rb, g0, g1, B, 0, wa, wb, in, &acc_a, &acc_b)                                     \
    : HIGH_ONLY(m) ? pair_run(m, ra, rb, g0, g1, B, 2, wa, wb, in, &acc_a, &acc_b)                                     \
                   : pair_run(m, ra, rb, g0, g1, B, 1, wa, wb, in, &acc_a, &acc_b)
            WITH_WIDTH(bits[g0], RUN)
#undef RUN
            wa += (g1 - g0) * 8 * bits[g0], wb += (g1 - g0) * 8 * bits[g0];
        }
    } else {
        for (int64_t g = 0; g < groups; g++) {
            const int64_t sa_ = ra * groups + g, sb_ = rb * groups + g, k0 = g * group_blocks;
            const uint8_t *ta = m->tables ? m->tables + m->table_off[sa_] : NULL;
            const uint8_t *tb = m->tables ? m->tables + m->table_off[sb_] : NULL;
            const float sa = m->scale[sa_], sb = m->scale[sb_];
            const int8_t *xq = in->xq + 2 * k0 * BLOCK;
            const int b = m->bits[sa_];
#define PAIR(B) PAIR_OF(B, group_blocks)
            WITH_WIDTH(b, PAIR)
#undef PAIR
            wa += group_blocks * 8 * b, wb += group_blocks * 8 * b;
        }
    }
    y[ra] = total_a + in->step[0] * acc_sum(acc_a);
    y[rb] = total_b + in->step[0] * acc_sum(acc_b);
}

/* pair_product for rows of one segment each (per-row codebooks, per-channel grids), in a function of its own:
 * no loop over segments, and no change to the code generated for rows of many (on AVX2 the same shortcuts
 * inside pair_product made group codebooks' rows 0.75-0.83x as fast, kernel_ab.py). */
static void pair_one_segment(const anybit_matrix *m, int64_t ra, int64_t rb, const coded_input *in, float *y) {
    const int64_t blocks = m->cols / BLOCK;
    const float total_a = -segment_bias(m, ra, in, 0, 0, blocks), total_b = -segment_bias(m, rb, in, 0, 0, blocks);
    accumulator acc_a = ACC_ZERO, acc_b = ACC_ZERO;
    const uint8_t *wa = m->codes + m->row_off[ra], *wb = m->codes + m->row_off[rb];
    const uint8_t *ta = m->tables ? m->tables + m->table_off[ra] : NULL;
    const uint8_t *tb = m->tables ? m->tables + m->table_off[rb] : NULL;
    const float sa = m->scale[ra], sb = m->scale[rb];
    const int8_t *xq = in->xq;
#define PAIR(B) PAIR_OF(B, blocks)
    WITH_WIDTH(m->bits[ra], PAIR)
#undef PAIR
    y[ra] = total_a + in->step[0] * acc_sum(acc_a);
    y[rb] = total_b + in->step[0] * acc_sum(acc_b);
}
#undef PAIR_OF

/* Whether rows ra and rb multiply together (pair_product): one token, no vector codebooks, and the same width
 * segment by segment. */
static inline int pairs(const anybit_matrix *m, int64_t ra, int64_t rb, int64_t T) {
    if (T != 1 || m->vq_codes) return 0;
    const int64_t groups = m->cols / m->group_size;
    if (groups == 1) return m->bits[ra] == m->bits[rb];
    return !memcmp(m->bits + ra * groups, m->bits + rb * groups, (size_t)groups);
}
#endif



/* Scratch for the rounded input of T tokens of at most `cols` columns; 0, or -1 when it cannot be allocated. */
static int alloc_input(coded_input *in, int64_t T, int64_t cols) {
    const size_t sums = sizeof(double) * (size_t)(T * (cols / BLOCK + 1));
    const size_t block_sums = sizeof(float) * (size_t)(T * (cols / BLOCK));
    in->xq = malloc((size_t)(2 * T * cols) + 64);
    in->step = malloc(sizeof(float) * (size_t)T);
    in->xsum = malloc(sums), in->hisum = malloc(sums);
    in->xblock = malloc(block_sums), in->hiblock = malloc(block_sums);
    in->coded = malloc(sizeof(float) * (size_t)(T * cols));
    in->picked = malloc(sizeof(int64_t) * (size_t)(T * cols));
    in->n_picked = malloc(sizeof(int64_t) * (size_t)T);
    in->rotated = malloc(sizeof(float) * (size_t)(T * cols));
    in->tiles = block_tokens(T) ? malloc((size_t)(2 * token_groups(T) * TILE * cols)) : NULL;
    return in->xq && in->step && in->xsum && in->hisum && in->xblock && in->hiblock && in->coded && in->picked &&
                   in->n_picked && in->rotated && (in->tiles || !block_tokens(T))
               ? 0
               : -1;
}

static void free_input(coded_input *in) {
    free(in->xq), free(in->step), free(in->xsum), free(in->hisum), free(in->xblock), free(in->hiblock);
    free(in->coded), free(in->picked);
    free(in->n_picked), free(in->tiles), free(in->rotated);
}

#define DEC_CHUNK 1024 /* input channels per selection chunk (anybit/runtime/dec.py, CHUNK) */

/* Compensation's score of input channel j: |x| (times its weight). */
static inline float dec_score(const anybit_matrix *m, const float *x, int64_t j) {
    return fabsf(x[j]) * (m->dec_weight ? m->dec_weight[j] : 1.0f);
}

/* The channels of x (cols) that compensation picks: per chunk, the largest scores, by insertion into a
 * sorted run; returns their count. */
static int64_t pick_channels(const anybit_matrix *m, const float *x, int64_t *picked) {
    if (m->dec_fixed) {
        memcpy(picked, m->dec_fixed, sizeof(int64_t) * (size_t)m->dec_n_fixed);
        return m->dec_n_fixed;
    }
    int64_t n = 0;
    for (int64_t start = 0; start < m->cols; start += DEC_CHUNK) {
        const int64_t length = m->cols - start < DEC_CHUNK ? m->cols - start : DEC_CHUNK;
        const int64_t k = m->dec_k_chunk * length / DEC_CHUNK < length ? m->dec_k_chunk * length / DEC_CHUNK : length;
        int64_t *run = picked + n, kept = 0;
        for (int64_t j = start; j < start + length && k > 0; j++) {
            const float score = dec_score(m, x, j);
            if (kept == k && !(score > dec_score(m, x, run[k - 1]))) continue;
            int64_t at = kept < k ? kept : k - 1; /* where it goes, moving up from the end of the run */
            while (at > 0 && score > dec_score(m, x, run[at - 1])) run[at] = run[at - 1], at--;
            run[at] = j;
            kept += kept < k;
        }
        n += kept;
    }
    return n;
}

#define DEC_ROWS 256 /* output channels compensated per unit of work (an even number) */

/* Units of compensation work per token of a matrix: its outputs in runs of DEC_ROWS (none without residuals). */
static int64_t dec_units(const anybit_matrix *m) { return m->dec_codes ? (m->rows + DEC_ROWS - 1) / DEC_ROWS : 0; }

/* y[r0 .. r1 - 1] += the residual rows of the n channels picked for x, times x (r0 even). */
static void compensate(const anybit_matrix *m, const float *x, const int64_t *picked, int64_t n, int64_t r0,
                       int64_t r1, float *y) {
    float acc[DEC_ROWS] = {0};
    const int64_t pairs = (r1 - r0 + 1) / 2;
    for (int64_t p = 0; p < n; p++) {
        const float xv = x[picked[p]];
        const uint8_t *codes = m->dec_codes + picked[p] * m->dec_row_bytes + r0 / 2;
        for (int64_t j = 0; j < pairs; j++) {
            acc[2 * j] += xv * (float)((int)(codes[j] & 15) - 8);
            acc[2 * j + 1] += xv * (float)((int)(codes[j] >> 4) - 8);
        }
    }
    for (int64_t r = r0; r < r1; r++) y[r] += acc[r - r0] * m->dec_scales[r];
}

/* Whether matrix i reads the first matrix's rounding of the shared input (both take it as it is). */
static int same_rotation(const anybit_matrix *a, const anybit_matrix *b) {
    if (!a->rot_mix || !b->rot_mix) return !a->rot_mix && !b->rot_mix;
    return a->cols == b->cols && a->rot_m == b->rot_m &&
           !memcmp(a->rot_signs, b->rot_signs, sizeof(float) * (size_t)a->cols) &&
           !memcmp(a->rot_mix, b->rot_mix, sizeof(float) * (size_t)(a->rot_m * a->rot_m));
}

static int shares_input(const anybit_matrix *const *m, int i) {
    return i > 0 && !m[i]->perm && !m[i]->col_scale && !m[0]->perm && !m[0]->col_scale && same_rotation(m[0], m[i]) &&
           !m[i]->vq_codes == !m[0]->vq_codes && !m[i]->col_codes && !m[0]->col_codes;
}

#if defined(PATH_BLOCKS)
/* Whether any of `count` matrices is vector-coded or column-coded (those take the row path). */
static int any_row_only(const anybit_matrix *const *m, int count) {
    for (int i = 0; i < count; i++)
        if (m[i]->vq_codes || m[i]->col_codes) return 1;
    return 0;
}
#endif

/* out = R v (anybit_matrix.rot_mix): signs, a Walsh-Hadamard transform of each block of b, then Q across the
 * blocks; `work` holds cols floats. */
static void rotate_input(const anybit_matrix *m, const float *v, float *work, float *out) {
    const int64_t n = m->cols, q = m->rot_m, b = n / q;
    for (int64_t j = 0; j < n; j++) work[j] = v[j] * m->rot_signs[j];
    for (int64_t blk = 0; blk < q; blk++) {
        float *w = work + blk * b;
        for (int64_t h = 1; h < b; h *= 2)
            for (int64_t i = 0; i < b; i += 2 * h)
                for (int64_t j = i; j < i + h; j++) {
                    const float x = w[j], y = w[j + h];
                    w[j] = x + y, w[j + h] = x - y;
                }
    }
    const float norm = 1.0f / sqrtf((float)b);
    for (int64_t i = 0; i < q; i++) {
        float *o = out + i * b;
        for (int64_t p = 0; p < b; p++) o[p] = 0.0f;
        for (int64_t j = 0; j < q; j++) {
            const float c = m->rot_mix[i * q + j] * norm;
            const float *w = work + j * b;
            for (int64_t p = 0; p < b; p++) o[p] += c * w[p];
        }
    }
}

/* Round token t of the input x of `count` matrices into in[i] (not where shares_input), and pick its
 * channels for compensation. */
static void code_token(const anybit_matrix *const *m, int count, const float *x, int64_t t, coded_input *in) {
    for (int i = 0; i < count; i++) {
        const int64_t cols = m[i]->cols;
        const float *src = x + t * cols;
        if (shares_input(m, i)) continue;
        if (m[i]->rot_mix) { /* rotated first: the permutation and scaling describe the rotated matrix */
            float *rotated = in[i].rotated + t * cols;
            rotate_input(m[i], src, in[i].coded + t * cols, rotated);
            src = rotated;
        }
        if (m[i]->perm || m[i]->col_scale) {
            float *coded = in[i].coded + t * cols;
            for (int64_t j = 0; j < cols; j++) {
                const int64_t c = m[i]->perm ? m[i]->perm[j] : j;
                coded[j] = src[c] / (m[i]->col_scale ? m[i]->col_scale[c] : 1.0f);
            }
            src = coded;
        }
        if (m[i]->col_codes) {
            column_token(m[i], src, t, in + i);
            continue;
        }
        if (m[i]->vq_codes) { /* vector codebooks multiply the float input, from `coded` */
            float *coded = in[i].coded + t * cols;
            if (src != coded) memcpy(coded, src, sizeof(float) * (size_t)cols);
            continue;
        }
        quantize_token(src, t, cols, in + i);
    }
    for (int i = 0; i < count; i++)
        if (m[i]->dec_codes)
            in[i].n_picked[t] = pick_channels(m[i], x + t * m[i]->cols, in[i].picked + t * m[i]->cols);
}

static inline int has_extras(const anybit_matrix *m) { return m->n_outliers > 0 || m->bias; }

#if defined(PATH_AVX512) || defined(PATH_AVX2)
/* acc plus outlier e's delta times its column's 8 tokens in `lanes` (add_outliers_8). */
static inline __m256 outlier_lanes(const anybit_matrix *m, int64_t e, const float *lanes, __m256 acc) {
    const __m256 column = _mm256_loadu_ps(lanes + 8 * (int64_t)m->outlier_cols[e]);
    return _mm256_fmadd_ps(_mm256_set1_ps(m->outlier_deltas[e]), column, acc);
}

/* The outliers of the rows at positions q0 .. q1 - 1 of m's `order` added to their outputs for tokens t0 ..
 * t0 + 7 of x: the tokens' inputs transposed into `lanes` (cols × 8), each row's outliers summed 8 tokens to a
 * register. */
static void add_outliers_8(const anybit_matrix *m, int64_t q0, int64_t q1, const float *x, int64_t t0, float *lanes,
                           float *y) {
    const int64_t cols = m->cols;
    for (int64_t j = 0; j < cols; j++)
        for (int k = 0; k < 8; k++) lanes[j * 8 + k] = x[(t0 + k) * cols + j];
    for (int64_t q = q0; q < q1; q++) {
        const int64_t end = m->outlier_start[q + 1];
        int64_t e = m->outlier_start[q];
        if (e == end) continue;
        __m256 even = _mm256_setzero_ps(), odd = even;
        for (; e + 2 <= end; e += 2)
            even = outlier_lanes(m, e, lanes, even), odd = outlier_lanes(m, e + 1, lanes, odd);
        if (e < end) even = outlier_lanes(m, e, lanes, even);
        float sums[8];
        _mm256_storeu_ps(sums, _mm256_add_ps(even, odd));
        for (int k = 0; k < 8; k++) y[(t0 + k) * m->rows + m->order[q]] += sums[k];
    }
}
#endif

/* The outliers and bias of the rows at positions q0 .. q1 - 1 of m's `order` added to their outputs for the T
 * tokens of x (the input as given): on the SIMD paths 8 tokens at a time where there are 8 (a prompt of 64
 * tokens 1.2-1.7x as fast as token by token: kernel_ab.py on SqueezeLLM's and CLAQ's SmolLM2), the rest token by
 * token in one loop over the outliers, whose rows' short sums overlap (summing each row's in registers instead
 * decoded 2-6 % more slowly). */
static void add_extras(const anybit_matrix *m, int64_t q0, int64_t q1, const float *x, int64_t T, float *y) {
    int64_t t = 0;
#if defined(PATH_AVX512) || defined(PATH_AVX2)
    float *lanes = m->n_outliers && T >= 8 ? malloc(sizeof(float) * 8 * m->cols) : NULL;
    for (; lanes && t + 8 <= T; t += 8) add_outliers_8(m, q0, q1, x, t, lanes, y);
    free(lanes);
#endif
    const int64_t first = m->n_outliers ? m->outlier_start[q0] : 0, end = m->n_outliers ? m->outlier_start[q1] : 0;
    for (int64_t u = t; u < T; u++) {
        const float *xu = x + u * m->cols;
        float *yu = y + u * m->rows;
        for (int64_t e = first; e < end; e++) yu[m->outlier_rows[e]] += m->outlier_deltas[e] * xu[m->outlier_cols[e]];
    }
    for (int64_t u = 0; m->bias && u < T; u++)
        for (int64_t q = q0; q < q1; q++) y[u * m->rows + m->order[q]] += m->bias[m->order[q]];
}

/* This thread's share of the pairs of rows of `count` matrices (each matrix's rows in its `order`, two by two):
 * pairs first .. end - 1 of them all, an equal count per thread (rows cost about the same at any width). */
static void thread_pairs(const anybit_matrix *const *m, int count, int64_t *first, int64_t *end) {
    int64_t total = 0;
    for (int i = 0; i < count; i++) total += (m[i]->rows + 1) / 2;
    *first = total * omp_thread() / omp_threads(), *end = total * (omp_thread() + 1) / omp_threads();
}

/* Where a thread's share of pairs (from `lo`, or up to `hi`) starts or ends in matrix m: column-coded rows go in
 * blocks, each to the thread whose share holds its first pair (row_products). */
static inline int64_t share_bound(const anybit_matrix *m, int64_t pair) {
    const int64_t per_block = COLUMN_ROWS / 2;
    return m->col_codes && pair > 0 ? (pair + per_block - 1) / per_block * per_block : pair;
}

/* The outliers and biases of the rows in this thread's pairs (thread_pairs). */
static void thread_extras(const anybit_matrix *const *m, int count, const float *x, int64_t T, float *const *y) {
    int64_t first, end, base = 0;
    thread_pairs(m, count, &first, &end);
    for (int i = 0; i < count; base += (m[i]->rows + 1) / 2, i++) {
        const int64_t lo = share_bound(m[i], first > base ? first - base : 0), hi = share_bound(m[i], end - base);
        if (!has_extras(m[i]) || hi <= lo || lo >= (m[i]->rows + 1) / 2) continue;
        add_extras(m[i], 2 * lo, 2 * hi < m[i]->rows ? 2 * hi : m[i]->rows, x, T, y[i]);
    }
}

/* Pair P of the rows of `count` matrices (in each matrix's `order`): its matrix's index in *i, its rows in rows
 * (rows[1] -1 where the matrix's last row is left alone). */
static inline void pair_rows(const anybit_matrix *const *m, int64_t P, int *i, int64_t *rows) {
    int k = 0;
    while (P >= (m[k]->rows + 1) / 2) P -= (m[k++]->rows + 1) / 2;
    *i = k;
    rows[0] = m[k]->order[2 * P], rows[1] = 2 * P + 1 < m[k]->rows ? m[k]->order[2 * P + 1] : -1;
}

/* The rows of `count` matrices to the threads in each matrix's `order` (rows of one width together, so that the
 * branch on the width is predicted), an equal share of pairs per thread, MAX_TOKENS tokens per pass over a row,
 * two rows at a time where they pair (pair_product; SmolLM2's decode steps 1.18× as fast for anybit 3.25 and
 * 1.34× for GPTQ 4-bit g64 on AVX-512, 0.98× and 1.19× on AVX2: kernel_ab.py --model), else one by one. Then
 * each thread adds the outliers and biases (x: the input as given) of the rows it wrote, while they are in its
 * cache, in a loop of their own where the rows' short sums overlap. Called by every thread; ends in a barrier. */
static void row_products(const anybit_matrix *const *m, int count, const coded_input *const *coded, const float *x,
                         int64_t T, float *const *y) {
    int64_t first, end;
    thread_pairs(m, count, &first, &end);
    for (int64_t P = first; P < end; P++) {
        int i;
        int64_t rows[2];
        pair_rows(m, P, &i, rows);
        if (m[i]->col_codes) { /* a block of rows, from its first pair (`order` is the rows in order) */
            if (rows[0] % COLUMN_ROWS == 0) column_products(m[i], rows[0] / COLUMN_ROWS, coded[i], T, y[i]);
            continue;
        }
#if defined(PATH_AVX512) || defined(PATH_AVX2)
        if (rows[1] >= 0 && pairs(m[i], rows[0], rows[1], T)) {
            (m[i]->group_size == m[i]->cols ? pair_one_segment : pair_product)(m[i], rows[0], rows[1], coded[i], y[i]);
            continue;
        }
#endif
        for (int j = 0; j < 2 && rows[j] >= 0; j++)
            for (int64_t t0 = 0; t0 < T; t0 += MAX_TOKENS) {
                const int n = (int)(T - t0 < MAX_TOKENS ? T - t0 : MAX_TOKENS);
                (m[i]->vq_codes ? vq_row_product_n : row_product_n)(m[i], rows[j], coded[i], t0, n, y[i]);
            }
    }
    thread_extras(m, count, x, T, y);
#pragma omp barrier
}

#if defined(PATH_BLOCKS)
/* The high and low parts (on AVX2 the wide values) of tokens 16 tg .. 16 tg + 15 (zeros past T) in block k,
 * in tile order: 4-byte units, the same copy for either. */
static int8_t *input_tile(const coded_input *in, int64_t blocks, int64_t tg, int64_t k) {
    return in->tiles + (tg * blocks + k) * 2 * TILE_BYTES;
}

static void lay_input_tile(const coded_input *in, int64_t cols, int64_t T, int64_t tg, int64_t k) {
    int8_t *dst = input_tile(in, cols / BLOCK, tg, k);
    for (int n = 0; n < TILE; n++) {
        const int64_t t = tg * TILE + n;
        const int8_t *src = t < T ? XQ(in->xq, cols, t, k) : NULL;
        for (int part = 0; part < 2; part++)
            for (int kk = 0; kk < 16; kk++) {
                int8_t *to = dst + part * TILE_BYTES + kk * 64 + n * 4;
                if (src)
                    memcpy(to, src + part * BLOCK + kk * 4, 4);
                else
                    memset(to, 0, 4);
            }
    }
}

/* One row's segment of b bits decoded into the block buffer (per block: 16 rows of 64 high values, then of
 * low values, on AVX2 of the first and second 32 wide values; `dst` at this row's slot of the segment's first
 * block), as the path multiplies them: unsigned on AVX-512, wide on AVX2. */
static inline __attribute__((always_inline)) const uint8_t *decode_segment(const uint8_t *w, const int b,
                                                                           const int tabled, const uint8_t *table,
                                                                           uint8_t *dst, int64_t nblocks) {
    for (int64_t k = 0; k < nblocks; k++, w += 8 * b, dst += 2 * TILE_BYTES) {
#if defined(PATH_AVX512)
        const __m512i codes = block_codes(w, b);
        _mm512_storeu_si512(dst, tabled ? lookup(codes, b, table) : codes);
        if (tabled) _mm512_storeu_si512(dst + TILE_BYTES, lookup(codes, b, table + (1 << b)));
#else
        for (int half = 0; half < 2; half++) { /* a half's 32 wide values: 64 bytes, one part's row */
            __m256i first, second;
            half_wide_values(half_codes(w, b, half), b, tabled, table, &first, &second);
            _mm256_storeu_si256((__m256i *)(dst + half * TILE_BYTES), first);
            _mm256_storeu_si256((__m256i *)(dst + half * TILE_BYTES + 32), second);
        }
#endif
    }
    return w;
}

static void decode_row_block(const anybit_matrix *m, const int64_t *rows, int nrows, uint8_t *buf) {
    const int64_t blocks = m->cols / BLOCK, groups = m->cols / m->group_size, group_blocks = m->group_size / BLOCK;
    for (int q = nrows; q < TILE; q++) /* rows past the matrix's end multiply as zeros */
        for (int64_t k = 0; k < 2 * blocks; k++) memset(buf + k * TILE_BYTES + q * 64, 0, 64);
    for (int q = 0; q < nrows; q++) {
        const int64_t r = rows[q];
        const uint8_t *w = m->codes + m->row_off[r];
        for (int64_t g = 0; g < groups; g++) {
            const int64_t s = r * groups + g;
            const uint8_t *table = m->tables ? m->tables + m->table_off[s] : NULL;
            uint8_t *dst = buf + g * group_blocks * 2 * TILE_BYTES + q * 64;
#define DECODE(B)                                                                                                      \
    w = !table              ? decode_segment(w, B, 0, NULL, dst, group_blocks)                                        \
        : BLOCK_TABLED(m) ? decode_segment(w, B, 1, table, dst, group_blocks)                                         \
                          : decode_segment(w, B, 2, table, dst, group_blocks)
            WITH_WIDTH(m->bits[s], DECODE)
#undef DECODE
        }
    }
}

/* Per segment g and token n of token group tg: the sums over the segment's blocks of the rounded input (dx)
 * and of s times its high parts (dh), zeros past T: what the offsets and the low tables' bias take out. */
static void segment_sums(const anybit_matrix *m, const coded_input *in, int64_t T, int64_t tg, float *dx, float *dh) {
    const int64_t blocks = m->cols / BLOCK, groups = m->cols / m->group_size, group_blocks = m->group_size / BLOCK;
    for (int n = 0; n < TILE; n++) {
        const int64_t t = tg * TILE + n;
        const double *xsum = in->xsum + t * (blocks + 1), *hisum = in->hisum + t * (blocks + 1);
        for (int64_t g = 0; g < groups; g++) {
            const int64_t k0 = g * group_blocks, k1 = k0 + group_blocks;
            dx[g * TILE + n] = t < T ? (float)(xsum[k1] - xsum[k0]) : 0.0f;
            dh[g * TILE + n] = t < T ? (float)(hisum[k1] - hisum[k0]) : 0.0f;
        }
    }
}

/* y[t, rows[q]] (q < nrows) for the 16 tokens of group tg from the rows' float sums `acc` and the bias taken
 * out `total` (16 tokens each): total + s acc. */
static void store_token_group(const anybit_matrix *m, const int64_t *rows, int nrows, const coded_input *in,
                              int64_t T, int64_t tg, float (*acc)[TILE], float (*total)[TILE], float *y) {
    const int nt = T - tg * TILE < TILE ? (int)(T - tg * TILE) : TILE;
    for (int q = 0; q < nrows; q++)
        for (int n = 0; n < nt; n++) {
            const int64_t t = tg * TILE + n;
            y[t * m->rows + rows[q]] = total[q][n] + in->step[t] * acc[q][n];
        }
}

#if defined(PATH_AVX512)
#define REGISTER_ROWS 8 /* rows per pass of the register path: 16 accumulators (4 measured slower) */

/* acc += vpdpbusd(u, s), in place: GCC (12) otherwise copies each accumulator once or twice per product. */
static inline __m512i dpbusd_in_place(__m512i acc, __m512i u, __m512i s) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(s));
    return acc;
}

/* acc[q] += sc[q] (A + B / 256) over the blocks first .. end - 1 (at most FLUSH_BLOCKS) of rows q0 .. q0 +
 * REGISTER_ROWS - 1 of the decoded block `buf` and token group tg: per tile row kk, each row's 4 values
 * broadcast and multiplied with the 16 tokens' 4 parts (vpdpbusd). Inlined with `tabled` constant. */
static inline __attribute__((always_inline)) void register_chunk(const uint8_t *buf, int q0, const int tabled,
                                                                 const coded_input *in, int64_t blocks, int64_t tg,
                                                                 int64_t first, int64_t end, const float *sc,
                                                                 float (*acc)[TILE]) {
    __m512i a[REGISTER_ROWS], bl[REGISTER_ROWS];
    for (int q = 0; q < REGISTER_ROWS; q++) a[q] = bl[q] = _mm512_setzero_si512();
    for (int64_t k = first; k < end; k++) {
        const int8_t *x = input_tile(in, blocks, tg, k);
        const uint8_t *w = buf + k * 2 * TILE_BYTES + q0 * 64;
#pragma GCC unroll 4
        for (int kk = 0; kk < 16; kk++) {
            const __m512i xh = _mm512_loadu_si512(x + kk * 64), xl = _mm512_loadu_si512(x + TILE_BYTES + kk * 64);
            for (int q = 0; q < REGISTER_ROWS; q++) {
                int32_t four;
                memcpy(&four, w + q * 64 + kk * 4, 4);
                const __m512i wh = _mm512_set1_epi32(four);
                a[q] = dpbusd_in_place(a[q], wh, xh), bl[q] = dpbusd_in_place(bl[q], wh, xl);
                if (tabled) {
                    memcpy(&four, w + TILE_BYTES + q * 64 + kk * 4, 4);
                    bl[q] = dpbusd_in_place(bl[q], _mm512_set1_epi32(four), xh);
                }
            }
        }
    }
    for (int q = 0; q < REGISTER_ROWS; q++) {
        const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(bl[q]), _mm512_set1_ps(1.0f / 256.0f),
                                         _mm512_cvtepi32_ps(a[q]));
        _mm512_storeu_ps(acc[q], _mm512_fmadd_ps(f, _mm512_set1_ps(sc[q]), _mm512_loadu_ps(acc[q])));
    }
}
#else
#define REGISTER_ROWS 4 /* rows per pass */

/* register_chunk on AVX2, on the wide layout: the decoded rows and the input tiles hold int16 values (two
 * per 4-byte unit, in the same wide slots), and each madd_epi16 multiplies a row's two values with 8 tokens'
 * two activations, summed in int32 over one part of a block (16 madds: a table's 12-bit entries reach 2^31
 * there), codes' over the whole block. Each row's broadcast values multiply both halves of the 16 tokens. */
static inline __attribute__((always_inline)) void register_chunk(const uint8_t *buf, int q0, const int tabled,
                                                                 const coded_input *in, int64_t blocks, int64_t tg,
                                                                 int64_t first, int64_t end, const float *sc,
                                                                 float (*acc)[TILE]) {
    const float unit = tabled ? 1.0f / 65536.0f : 1.0f / 256.0f; /* wide values are 256 times the values */
    __m256 f[2][REGISTER_ROWS];
    for (int q = 0; q < REGISTER_ROWS; q++) f[0][q] = f[1][q] = _mm256_setzero_ps();
    for (int64_t k = first; k < end; k++) {
        const int8_t *x = input_tile(in, blocks, tg, k);
        const uint8_t *w = buf + k * 2 * TILE_BYTES + q0 * 64;
        __m256i ia[2][REGISTER_ROWS];
        for (int q = 0; q < REGISTER_ROWS; q++) ia[0][q] = ia[1][q] = _mm256_setzero_si256();
        for (int part = 0; part < 2; part++) {
            for (int kk = 0; kk < 16; kk++) {
                const int8_t *xk = x + part * TILE_BYTES + kk * 64;
                const __m256i x0 = _mm256_loadu_si256((const __m256i *)xk);
                const __m256i x1 = _mm256_loadu_si256((const __m256i *)(xk + 32));
                for (int q = 0; q < REGISTER_ROWS; q++) {
                    int32_t two;
                    memcpy(&two, w + part * TILE_BYTES + q * 64 + kk * 4, 4);
                    const __m256i values = _mm256_set1_epi32(two);
                    ia[0][q] = _mm256_add_epi32(ia[0][q], _mm256_madd_epi16(values, x0));
                    ia[1][q] = _mm256_add_epi32(ia[1][q], _mm256_madd_epi16(values, x1));
                }
            }
            if (tabled || part == 1)
                for (int half = 0; half < 2; half++)
                    for (int q = 0; q < REGISTER_ROWS; q++) {
                        f[half][q] = _mm256_add_ps(f[half][q], _mm256_cvtepi32_ps(ia[half][q]));
                        ia[half][q] = _mm256_setzero_si256();
                    }
        }
    }
    for (int half = 0; half < 2; half++)
        for (int q = 0; q < REGISTER_ROWS; q++) {
            float *to = acc[q] + 8 * half;
            _mm256_storeu_ps(to, _mm256_fmadd_ps(f[half][q], _mm256_set1_ps(sc[q] * unit), _mm256_loadu_ps(to)));
        }
}
#endif

/* acc[q] += sc[q] (A + B / 256) over the blocks k0 .. k1 - 1 of one segment (register_chunk on at most
 * FLUSH_BLOCKS blocks at a time: the int32 sums cannot overflow). */
static inline __attribute__((always_inline)) void register_segment(const uint8_t *buf, int q0, const int tabled,
                                                                   const coded_input *in, int64_t blocks, int64_t tg,
                                                                   int64_t k0, int64_t k1, const float *sc,
                                                                   float (*acc)[TILE]) {
    for (int64_t first = k0; first < k1; first += FLUSH_BLOCKS) {
        const int64_t end = first + FLUSH_BLOCKS < k1 ? first + FLUSH_BLOCKS : k1;
        register_chunk(buf, q0, tabled, in, blocks, tg, first, end, sc, acc);
    }
}

/* y[t, r] for the rows `rows` (nrows <= 16) of m and the token groups tg0 .. tg1 - 1, from their decoded
 * values in `buf`, on vector registers: per segment and token, sc (A + B / 256) less the offsets' and the
 * low tables' bias, as row_product adds them. */
static void register_row_block(const anybit_matrix *m, const int64_t *rows, int nrows, const coded_input *in,
                               int64_t T, int64_t tg0, int64_t tg1, const uint8_t *buf, float *y, float *sums) {
    const int64_t blocks = m->cols / BLOCK, groups = m->cols / m->group_size, group_blocks = m->group_size / BLOCK;
    float *dx = sums, *dh = sums + groups * TILE;
    const float low = (float)LOW_BIAS(m);
    for (int64_t tg = tg0; tg < tg1; tg++) {
        float acc[TILE][TILE] __attribute__((aligned(64))) = {{0}};
        float total[TILE][TILE] __attribute__((aligned(64))) = {{0}};
        segment_sums(m, in, T, tg, dx, dh);
        for (int q0 = 0; q0 < nrows; q0 += REGISTER_ROWS)
            for (int64_t g = 0; g < groups; g++) {
                float sc[REGISTER_ROWS], off[REGISTER_ROWS];
                for (int q = 0; q < REGISTER_ROWS; q++) { /* rows past nrows: zeros in buf, scale 0 */
                    const int64_t s = q0 + q < nrows ? rows[q0 + q] * groups + g : -1;
                    sc[q] = s >= 0 ? m->scale[s] : 0.0f, off[q] = s >= 0 ? (float)OFFSET_BIAS(m, s) : 0.0f;
                }
                const int64_t k0 = g * group_blocks, k1 = k0 + group_blocks;
                if (BLOCK_TABLED(m))
                    register_segment(buf, q0, 1, in, blocks, tg, k0, k1, sc, acc + q0);
                else
                    register_segment(buf, q0, 0, in, blocks, tg, k0, k1, sc, acc + q0);
                for (int q = 0; q < REGISTER_ROWS; q++)
                    for (int n = 0; n < TILE; n++)
                        total[q0 + q][n] -= sc[q] * (off[q] * dx[g * TILE + n] + low * dh[g * TILE + n]);
            }
        store_token_group(m, rows, nrows, in, T, tg, acc, total, y);
    }
}

#if defined(PATH_AMX)
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* Tiles 0, 1: the int32 sums A and B (rows x tokens); 2, 3: high and low weight values (rows x 64 columns);
 * 4, 5: high and low input parts (64 columns as 16 rows of 4, x tokens). */
static void amx_configure(void) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 6; i++) c.colsb[i] = 64, c.rows[i] = TILE;
    _tile_loadconfig(&c);
}

/* register_row_block on AMX tiles: 16 rows by 16 tokens per tile product. */
static void amx_row_block(const anybit_matrix *m, const int64_t *rows, int nrows, const coded_input *in, int64_t T,
                          int64_t tg0, int64_t tg1, const uint8_t *buf, float *y) {
    const int64_t cols = m->cols, blocks = cols / BLOCK, groups = cols / m->group_size;
    const int64_t group_blocks = m->group_size / BLOCK;
    const int tabled = BLOCK_TABLED(m);
    int32_t a[TILE * TILE] __attribute__((aligned(64))), bl[TILE * TILE] __attribute__((aligned(64)));
    for (int64_t tg = tg0; tg < tg1; tg++) {
        const int nt = T - tg * TILE < TILE ? (int)(T - tg * TILE) : TILE;
        float acc[TILE][TILE] = {{0}}, total[TILE][TILE] = {{0}};
        for (int64_t g = 0; g < groups; g++) {
            const int64_t k0 = g * group_blocks, k1 = k0 + group_blocks;
            for (int64_t first = k0; first < k1; first += FLUSH_BLOCKS) {
                const int64_t end = first + FLUSH_BLOCKS < k1 ? first + FLUSH_BLOCKS : k1;
                _tile_zero(0);
                _tile_zero(1);
                for (int64_t k = first; k < end; k++) {
                    const int8_t *x = input_tile(in, blocks, tg, k);
                    _tile_loadd(2, buf + k * 2 * TILE_BYTES, 64);
                    _tile_loadd(4, x, 64);
                    _tile_loadd(5, x + TILE_BYTES, 64);
                    _tile_dpbusd(0, 2, 4);
                    _tile_dpbusd(1, 2, 5);
                    if (tabled) {
                        _tile_loadd(3, buf + (k * 2 + 1) * TILE_BYTES, 64);
                        _tile_dpbusd(1, 3, 4);
                    }
                }
                _tile_stored(0, a, 64);
                _tile_stored(1, bl, 64);
                for (int q = 0; q < nrows; q++) {
                    const float sc = m->scale[rows[q] * groups + g];
                    for (int n = 0; n < nt; n++)
                        acc[q][n] += sc * ((float)bl[q * TILE + n] * (1.0f / 256.0f) + (float)a[q * TILE + n]);
                }
            }
            for (int q = 0; q < nrows; q++) {
                const int64_t s = rows[q] * groups + g;
                for (int n = 0; n < nt; n++) {
                    const int64_t t = tg * TILE + n;
                    const double *xsum = in->xsum + t * (blocks + 1), *hisum = in->hisum + t * (blocks + 1);
                    double bias = (double)m->offset[s] * (xsum[k1] - xsum[k0]);
                    if (tabled) bias += 128.0 / 256.0 * (hisum[k1] - hisum[k0]);
                    total[q][n] -= m->scale[s] * (float)bias;
                }
            }
        }
        store_token_group(m, rows, nrows, in, T, tg, acc, total, y);
    }
}
#endif

#define CHUNK_GROUPS 16 /* token groups multiplied per decoding of a block of rows: their input tiles stay in L2 */

/* Block R of the blocks of 16 rows of `m` (every matrix's blocks in turn): its matrix, rows and row count. */
static int row_block(const anybit_matrix *const *m, int64_t R, const int64_t **rows, int *nrows) {
    int i = 0;
    while (R >= (m[i]->rows + TILE - 1) / TILE) R -= (m[i++]->rows + TILE - 1) / TILE;
    *rows = m[i]->order + R * TILE;
    *nrows = m[i]->rows - R * TILE < TILE ? (int)(m[i]->rows - R * TILE) : TILE;
    return i;
}

/* Tokens t0 .. t1 - 1 of a block of rows on the row path: where a thread has no room for its decoded rows. */
static void block_by_rows(const anybit_matrix *m, const int64_t *rows, int nrows, const coded_input *in, int64_t t0,
                          int64_t t1, float *y) {
    for (int q = 0; q < nrows; q++)
        for (int64_t t = t0; t < t1; t += MAX_TOKENS)
            row_product_n(m, rows[q], in, t, (int)(t1 - t < MAX_TOKENS ? t1 - t : MAX_TOKENS), y);
}

/* The row loop of `products` in blocks of 16 rows, for T >= TILE_MIN_TOKENS tokens (called by every thread):
 * on AMX tiles where in use, else on registers; the rows decoded again for every CHUNK_GROUPS token groups. */
static void block_products(const anybit_matrix *const *m, int count, const coded_input *const *coded, int64_t T,
                           float *const *y) {
    const int64_t tgroups = token_groups(T);
    int64_t units = 0, total = 0, wide = 0;
    for (int i = 0; i < count; i++) {
        if (!shares_input(m, i)) units += tgroups * (m[i]->cols / BLOCK);
        total += (m[i]->rows + TILE - 1) / TILE;
        wide = m[i]->cols > wide ? m[i]->cols : wide;
    }
#pragma omp for schedule(static)
    for (int64_t U = 0; U < units; U++) {
        int i = 0;
        int64_t u = U;
        while (shares_input(m, i) || u >= tgroups * (m[i]->cols / BLOCK)) {
            if (!shares_input(m, i)) u -= tgroups * (m[i]->cols / BLOCK);
            i++;
        }
        lay_input_tile(coded[i], m[i]->cols, T, u / (m[i]->cols / BLOCK), u % (m[i]->cols / BLOCK));
    }
    const int tiles = amx_state > 0;
    (void)tiles; /* read only where the build has AMX */
    uint8_t *buf = aligned_alloc(64, (size_t)(wide / BLOCK * 2 * TILE_BYTES));
    float *sums = malloc(sizeof(float) * (size_t)(wide / BLOCK * 2 * TILE)); /* segment_sums: at most a block each */
    if (!sums) free(buf), buf = NULL;
#if defined(PATH_AMX)
    if (buf && tiles) amx_configure();
#endif
    for (int64_t tg0 = 0; tg0 < tgroups; tg0 += CHUNK_GROUPS) {
        const int64_t tg1 = tg0 + CHUNK_GROUPS < tgroups ? tg0 + CHUNK_GROUPS : tgroups;
        const int64_t t0 = tg0 * TILE, t1 = tg1 * TILE < T ? tg1 * TILE : T;
#pragma omp for schedule(static)
        for (int64_t R = 0; R < total; R++) {
            const int64_t *rows;
            int nrows;
            const int i = row_block(m, R, &rows, &nrows);
            if (!buf) {
                block_by_rows(m[i], rows, nrows, coded[i], t0, t1, y[i]);
                continue;
            }
            decode_row_block(m[i], rows, nrows, buf);
#if defined(PATH_AMX)
            if (tiles) {
                amx_row_block(m[i], rows, nrows, coded[i], T, tg0, tg1, buf, y[i]);
                continue;
            }
#endif
            register_row_block(m[i], rows, nrows, coded[i], T, tg0, tg1, buf, y[i], sums);
        }
    }
#if defined(PATH_AMX)
    if (buf && tiles) _tile_release();
#endif
    free(buf), free(sums);
}

#if defined(PATH_AVX512)
/* Few tokens (4 or 8 .. TILE_MIN_TOKENS - 1: few_tokens) on AVX-512: a block of 16 rows is decoded once (as for
 * prompts), each of its 16-by-16 units of 4 bytes transposed, so that one register holds the 16 rows' values
 * of 4 columns, and multiplied with each token's 4 parts of those columns broadcast from the rounded input
 * (vpdpbusd with a broadcast operand): 16 rows' sums per register and token, FEW_TOKENS tokens per pass. The
 * row path multiplies few tokens at the speed of one, for it reloads every token's activations for every
 * row; here one load serves 16 rows, and nothing needs laying in tile order beforehand. The same integer
 * sums, flushed at the same blocks and in the same order as the register path's. */
#define FEW_TOKENS 8

/* Whether T tokens multiply in few-token blocks: from 4 tokens where every segment is one block (the row path
 * flushes such rows' sums to float for every block and token), from 8 where segments are longer (the row path
 * is as fast below; kernel_ab.py, AMD EPYC, 2026-12-06). */
static int few_tokens(const anybit_matrix *const *m, int count, int64_t T) {
    if (T >= TILE_MIN_TOKENS || registers_off) return 0;
    for (int i = 0; i < count; i++)
        if (m[i]->vq_codes || m[i]->col_codes || T < (m[i]->group_size == BLOCK ? 4 : 8)) return 0;
    return 1;
}

/* acc += vpdpbusd(u, the 4 signed bytes at s broadcast to every lane), in place (see dpbusd_in_place). */
static inline __m512i dpbusd_broadcast(__m512i acc, __m512i u, const int8_t *s) {
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u), "m"(*(const int32_t *)s));
    return acc;
}

/* Each 1 KiB part of the decoded block buffer (16 rows of 16 units of 4 bytes) transposed in place: unit kk
 * of row q moves to position q of unit row kk. Without tables only the high parts hold values. */
static void transpose_row_block(uint8_t *buf, int64_t blocks, int tabled) {
    for (int64_t part = 0; part < 2 * blocks; part += tabled ? 1 : 2) {
        __m512i *unit = (__m512i *)(buf + part * TILE_BYTES), r[16], t[16];
        for (int q = 0; q < 16; q++) r[q] = _mm512_load_si512(unit + q);
        for (int q = 0; q < 16; q += 2)
            t[q] = _mm512_unpacklo_epi32(r[q], r[q + 1]), t[q + 1] = _mm512_unpackhi_epi32(r[q], r[q + 1]);
        for (int q = 0; q < 16; q += 4) { /* r[q + j], lane L: unit 4 L + j of rows q .. q + 3 */
            r[q] = _mm512_unpacklo_epi64(t[q], t[q + 2]), r[q + 1] = _mm512_unpackhi_epi64(t[q], t[q + 2]);
            r[q + 2] = _mm512_unpacklo_epi64(t[q + 1], t[q + 3]), r[q + 3] = _mm512_unpackhi_epi64(t[q + 1], t[q + 3]);
        }
        for (int j = 0; j < 4; j++) {
            const __m512i even = _mm512_shuffle_i32x4(r[j], r[4 + j], 0x88);
            const __m512i odd = _mm512_shuffle_i32x4(r[j], r[4 + j], 0xdd);
            const __m512i even2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0x88);
            const __m512i odd2 = _mm512_shuffle_i32x4(r[8 + j], r[12 + j], 0xdd);
            _mm512_store_si512(unit + j, _mm512_shuffle_i32x4(even, even2, 0x88));
            _mm512_store_si512(unit + 8 + j, _mm512_shuffle_i32x4(even, even2, 0xdd));
            _mm512_store_si512(unit + 4 + j, _mm512_shuffle_i32x4(odd, odd2, 0x88));
            _mm512_store_si512(unit + 12 + j, _mm512_shuffle_i32x4(odd, odd2, 0xdd));
        }
    }
}

/* y[t, rows[q]] (q < nrows) for the n tokens t0 .. t0 + n - 1 from the transposed block `buf`; `sc` and `off`
 * hold the 16 rows' scales and scales times offsets per segment (zeros past nrows). Inlined with n and
 * `tabled` constant. */
static inline __attribute__((always_inline)) void few_token_pass(const anybit_matrix *m, const int64_t *rows,
                                                                 int nrows, const coded_input *in, int64_t t0,
                                                                 const int n, const int tabled, const uint8_t *buf,
                                                                 const float *sc, const float *off, float *y) {
    const int64_t cols = m->cols, groups = cols / m->group_size, group_blocks = m->group_size / BLOCK;
    __m512 acc[FEW_TOKENS];
    for (int t = 0; t < n; t++) acc[t] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        const int64_t k1 = (g + 1) * group_blocks;
        for (int64_t first = g * group_blocks; first < k1; first += FLUSH_BLOCKS) {
            const int64_t end = first + FLUSH_BLOCKS < k1 ? first + FLUSH_BLOCKS : k1;
            __m512i a[FEW_TOKENS], bl[FEW_TOKENS];
            for (int t = 0; t < n; t++) a[t] = bl[t] = _mm512_setzero_si512();
            for (int64_t k = first; k < end; k++) {
                const uint8_t *w = buf + k * 2 * TILE_BYTES;
                const int8_t *x = XQ(in->xq, cols, t0, k);
#pragma GCC unroll 2
                for (int kk = 0; kk < 16; kk++) {
                    const __m512i high = _mm512_load_si512(w + kk * 64);
                    for (int t = 0; t < n; t++) {
                        const int8_t *xt = x + 2 * t * cols + 4 * kk;
                        a[t] = dpbusd_broadcast(a[t], high, xt), bl[t] = dpbusd_broadcast(bl[t], high, xt + BLOCK);
                    }
                    if (tabled) {
                        const __m512i low = _mm512_load_si512(w + TILE_BYTES + kk * 64);
                        for (int t = 0; t < n; t++) bl[t] = dpbusd_broadcast(bl[t], low, x + 2 * t * cols + 4 * kk);
                    }
                }
            }
            const __m512 scale = _mm512_loadu_ps(sc + g * TILE);
            for (int t = 0; t < n; t++) {
                const __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(bl[t]), _mm512_set1_ps(1.0f / 256.0f),
                                                 _mm512_cvtepi32_ps(a[t]));
                acc[t] = _mm512_fmadd_ps(f, scale, acc[t]);
            }
        }
    }
    const float low = (float)LOW_BIAS(m); /* nonzero with tables only */
    for (int t = 0; t < n; t++) {
        const int64_t blocks = cols / BLOCK;
        const float *xblock = in->xblock + (t0 + t) * blocks, *hiblock = in->hiblock + (t0 + t) * blocks;
        const double *xsum = in->xsum + (t0 + t) * (blocks + 1), *hisum = in->hisum + (t0 + t) * (blocks + 1);
        __m512 total = _mm512_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            const int64_t k0 = g * group_blocks, k1 = k0 + group_blocks;
            const float dx = group_blocks == 1 ? xblock[g] : (float)(xsum[k1] - xsum[k0]);
            total = _mm512_fnmadd_ps(_mm512_loadu_ps(off + g * TILE), _mm512_set1_ps(dx), total);
            if (tabled) {
                const float dh = group_blocks == 1 ? hiblock[g] : (float)(hisum[k1] - hisum[k0]);
                total = _mm512_fnmadd_ps(_mm512_loadu_ps(sc + g * TILE), _mm512_set1_ps(low * dh), total);
            }
        }
        float out[TILE];
        _mm512_storeu_ps(out, _mm512_fmadd_ps(_mm512_set1_ps(in->step[t0 + t]), acc[t], total));
        for (int q = 0; q < nrows; q++) y[(t0 + t) * m->rows + rows[q]] = out[q];
    }
}

static void few_token_block(const anybit_matrix *m, const int64_t *rows, int nrows, const coded_input *in,
                            int64_t T, const uint8_t *buf, const float *sc, const float *off, float *y) {
    for (int64_t t0 = 0; t0 < T; t0 += FEW_TOKENS) {
        const int n = (int)(T - t0 < FEW_TOKENS ? T - t0 : FEW_TOKENS);
#define FEW_PASS(m, r, in, t0, N, y)                                                                                   \
    BLOCK_TABLED(m) ? few_token_pass(m, r, nrows, in, t0, N, 1, buf, sc, off, y)                                       \
                    : few_token_pass(m, r, nrows, in, t0, N, 0, buf, sc, off, y)
        WITH_TOKEN_COUNT(FEW_PASS, m, rows, in, t0, n, y)
#undef FEW_PASS
    }
}

/* The row loop of `products` in blocks of 16 rows for few tokens (called by every thread). */
static void few_token_products(const anybit_matrix *const *m, int count, const coded_input *const *coded, int64_t T,
                               float *const *y) {
    int64_t total = 0, wide = 0, most_groups = 0;
    for (int i = 0; i < count; i++) {
        total += (m[i]->rows + TILE - 1) / TILE;
        wide = m[i]->cols > wide ? m[i]->cols : wide;
        most_groups = m[i]->cols / m[i]->group_size > most_groups ? m[i]->cols / m[i]->group_size : most_groups;
    }
    uint8_t *buf = aligned_alloc(64, (size_t)(wide / BLOCK * 2 * TILE_BYTES));
    float *sc = malloc(sizeof(float) * (size_t)(2 * most_groups * TILE));
#pragma omp for schedule(static)
    for (int64_t R = 0; R < total; R++) {
        const int64_t *rows;
        int nrows;
        const int i = row_block(m, R, &rows, &nrows);
        if (!buf || !sc) {
            block_by_rows(m[i], rows, nrows, coded[i], 0, T, y[i]);
            continue;
        }
        const int64_t groups = m[i]->cols / m[i]->group_size;
        float *off = sc + most_groups * TILE;
        for (int64_t g = 0; g < groups; g++)
            for (int q = 0; q < TILE; q++) {
                const int64_t s = rows[q < nrows ? q : 0] * groups + g;
                sc[g * TILE + q] = q < nrows ? m[i]->scale[s] : 0.0f;
                off[g * TILE + q] = q < nrows ? m[i]->scale[s] * (float)OFFSET_BIAS(m[i], s) : 0.0f;
            }
        decode_row_block(m[i], rows, nrows, buf);
        transpose_row_block(buf, m[i]->cols / BLOCK, BLOCK_TABLED(m[i]));
        few_token_block(m[i], rows, nrows, coded[i], T, buf, sc, off, y[i]);
    }
    free(buf), free(sc);
}
#endif
#endif

#define TOKENS_ROWS 0
#define TOKENS_FEW 1
#define TOKENS_REGISTERS 2
#define TOKENS_TILES 3

/* Which path T tokens of `count` matrices sharing an input take (as `products` chooses, when its scratch can be
 * allocated): row by row, few-token blocks of rows, or blocks of rows on registers or on AMX tiles. */
static int token_path(const anybit_matrix *const *m, int count, int64_t T) {
#if defined(PATH_BLOCKS)
    if (block_tokens(T) && !any_row_only(m, count)) return amx_state > 0 ? TOKENS_TILES : TOKENS_REGISTERS;
#if defined(PATH_AVX512)
    if (few_tokens(m, count, T)) return TOKENS_FEW;
#endif
#endif
    (void)m, (void)count, (void)T;
    return TOKENS_ROWS;
}

/* y[i] (T, rows_i) = x (T, cols) W_iᵀ for `count` matrices sharing x, their outliers and biases included;
 * called by every thread of a parallel region: a prompt in blocks of rows (block_products), else row by row. */
static void products(const anybit_matrix *const *m, int count, const float *x, int64_t T, float *const *y,
                     coded_input *in) {
    const coded_input *coded[SCRATCH_INPUTS] = {0};
    for (int i = 0; i < count; i++) coded[i] = shares_input(m, i) ? in : in + i;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) code_token(m, count, x, t, in);
    const int path = token_path(m, count, T);
    (void)path; /* the portable build has only rows */
    int by_rows = 0; /* the row path adds the outliers and biases itself */
#if defined(PATH_BLOCKS)
    if (path >= TOKENS_REGISTERS && in->tiles)
        block_products(m, count, coded, T, y);
    else
#endif
#if defined(PATH_BLOCKS) && defined(PATH_AVX512)
    if (path == TOKENS_FEW)
        few_token_products(m, count, coded, T, y);
    else
#endif
        row_products(m, count, coded, x, T, y), by_rows = 1;
    /* Every thread sees the same matrices, so all take or skip each barrier below together. */
    int64_t units = 0; /* compensation: DEC_ROWS output channels of one token each */
    for (int i = 0; i < count; i++) units += T * dec_units(m[i]);
    if (units) {
#pragma omp for schedule(static)
        for (int64_t U = 0; U < units; U++) {
            int i = 0;
            int64_t u = U;
            while (u >= T * dec_units(m[i])) u -= T * dec_units(m[i++]);
            const anybit_matrix *w = m[i];
            const int64_t per_token = dec_units(w), t = u / per_token;
            const int64_t r0 = (u % per_token) * DEC_ROWS, r1 = r0 + DEC_ROWS < w->rows ? r0 + DEC_ROWS : w->rows;
            compensate(w, x + t * w->cols, in[i].picked + t * w->cols, in[i].n_picked[t], r0, r1, y[i] + t * w->rows);
        }
    }
    int extras = 0;
    for (int i = 0; i < count; i++) extras |= has_extras(m[i]);
    if (extras && !by_rows) { /* after blocks of rows: the same share of the rows as row_products gives a thread */
        thread_extras(m, count, x, T, y);
#pragma omp barrier
    }
}

/* token_path for one matrix: TOKENS_ROWS, TOKENS_FEW, TOKENS_REGISTERS or TOKENS_TILES. */
int anybit_fast_token_path(const anybit_matrix *m, int64_t tokens) {
    init_tables();
    return token_path(&m, 1, tokens);
}

/* y (tokens, rows) = x (tokens, cols) Wᵀ on `threads` threads. Returns 0, or -1 when the scratch for the
 * rounded input cannot be allocated. */
int anybit_fast_matmul(const anybit_matrix *m, const float *x, int64_t tokens, float *y, int threads) {
    init_tables();
    coded_input in;
    if (alloc_input(&in, tokens, m->cols)) {
        free_input(&in);
        return -1;
    }
#pragma omp parallel num_threads(threads)
    products(&m, 1, x, tokens, &y, &in);
    free_input(&in);
    return 0;
}

/* out (rows, cols) = a vector-coded matrix (coded column order), decoded on `threads` threads. */
void anybit_vector_dequantize(const anybit_matrix *m, float *out, int threads) {
    const int64_t dim = m->vq_dim, pieces = m->cols / dim;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t r = 0; r < m->rows; r++) {
        const uint8_t *codes = m->vq_codes + r * m->vq_row_bytes;
        float *row = out + r * m->cols;
        int64_t offset[4];
        for (int64_t p = 0; p < pieces; p++) {
            vq_offsets(m, codes, p, offset);
            for (int j = 0; j < dim; j++) row[dim * p + j] = m->vq_scale[r] * m->vq_table[offset[0] + j];
        }
    }
}

/* Rows ids[0 .. n - 1] of a matrix whose segments are all 8-bit (a block is its 64 codes, one byte each), decoded
 * as the kernel multiplies them (an embedding lookup from the 8-bit head); out (n, cols). */
/* Code j of a row of 8-bit codes: on the AVX-512 path in the stored layout (per 8 codes, byte q holds bit q
 * of each), elsewhere one byte each. */
static inline int code8(const uint8_t *row, int64_t j) {
#if defined(PATH_AVX512)
    const uint8_t *planes = row + (j & ~(int64_t)7);
    int code = 0;
    for (int q = 0; q < 8; q++) code |= ((planes[q] >> (j & 7)) & 1) << q;
    return code;
#else
    return row[j];
#endif
}

void anybit_fast_rows(const anybit_matrix *m, const int64_t *ids, int64_t n, float *out) {
    const int64_t groups = m->cols / m->group_size;
    for (int64_t i = 0; i < n; i++) {
        const uint8_t *row = m->codes + m->row_off[ids[i]];
        for (int64_t g = 0; g < groups; g++) {
            const int64_t s = ids[i] * groups + g;
            const float sc = m->scale[s], offset = (float)m->offset[s];
            const uint8_t *high = m->tables ? m->tables + m->table_off[s] : NULL, *low = high ? high + 256 : NULL;
            float *y = out + i * m->cols + g * m->group_size;
            for (int64_t j = 0; j < m->group_size; j++) {
                const int code = code8(row, g * m->group_size + j);
                y[j] = high ? ((float)high[code] - offset + ((float)low[code] - LOW_TABLE_OFFSET) / 256.0f) * sc
                            : ((float)code - offset) * sc;
            }
        }
    }
}

/* ---- A whole decoder step of the Llama family, with no Python per layer --------------------------------
 * x (tokens at positions pos .. pos + T - 1, already embedded) runs through every layer: RMS norm, q/k/v
 * products (optionally per-head RMS norms of q and k), rotary embedding from precomputed cos/sin tables,
 * attention over the half-precision KV cache (grouped heads, optional sliding window), the output product, the
 * gated SiLU MLP, residual adds; then the final norm and the head product for the last token only (without a
 * head, the normed state is the output). One
 * OpenMP parallel region per step: products and attention split over threads, the small vector work done
 * by one thread between barriers. */

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
    uint16_t *k_cache, *v_cache; /* (layers, kv_heads, max_len, head_dim), IEEE half precision */
} anybit_model;

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

/* The KV cache holds IEEE half-precision floats (half the bytes a long context's decode step reads; llama.cpp's
 * default too). Stores saturate at the largest finite half and round to nearest even; the SIMD builds convert
 * with F16C, the portable one in these functions, to the same bits for every number (a NaN saturates on the
 * SIMD builds, stays NaN on the portable one). */
#define HALF_MAX 65504.0f

static inline uint16_t half_from_float(float value) {
    value = value > HALF_MAX ? HALF_MAX : value < -HALF_MAX ? -HALF_MAX : value;
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    const uint32_t sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN */
    if (magnitude < 0x38800000u) { /* below the smallest normal half: a subnormal or zero */
        if (magnitude < 0x33000000u) return (uint16_t)sign;
        const uint32_t mantissa = (magnitude & 0x7fffffu) | 0x800000u, shift = 126 - (magnitude >> 23);
        const uint32_t half = mantissa >> shift, rest = mantissa & ((1u << shift) - 1), middle = 1u << (shift - 1);
        return (uint16_t)(sign | (half + (rest > middle || (rest == middle && (half & 1)))));
    }
    const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u); /* to nearest even at bit 13 */
    return (uint16_t)(sign | ((rounded - 0x38000000u) >> 13));
}

static inline float float_from_half(uint16_t half) {
    const uint32_t sign = (uint32_t)(half & 0x8000u) << 16, exponent = (half >> 10) & 0x1fu, mantissa = half & 0x3ffu;
    uint32_t bits;
    if (exponent == 0x1f) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else { /* a subnormal: mantissa 2^-24 */
        const float value = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -value : value;
    }
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* n floats to halves, and back. */
static void halves_from_floats(uint16_t *out, const float *in, int64_t n) {
    int64_t i = 0;
#if defined(PATH_AVX512) || defined(PATH_AVX2)
    const __m256 top = _mm256_set1_ps(HALF_MAX), bottom = _mm256_set1_ps(-HALF_MAX);
    for (; i + 8 <= n; i += 8) {
        const __m256 x = _mm256_max_ps(_mm256_min_ps(_mm256_loadu_ps(in + i), top), bottom);
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
    }
#endif
    for (; i < n; i++) out[i] = half_from_float(in[i]);
}

static void floats_from_halves(float *out, const uint16_t *in, int64_t n) {
    int64_t i = 0;
#if defined(PATH_AVX512) || defined(PATH_AVX2)
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + i))));
#endif
    for (; i < n; i++) out[i] = float_from_half(in[i]);
}

#define ATTN_KEYS 64     /* keys per block: a block's keys and values (64 or 128 floats each) stay in L1 */
#define ATTN_QUERIES 16  /* head vectors per unit of attention work (heads sharing a KV head, times tokens) */
/* floats a thread's blocked attention needs: queries, sums, weights */
#define ATTN_SCRATCH (ATTN_QUERIES * (2 * 128 + ATTN_KEYS))

/* One unit of attention work: `count` query vectors of one KV head's group, the i-th at position p[i] over the
 * cached positions lo[i] .. p[i], its output at out[i]. */
typedef struct {
    int count;
    const float *q[ATTN_QUERIES];
    float *out[ATTN_QUERIES];
    int64_t lo[ATTN_QUERIES], p[ATTN_QUERIES];
} query_set;

/* One KV head's cached keys and values (position by position, head_dim halves each) and, where the step widened
 * them (`widens`), the same as floats. */
typedef struct {
    const uint16_t *keys, *values;
    const float *wide_keys, *wide_values; /* NULL: not widened */
} kv_view;

#if defined(PATH_AVX512) || defined(PATH_AVX2)
/* e^x for each lane (x <= 0 here: scores less their maximum, or -|g| for SiLU), to about 2 ulp: 2^n times a
 * degree-6 polynomial of the remainder, Cody-Waite split ln 2; below -87.3 the lanes give about 1e-38, not 0. */
static inline __m256 exp_lanes(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145752f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.42860677e-6f), r);
    __m256 y = _mm256_set1_ps(1.38888889e-3f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.33333333e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.16666667e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.66666667e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(0.5f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.0f));
    const __m256i power = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(power));
}

/* 8 cached floats at element i of `data`: halves (widened here) or floats (inlined with `halves` constant). */
static inline __attribute__((always_inline)) __m256 cached8(const void *data, int64_t i, const int halves) {
    return halves ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)data + i)))
                  : _mm256_loadu_ps((const float *)data + i);
}

/* Asks for cached row j + ATTN_KEYS (D halves or floats), the next block's, while row j is used. On halves, in a
 * block's first pass (`ahead`): one token's attention 1.06-1.09x at 2048 and 4096 positions, unchanged at 512
 * (two blocks ahead: 0.95-0.98x of one); on a long prompt's widened floats it made the attention 0.87x. */
static inline __attribute__((always_inline)) void prefetch_row(const void *data, int64_t j, const int64_t D,
                                                               const int halves) {
    const char *row = (const char *)data + (j + ATTN_KEYS) * D * (halves ? 2 : 4);
    for (int64_t b = 0; b < D * (halves ? 2 : 4); b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
}

/* Scores of Q (1 to 3; inlined with Q, the head size D and `halves` constant) scaled queries qs (D floats apart)
 * against the n keys at `keys` (halves or floats): four keys per pass, query i's scores at s[i * ATTN_KEYS ..]. */
static inline __attribute__((always_inline)) void block_scores(const float *qs, const void *keys, int64_t n,
                                                               const int64_t D, const int Q, const int halves,
                                                               const int ahead, float *s) {
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        const int64_t k = j * D;
        for (int f = 0; ahead && f < 4; f++) prefetch_row(keys, j + f, D, halves);
        __m256 acc[3][4];
        for (int i = 0; i < Q; i++)
            for (int c = 0; c < 4; c++) acc[i][c] = _mm256_setzero_ps();
        const int K = Q == 3 ? 2 : 4; /* keys per sweep: three queries' 12 sums and 4 keys left no register free */
        for (int e = 0; e < 4; e += K)
            for (int64_t c = 0; c < D / 8; c++) {
                __m256 kc[4];
                for (int f = 0; f < K; f++) kc[f] = cached8(keys, k + (e + f) * D + 8 * c, halves);
                for (int i = 0; i < Q; i++) {
                    const __m256 qc = _mm256_loadu_ps(qs + i * D + 8 * c);
                    for (int f = 0; f < K; f++) acc[i][e + f] = _mm256_fmadd_ps(qc, kc[f], acc[i][e + f]);
                }
            }
        for (int i = 0; i < Q; i++) {
            const __m256 pairs =
                _mm256_hadd_ps(_mm256_hadd_ps(acc[i][0], acc[i][1]), _mm256_hadd_ps(acc[i][2], acc[i][3]));
            const __m128 four = _mm_add_ps(_mm256_castps256_ps128(pairs), _mm256_extractf128_ps(pairs, 1));
            _mm_storeu_ps(s + i * ATTN_KEYS + j, four);
        }
    }
    for (; j < n; j++)
        for (int i = 0; i < Q; i++) {
            __m256 a = _mm256_setzero_ps();
            for (int64_t c = 0; c < D / 8; c++)
                a = _mm256_fmadd_ps(_mm256_loadu_ps(qs + i * D + 8 * c), cached8(keys, j * D + 8 * c, halves), a);
            s[i * ATTN_KEYS + j] = lane_sum(a);
        }
}

/* One query's scores of a block (ATTN_KEYS of them) turned into weights: e^(s - top) for the keys first ..
 * last - 1, 0 for the others, top the running maximum over the blocks so far, total their running sum. Returns
 * the factor that rescales what the earlier blocks summed. */
static inline float block_weights(float *s, int64_t first, int64_t last, float *top, float *total) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256 none = _mm256_set1_ps(-INFINITY);
    __m256 high = none;
    for (int j = 0; j < ATTN_KEYS; j += 8) {
        const __m256i index = _mm256_add_epi32(_mm256_set1_epi32(j), lane);
        const __m256i valid = _mm256_andnot_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)first), index),
                                                  _mm256_cmpgt_epi32(_mm256_set1_epi32((int)last), index));
        const __m256 x = _mm256_blendv_ps(none, _mm256_loadu_ps(s + j), _mm256_castsi256_ps(valid));
        _mm256_storeu_ps(s + j, x);
        high = _mm256_max_ps(high, x);
    }
    if (first >= last) return 1.0f; /* no key of this block: the weights are zeros, the sums stand */
    const __m128 four = _mm_max_ps(_mm256_castps256_ps128(high), _mm256_extractf128_ps(high, 1));
    const __m128 two = _mm_max_ps(four, _mm_movehl_ps(four, four));
    const float new_top = fmaxf(*top, fmaxf(_mm_cvtss_f32(two), _mm_cvtss_f32(_mm_movehdup_ps(two))));
    const float rescale = expf(*top - new_top); /* 0 before the first block with keys */
    __m256 sum = _mm256_setzero_ps();
    for (int j = 0; j < ATTN_KEYS; j += 8) {
        const __m256 x = _mm256_loadu_ps(s + j);
        const __m256 e = _mm256_and_ps(exp_lanes(_mm256_sub_ps(x, _mm256_set1_ps(new_top))),
                                       _mm256_cmp_ps(x, none, _CMP_NEQ_OQ));
        _mm256_storeu_ps(s + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    *total = *total * rescale + lane_sum(sum);
    *top = new_top;
    return rescale;
}

/* acc_i = acc_i * rescale[i] + sum over keys a .. b - 1 of w_i[j] values[j], for Q (1 to 3) queries (acc D
 * floats apart, weights ATTN_KEYS apart): 8 C floats of the head at a time (C 4 for one or two queries, 2 for
 * three, which keeps the sums, the values and a weight in AVX2's 16 registers), held in registers. */
static inline __attribute__((always_inline)) void block_values(const float *w, const void *values, int64_t a,
                                                               int64_t b, const int64_t D, const int Q,
                                                               const int halves, const int ahead,
                                                               const float *rescale, float *acc) {
    const int C = Q == 3 ? 2 : 4;
    for (int64_t h = 0; h < D; h += 8 * C) {
        __m256 r[3][4], v[4];
        for (int i = 0; i < Q; i++)
            for (int c = 0; c < C; c++)
                r[i][c] = _mm256_mul_ps(_mm256_loadu_ps(acc + i * D + h + 8 * c), _mm256_set1_ps(rescale[i]));
        for (int64_t j = a; j < b; j++) {
            if (ahead && h == 0) prefetch_row(values, j, D, halves);
            for (int c = 0; c < C; c++) v[c] = cached8(values, j * D + h + 8 * c, halves);
            for (int i = 0; i < Q; i++) {
                const __m256 wi = _mm256_broadcast_ss(w + i * ATTN_KEYS + j);
                for (int c = 0; c < C; c++) r[i][c] = _mm256_fmadd_ps(wi, v[c], r[i][c]);
            }
        }
        for (int i = 0; i < Q; i++)
            for (int c = 0; c < C; c++) _mm256_storeu_ps(acc + i * D + h + 8 * c, r[i][c]);
    }
}

/* A query set over one KV head's keys and values, for heads of D floats (64 or 128; inlined with D constant):
 * the keys in blocks of ATTN_KEYS read once for every query of the set, two or three queries per pass, each
 * half widened as it is loaded (unless the view has them as floats: widening each block into scratch first made
 * one-token attention 1.36-1.40x slower, kernel_ab.py --attention), the softmax kept running over the blocks
 * (its maximum, its sum, the weighted values rescaled when the maximum grows). Without `state` each output is
 * normalized; with it, query i's maximum, sum and unnormalized values go to state + i (D + 2) (a query without
 * keys: -inf, 0 and zeros) for `combine_states`. */
static inline __attribute__((always_inline)) void attend_blocked(const query_set *set, const kv_view *kv,
                                                                 const int64_t D, float scale, float *scratch,
                                                                 float *state) {
    float *qs = scratch, *acc = qs + ATTN_QUERIES * D, *w = acc + ATTN_QUERIES * D;
    const int halves = !kv->wide_keys; /* read the cache's halves, widening each as it is loaded */
    /* queries per pass: three where each key and value is widened as loaded (a GQA group of 3 reads each once:
     * one token's attention 1.08-1.09x at 2048 positions); two on floats (three: a 2048-token prompt's 0.84-0.87x,
     * with fewer independent sums and more loads per product; kernel_ab.py --attention) */
    const int most = halves ? 3 : 2;
    float top[ATTN_QUERIES], total[ATTN_QUERIES], rescale[ATTN_QUERIES];
    int64_t lo = INT64_MAX, hi = -1, first[ATTN_QUERIES], last[ATTN_QUERIES];
    const int count = set->count;
    for (int i = 0; i < count; i++) {
        for (int64_t c = 0; c < D; c++) qs[i * D + c] = set->q[i][c] * scale, acc[i * D + c] = 0.0f;
        top[i] = -INFINITY, total[i] = 0.0f;
        if (set->lo[i] > set->p[i]) continue;
        lo = set->lo[i] < lo ? set->lo[i] : lo, hi = set->p[i] > hi ? set->p[i] : hi;
    }
    for (int64_t j0 = lo; j0 <= hi; j0 += ATTN_KEYS) {
        const int64_t n = hi + 1 - j0 < ATTN_KEYS ? hi + 1 - j0 : ATTN_KEYS;
        const void *kb = halves ? (const void *)(kv->keys + j0 * D) : kv->wide_keys + j0 * D;
        const void *vb = halves ? (const void *)(kv->values + j0 * D) : kv->wide_values + j0 * D;
        /* block_scores and block_values for Q of 1 to 3 queries from query i, with Q and `halves` constant */
#define SCORES(Q) (halves ? block_scores(qs + i * D, kb, n, D, Q, 1, i == 0, w + i * ATTN_KEYS)                      \
                          : block_scores(qs + i * D, kb, n, D, Q, 0, 0, w + i * ATTN_KEYS))
#define VALUES(Q) (halves ? block_values(w + i * ATTN_KEYS, vb, a, b, D, Q, 1, i == 0, rescale + i, acc + i * D)     \
                          : block_values(w + i * ATTN_KEYS, vb, a, b, D, Q, 0, 0, rescale + i, acc + i * D))
        for (int i = 0, q; i < count; i += q) {
            q = count - i < most ? count - i : most;
            q == 3 ? SCORES(3) : q == 2 ? SCORES(2) : SCORES(1);
        }
        for (int i = 0; i < count; i++) {
            first[i] = set->lo[i] > j0 ? set->lo[i] - j0 : 0;
            last[i] = set->p[i] + 1 - j0 < n ? set->p[i] + 1 - j0 : n;
            rescale[i] = block_weights(w + i * ATTN_KEYS, first[i], last[i], top + i, total + i);
        }
        for (int i = 0, q; i < count; i += q) {
            q = count - i < most ? count - i : most;
            int64_t a = first[i], b = last[i];
            for (int e = i + 1; e < i + q; e++) a = first[e] < a ? first[e] : a, b = last[e] > b ? last[e] : b;
            q == 3 ? VALUES(3) : q == 2 ? VALUES(2) : VALUES(1);
        }
#undef SCORES
#undef VALUES
    }
    for (int i = 0; i < count; i++) {
        if (state) {
            float *mine = state + i * (D + 2);
            mine[0] = top[i], mine[1] = total[i];
            memcpy(mine + 2, acc + i * D, sizeof(float) * D);
            continue;
        }
        const __m256 inverse = _mm256_set1_ps(1.0f / total[i]);
        for (int64_t c = 0; c < D; c += 8)
            _mm256_storeu_ps(set->out[i] + c, _mm256_mul_ps(_mm256_loadu_ps(acc + i * D + c), inverse));
    }
}
#endif

/* One attention head for one token at position p over cached positions lo .. p; out (head_dim). */
static void attend(const float *q, const uint16_t *keys, const uint16_t *values, int64_t lo, int64_t p, int64_t d,
                   float scale, float *scores, float *out) {
    float top = -INFINITY;
    for (int64_t j = lo; j <= p; j++) {
        float s = 0.0f;
        for (int64_t i = 0; i < d; i++) s += q[i] * float_from_half(keys[j * d + i]);
        scores[j] = s * scale;
        top = fmaxf(top, scores[j]);
    }
    float total = 0.0f;
    for (int64_t j = lo; j <= p; j++) total += scores[j] = expf(scores[j] - top);
    for (int64_t i = 0; i < d; i++) out[i] = 0.0f;
    for (int64_t j = lo; j <= p; j++) {
        const float w = scores[j] / total;
        for (int64_t i = 0; i < d; i++) out[i] += w * float_from_half(values[j * d + i]);
    }
}

/* Whether attend_set computes heads of d floats in blocks of keys (which alone can split the keys: `state`). */
static int blocked_heads(int64_t d) {
#if defined(PATH_AVX512) || defined(PATH_AVX2)
    return d == 64 || d == 128;
#else
    (void)d;
    return 0;
#endif
}

/* A query set over one KV head's keys and values (heads of d floats); scratch holds ATTN_SCRATCH floats and
 * then one per cached position; `state` as for attend_blocked (NULL where not blocked_heads(d)). */
static void attend_set(const query_set *set, const kv_view *kv, int64_t d, float scale, float *scratch,
                       float *state) {
#if defined(PATH_AVX512) || defined(PATH_AVX2)
    if (d == 64 || d == 128) {
        if (d == 64)
            attend_blocked(set, kv, 64, scale, scratch, state);
        else
            attend_blocked(set, kv, 128, scale, scratch, state);
        return;
    }
#endif
    (void)state; /* only blocked heads split their keys */
    for (int i = 0; i < set->count; i++)
        attend(set->q[i], kv->keys, kv->values, set->lo[i], set->p[i], d, scale, scratch + ATTN_SCRATCH, set->out[i]);
}

/* out = the softmax-weighted values of `splits` partial states of one query (attend_blocked's, `stride` floats
 * apart), each over its own keys. */
static void combine_states(const float *state, int64_t splits, int64_t stride, int64_t d, float *out) {
    float top = -INFINITY, total = 0.0f;
    for (int64_t s = 0; s < splits; s++) top = fmaxf(top, state[s * stride]);
    for (int64_t c = 0; c < d; c++) out[c] = 0.0f;
    for (int64_t s = 0; s < splits; s++) {
        const float *part = state + s * stride, weight = expf(part[0] - top); /* 0 for a split without keys */
        total += weight * part[1];
        for (int64_t c = 0; c < d; c++) out[c] += weight * part[2 + c];
    }
    for (int64_t c = 0; c < d; c++) out[c] /= total;
}

#define ATTN_SPLIT_KEYS 256 /* the fewest cached positions per split of the keys */

/* How T tokens' attention is cut into units of work: query sets of `heads` heads of one KV head's group times
 * `tokens` tokens, each over `splits` ranges of `span` cached positions. */
typedef struct {
    int64_t heads, tokens, head_blocks, token_blocks, sets, splits, span;
} attention_plan;

static attention_plan plan_attention(const anybit_model *M, int64_t T, int64_t pos, int threads) {
    attention_plan a;
    const int64_t group = M->heads / M->kv_heads;
    a.heads = group < ATTN_QUERIES ? group : ATTN_QUERIES;
    a.tokens = ATTN_QUERIES / a.heads;
    a.head_blocks = (group + a.heads - 1) / a.heads, a.token_blocks = (T + a.tokens - 1) / a.tokens;
    a.sets = M->kv_heads * a.head_blocks * a.token_blocks;
    a.splits = 1;
    if (blocked_heads(M->head_dim) && a.sets < 2 * threads) { /* too few sets to share: split the keys too */
        const int64_t keys = pos + T, most = keys / ATTN_SPLIT_KEYS > 1 ? keys / ATTN_SPLIT_KEYS : 1;
        a.splits = (2 * threads + a.sets - 1) / a.sets;
        a.splits = a.splits < most ? a.splits : most;
    }
    a.span = (pos + T + a.splits - 1) / a.splits;
    return a;
}

/* Query set `index` of a plan (later tokens, which see more keys, first). */
static void plan_set(const anybit_model *M, const attention_plan *a, const float *q, float *attn, int64_t T,
                     int64_t pos, int64_t index, query_set *set) {
    const int64_t hd = M->head_dim, q_dim = M->heads * hd, group = M->heads / M->kv_heads;
    const int64_t per_token_block = M->kv_heads * a->head_blocks, kvh = index % M->kv_heads;
    const int64_t h0 = kvh * group + (index / M->kv_heads) % a->head_blocks * a->heads;
    const int64_t t0 = (a->token_blocks - 1 - index / per_token_block) * a->tokens;
    const int64_t h1 = h0 + a->heads < (kvh + 1) * group ? h0 + a->heads : (kvh + 1) * group;
    const int64_t t1 = t0 + a->tokens < T ? t0 + a->tokens : T;
    set->count = 0;
    for (int64_t t = t0; t < t1; t++)
        for (int64_t h = h0; h < h1; h++) {
            const int64_t p = pos + t, c = set->count++;
            set->q[c] = q + t * q_dim + h * hd, set->out[c] = attn + t * q_dim + h * hd;
            set->p[c] = p, set->lo[c] = M->window > 0 && p - M->window + 1 > 0 ? p - M->window + 1 : 0;
        }
}

/* Whether a step widens each layer's cached keys and values to float once, before its attention: where several
 * query sets of one KV head would each widen them block by block. */
static int widens(const anybit_model *M, int64_t T, int64_t pos) {
    return blocked_heads(M->head_dim) && plan_attention(M, T, pos, 1).token_blocks > 1;
}

/* Scratch memory for `attention` of T tokens at pos on up to `threads` threads: per thread ATTN_SCRATCH floats and
 * one per cached position, then the states of split keys (fewer than 4 units per thread where plan_attention
 * splits), then where the step `widens`, every KV head's keys and values up to the last token as floats. NULL
 * when it cannot be allocated. */
static float *attention_scratch(const anybit_model *M, int64_t T, int64_t pos, int threads) {
    const int64_t wide = widens(M, T, pos) ? 2 * M->kv_heads * (pos + T) * M->head_dim : 0;
    const int64_t partial = 4 * ATTN_QUERIES * (M->head_dim + 2);
    return malloc(sizeof(float) * ((size_t)threads * (ATTN_SCRATCH + M->max_len + partial) + wide));
}

/* Attention of T tokens at positions pos .. (their keys and values cached) inside a parallel region of at most
 * `threads` threads, per plan_attention; scratch from attention_scratch. */
static void attention(const anybit_model *M, const float *q, const uint16_t *kc, const uint16_t *vc, int64_t T,
                      int64_t pos, float *scratch, int threads, float *attn) {
    const int64_t hd = M->head_dim, stride = hd + 2, span = pos + T;
    const attention_plan a = plan_attention(M, T, pos, omp_threads());
    float *own = scratch + (int64_t)omp_thread() * (ATTN_SCRATCH + M->max_len);
    float *partial = scratch + (int64_t)threads * (ATTN_SCRATCH + M->max_len);
    float *wide = widens(M, T, pos) ? partial + (int64_t)threads * 4 * ATTN_QUERIES * stride : NULL;
    if (wide) {
        const int64_t chunks = (span + ATTN_KEYS - 1) / ATTN_KEYS;
#pragma omp for schedule(static)
        for (int64_t c = 0; c < 2 * M->kv_heads * chunks; c++) { /* keys, then values, ATTN_KEYS positions each */
            const int64_t head = c / chunks, p0 = c % chunks * ATTN_KEYS;
            const int64_t n = span - p0 < ATTN_KEYS ? span - p0 : ATTN_KEYS, kvh = head % M->kv_heads;
            const uint16_t *cache = (head < M->kv_heads ? kc : vc) + kvh * M->max_len * hd;
            floats_from_halves(wide + (head * span + p0) * hd, cache + p0 * hd, n * hd);
        }
    }
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < a.sets * a.splits; u++) {
        query_set set;
        plan_set(M, &a, q, attn, T, pos, u / a.splits, &set);
        const int64_t kvh = u / a.splits % M->kv_heads, from = u % a.splits * a.span, to = from + a.span - 1;
        for (int i = 0; a.splits > 1 && i < set.count; i++) {
            set.lo[i] = set.lo[i] > from ? set.lo[i] : from;
            set.p[i] = set.p[i] < to ? set.p[i] : to;
        }
        const kv_view kv = {kc + kvh * M->max_len * hd, vc + kvh * M->max_len * hd,
                            wide ? wide + kvh * span * hd : NULL, wide ? wide + (M->kv_heads + kvh) * span * hd : NULL};
        attend_set(&set, &kv, hd, M->attn_scale, own, a.splits > 1 ? partial + u * ATTN_QUERIES * stride : NULL);
    }
    if (a.splits == 1) return;
#pragma omp for schedule(static)
    for (int64_t index = 0; index < a.sets; index++) {
        query_set set;
        plan_set(M, &a, q, attn, T, pos, index, &set);
        for (int i = 0; i < set.count; i++)
            combine_states(partial + (index * a.splits * ATTN_QUERIES + i) * stride, a.splits,
                           ATTN_QUERIES * stride, hd, set.out[i]);
    }
}

/* n floats rounded to the KV cache's halves (tests: the conversions of every build against torch's). */
void anybit_halves(const float *in, int64_t n, uint16_t *out) { halves_from_floats(out, in, n); }

/* The decode step's attention alone (tests, benchmarks): queries q (T, heads, head_dim) of the tokens at
 * positions pos .. pos + T - 1 over the cache (kv_heads, max_len, head_dim) up to them, as anybit_decode_step
 * runs it, into out (T, heads, head_dim). Returns 0, or -1 when scratch memory cannot be allocated. */
int anybit_attention(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, int64_t T, int64_t pos,
                     int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t max_len, int64_t window, float scale,
                     float *out, int threads) {
    const anybit_model M = {.heads = heads, .kv_heads = kv_heads, .head_dim = head_dim, .max_len = max_len,
                            .window = window, .attn_scale = scale};
    float *scratch = attention_scratch(&M, T, pos, threads);
    if (!scratch) return -1;
#pragma omp parallel num_threads(threads)
    attention(&M, q, k_cache, v_cache, T, pos, scratch, threads, out);
    free(scratch);
    return 0;
}

/* gate[j] = silu(gate[j]) up[j] for the 8 elements from j (fewer at the end, n): g / (1 + e^-g) from e^-|g|, the
 * SIMD builds' exp of 8 lanes (libm's expf took 2.5 % of a decode step, by hand). */
static void silu_times_8(float *gate, const float *up, int64_t j, int64_t n) {
#if defined(PATH_AVX512) || defined(PATH_AVX2)
    if (j + 8 <= n) {
        const __m256 g = _mm256_loadu_ps(gate + j), one = _mm256_set1_ps(1.0f);
        const __m256 e = exp_lanes(_mm256_or_ps(g, _mm256_set1_ps(-0.0f))); /* e^-|g| */
        const __m256 high = _mm256_div_ps(one, _mm256_add_ps(one, e));      /* sigmoid(|g|) */
        const __m256 sigmoid = _mm256_blendv_ps(high, _mm256_mul_ps(e, high), g); /* g < 0: e / (1 + e) */
        _mm256_storeu_ps(gate + j, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_loadu_ps(up + j)));
        return;
    }
#endif
    for (int64_t i = j; i < j + 8 && i < n; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* Runs T tokens (embedded in x, T × hidden, overwritten) at positions pos ..; writes the last token's logits
 * (vocab). Returns 0, or -1 when scratch memory cannot be allocated. */
int anybit_decode_step(const anybit_model *M, float *x, int64_t T, int64_t pos, float *logits, int threads) {
    init_tables();
    const int64_t H = M->hidden, hd = M->head_dim, q_dim = M->heads * hd, kv_dim = M->kv_heads * hd;
    const int64_t wide = H > M->intermediate ? H : M->intermediate;
    float *normed = malloc(sizeof(float) * T * wide), *q = malloc(sizeof(float) * T * q_dim);
    float *k = malloc(sizeof(float) * T * kv_dim), *v = malloc(sizeof(float) * T * kv_dim);
    float *attn = malloc(sizeof(float) * T * q_dim), *out = malloc(sizeof(float) * T * H);
    float *gate = malloc(sizeof(float) * T * M->intermediate), *up = malloc(sizeof(float) * T * M->intermediate);
    float *scratch = attention_scratch(M, T, pos, threads);
    coded_input in[SCRATCH_INPUTS];
    int failed = !normed || !q || !k || !v || !attn || !out || !gate || !up || !scratch;
    for (int i = 0; i < SCRATCH_INPUTS; i++) failed |= alloc_input(in + i, T, wide);
    if (!failed) {
#pragma omp parallel num_threads(threads)
        {
            for (int64_t l = 0; l < M->n_layers; l++) {
                const anybit_layer *L = M->layers + l;
                uint16_t *kc = M->k_cache + l * M->kv_heads * M->max_len * hd;
                uint16_t *vc = M->v_cache + l * M->kv_heads * M->max_len * hd;
#pragma omp for schedule(static)
                for (int64_t t = 0; t < T; t++) rms_norm(x + t * H, L->attn_norm, H, M->eps, normed + t * H);
                const anybit_matrix *qkv[3] = {&L->q, &L->k, &L->v};
                float *qkv_out[3] = {q, k, v};
                products(qkv, 3, normed, T, qkv_out, in);
#pragma omp for schedule(static)
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
                        halves_from_floats(kc + (h * M->max_len + p) * hd, kh, hd);
                        halves_from_floats(vc + (h * M->max_len + p) * hd, v + t * kv_dim + h * hd, hd);
                    }
                }
                attention(M, q, kc, vc, T, pos, scratch, threads, attn);
                const anybit_matrix *o[1] = {&L->o};
                float *o_out[1] = {out};
                products(o, 1, attn, T, o_out, in);
#pragma omp for schedule(static)
                for (int64_t t = 0; t < T; t++) {
                    for (int64_t j = 0; j < H; j++) x[t * H + j] += out[t * H + j];
                    rms_norm(x + t * H, L->mlp_norm, H, M->eps, normed + t * H);
                }
                const anybit_matrix *gu[2] = {&L->gate, &L->up};
                float *gu_out[2] = {gate, up};
                products(gu, 2, normed, T, gu_out, in);
#pragma omp for schedule(static)
                for (int64_t j = 0; j < T * M->intermediate; j += 8) silu_times_8(gate, up, j, T * M->intermediate);
                const anybit_matrix *down[1] = {&L->down};
                float *down_out[1] = {out};
                products(down, 1, gate, T, down_out, in);
#pragma omp for schedule(static)
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
    free(normed), free(q), free(k), free(v), free(attn), free(out), free(gate), free(up), free(scratch);
    for (int i = 0; i < SCRATCH_INPUTS; i++) free_input(in + i);
    return failed ? -1 : 0;
}
