// Decode kernels for x86 CPUs with AVX512-BF16: bf16 weights, fp32 accumulation.
//
// A batch-1 decode step is a chain of matrix-vector products whose weights are read once each, so
// its speed is memory bandwidth. Torch's bf16 GEMV on CPU is AVX2 code converting bf16 to fp32 on
// the fly; here `vdpbf16ps` multiplies 32 bf16 pairs and accumulates them in fp32 per instruction,
// and a whole SwiGLU expert group (a token's routed experts plus the shared ones) runs in one call
// with two thread barriers, instead of ~4 torch ops per expert.
//
// Rounding follows the torch reference (`dsray/layers.py`, `experts/shard.py`) step by step:
// every product leaves as bf16 (round to nearest even), SiLU and the gate*up product are computed
// in fp32 and rounded to bf16, expert outputs are weighted and summed in fp32 in the order given,
// and the shared experts' bf16 output is added to the bf16-rounded routed sum. Only the order of
// the fp32 additions inside a dot product differs from torch's.
//
// Built at first use by dsray/cpu_kernels.py (gcc -O3 -mavx512bf16 -fopenmp) and linked against
// the OpenMP runtime torch already loaded, so both share one thread pool.

#include <immintrin.h>
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

static inline __m512bh load_bh(const bf16* p) { return (__m512bh)_mm512_loadu_si512((const void*)p); }

static inline __m512bh load_bh_tail(const bf16* p, int n) {
    return (__m512bh)_mm512_maskz_loadu_epi16(_bzhi_u32(0xffffffffu, (unsigned)n), (const void*)p);
}

// out[r] = dot(W[r, :K], x[:K]) for 4 rows r0..r0+3 (row stride ldw), fp32.
static inline void dot4(const bf16* W, long ldw, const bf16* x, int K, float* out) {
    const bf16 *w0 = W, *w1 = W + ldw, *w2 = W + 2 * ldw, *w3 = W + 3 * ldw;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh xv = load_bh(x + k);
        a0 = _mm512_dpbf16_ps(a0, load_bh(w0 + k), xv);
        a1 = _mm512_dpbf16_ps(a1, load_bh(w1 + k), xv);
        a2 = _mm512_dpbf16_ps(a2, load_bh(w2 + k), xv);
        a3 = _mm512_dpbf16_ps(a3, load_bh(w3 + k), xv);
    }
    if (k < K) {
        int n = K - k;
        __m512bh xv = load_bh_tail(x + k, n);
        a0 = _mm512_dpbf16_ps(a0, load_bh_tail(w0 + k, n), xv);
        a1 = _mm512_dpbf16_ps(a1, load_bh_tail(w1 + k, n), xv);
        a2 = _mm512_dpbf16_ps(a2, load_bh_tail(w2 + k, n), xv);
        a3 = _mm512_dpbf16_ps(a3, load_bh_tail(w3 + k, n), xv);
    }
    out[0] = _mm512_reduce_add_ps(a0);
    out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2);
    out[3] = _mm512_reduce_add_ps(a3);
}

// dot(w[:K], x[:K]) for a single row, two accumulators to hide the instruction latency.
static inline float dot1(const bf16* w, const bf16* x, int K) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int k = 0;
    for (; k + 64 <= K; k += 64) {
        a0 = _mm512_dpbf16_ps(a0, load_bh(w + k), load_bh(x + k));
        a1 = _mm512_dpbf16_ps(a1, load_bh(w + k + 32), load_bh(x + k + 32));
    }
    for (; k + 32 <= K; k += 32) a0 = _mm512_dpbf16_ps(a0, load_bh(w + k), load_bh(x + k));
    if (k < K) a1 = _mm512_dpbf16_ps(a1, load_bh_tail(w + k, K - k), load_bh_tail(x + k, K - k));
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

