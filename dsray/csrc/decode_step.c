// A whole decode step of the model in one call: every layer (MLA, then the dense MLP or the MoE with
// its experts on this process) and the final norm, for a batch of 1 to 64 tokens, one per sequence.
//
// Why: a batch-1 decode step of `small` is ~13 ms of kernels and was ~5 ms of Python around them
// (module calls, argument checks, tensor allocations, ~120 ctypes calls); a 16-token step spent
// another ~15 ms in the MoE dispatch's small torch ops. Here the same kernels run in the same
// order with the same roundings, called from C: `dsray/decode_step.py` checks that the model can
// take this path, collects the weight pointers once, and per step passes only the token rows and
// the attention metadata. The Python path (`dsray/model.py`) stays the reference: with no slot over
// `grouped_max_rows` rows the two give identical bits (tests/model/test_decode_step.py).
//
// Per layer, as `Block.attend` / `start_mlp` / `finish_mlp` compute it with the kernels:
//   h = rmsnorm(x); q = q_b(rmsnorm(q_a(h))) (or q_proj(h)); kv = kv_a(h)
//   x = x + o_proj(mla_decode(q, kv))                       (latents written to the cache first)
//   h = rmsnorm(x); x = x + mlp(h)
// where mlp is the dense SwiGLU, or the MoE: gate, then for one token its routed and shared experts
// in one call (swiglu_experts), for more tokens the (token, k) rows sorted by expert through the
// grouped kernel, combined in k order, plus the shared experts.

#include "cpu_kernels.h"

typedef struct {
    const bf16 *input_norm, *post_norm;
    const bf16 *q_a, *q_a_norm, *q_b;  // without a query LoRA (q_rank 0), q_b is q_proj and q_a is unused
    const bf16 *kv_a, *kv_norm, *w_uk_t, *w_uv, *o_proj;
    const bf16 *mlp_gate, *mlp_up, *mlp_down;  // the dense MLP, or the MoE's shared experts (NULL: none)
    const float *router, *router_bias;         // MoE only (router NULL: a dense layer); bias may be NULL
    const bf16 *w13, *w2;                      // stacked experts [E, 2I, D] (gate rows, then up), [E, D, I]
    int64_t* expert_load;                      // [E] tokens routed to each expert, counted here
    float input_eps, post_eps, q_a_eps, kv_eps;
    int mlp_inter;
} dsray_layer;

typedef struct {
    const dsray_layer* layers;
    const bf16* final_norm;
    float final_eps, softmax_scale, routed_scaling;
    int num_layers, D, H, d_nope, R, C, d_v, q_rank;
    int E, K, moe_inter, n_group, topk_group, scoring, method, norm_topk;
    int interleaved, block_size;
} dsray_model;

// y = bf16(y + b), elementwise (torch's bf16 addition).
static void add_rows(bf16* y, const bf16* b, long n) {
    for (long i = 0; i < n; ++i) y[i] = f32_to_bf16(bf16_to_f32(y[i]) + bf16_to_f32(b[i]));
}

// out [N, D] = down(bf16(silu(gate(x)) * up(x))) for N rows of x [N, D]: each product rounded to bf16,
// as `MLP.forward` computes it. `g`, `u` are scratch of N * I.
void dsray_swiglu_rows_bf16(const bf16* x, int N, int D, const bf16* gate, const bf16* up, const bf16* down, int I,
                            bf16* g, bf16* u, bf16* out, int nthreads) {
    dsray_gemm_bf16(x, D, gate, D, g, I, N, I, D, nthreads);
    dsray_gemm_bf16(x, D, up, D, u, I, N, I, D, nthreads);
    for (long i = 0; i < (long)N * I; ++i) g[i] = f32_to_bf16(silu_bf16(bf16_to_f32(g[i])) * bf16_to_f32(u[i]));
    dsray_gemm_bf16(g, I, down, I, out, D, N, D, I, nthreads);
}

typedef struct {
    bf16 *h, *qa, *qa_n, *q, *kv, *q_pe, *attn, *o, *mlp, *sorted, *act, *back, *g, *u;
    float* weights;
    int64_t *ids, *order;
    int *slots, *counts;
    long* row_off;
} scratch;

