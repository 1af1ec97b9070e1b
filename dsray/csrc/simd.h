// The vector primitives of cpu_kernels.c, for the two instruction sets it is built for
// (dsray/kernel_build.py picks one by the CPU's flags):
//
//   AVX512-BF16 (Intel Cooper Lake, Sapphire Rapids and later; AMD Zen 4 and later): a vector is
//     32 bf16; `vdpbf16ps` multiplies 16 pairs of them and adds each pair's two products to one
//     fp32 lane, in one instruction.
//   AVX2 + FMA (every x86-64 CPU since ~2015): a vector is 16 bf16. A bf16 is the top half of an
//     fp32, so a pair product is a shift or a mask per operand (the even element of each pair
//     shifted up, the odd one masked in place), a multiply and an FMA per 8 lanes.
//
// Either way `vdp(acc, a, b)` leaves in lane i of acc: acc[i] + a[2i] b[2i] + a[2i+1] b[2i+1] in
// fp32. Products of two bf16 are exact in fp32, so the two paths differ only in the order of fp32
// additions, as any two dot-product kernels do. Wide tiles (cpu_kernels.c) exist only for
// AVX512-BF16; the narrow and square tiles, the thread pool and every kernel built on them are
// shared.
#pragma once

#include <immintrin.h>

#include "cpu_kernels.h"

#if defined(__AVX512BF16__)

#define DSRAY_WIDE_TILES 1
#define DSRAY_WIDEN_X 0  // the tiles read X as bf16
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define DSRAY_AMX 1  // a wide slot's products may take the AMX tiles (cpu_kernels.c, dsray_use_amx)
#else
#define DSRAY_AMX 0
#endif
#define VK 32  // bf16 per vector
#define SQUARE_N 4  // weight rows of a square tile: 4 x 4 accumulators of the 32 registers

typedef __m512bh vbh;
typedef __m512 vacc;
typedef bf16 xrow_t;  // an element of X as the tiles read it

static inline vbh load_bh(const bf16* p) { return (__m512bh)_mm512_loadu_si512((const void*)p); }

static inline vbh load_bh_tail(const bf16* p, int n) {
    return (__m512bh)_mm512_maskz_loadu_epi16(_bzhi_u32(0xffffffffu, (unsigned)n), (const void*)p);
}

static inline vacc vzero(void) { return _mm512_setzero_ps(); }
static inline vacc vadd(vacc a, vacc b) { return _mm512_add_ps(a, b); }
static inline vacc vdp(vacc acc, vbh a, vbh b) { return _mm512_dpbf16_ps(acc, a, b); }
static inline float vsum(vacc a) { return _mm512_reduce_add_ps(a); }

// The sums of the 16 lanes of a, b, c and d, as one vector: lanes are added pairwise across the four
// vectors at each step (256-bit halves, then 128-bit quarters, then within quarters).
static inline __m128 hsum4(vacc a, vacc b, vacc c, vacc d) {
    // [a0+a2 a1+a3 b0+b2 b1+b3] by 128-bit quarter, likewise c with d
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xee));
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xee));
    // one quarter each of a, b, c, d: the sum of all four of that vector's quarters
    __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xdd));
    q = _mm512_add_ps(q, _mm512_permute_ps(q, 0x4e));  // within each quarter: [x0+x2 x1+x3 ...]
    q = _mm512_add_ps(q, _mm512_permute_ps(q, 0xb1));  // every lane of a quarter holds its sum
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), q));
}

// Read n contiguous elements once, front to back, so that they sit in L2 for the tiles that follow.
static volatile int warm_sink;
static void warm(const bf16* p, long n) {
    const char* c = (const char*)p;
    __m512i acc = _mm512_setzero_si512();
    for (long o = 0; o + 64 <= n * (long)sizeof(bf16); o += 64) acc = _mm512_or_si512(acc, _mm512_loadu_si512(c + o));
    warm_sink = _mm512_reduce_or_epi32(acc);
}

// Lanes of fp32 that `load_f32` and `store_bf16` move at once.
#define VF 16
typedef __m512 vf32;