// Y[m, n] = bf16(dot(W[n, :K], X[m, :K])) for m < M, n < N. X rows have stride ldx, Y rows ldy,
// W rows ldw. Rows of W are split over threads in groups of 4; each group is read once for all M
// rows of X (which stay in L1).
void dsray_gemv_bf16(const bf16* X, long ldx, const bf16* W, long ldw, bf16* Y, long ldy, int M, int N, int K,
                     int nthreads) {
    int groups = N / 4;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int g = 0; g < groups; ++g) {
        float out[4];
        for (int m = 0; m < M; ++m) {
            dot4(W + (long)g * 4 * ldw, ldw, X + m * ldx, K, out);
            for (int j = 0; j < 4; ++j) Y[m * ldy + g * 4 + j] = f32_to_bf16(out[j]);
        }
    }
    for (int n = groups * 4; n < N; ++n)
        for (int m = 0; m < M; ++m) Y[m * ldy + n] = f32_to_bf16(dot1(W + n * ldw, X + m * ldx, K));
}

// One token through a group of SwiGLU experts: out[D] = bf16(bf16(sum_e weight[e] * expert_e(x))
// + shared(x)), where expert e has gate [I_e, D], up [I_e, D] and down [D, I_e] weights given by
// pointer (row-major, contiguous rows), the first `num_routed` experts are weighted and the rest
// are shared (added unweighted after rounding, as the reference adds its shared MLP). `inter[e]` is
// I_e, a multiple of 4. `h` is fp32 scratch of sum(2 I_e), `act` bf16 scratch of sum(I_e).
void dsray_swiglu_experts_bf16(const bf16* x, int D, int num_experts, int num_routed, const bf16* const* gate,
                               const bf16* const* up, const bf16* const* down, const int* inter,
                               const float* weights, float* h, bf16* act, bf16* out, int nthreads) {
    long h_off[num_experts + 1], a_off[num_experts + 1];
    long groups_off[num_experts + 1];  // 4-row groups of gate and up rows, per expert
    h_off[0] = a_off[0] = groups_off[0] = 0;
    for (int e = 0; e < num_experts; ++e) {
        h_off[e + 1] = h_off[e] + 2L * inter[e];
        a_off[e + 1] = a_off[e] + inter[e];
        groups_off[e + 1] = groups_off[e] + 2L * inter[e] / 4;
    }
    long total_groups = groups_off[num_experts];

#pragma omp parallel num_threads(nthreads)
    {
        // Phase 1: gate and up rows of every expert (h, rounded to bf16 as torch's bf16 output is).
#pragma omp for schedule(static)
        for (long g = 0; g < total_groups; ++g) {
            int e = 0;
            while (groups_off[e + 1] <= g) ++e;
            long row = (g - groups_off[e]) * 4;  // in [0, 2 I_e)
            const bf16* w = row < inter[e] ? gate[e] + row * D : up[e] + (row - inter[e]) * D;
            float r[4];
            dot4(w, D, x, D, r);
            for (int j = 0; j < 4; ++j) h[h_off[e] + row + j] = round_bf16(r[j]);
        }
        // SiLU(gate) * up, each rounded to bf16 like the reference's bf16 tensors.
#pragma omp for schedule(static)
        for (int e = 0; e < num_experts; ++e) {
            const float* hg = h + h_off[e];
            const float* hu = hg + inter[e];
            for (int i = 0; i < inter[e]; ++i) {
                float s = round_bf16(hg[i] / (1.0f + expf(-hg[i])));
                act[a_off[e] + i] = f32_to_bf16(s * hu[i]);
            }
        }
        // Phase 2: down rows, all experts of one output element on one thread, summed in order.
#pragma omp for schedule(static)
        for (int d = 0; d < D; ++d) {
            float routed = 0.0f;
            for (int e = 0; e < num_routed; ++e)
                routed += round_bf16(dot1(down[e] + (long)d * inter[e], act + a_off[e], inter[e])) * weights[e];
            float y = round_bf16(routed);
            for (int e = num_routed; e < num_experts; ++e)
                y = round_bf16(y + round_bf16(dot1(down[e] + (long)d * inter[e], act + a_off[e], inter[e])));
            out[d] = f32_to_bf16(y);
        }
    }
}