// One token's MoE: its routed experts in expert order (the summation order of
// `ExpertShard.forward_single`) and the shared experts, in one swiglu_experts call.
static void moe_one_token(const dsray_model* m, const dsray_layer* L, const bf16* h, scratch* s, bf16* out,
                          int nthreads) {
    const int K = m->K, D = m->D, I = m->moe_inter;
    int n = 0, idx[K + 1];
    for (int k = 0; k < K; ++k) idx[k] = k;
    for (int a = 1; a < K; ++a)  // insertion sort of the K picks by expert id (ids are distinct)
        for (int b = a; b > 0 && s->ids[idx[b - 1]] > s->ids[idx[b]]; --b) {
            int t = idx[b];
            idx[b] = idx[b - 1];
            idx[b - 1] = t;
        }
    const bf16 *gate[K + 1], *up[K + 1], *down[K + 1];
    int inter[K + 1];
    float w[K + 1];
    for (; n < K; ++n) {
        long e = s->ids[idx[n]];
        gate[n] = L->w13 + e * 2 * I * (long)D;
        up[n] = gate[n] + (long)I * D;
        down[n] = L->w2 + e * (long)D * I;
        inter[n] = I;
        w[n] = s->weights[idx[n]];
    }
    int num = K;
    if (L->mlp_gate) {
        gate[num] = L->mlp_gate, up[num] = L->mlp_up, down[num] = L->mlp_down, inter[num] = L->mlp_inter;
        ++num;
    }
    dsray_swiglu_experts_bf16(h, D, num, K, gate, up, down, inter, w, s->act, out, nthreads);
}

// Several tokens' MoE: the exchange's local round (`router/exchange.py`, `ExpertShard.run_sorted`),
// then the shared experts added to the combined result.
static void moe_rows(const dsray_model* m, const dsray_layer* L, int N, const bf16* h, scratch* s, bf16* out,
                     int nthreads) {
    const int K = m->K, D = m->D, E = m->E, I = m->moe_inter;
    const long P = (long)N * K;
    // Pairs sorted by expert, stable (argsort(stable=True) of the pairs' experts).
    memset(s->counts, 0, sizeof(int) * (E + 1));
    for (long p = 0; p < P; ++p) ++s->counts[s->ids[p] + 1];
    for (int e = 0; e < E; ++e) s->counts[e + 1] += s->counts[e];
    int num_slots = 0;
    for (int e = 0; e < E; ++e)
        if (s->counts[e + 1] > s->counts[e]) {
            s->slots[num_slots] = e;
            s->row_off[2 * num_slots] = s->counts[e];
            s->row_off[2 * num_slots + 1] = s->counts[e + 1];
            ++num_slots;
        }
    for (long p = 0; p < P; ++p) s->order[s->counts[s->ids[p]]++] = p;
    for (long j = 0; j < P; ++j) memcpy(s->sorted + j * D, h + (s->order[j] / K) * D, sizeof(bf16) * D);
    dsray_swiglu_grouped_bf16(s->sorted, L->w13, L->w2, num_slots, s->slots, s->row_off, D, I, s->act, s->back,
                              nthreads);
    dsray_combine_bf16(s->back, s->order, s->weights, N, K, D, out, nthreads);
    if (L->mlp_gate) {
        dsray_swiglu_rows_bf16(h, N, D, L->mlp_gate, L->mlp_up, L->mlp_down, L->mlp_inter, s->g, s->u, s->o,
                               nthreads);
        add_rows(out, s->o, (long)N * D);
    }
}

static void mlp(const dsray_model* m, const dsray_layer* L, int N, const bf16* h, scratch* s, bf16* out,
                int nthreads) {
    const int D = m->D;
    if (!L->router) {  // dense: one token through swiglu_experts (as `MLP.forward`), more through the rows
        if (N == 1) {
            const bf16 *gate = L->mlp_gate, *up = L->mlp_up, *down = L->mlp_down;
            dsray_swiglu_experts_bf16(h, D, 1, 0, &gate, &up, &down, &L->mlp_inter, NULL, s->act, out, nthreads);
        } else {
            dsray_swiglu_rows_bf16(h, N, D, L->mlp_gate, L->mlp_up, L->mlp_down, L->mlp_inter, s->g, s->u, out,
                                   nthreads);
        }
        return;
    }
    dsray_gate_bf16(h, D, L->router, L->router_bias, N, D, m->E, m->K, m->n_group, m->topk_group, m->scoring,
                    m->method, m->norm_topk, m->routed_scaling, s->weights, s->ids, nthreads);
    for (long p = 0; p < (long)N * m->K; ++p) ++L->expert_load[s->ids[p]];
    if (N == 1) moe_one_token(m, L, h, s, out, nthreads);
    else moe_rows(m, L, N, h, s, out, nthreads);
}