// bf16 p[0:n] (n <= VF) widened to fp32, zero past n.
static inline vf32 load_f32(const bf16* p, int n) {
    __m256i h = _mm256_maskz_loadu_epi16((__mmask16)_bzhi_u32(0xffff, (unsigned)n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// p[0:n] = bf16(v[0:n]), round to nearest even.
static inline void store_bf16(bf16* p, vf32 v, int n) {
    _mm256_mask_storeu_epi16(p, (__mmask16)_bzhi_u32(0xffff, (unsigned)n), (__m256i)_mm512_cvtneps_pbh(v));
}

static inline vf32 vf_set1(float f) { return _mm512_set1_ps(f); }
static inline vf32 vf_fmadd(vf32 a, vf32 b, vf32 c) { return _mm512_fmadd_ps(a, b, c); }
static inline vf32 vf_add(vf32 a, vf32 b) { return _mm512_add_ps(a, b); }
static inline vf32 vf_mul(vf32 a, vf32 b) { return _mm512_mul_ps(a, b); }
static inline vf32 vf_zero(void) { return _mm512_setzero_ps(); }
static inline vf32 vf_loadu(const float* p) { return _mm512_loadu_ps(p); }
static inline float vf_sum(vf32 a) { return _mm512_reduce_add_ps(a); }

#elif defined(__AVX2__) && defined(__FMA__)

#define DSRAY_WIDE_TILES 0
#define DSRAY_AMX 0
#define DSRAY_WIDEN_X 1  // the tiles read X widened to fp32 (cpu_kernels.c, widen_rows)
#define VK 16
#define SQUARE_N 2  // 4 x 2 accumulators and the operands' halves fit the 16 registers

typedef __m256i vbh;
typedef __m256 vacc;
typedef float xrow_t;

static inline vbh load_bh(const bf16* p) { return _mm256_loadu_si256((const __m256i*)p); }

static inline vbh load_bh_tail(const bf16* p, int n) {
    bf16 buf[VK] = {0};
    memcpy(buf, p, sizeof(bf16) * (size_t)n);
    return _mm256_loadu_si256((const __m256i*)buf);
}

static inline vacc vzero(void) { return _mm256_setzero_ps(); }
static inline vacc vadd(vacc a, vacc b) { return _mm256_add_ps(a, b); }

// The even elements of each bf16 pair as fp32 (shifted into the top half), and the odd ones (in place).
static inline __m256 bf16_even(vbh v) { return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)); }
static inline __m256 bf16_odd(vbh v) { return _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xffff0000u))); }

// The pair products are summed first (a multiply, then an FMA) and added to acc last: the add is
// the only step on acc's dependency chain, and it runs on other pipes than the products.
static inline vacc vdp(vacc acc, vbh a, vbh b) {
    return _mm256_add_ps(acc, _mm256_fmadd_ps(bf16_even(a), bf16_even(b), _mm256_mul_ps(bf16_odd(a), bf16_odd(b))));
}

static inline float vsum(vacc a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// [sum(a), sum(b), sum(c), sum(d)]: two rounds of pairwise horizontal adds, then the two halves.
static inline __m128 hsum4(vacc a, vacc b, vacc c, vacc d) {
    __m256 q = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1));
}

static volatile int warm_sink;
static void warm(const bf16* p, long n) {
    const char* c = (const char*)p;
    __m256i acc = _mm256_setzero_si256();
    for (long o = 0; o + 32 <= n * (long)sizeof(bf16); o += 32)
        acc = _mm256_or_si256(acc, _mm256_loadu_si256((const __m256i*)(c + o)));
    warm_sink = _mm256_movemask_epi8(acc);
}

#define VF 8
typedef __m256 vf32;

static inline vf32 load_f32(const bf16* p, int n) {
    __m128i h;
    if (n >= VF) {
        h = _mm_loadu_si128((const __m128i*)p);
    } else {
        bf16 buf[VF] = {0};
        memcpy(buf, p, sizeof(bf16) * (size_t)n);
        h = _mm_loadu_si128((const __m128i*)buf);
    }
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

// Round to nearest even as f32_to_bf16 does, NaNs kept quiet.
static inline void store_bf16(bf16* p, vf32 v, int n) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    // 32-bit lanes to 16: packus works per 128-bit half, so gather the halves in order after it.
    __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    if (n >= VF) {
        _mm_storeu_si128((__m128i*)p, h);
    } else {
        bf16 buf[VF];
        _mm_storeu_si128((__m128i*)buf, h);
        memcpy(p, buf, sizeof(bf16) * (size_t)n);
    }
}

static inline vf32 vf_set1(float f) { return _mm256_set1_ps(f); }
static inline vf32 vf_fmadd(vf32 a, vf32 b, vf32 c) { return _mm256_fmadd_ps(a, b, c); }
static inline vf32 vf_add(vf32 a, vf32 b) { return _mm256_add_ps(a, b); }
static inline vf32 vf_mul(vf32 a, vf32 b) { return _mm256_mul_ps(a, b); }
static inline vf32 vf_zero(void) { return _mm256_setzero_ps(); }
static inline vf32 vf_loadu(const float* p) { return _mm256_loadu_ps(p); }
static inline float vf_sum(vf32 a) { return vsum(a); }

#else
#error "cpu_kernels.c needs AVX512-BF16 or AVX2 with FMA"
#endif