// acc[0:n] += a * bf16 row w[0:n], in fp32 (n a multiple of 16).
static inline void axpy_bf16(float* acc, float a, const bf16* w, int n) {
    __m512 av = _mm512_set1_ps(a);
    for (int i = 0; i < n; i += 16) {
        __m512i wi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(w + i))), 16);
        __m512 prod = _mm512_mul_ps(av, _mm512_castsi512_ps(wi));
        _mm512_storeu_ps(acc + i, _mm512_add_ps(_mm512_loadu_ps(acc + i), prod));
    }
}

// Absorbed MLA attention for decode steps (one new token per sequence), after the rope and the
// cache write: for sequence n and head h,
//   q_lat = q_nope W_UK[h]                       (W_UK [H, d_nope, C])
//   p     = softmax(scale * [q_lat, q_pe] . latent[s] for s < context_lens[n])
//   out   = (sum_s p[s] latent[s, :C]) W_UV^T[h]  (W_UV^T [H, C, d_v])
// reading the paged latent cache through the block table. Every intermediate is rounded to bf16
// where `attention/mla.py` holds a bf16 tensor (q_lat, scores, probabilities, o_lat, out).
// Tasks (n, h) run in parallel with no barrier; C and d_v must be multiples of 16.
void dsray_mla_decode_bf16(const bf16* q_nope, long q_sn, long q_sh, const bf16* q_pe, long pe_sn, long pe_sh,
                           const bf16* w_uk, const bf16* w_uv_t, const bf16* cache, const int64_t* block_tables,
                           long bt_stride, const int64_t* context_lens, int block_size, int N, int H, int d_nope,
                           int R, int C, int d_v, float scale, bf16* out, int nthreads) {
    const int W = C + R;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (long task = 0; task < (long)N * H; ++task) {
        int n = (int)(task / H), h = (int)(task % H);
        const long S = context_lens[n];
        const int64_t* table = block_tables + n * bt_stride;
        float acc[C > d_v ? C : d_v];
        bf16 q_full[W];
        // q_lat[c] = sum_d q_nope[d] W_UK[h, d, c]
        memset(acc, 0, sizeof(float) * C);
        const bf16* qn = q_nope + n * q_sn + h * q_sh;
        for (int d = 0; d < d_nope; ++d) axpy_bf16(acc, bf16_to_f32(qn[d]), w_uk + ((long)h * d_nope + d) * C, C);
        for (int c = 0; c < C; ++c) q_full[c] = f32_to_bf16(acc[c]);
        memcpy(q_full + C, q_pe + n * pe_sn + h * pe_sh, sizeof(bf16) * R);
        // Scores and softmax over the context.
        float* p = (float*)malloc(sizeof(float) * (S > 0 ? S : 1));
        float max = -INFINITY;
        for (long s = 0; s < S; ++s) {
            const bf16* row = cache + (table[s / block_size] * block_size + s % block_size) * (long)W;
            p[s] = round_bf16(dot1(row, q_full, W)) * scale;
            if (p[s] > max) max = p[s];
        }
        float sum = 0.0f;
        for (long s = 0; s < S; ++s) sum += (p[s] = expf(p[s] - max));
        // o_lat = sum_s p[s] latent[s, :C]
        memset(acc, 0, sizeof(float) * C);
        for (long s = 0; s < S; ++s) {
            float ps = round_bf16(p[s] / sum);
            if (ps == 0.0f) continue;
            axpy_bf16(acc, ps, cache + (table[s / block_size] * block_size + s % block_size) * (long)W, C);
        }
        free(p);
        bf16 o_lat[C];
        for (int c = 0; c < C; ++c) o_lat[c] = f32_to_bf16(acc[c]);
        // out[v] = sum_c o_lat[c] W_UV^T[h, c, v]
        memset(acc, 0, sizeof(float) * d_v);
        for (int c = 0; c < C; ++c) axpy_bf16(acc, bf16_to_f32(o_lat[c]), w_uv_t + ((long)h * C + c) * d_v, d_v);
        bf16* o = out + ((long)n * H + h) * d_v;
        for (int v = 0; v < d_v; ++v) o[v] = f32_to_bf16(acc[v]);
    }
}