// x [N, D]: the tokens' embeddings → out [N, D]: the final-normed hidden states. cis [N, R] (cos,
// sin pairs of each token's position), slot_mapping [N], block_tables [N, bt_stride], context_lens
// [N] as `mla_decode_step` takes them; cache holds every layer's latents, `cache_layer` elements apart.
// Returns 0, or -1 if scratch memory could not be had (nothing was written then).
int dsray_decode_step_bf16(const dsray_model* m, int N, const bf16* x_in, const float* cis,
                           const int64_t* slot_mapping, bf16* cache, long cache_layer, const int64_t* block_tables,
                           long bt_stride, const int64_t* context_lens, bf16* out, int nthreads) {
    const int D = m->D, H = m->H, qk = m->d_nope + m->R, W = m->C + m->R, K = m->K;
    const long P = (long)N * (K > 0 ? K : 1);
    int I = m->moe_inter;
    for (int l = 0; l < m->num_layers; ++l)
        if (m->layers[l].mlp_inter > I) I = m->layers[l].mlp_inter;
    const long act_rows = P + N;  // swiglu_experts: K routed + shared intermediates; grouped: P rows
    // One allocation for every buffer of the step (a few hundred KiB at 64 tokens).
    size_t bf16s = (size_t)N * D * 4 + (size_t)N * m->q_rank * 2 + (size_t)N * H * qk + (size_t)N * W +
                   (size_t)N * H * m->R + (size_t)N * H * m->d_v + (size_t)P * D * 2 + (size_t)act_rows * I +
                   (size_t)N * I * 2;
    size_t bytes = bf16s * sizeof(bf16) + (size_t)P * (sizeof(float) + 2 * sizeof(int64_t) + 2 * sizeof(long)) +
                   sizeof(int) * (size_t)(P + m->E + 1) + 64 * 4;
    char* mem = malloc(bytes);
    if (!mem) return -1;
    bf16* next = (bf16*)mem;
    scratch s;
    bf16* x = next;
    next += (size_t)N * D;
    s.h = next, next += (size_t)N * D;
    s.o = next, next += (size_t)N * D;
    s.mlp = next, next += (size_t)N * D;
    s.qa = next, next += (size_t)N * m->q_rank;
    s.qa_n = next, next += (size_t)N * m->q_rank;
    s.q = next, next += (size_t)N * H * qk;
    s.kv = next, next += (size_t)N * W;
    s.q_pe = next, next += (size_t)N * H * m->R;
    s.attn = next, next += (size_t)N * H * m->d_v;
    s.sorted = next, next += (size_t)P * D;
    s.back = next, next += (size_t)P * D;
    s.act = next, next += (size_t)act_rows * I;
    s.g = next, next += (size_t)N * I;
    s.u = next, next += (size_t)N * I;
    char* rest = (char*)(((uintptr_t)next + 63) & ~(uintptr_t)63);
    s.weights = (float*)rest, rest += sizeof(float) * P;
    s.ids = (int64_t*)(((uintptr_t)rest + 7) & ~(uintptr_t)7), rest = (char*)(s.ids + P);
    s.order = (int64_t*)rest, rest += sizeof(int64_t) * P;
    s.row_off = (long*)rest, rest += sizeof(long) * 2 * P;
    s.counts = (int*)rest, rest += sizeof(int) * (m->E + 1);
    s.slots = (int*)rest;

    memcpy(x, x_in, sizeof(bf16) * N * D);
    for (int l = 0; l < m->num_layers; ++l) {
        const dsray_layer* L = &m->layers[l];
        dsray_rmsnorm_bf16(x, D, L->input_norm, s.h, N, D, L->input_eps, nthreads);
        if (m->q_rank) {
            dsray_gemm_bf16(s.h, D, L->q_a, D, s.qa, m->q_rank, N, m->q_rank, D, nthreads);
            dsray_rmsnorm_bf16(s.qa, m->q_rank, L->q_a_norm, s.qa_n, N, m->q_rank, L->q_a_eps, nthreads);
            dsray_gemm_bf16(s.qa_n, m->q_rank, L->q_b, m->q_rank, s.q, (long)H * qk, N, H * qk, m->q_rank, nthreads);
        } else {
            dsray_gemm_bf16(s.h, D, L->q_b, D, s.q, (long)H * qk, N, H * qk, D, nthreads);
        }
        dsray_gemm_bf16(s.h, D, L->kv_a, D, s.kv, W, N, W, D, nthreads);
        dsray_mla_decode_step_bf16(s.q, (long)H * qk, s.kv, W, L->kv_norm, L->kv_eps, cis, m->interleaved,
                                   slot_mapping, L->w_uk_t, L->w_uv, cache + l * cache_layer, block_tables,
                                   bt_stride, context_lens, m->block_size, N, H, m->d_nope, m->R, m->C, m->d_v,
                                   m->softmax_scale, s.q_pe, s.attn, nthreads);
        dsray_gemm_bf16(s.attn, (long)H * m->d_v, L->o_proj, (long)H * m->d_v, s.o, D, N, D, H * m->d_v, nthreads);
        add_rows(x, s.o, (long)N * D);
        dsray_rmsnorm_bf16(x, D, L->post_norm, s.h, N, D, L->post_eps, nthreads);
        mlp(m, L, N, s.h, &s, s.mlp, nthreads);
        add_rows(x, s.mlp, (long)N * D);
    }
    dsray_rmsnorm_bf16(x, D, m->final_norm, out, N, D, m->final_eps, nthreads);
    free(mem);
    return 0;
}
