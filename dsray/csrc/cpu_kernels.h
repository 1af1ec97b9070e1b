// The kernels of cpu_kernels.c that other C files call (decode_step.c), and the bf16 helpers both use.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16;

static inline float bf16_to_f32(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16 f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return (bf16)(u >> 16);
}

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

// SiLU of a bf16 value, rounded to bf16 (as torch's bf16 silu returns it).
static inline float silu_bf16(float g) { return round_bf16(g / (1.0f + expf(-g))); }

void dsray_gemm_bf16(const bf16* X, long ldx, const bf16* W, long ldw, bf16* Y, long ldy, int M, int N, int K,
                     int nthreads);
void dsray_swiglu_experts_bf16(const bf16* x, int D, int num_experts, int num_routed, const bf16* const* gate,
                               const bf16* const* up, const bf16* const* down, const int* inter,
                               const float* weights, bf16* act, bf16* out, int nthreads);
void dsray_swiglu_grouped_bf16(const bf16* X, const bf16* w13, const bf16* w2, int num_slots, const int* slots,
                               const long* row_off, long D, long I, bf16* act, bf16* Y, int nthreads);
void dsray_rmsnorm_bf16(const bf16* x, long ldx, const bf16* w, bf16* y, int T, int D, float eps, int nthreads);
void dsray_mla_decode_step_bf16(const bf16* q, long q_sn, const bf16* kv, long kv_sn, const bf16* kv_norm_w,
                                float eps, const float* cis, int interleaved, const int64_t* slot_mapping,
                                const bf16* w_uk_t, const bf16* w_uv, bf16* cache, const int64_t* block_tables,
                                long bt_stride, const int64_t* context_lens, int block_size, int N, int H, int d_nope,
                                int R, int C, int d_v, float scale, bf16* q_pe, bf16* out, int nthreads);
void dsray_gate_bf16(const bf16* x, long ldx, const float* w, const float* bias, int T, int D, int E, int K,
                     int n_group, int topk_group, int scoring, int method, int norm, float scaling, float* weights,
                     int64_t* ids, int nthreads);
void dsray_combine_bf16(const bf16* back, const int64_t* order, const float* weights, int T, int K, int D,
                        bf16* out, int nthreads);
