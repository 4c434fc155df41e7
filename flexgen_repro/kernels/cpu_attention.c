/* Decode attention on the CPU: one new token per (row, head) over a head-major KV cache.
 *
 * Built at first use by kernels/cpu_attention.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes, so the GIL is released and the call runs on its own OpenMP team.
 *
 * Each (row, head) reads its K block once (scores), then its V block once (weighted sum); the
 * cache is read in its own dtype (float16, bfloat16 or float32) and widened in registers, with
 * float32 accumulation and softmax. Only the first n_prev positions are read (the written ones);
 * masked positions are not read at all, and V rows of negligible weight are not read.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define FG_VEC 1
#endif

enum { FG_F32 = 0, FG_F16 = 1, FG_BF16 = 2 };

/* A position whose softmax weight is below this (relative to the largest, which is 1) is skipped:
 * its V row is not read. Even 2^16 such positions change the result by under 2^-24 relative, below
 * float32 rounding; and exp() of a very negative score is subnormal, which x86 multiplies ~100x
 * slower (an unscaled random query made the whole call 4x slower). */
#define FG_NEGLIGIBLE 0x1p-40f

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else {  /* subnormal: normalise */
        int e = -1;
        do { e++; man <<= 1; } while (!(man & 0x400u));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((man & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static uint16_t float_to_half(float f) {  /* round to nearest even */
#ifdef FG_VEC
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0));
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);          /* overflows to inf */
    if (ax < 0x38800000u) {                                             /* subnormal or zero */
        float a;
        memcpy(&a, &ax, 4);
        return (uint16_t)(sign | (uint32_t)nearbyintf(a * 16777216.0f));
    }
    uint32_t r = ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u;
    return (uint16_t)(sign | (r >> 13));
#endif
}

static uint16_t float_to_bf16(float f) {  /* round to nearest even; NaN stays NaN */
    uint32_t x;
    memcpy(&x, &f, 4);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40u);
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

static float load1(const void *p, long i, int dtype) {
    if (dtype == FG_F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    if (dtype == FG_F16) return half_to_float(h);
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static void store1(void *p, long i, float f, int dtype) {
    if (dtype == FG_F32) ((float *)p)[i] = f;
    else ((uint16_t *)p)[i] = dtype == FG_F16 ? float_to_half(f) : float_to_bf16(f);
}

#ifdef FG_VEC
static inline __m256 load8(const void *p, long i, int dtype) {
    if (dtype == FG_F32) return _mm256_loadu_ps((const float *)p + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (dtype == FG_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

static inline float hsum8(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* sum_i qf[i] * x[i] for one row x of d elements. */
static float dot_row(const float *qf, const void *x, long off, int d, int dtype) {
    int i = 0;
    float s = 0.0f;
#ifdef FG_VEC
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= d; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qf + i), load8(x, off + i, dtype), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qf + i + 8), load8(x, off + i + 8, dtype), a1);
    }
    for (; i + 8 <= d; i += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qf + i), load8(x, off + i, dtype), a0);
    s = hsum8(_mm256_add_ps(a0, a1));
#endif
    for (; i < d; i++) s += qf[i] * load1(x, off + i, dtype);
    return s;
}

/* acc[i] += p * x[i] for one row x of d elements. */
static void axpy_row(float *acc, float p, const void *x, long off, int d, int dtype) {
    int i = 0;
#ifdef FG_VEC
    __m256 pv = _mm256_set1_ps(p);
    for (; i + 8 <= d; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, load8(x, off + i, dtype), _mm256_loadu_ps(acc + i)));
#endif
    for (; i < d; i++) acc[i] += p * load1(x, off + i, dtype);
}

/* One (row b, query head h): scores over the attendable positions, softmax, weighted sum of V.
 * Query head h reads KV head h / group (grouped-query attention; group 1 is multi-head). */
static void attend_one(int dtype, int d, long n_prev, long b, long h, long heads, long group,
                       const void *q, const void *k, const void *v, const long *ks, const long *vs,
                       const uint8_t *mask, long mask_stride, const void *k_new, const void *v_new,
                       const uint8_t *new_mask, void *out, float *scores, float *qf, float *acc) {
    long qoff = (b * heads + h) * d, kvh = h / group, newoff = (b * (heads / group) + kvh) * d;
    for (int i = 0; i < d; i++) qf[i] = load1(q, qoff + i, dtype);
    const uint8_t *m = mask + b * mask_stride;
    long kbase = b * ks[0] + kvh * ks[1], vbase = b * vs[0] + kvh * vs[1];
    float mx = -INFINITY;
    for (long j = 0; j < n_prev; j++) {
        scores[j] = m[j] ? dot_row(qf, k, kbase + j * ks[2], d, dtype) : -INFINITY;
        if (scores[j] > mx) mx = scores[j];
    }
    int has_new = k_new != NULL && new_mask[b];
    float s_new = has_new ? dot_row(qf, k_new, newoff, d, dtype) : -INFINITY;
    if (s_new > mx) mx = s_new;
    for (int i = 0; i < d; i++) acc[i] = 0.0f;
    float total = 0.0f;
    if (mx != -INFINITY) {
        for (long j = 0; j < n_prev; j++) {
            if (!m[j]) continue;
            float p = expf(scores[j] - mx);
            if (p < FG_NEGLIGIBLE) continue;
            total += p;
            axpy_row(acc, p, v, vbase + j * vs[2], d, dtype);
        }
        if (has_new) {
            float p = expf(s_new - mx);
            total += p;
            axpy_row(acc, p, v_new, newoff, d, dtype);
        }
    }
    float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int i = 0; i < d; i++) store1(out, qoff + i, acc[i] * inv, dtype);
}

/* q, out: contiguous (rows, heads, d); k_new, v_new: contiguous (rows, heads / group, d). k, v:
 * (rows, heads / group, >= n_prev, d) with element
 * strides ks, vs for (row, head, position) and the last dim contiguous. mask: (rows, >= n_prev)
 * bytes, row stride mask_stride; new_mask: one byte per row for the new token (k_new may be NULL:
 * no new token). A row with nothing to attend gives zeros. Returns 0, or -1 when out of memory. */
int fg_decode_attention(int dtype, long rows, long heads, long group, int d, long n_prev,
                        const void *q, const void *k, const void *v, const long *ks, const long *vs,
                        const uint8_t *mask, long mask_stride, const void *k_new, const void *v_new,
                        const uint8_t *new_mask, void *out, int n_threads) {
    int failed = 0;
#pragma omp parallel num_threads(n_threads) reduction(| : failed)
    {
        float *scores = malloc(sizeof(float) * (size_t)(n_prev + 1));
        float *qf = malloc(sizeof(float) * (size_t)d), *acc = malloc(sizeof(float) * (size_t)d);
        int ok = scores && qf && acc;
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < rows * heads; t++) {
            if (ok) attend_one(dtype, d, n_prev, t / heads, t % heads, heads, group, q, k, v, ks, vs,
                               mask, mask_stride, k_new, v_new, new_mask, out, scores, qf, acc);
            else failed = 1;
        }
        free(scores);
        free(qf);
        free(acc);
    }
    return failed ? -1 : 0;
}
