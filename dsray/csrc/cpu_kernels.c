// Decode kernels for x86 CPUs with AVX512-BF16 or AVX2: bf16 weights, fp32 accumulation.
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
// the fp32 additions inside a dot product differs from torch's, and the grouped kernel's wide
// tiles take exp from a polynomial rather than libm.
//
// Threads: a small pool of our own rather than OpenMP. A kernel call is split into chunks that
// threads claim from one atomic counter; the calling thread works too and waits only for chunks
// another thread has claimed, never for a thread to wake up. On a busy machine (a serving node
// runs several processes on few cores) an OpenMP barrier waits a whole scheduler time slice for
// a descheduled thread, many times per decode step; here a late thread finds no work left.
// Built at first use by dsray/kernel_build.py, once per instruction set (simd.h says what differs).

#include <immintrin.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "cpu_kernels.h"
#include "simd.h"

// dot(w[:K], x[:K]) for one row. One row at a time with four independent accumulators: a single
// sequential stream per thread reads DRAM faster here than four interleaved rows (~20 %).
static inline float dot1(const bf16* w, const bf16* x, int K) {
    vacc a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    int k = 0;
    for (; k + 4 * VK <= K; k += 4 * VK) {
        a0 = vdp(a0, load_bh(w + k), load_bh(x + k));
        a1 = vdp(a1, load_bh(w + k + VK), load_bh(x + k + VK));
        a2 = vdp(a2, load_bh(w + k + 2 * VK), load_bh(x + k + 2 * VK));
        a3 = vdp(a3, load_bh(w + k + 3 * VK), load_bh(x + k + 3 * VK));
    }
    for (; k + VK <= K; k += VK) a0 = vdp(a0, load_bh(w + k), load_bh(x + k));
    if (k < K) a1 = vdp(a1, load_bh_tail(w + k, K - k), load_bh_tail(x + k, K - k));
    return vsum(vadd(vadd(a0, a1), vadd(a2, a3)));
}

// ---- The thread pool ---------------------------------------------------------------------------

typedef void (*chunk_fn)(void* ctx, long begin, long end);

#define MAX_WORKERS 63
// A worker spins this long for the next job before it sleeps. Between kernel calls a decode step
// hands over at once; a longer spin (200 us before) only takes the core from torch's OpenMP thread
// when torch ops run between our kernels, as in a prefill: 128-token prefill of `small`, 2 threads,
// 594 -> 795 tok/s with this and GOMP_SPINCOUNT=10000 (dsray/openmp.py) together.
#define SPIN_NS 20000L

static struct {
    // (generation << 32) | next chunk index: claiming a chunk is one compare-and-swap that also
    // proves the job it belongs to is still the current one.
    _Atomic uint64_t cursor;
    atomic_long done;      // chunks finished in the current job
    atomic_uint epoch;     // bumped per job; sleeping workers wait on it (futex)
    atomic_int sleepers;
    chunk_fn fn;           // the current job; written only while no chunk of the previous is pending
    void* ctx;
    atomic_long total;
    int num_workers;
    pthread_mutex_t owner;  // one calling thread at a time uses the workers; others run alone
    pthread_mutex_t grow;
} pool = {.owner = PTHREAD_MUTEX_INITIALIZER, .grow = PTHREAD_MUTEX_INITIALIZER};

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

// Claim and run chunks of job `gen` until none is left; returns whether any was run.
static int run_chunks(uint32_t gen) {
    int ran = 0;
    for (;;) {
        uint64_t cur = atomic_load_explicit(&pool.cursor, memory_order_acquire);
        if ((uint32_t)(cur >> 32) != gen || (long)(cur & 0xffffffffu) >= atomic_load(&pool.total)) return ran;
        if (!atomic_compare_exchange_weak_explicit(&pool.cursor, &cur, cur + 1, memory_order_acq_rel,
                                                   memory_order_relaxed))
            continue;
        long i = (long)(cur & 0xffffffffu);  // the job's fields are stable while we hold one of its chunks
        pool.fn(pool.ctx, i, i + 1);
        atomic_fetch_add_explicit(&pool.done, 1, memory_order_release);
        ran = 1;
    }
}

static void* worker_main(void* arg) {
    (void)arg;
    unsigned seen = atomic_load(&pool.epoch);
    for (;;) {
        long spin_until = now_ns() + SPIN_NS;
        unsigned epoch;
        while ((epoch = atomic_load_explicit(&pool.epoch, memory_order_acquire)) == seen) {
            for (int i = 0; i < 64; ++i) _mm_pause();
            if (now_ns() > spin_until) {
                atomic_fetch_add(&pool.sleepers, 1);
                syscall(SYS_futex, &pool.epoch, FUTEX_WAIT_PRIVATE, seen, NULL, NULL, 0);
                atomic_fetch_sub(&pool.sleepers, 1);
                spin_until = now_ns() + SPIN_NS;
            }
        }
        seen = epoch;
        run_chunks((uint32_t)(atomic_load_explicit(&pool.cursor, memory_order_acquire) >> 32));
    }
    return NULL;
}

static void ensure_workers(int n) {
    if (n > MAX_WORKERS) n = MAX_WORKERS;
    if (pool.num_workers >= n) return;
    pthread_mutex_lock(&pool.grow);
    while (pool.num_workers < n) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &attr, worker_main, NULL) != 0) break;
        pthread_attr_destroy(&attr);
        pool.num_workers++;
    }
    pthread_mutex_unlock(&pool.grow);
}

static void forget_workers_after_fork(void) {
    // The child has no workers; the calling thread alone can still claim every chunk.
    pool.num_workers = 0;
    pthread_mutex_init(&pool.owner, NULL);
    pthread_mutex_init(&pool.grow, NULL);
}

__attribute__((constructor)) static void pool_init(void) { pthread_atfork(NULL, NULL, forget_workers_after_fork); }

// Run fn(ctx, i, i + 1) for every chunk i < num_chunks on up to `nthreads` threads (this one included).
static void parallel_chunks(chunk_fn fn, void* ctx, long num_chunks, int nthreads) {
    if (num_chunks <= 0) return;
    if (nthreads <= 1 || num_chunks == 1 || pthread_mutex_trylock(&pool.owner) != 0) {
        fn(ctx, 0, num_chunks);
        return;
    }
    ensure_workers(nthreads - 1);
    uint32_t gen = (uint32_t)(atomic_load(&pool.cursor) >> 32) + 1;
    // Close the cursor under the new generation before the job's fields change: a worker still in
    // run_chunks for the previous job may have read its cursor (all chunks claimed) and then read the
    // new, larger total; its claim must fail, or it would run a chunk of this job as the old one's and
    // count it in `done` before this job resets it (back-to-back calls from C hit that).
    atomic_store(&pool.cursor, ((uint64_t)gen << 32) | 0xffffffffu);
    pool.fn = fn;
    pool.ctx = ctx;
    atomic_store(&pool.total, num_chunks);
    atomic_store(&pool.done, 0);
    atomic_store_explicit(&pool.cursor, (uint64_t)gen << 32, memory_order_release);
    atomic_fetch_add_explicit(&pool.epoch, 1, memory_order_release);
    if (atomic_load(&pool.sleepers) > 0) syscall(SYS_futex, &pool.epoch, FUTEX_WAKE_PRIVATE, INT32_MAX, NULL, NULL, 0);
    run_chunks(gen);
    // Every chunk is claimed; wait for the ones other threads hold.
    for (long spins = 0; atomic_load_explicit(&pool.done, memory_order_acquire) < num_chunks; ++spins) {
        if (spins < 4096) _mm_pause();
        else sched_yield();
    }
    pthread_mutex_unlock(&pool.owner);
}

// Items [i * per, min(n, (i + 1) * per)) of chunk i, for n items cut into chunks of `per`.
static inline long chunk_begin(long i, long per) { return i * per; }
static inline long chunk_end(long i, long per, long n) { return (i + 1) * per < n ? (i + 1) * per : n; }
static inline long num_chunks(long n, long per) { return (n + per - 1) / per; }

// ---- Kernels -------------------------------------------------------------------------------------

// Y[m, n] = bf16(dot(W[n, :K], X[m, :K])) for m < M, n < N (dsray_gemm_bf16 below). X rows have
// stride ldx, Y rows ldy, W rows ldw.
typedef struct {
    const bf16 *X, *W;
    bf16* Y;
    long ldx, ldw, ldy;
    int M, N, K;
    long per;  // rows per chunk
} gemv_ctx;

// ---- Decode-batch matrix products: 1 to 64 rows --------------------------------------------------
//
// A decode batch multiplies each weight by one to a few dozen rows: too few for oneDNN's packed
// GEMM to pay off (it re-packs the weights on every call, slower than the weight read itself
// here), while its GEMV reads at about half the memory bandwidth. Here register tiles of dot
// products (below) cover every row count; a chunk of weight rows stays in L1 while every row tile
// of X passes over it, so each weight is read from memory once per call. Sums are fp32, each
// output rounded to bf16 once.

#define TILE_M 8  // most rows of X in a register tile
#define TILE_N 4  // most weight rows in a register tile

#if !DSRAY_WIDEN_X
// out[m * ldo + n] = dot(W[n], X[m]) over K for m < MR, n < NR (fp32, unrounded).
static inline __attribute__((always_inline)) void tile_dot(const bf16* W, long ldw, const xrow_t* X, long ldx, int K,
                                                         float* out, long ldo, const int MR, const int NR) {
    vacc acc[TILE_M][TILE_N];
    for (int m = 0; m < MR; ++m)
        for (int n = 0; n < NR; ++n) acc[m][n] = vzero();
    int k = 0;
    for (; k + VK <= K; k += VK) {
        vbh w[TILE_N], x[TILE_M];
        for (int n = 0; n < NR; ++n) w[n] = load_bh(W + n * ldw + k);
        for (int m = 0; m < MR; ++m) x[m] = load_bh(X + m * ldx + k);
        for (int m = 0; m < MR; ++m)
            for (int n = 0; n < NR; ++n) acc[m][n] = vdp(acc[m][n], w[n], x[m]);
    }
    if (k < K) {
        vbh w[TILE_N], x[TILE_M];
        for (int n = 0; n < NR; ++n) w[n] = load_bh_tail(W + n * ldw + k, K - k);
        for (int m = 0; m < MR; ++m) x[m] = load_bh_tail(X + m * ldx + k, K - k);
        for (int m = 0; m < MR; ++m)
            for (int n = 0; n < NR; ++n) acc[m][n] = vdp(acc[m][n], w[n], x[m]);
    }
    if (NR == 4) {  // four sums at once: a third of the shuffles of four separate reductions
        for (int m = 0; m < MR; ++m) _mm_storeu_ps(out + m * ldo, hsum4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
        return;
    }
    int m = 0;
    for (; NR == 1 && m + 4 <= MR; m += 4) {
        float sums[4];
        _mm_storeu_ps(sums, hsum4(acc[m][0], acc[m + 1][0], acc[m + 2][0], acc[m + 3][0]));
        for (int j = 0; j < 4; ++j) out[(m + j) * ldo] = sums[j];
    }
    for (; m < MR; ++m)
        for (int n = 0; n < NR; ++n) out[m * ldo + n] = vsum(acc[m][n]);
}
#else
// AVX2: X's rows arrive widened to fp32 (widen_rows below), each block of VK as its VK/2 even
// elements, then its odd ones: the lanes vdp pairs. A product step is then a weight vector's two
// conversions, shared by the tile's rows, and two FMAs per row whose X operands are plain loads.
// A tile of few sums keeps several per output (even and odd products apart; with one output, also
// alternate steps apart), so that enough FMAs are in flight to hide their latency.
static inline __attribute__((always_inline)) void tile_dot(const bf16* W, long ldw, const xrow_t* X, long ldx, int K,
                                                         float* out, long ldo, const int MR, const int NR) {
    const int C = MR * NR == 1 ? 4 : MR * NR <= 4 ? 2 : 1;  // sums per output
    vacc acc[4][TILE_M][TILE_N];
    for (int c = 0; c < C; ++c)
        for (int m = 0; m < MR; ++m)
            for (int n = 0; n < NR; ++n) acc[c][m][n] = vzero();
    for (int k = 0, step = 0; k < K; k += VK, ++step) {
        const int ce = C == 4 ? 2 * (step & 1) : 0, co = C == 1 ? 0 : ce + 1;  // the sums of this step
        __m256 we[TILE_N], wo[TILE_N];
        for (int n = 0; n < NR; ++n) {
            const vbh w = k + VK <= K ? load_bh(W + n * ldw + k) : load_bh_tail(W + n * ldw + k, K - k);
            we[n] = bf16_even(w);
            wo[n] = bf16_odd(w);
        }
        for (int m = 0; m < MR; ++m) {
            const __m256 xe = _mm256_loadu_ps(X + m * ldx + k), xo = _mm256_loadu_ps(X + m * ldx + k + VK / 2);
            for (int n = 0; n < NR; ++n) {
                acc[ce][m][n] = _mm256_fmadd_ps(we[n], xe, acc[ce][m][n]);
                acc[co][m][n] = _mm256_fmadd_ps(wo[n], xo, acc[co][m][n]);
            }
        }
    }
    for (int c = 1; c < C; ++c)
        for (int m = 0; m < MR; ++m)
            for (int n = 0; n < NR; ++n) acc[0][m][n] = _mm256_add_ps(acc[0][m][n], acc[c][m][n]);
    int m = 0;
    for (; NR == 1 && m + 4 <= MR; m += 4) {
        float sums[4];
        _mm_storeu_ps(sums, hsum4(acc[0][m][0], acc[0][m + 1][0], acc[0][m + 2][0], acc[0][m + 3][0]));
        for (int j = 0; j < 4; ++j) out[(m + j) * ldo] = sums[j];
    }
    for (; m < MR; ++m)
        for (int n = 0; n < NR; ++n) out[m * ldo + n] = vsum(acc[0][m][n]);
}
#endif

// Two tile shapes, MR and NR known at compile time so the loops unroll into registers. With few
// rows the weights' memory read is the cost, and one weight row at a time against up to 8 rows of
// X keeps it a single sequential stream (interleaving 4 weight rows read memory ~2x slower here);
// with more rows the dot products are the cost, and 4 x SQUARE_N tiles load each operand for
// several of them.
static void tile_dot_narrow(const bf16* W, const xrow_t* X, long ldx, int K, float* out, long ldo, int MR) {
#define NARROW_CASE(mr) \
    case mr: tile_dot(W, 0, X, ldx, K, out, ldo, mr, 1); return;
    switch (MR) { NARROW_CASE(1) NARROW_CASE(2) NARROW_CASE(3) NARROW_CASE(4)
                  NARROW_CASE(5) NARROW_CASE(6) NARROW_CASE(7) NARROW_CASE(8) }
#undef NARROW_CASE
}

static void tile_dot_square(const bf16* W, long ldw, const xrow_t* X, long ldx, int K, float* out, long ldo, int MR,
                            int NR) {
#define SQUARE_CASE(mr, nr) \
    case (mr) * 8 + (nr): tile_dot(W, ldw, X, ldx, K, out, ldo, mr, nr); return;
#define SQUARE_ROW(mr) SQUARE_CASE(mr, 1) SQUARE_CASE(mr, 2) SQUARE_CASE(mr, 3) SQUARE_CASE(mr, 4)
    switch (MR * 8 + NR) { SQUARE_ROW(1) SQUARE_ROW(2) SQUARE_ROW(3) SQUARE_ROW(4) }
#undef SQUARE_ROW
#undef SQUARE_CASE
}

// warm (simd.h) reads n contiguous elements once, front to back, so that they sit in L2 for the
// tiles that follow. The square tiles read several weight rows at once, interleaved, a pattern
// memory serves ~2x slower than one sequential stream (see tile_dot_narrow); a chunk's weights read
// first as one stream and then tiled from L2: 128-token prefill of small 273 -> 241 ms (best of 6), grouped experts, 64
// slots of 16 rows, 13.2 -> 10.7 ms.

#define NARROW_MAX_ROWS 8  // up to this many rows of X: the narrow tiles

// Y[m, n0:n1] (fp32 in `out`, rows ldo apart) = X[m] . W[n0:n1] for every m < M, tile by tile:
// the weight rows of a tile stay in L1 while all row tiles of X pass over them.
#if DSRAY_WIDEN_X
// X [M, K] (rows ldx apart) widened for tile_dot into this thread's buffer, rows *ld apart, zero
// past K; NULL when the buffer cannot grow. Once per block_products call: its tiles then read each
// X element once per weight row, so the widening is a 1 / (weight rows) share of the work.
static __thread float* widened;
static __thread long widened_cap;

static const float* widen_rows(const bf16* X, long ldx, int M, int K, long* ld) {
    *ld = (K + VK - 1) / VK * VK;
    if (M * *ld > widened_cap) {
        const long cap = M * *ld;
        float* grown = aligned_alloc(32, (size_t)cap * sizeof(float));
        if (grown == NULL) return NULL;
        free(widened);
        widened = grown;
        widened_cap = cap;
    }
    for (int m = 0; m < M; ++m)
        for (int k = 0; k < K; k += VK) {
            const vbh v = k + VK <= K ? load_bh(X + m * ldx + k) : load_bh_tail(X + m * ldx + k, K - k);
            _mm256_storeu_ps(widened + m * *ld + k, bf16_even(v));
            _mm256_storeu_ps(widened + m * *ld + k + VK / 2, bf16_odd(v));
        }
    return widened;
}
#endif

static void block_products(const bf16* W, long ldw, long n0, long n1, const bf16* X_bf16, long ldx, int M, int K,
                           float* out, long ldo) {
#if DSRAY_WIDEN_X
    long ld;
    const float* X = widen_rows(X_bf16, ldx, M, K, &ld);
    if (X == NULL) {  // no memory for the widened rows: one dot product at a time
        for (int m = 0; m < M; ++m)
            for (long n = n0; n < n1; ++n) out[m * ldo + (n - n0)] = dot1(W + n * ldw, X_bf16 + m * ldx, K);
        return;
    }
    ldx = ld;
#else
    const bf16* X = X_bf16;
#endif
    if (M <= NARROW_MAX_ROWS) {
        for (long n = n0; n < n1; ++n) tile_dot_narrow(W + n * ldw, X, ldx, K, out + (n - n0), ldo, M);
        return;
    }
    for (long n = n0; n < n1; n += SQUARE_N) {
        int nr = n1 - n < SQUARE_N ? (int)(n1 - n) : SQUARE_N;
        for (int m = 0; m < M; m += 4) {
            int mr = M - m < 4 ? M - m : 4;
            tile_dot_square(W + n * ldw, ldw, X + m * ldx, ldx, K, out + m * ldo + (n - n0), ldo, mr, nr);
        }
    }
}

// Weight rows per chunk: about four chunks per thread, in multiples of 16 rows, 16 to 256. Chunks
// of a fixed 16 rows made a 1,024-row weight 64 claims on the pool's shared cursor, whose cache line
// then bounces between the cores more than the rows take to read (small, batch 1: ~5% of a step;
// 16 sequences: ~15%); a few large chunks also keep each thread's read one long sequential stream.
static long gemm_block(long N, int nthreads) {
    long per = (N + 4L * nthreads - 1) / (4L * nthreads);
    per = (per + 15) / 16 * 16;
    return per < 16 ? 16 : per > 256 ? 256 : per;
}

// Rows of X per pass over a chunk's weights (whose rows stay in L2 between passes): bounds the
// chunk's fp32 tile on the stack whatever M is.
#define GEMM_ROW_BLOCK 64

static void gemm_chunk(void* p, long c0, long c1) {
    const gemv_ctx* a = p;
    const int rows = a->M < GEMM_ROW_BLOCK ? a->M : GEMM_ROW_BLOCK;
    float tile[rows * a->per];
    for (long c = c0; c < c1; ++c) {
        long n0 = chunk_begin(c, a->per), n1 = chunk_end(c, a->per, a->N);
        if (a->M > NARROW_MAX_ROWS && a->ldw == a->K) warm(a->W + n0 * a->ldw, (n1 - n0) * a->K);
        for (int m0 = 0; m0 < a->M; m0 += GEMM_ROW_BLOCK) {
            const int mr = a->M - m0 < GEMM_ROW_BLOCK ? a->M - m0 : GEMM_ROW_BLOCK;
            block_products(a->W, a->ldw, n0, n1, a->X + m0 * a->ldx, a->ldx, mr, a->K, tile, a->per);
            for (int m = 0; m < mr; ++m)
                for (long n = n0; n < n1; ++n) a->Y[(m0 + m) * a->ldy + n] = f32_to_bf16(tile[m * a->per + (n - n0)]);
        }
    }
}

// Y[m, n] = bf16(dot(W[n, :K], X[m, :K])) for any M (meant for a decode batch: 1..64 rows).
void dsray_gemm_bf16(const bf16* X, long ldx, const bf16* W, long ldw, bf16* Y, long ldy, int M, int N, int K,
                     int nthreads) {
    gemv_ctx a = {X, W, Y, ldx, ldw, ldy, M, N, K, gemm_block(N, nthreads)};
    parallel_chunks(gemm_chunk, &a, num_chunks(N, a.per), nthreads);
}

// One token through a group of SwiGLU experts: out[D] = bf16(bf16(sum_e weight[e] * expert_e(x))
// + shared(x)), where expert e has gate [I_e, D], up [I_e, D] and down [D, I_e] weights given by
// pointer (row-major, contiguous rows), the first `num_routed` experts are weighted and the rest
// are shared (added unweighted after rounding, as the reference adds its shared MLP). `inter[e]` is
// I_e; `act` is bf16 scratch of sum(I_e).
typedef struct {
    const bf16* x;
    int D, num_experts, num_routed;
    const bf16 *const *gate, *const *up, *const *down;
    const int* inter;
    const float* weights;
    bf16 *act, *out;
    const long *a_off, *blocks_off;
    long per_index, per_row;
} swiglu_ctx;

// Phase 1: a block of one expert's intermediate indices: its gate and up rows (each product
// rounded to bf16, as torch's bf16 output is), then SiLU(gate) * up, rounded likewise.
static void swiglu_gate_up_chunk(void* p, long c0, long c1) {
    const swiglu_ctx* a = p;
    for (long c = c0; c < c1; ++c) {
        int e = 0;
        while (a->blocks_off[e + 1] <= c) ++e;
        long i0 = (c - a->blocks_off[e]) * a->per_index, i1 = i0 + a->per_index < a->inter[e] ? i0 + a->per_index : a->inter[e];
        float g[i1 - i0];
        for (long i = i0; i < i1; ++i) g[i - i0] = round_bf16(dot1(a->gate[e] + i * a->D, a->x, a->D));
        for (long i = i0; i < i1; ++i) {
            float u = round_bf16(dot1(a->up[e] + i * a->D, a->x, a->D));
            float silu = silu_bf16(g[i - i0]);
            a->act[a->a_off[e] + i] = f32_to_bf16(silu * u);
        }
    }
}

// Phase 2: down rows. A chunk reads each expert's rows [d0, d1) in one sequential run, then sums
// the experts per output element in the given order.
static void swiglu_down_chunk(void* p, long c0, long c1) {
    const swiglu_ctx* a = p;
    const int n = a->num_experts;
    for (long c = c0; c < c1; ++c) {
        long d0 = chunk_begin(c, a->per_row), d1 = chunk_end(c, a->per_row, a->D);
        float y[n][d1 - d0];
        for (int e = 0; e < n; ++e)
            for (long d = d0; d < d1; ++d)
                y[e][d - d0] = round_bf16(dot1(a->down[e] + d * a->inter[e], a->act + a->a_off[e], a->inter[e]));
        for (long d = d0; d < d1; ++d) {
            float routed = 0.0f;
            for (int e = 0; e < a->num_routed; ++e) routed += y[e][d - d0] * a->weights[e];
            float out = round_bf16(routed);
            for (int e = a->num_routed; e < n; ++e) out = round_bf16(out + y[e][d - d0]);
            a->out[d] = f32_to_bf16(out);
        }
    }
}

void dsray_swiglu_experts_bf16(const bf16* x, int D, int num_experts, int num_routed, const bf16* const* gate,
                               const bf16* const* up, const bf16* const* down, const int* inter,
                               const float* weights, bf16* act, bf16* out, int nthreads) {
    // ~256 KiB of gate and up rows, and 128 output rows, per chunk: few claims on the pool's cursor
    long per_index = 65536 / D > 0 ? 65536 / D : 1;
    long a_off[num_experts + 1], blocks_off[num_experts + 1];
    a_off[0] = blocks_off[0] = 0;
    for (int e = 0; e < num_experts; ++e) {
        a_off[e + 1] = a_off[e] + inter[e];
        blocks_off[e + 1] = blocks_off[e] + num_chunks(inter[e], per_index);
    }
    swiglu_ctx a = {x, D, num_experts, num_routed, gate, up, down, inter, weights, act, out,
                    a_off, blocks_off, per_index, 128};
    parallel_chunks(swiglu_gate_up_chunk, &a, blocks_off[num_experts], nthreads);
    parallel_chunks(swiglu_down_chunk, &a, num_chunks(D, a.per_row), nthreads);
}

#if DSRAY_WIDE_TILES
// out[0:n] = sum_r coef[r] * rows[r][0:n] in fp32, for coefficients that are bf16 values (n a multiple
// of 16). Rows go in pairs: their columns interleaved (unpack), one vdpbf16ps multiplies a column of
// both rows by their two coefficients and adds both exact products to the sum, a third of the
// instructions of converting each row to fp32 first. Columns go in blocks of 128 held in registers
// (n a multiple of 16: a last half block of 16 columns is loaded masked).
static inline uint32_t bf16_bits(float f) { return f32_to_bf16(f); }

static void weighted_rows(const float* coef, const bf16* const* rows, long num_rows, int n, float* out) {
    // The interleaved halves hold columns {0-3, 8-11, 16-19, 24-27} (lo) and {4-7, ...} (hi) of each
    // 32; these indices put them back in order.
    const __m512i first = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i second = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int b = 0; b < n; b += 128) {
        const int blocks = (n - b + 31) / 32 < 4 ? (n - b + 31) / 32 : 4;
        const __mmask32 last = (n - b) % 32 && (n - b) / 32 < 4 ? 0xffffu : 0xffffffffu;  // the final block's columns
        __m512 lo[4], hi[4];
        for (int v = 0; v < 4; ++v) lo[v] = hi[v] = _mm512_setzero_ps();
        for (long r = 0; r < num_rows; r += 2) {
            const int pair = r + 1 < num_rows;
            const __m512bh c = (__m512bh)_mm512_set1_epi32(
                (int)(bf16_bits(coef[r]) | (pair ? bf16_bits(coef[r + 1]) << 16 : 0u)));
            for (int v = 0; v < blocks; ++v) {
                const __mmask32 mask = v == blocks - 1 ? last : 0xffffffffu;
                __m512i x = _mm512_maskz_loadu_epi16(mask, rows[r] + b + 32 * v);
                __m512i y = pair ? _mm512_maskz_loadu_epi16(mask, rows[r + 1] + b + 32 * v) : _mm512_setzero_si512();
                lo[v] = _mm512_dpbf16_ps(lo[v], (__m512bh)_mm512_unpacklo_epi16(x, y), c);
                hi[v] = _mm512_dpbf16_ps(hi[v], (__m512bh)_mm512_unpackhi_epi16(x, y), c);
            }
        }
        for (int v = 0; v < blocks; ++v) {
            _mm512_storeu_ps(out + b + 32 * v, _mm512_permutex2var_ps(lo[v], first, hi[v]));
            if (v < blocks - 1 || last == 0xffffffffu)
                _mm512_storeu_ps(out + b + 32 * v + 16, _mm512_permutex2var_ps(lo[v], second, hi[v]));
        }
    }
}
#else
// out[0:n] = sum_r coef[r] * rows[r][0:n] in fp32 (n a multiple of 16), 64 columns at a time in
// registers: each row widened to fp32 and multiplied by its coefficient (exact: both are bf16).
static void weighted_rows(const float* coef, const bf16* const* rows, long num_rows, int n, float* out) {
    for (int b = 0; b < n; b += 8 * VF) {
        const int vecs = (n - b) / VF < 8 ? (n - b) / VF : 8;
        vf32 acc[8];
        for (int v = 0; v < 8; ++v) acc[v] = vf_zero();
        for (long r = 0; r < num_rows; ++r) {
            const vf32 c = vf_set1(coef[r]);
            for (int v = 0; v < vecs; ++v) acc[v] = vf_fmadd(c, load_f32(rows[r] + b + VF * v, VF), acc[v]);
        }
        for (int v = 0; v < vecs; ++v) _mm256_storeu_ps(out + b + VF * v, acc[v]);
    }
}
#endif

// The dot products of four rows with one x (K elements), as [dot(r0, x), ..., dot(r3, x)].
static inline __m128 dot4(const bf16* r0, const bf16* r1, const bf16* r2, const bf16* r3, const bf16* x, int K) {
    vacc a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
    int k = 0;
    for (; k + VK <= K; k += VK) {
        const vbh xv = load_bh(x + k);
        a0 = vdp(a0, load_bh(r0 + k), xv);
        a1 = vdp(a1, load_bh(r1 + k), xv);
        a2 = vdp(a2, load_bh(r2 + k), xv);
        a3 = vdp(a3, load_bh(r3 + k), xv);
    }
    if (k < K) {
        const vbh xv = load_bh_tail(x + k, K - k);
        a0 = vdp(a0, load_bh_tail(r0 + k, K - k), xv);
        a1 = vdp(a1, load_bh_tail(r1 + k, K - k), xv);
        a2 = vdp(a2, load_bh_tail(r2 + k, K - k), xv);
        a3 = vdp(a3, load_bh_tail(r3 + k, K - k), xv);
    }
    return hsum4(a0, a1, a2, a3);
}

// Absorbed MLA attention for decode steps (one new token per sequence), once the rope is applied and
// the cache written (dsray_mla_decode_step_bf16 below): for sequence n and head h,
//   q_lat = q_nope W_UK[h]                       (given as W_UK^T [H, C, d_nope])
//   p     = softmax(scale * [q_lat, q_pe] . latent[s] for s < context_lens[n])
//   out   = (sum_s p[s] latent[s, :C]) W_UV[h]^T  (W_UV [H, d_v, C])
// reading the paged latent cache through the block table. Every intermediate is rounded to bf16
// where `attention/mla.py` holds a bf16 tensor (q_lat, scores, probabilities, o_lat, out).
// A chunk is one head for a block of up to MLA_SEQS sequences: the two up-projections are dot
// products of that head's weight rows with all of the block's rows at once (block_products, the
// weights read once per chunk); the attention itself runs per sequence. Consecutive chunks are the
// heads of one block, whose latents stay in L2 across them: blocks are sized to MLA_BLOCK_BYTES of
// context. C and d_v must be multiples of 16.
#define MLA_SEQS 8
#define MLA_BLOCK_BYTES (256L * 1024)

typedef struct {
    const bf16 *q_nope, *q_pe, *w_uk_t, *w_uv, *cache;
    long q_sn, q_sh, pe_sn, pe_sh, bt_stride;
    const int64_t *block_tables, *context_lens;
    int block_size, H, d_nope, R, C, d_v;
    float scale;
    bf16* out;
    long N, seqs;  // sequences, and sequences per block
} mla_ctx;

static void mla_decode_chunk(void* p, long c0, long c1) {
    const mla_ctx* a = p;
    const int C = a->C, R = a->R, W = C + R, d_v = a->d_v, bs = a->block_size;
    float acc[MLA_SEQS * (C > d_v ? C : d_v)];
    bf16 q_full[MLA_SEQS][W], o_lat[MLA_SEQS][C];
    for (long chunk = c0; chunk < c1; ++chunk) {
        const long h = chunk % a->H, n0 = chunk / a->H * a->seqs;
        const int M = n0 + a->seqs < a->N ? (int)a->seqs : (int)(a->N - n0);
        // q_lat of every sequence: [M, C]
        block_products(a->w_uk_t + h * (long)C * a->d_nope, a->d_nope, 0, C, a->q_nope + n0 * a->q_sn + h * a->q_sh,
                       a->q_sn, M, a->d_nope, acc, C);
        for (int m = 0; m < M; ++m) {
            for (int c = 0; c < C; ++c) q_full[m][c] = f32_to_bf16(acc[m * C + c]);
            memcpy(q_full[m] + C, a->q_pe + (n0 + m) * a->pe_sn + h * a->pe_sh, sizeof(bf16) * R);
        }
        for (int m = 0; m < M; ++m) {
            const long n = n0 + m, S = a->context_lens[n];
            const int64_t* table = a->block_tables + n * a->bt_stride;
            const bf16** rows = malloc(sizeof(bf16*) * (S > 0 ? S : 1));
            float* probs = malloc(sizeof(float) * (S > 0 ? S : 1));
            // Scores and softmax over the context.
            float max = -INFINITY;
            for (long s = 0; s < S; ++s) rows[s] = a->cache + (table[s / bs] * bs + s % bs) * (long)W;
            long s = 0;
            for (; s + 4 <= S; s += 4) {  // four positions at a time: one reduction for their four sums
                float dots[4];
                _mm_storeu_ps(dots, dot4(rows[s], rows[s + 1], rows[s + 2], rows[s + 3], q_full[m], W));
                for (int j = 0; j < 4; ++j) probs[s + j] = round_bf16(dots[j]) * a->scale;
            }
            for (; s < S; ++s) probs[s] = round_bf16(dot1(rows[s], q_full[m], W)) * a->scale;
            for (s = 0; s < S; ++s) max = probs[s] > max ? probs[s] : max;
            float sum = 0.0f;
            for (long s = 0; s < S; ++s) sum += (probs[s] = expf(probs[s] - max));
            for (long s = 0; s < S; ++s) probs[s] = round_bf16(probs[s] / sum);
            // o_lat = sum_s p[s] latent[s, :C]
            weighted_rows(probs, rows, S, C, acc);
            for (int c = 0; c < C; ++c) o_lat[m][c] = f32_to_bf16(acc[c]);
            free(probs);
            free(rows);
        }
        // out = o_lat W_UV[h]^T of every sequence: [M, d_v]
        block_products(a->w_uv + h * (long)d_v * C, C, 0, d_v, o_lat[0], C, M, C, acc, d_v);
        for (int m = 0; m < M; ++m) {
            bf16* o = a->out + ((n0 + m) * a->H + h) * d_v;
            for (int v = 0; v < d_v; ++v) o[v] = f32_to_bf16(acc[m * d_v + v]);
        }
    }
}


// RMSNorm as `dsray/layers.py` computes it: y = w * bf16(x / sqrt(mean(x^2) + eps)), the norm in
// fp32 and the weight product rounded to bf16. Rows of x have stride ldx; y is contiguous.
static void rmsnorm_row(const bf16* x, const bf16* w, bf16* y, int D, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < D; ++i) {
        float v = bf16_to_f32(x[i]);
        ss += v * v;
    }
    float r = 1.0f / sqrtf(ss / D + eps);
    for (int i = 0; i < D; ++i) y[i] = f32_to_bf16(bf16_to_f32(w[i]) * round_bf16(bf16_to_f32(x[i]) * r));
}

typedef struct {
    const bf16 *x, *w;
    bf16* y;
    long ldx;
    int D;
    float eps;
} rmsnorm_ctx;

static void rmsnorm_chunk(void* p, long c0, long c1) {
    const rmsnorm_ctx* a = p;
    for (long t = c0; t < c1; ++t) rmsnorm_row(a->x + t * a->ldx, a->w, a->y + t * a->D, a->D, a->eps);
}

void dsray_rmsnorm_bf16(const bf16* x, long ldx, const bf16* w, bf16* y, int T, int D, float eps, int nthreads) {
    rmsnorm_ctx a = {x, w, y, ldx, D, eps};
    parallel_chunks(rmsnorm_chunk, &a, T, T * (long)D >= 65536 ? nthreads : 1);
}

// Rotate the R/2 pairs of x (interleaved: (x0, x1), (x2, x3), ...; else halves: (x_i, x_{i+R/2}))
// by cis [R/2] (cos, sin pairs, already scaled) in fp32, as `attention/rope.py` does; y may be x.
static void rope_row(const bf16* x, const float* cis, bf16* y, int R, int interleaved) {
    int half = R / 2;
    bf16 tmp[R];
    for (int i = 0; i < half; ++i) {
        int i0 = interleaved ? 2 * i : i, i1 = interleaved ? 2 * i + 1 : i + half;
        float a = bf16_to_f32(x[i0]), b = bf16_to_f32(x[i1]), c = cis[2 * i], d = cis[2 * i + 1];
        tmp[i0] = f32_to_bf16(a * c - b * d);
        tmp[i1] = f32_to_bf16(a * d + b * c);
    }
    memcpy(y, tmp, sizeof(bf16) * R);
}

// The whole absorbed MLA decode step after the projections: for each sequence n, the latent of its
// new token (kv_a_layernorm of kv[n, :C], rope of kv[n, C:]) is written to cache slot
// slot_mapping[n]; then q's rope dims are rotated and attention runs as in mla_decode_chunk above.
// q is [N, H, d_nope + R] (rows q_sn apart), kv [N, C + R] (rows kv_sn apart), cis [N, R/2, 2].
void dsray_mla_decode_step_bf16(const bf16* q, long q_sn, const bf16* kv, long kv_sn, const bf16* kv_norm_w,
                                float eps, const float* cis, int interleaved, const int64_t* slot_mapping,
                                const bf16* w_uk_t, const bf16* w_uv, bf16* cache, const int64_t* block_tables,
                                long bt_stride, const int64_t* context_lens, int block_size, int N, int H, int d_nope,
                                int R, int C, int d_v, float scale, bf16* q_pe, bf16* out, int nthreads) {
    const int W = C + R;
    for (int n = 0; n < N; ++n) {
        bf16* row = cache + slot_mapping[n] * (long)W;
        rmsnorm_row(kv + n * kv_sn, kv_norm_w, row, C, eps);
        rope_row(kv + n * kv_sn + C, cis + (long)n * R, row + C, R, interleaved);
        for (int h = 0; h < H; ++h)
            rope_row(q + n * q_sn + (long)h * (d_nope + R) + d_nope, cis + (long)n * R, q_pe + ((long)n * H + h) * R,
                     R, interleaved);
    }
    mla_ctx a = {q,          q_pe,   w_uk_t,       w_uv,       cache, q_sn, d_nope + R, (long)H * R, R, bt_stride,
                 block_tables, context_lens, block_size, H, d_nope, R, C, d_v, scale, out, N, 1};
    long longest = 1;
    for (int n = 0; n < N; ++n) longest = context_lens[n] > longest ? context_lens[n] : longest;
    a.seqs = MLA_BLOCK_BYTES / (longest * W * (long)sizeof(bf16));
    a.seqs = a.seqs < 1 ? 1 : a.seqs > MLA_SEQS ? MLA_SEQS : a.seqs;
    parallel_chunks(mla_decode_chunk, &a, (long)H * ((N + a.seqs - 1) / a.seqs), nthreads);
}

// dot(w[:K], x[:K]) of an fp32 row and a bf16 row, in fp32.
static inline float dot_f32_bf16(const float* w, const bf16* x, int K) {
    vf32 a0 = vf_zero(), a1 = vf_zero();
    int k = 0;
    for (; k + VF <= K; k += VF) {
        vf32 prod = vf_mul(vf_loadu(w + k), load_f32(x + k, VF));
        if (k & VF) a1 = vf_add(a1, prod);
        else a0 = vf_add(a0, prod);
    }
    float sum = vf_sum(vf_add(a0, a1));
    for (; k < K; ++k) sum += w[k] * bf16_to_f32(x[k]);
    return sum;
}

// The MoE gate for T tokens (`router/gate.py`): fp32 logits of x [T, D] against fp32 weight [E, D],
// softmax or sigmoid scores, then greedy (method 0), group-limited greedy (1) or noaux_tc (2,
// choosing by scores + bias) top-k; weights normalised when asked and scaled. Ties go to the
// lower expert id. Writes weights [T, K] (fp32) and ids [T, K] (int64), in descending choice.
static void top_k_desc(const float* v, int n, int k, int64_t* idx) {
    char taken[n];
    memset(taken, 0, (size_t)n);
    for (int j = 0; j < k; ++j) {
        int best = -1;
        for (int i = 0; i < n; ++i)
            if (!taken[i] && (best < 0 || v[i] > v[best])) best = i;
        idx[j] = best;
        taken[best] = 1;
    }
}

typedef struct {
    const bf16* x;
    const float *w, *bias;
    long ldx;
    int D, E, K, n_group, topk_group, scoring, method, norm;
    float scaling;
    float* weights;
    int64_t* ids;
} gate_ctx;

static void gate_chunk(void* p, long c0, long c1) {
    const gate_ctx* a = p;
    const int E = a->E, K = a->K, G = a->n_group > 0 ? a->n_group : 1, per = E / G;
    float scores[E], choice[E], group_scores[G];
    int64_t sel[E > G ? E : G];
    for (long t = c0; t < c1; ++t) {
        const bf16* x = a->x + t * a->ldx;
        for (int e = 0; e < E; ++e) scores[e] = dot_f32_bf16(a->w + (long)e * a->D, x, a->D);
        if (a->scoring == 0) {  // softmax
            float max = -INFINITY, sum = 0.0f;
            for (int e = 0; e < E; ++e) max = scores[e] > max ? scores[e] : max;
            for (int e = 0; e < E; ++e) sum += (scores[e] = expf(scores[e] - max));
            for (int e = 0; e < E; ++e) scores[e] /= sum;
        } else {
            for (int e = 0; e < E; ++e) scores[e] = 1.0f / (1.0f + expf(-scores[e]));
        }
        for (int e = 0; e < E; ++e) choice[e] = a->method == 2 ? scores[e] + a->bias[e] : scores[e];
        if (a->method != 0) {
            for (int g = 0; g < G; ++g) {
                const float* c = choice + g * per;
                if (a->method == 1) {  // the group's best expert
                    float m = -INFINITY;
                    for (int i = 0; i < per; ++i) m = c[i] > m ? c[i] : m;
                    group_scores[g] = m;
                } else {  // the sum of its two best
                    int64_t two[2] = {0, 0};
                    top_k_desc(c, per, per < 2 ? per : 2, two);
                    group_scores[g] = c[two[0]] + (per < 2 ? 0.0f : c[two[1]]);
                }
            }
            top_k_desc(group_scores, G, a->topk_group, sel);
            for (int g = 0; g < G; ++g) {
                int kept = 0;
                for (int q = 0; q < a->topk_group; ++q) kept |= sel[q] == g;
                if (!kept)
                    for (int i = 0; i < per; ++i) choice[g * per + i] = a->method == 1 ? 0.0f : -INFINITY;
            }
        }
        int64_t* ids = a->ids + t * K;
        float* wts = a->weights + t * K;
        top_k_desc(choice, E, K, ids);
        float sum = 0.0f;
        for (int k = 0; k < K; ++k) sum += (wts[k] = a->method == 1 ? choice[ids[k]] : scores[ids[k]]);
        for (int k = 0; k < K; ++k) {
            if (a->norm && K > 1) wts[k] = wts[k] / (sum + 1e-20f);
            wts[k] *= a->scaling;
        }
    }
}

void dsray_gate_bf16(const bf16* x, long ldx, const float* w, const float* bias, int T, int D, int E, int K,
                     int n_group, int topk_group, int scoring, int method, int norm, float scaling, float* weights,
                     int64_t* ids, int nthreads) {
    gate_ctx a = {x, w, bias, ldx, D, E, K, n_group, topk_group, scoring, method, norm, scaling, weights, ids};
    parallel_chunks(gate_chunk, &a, T, T >= 8 ? nthreads : 1);
}

// Rows sorted by expert slot, each through its own slot's SwiGLU expert (an expert rank's grouped
// compute, `ExpertShard.run_sorted`): for slot s = slots[j], rows [row_off[2j], row_off[2j + 1]) of X
// give the same Y rows = down_s(bf16(silu(bf16(gate_s x)) * bf16(up_s x))), every product rounded to bf16 as
// `ExpertShard.expert_ffn` rounds it. Weights are stacked: w13 [S, 2I, D] (gate rows then up rows),
// w2 [S, D, I]. Each weight row is read from memory once for all of its slot's rows, so a slot with
// a handful of rows costs about what one row does. `act` is bf16 scratch of [rows, I]. Two phases
// (gate/up, then down), each cut into chunks of one slot's weight rows. A slot of up to
// NARROW_MAX_ROWS rows takes the narrow tiles (its cost is the weight read); a wider one takes the
// wide tiles below (its cost is the products), after a first phase that packs its rows.
typedef struct {
    const bf16 *X, *w13, *w2;
    bf16 *Y, *act;
    const long* row_off;  // [begin, end) per slot
    const int* slots;
    long D, I, per_index, per_row, blocks1, blocks2;
    // The wide slots' packed rows: slot j's blocks start at block wide_off[j] (-1: a narrow slot);
    // block b is xp + b * WIDE_LANES * pairs(D) and actp + b * WIDE_LANES * pairs(I).
    const long* wide_off;
    const long* pack_slot;  // packing chunk c: the slot and first row of one block
    const long* pack_row;
    uint32_t *xp, *actp;
    int amx;  // the packed slots take the AMX tiles (amx_slots)
} grouped_ctx;

// Chunks and packing are laid out in whole wide tiles on every instruction set (without wide tiles
// only the chunk sizes see these).
#define WIDE_LANES 16
#define WIDE_N 16  // weight rows per tile: the accumulators

static inline long pairs(long K) { return (K + 1) / 2; }

#if DSRAY_WIDE_TILES
// ---- Wide tiles: a slot's rows in the vector lanes -----------------------------------------------
//
// With more rows than NARROW_MAX_ROWS the products are the cost. The square tiles keep K in the
// lanes: every output pays a horizontal sum (a third of the work when K is I = 256) and every
// product loads an X vector. Here a block of 16 of a slot's rows is the lanes instead: its rows are
// packed as [K/2][16] bf16 pairs (rows past the slot's end are zero), and a product step takes one
// packed vector against a broadcast weight pair of each of WIDE_N weight rows: no horizontal sums,
// one broadcast per product. SiLU is computed per vector (exp512, within an ulp or two of expf). 2
// threads, 64 slots of D 1024, I 256, weights from memory: 16 rows a slot 211 -> 292 GFLOP/s,
// 32 rows 239 -> 322, 64 rows 258 -> 321 (oneDNN one expert at a time: 218).
typedef uint32_t pair_t __attribute__((may_alias, aligned(2)));  // two adjacent bf16 of a weight row

// Transpose a 16x16 block of 32-bit lanes in place: r[i][j] <- r[j][i]. Four butterfly stages, each
// swapping one bit of the row index with the same bit of the lane index.
static inline void transpose16(__m512i r[16]) {
    for (int h = 8; h >= 1; h /= 2) {
        int lo[16], hi[16];
        for (int j = 0; j < 16; ++j) {
            lo[j] = (j & h) ? 16 + j - h : j;
            hi[j] = (j & h) ? 16 + j : j + h;
        }
        __m512i ilo = _mm512_loadu_si512(lo), ihi = _mm512_loadu_si512(hi);
        for (int i = 0; i < 16; ++i) {
            if (i & h) continue;
            __m512i a = r[i], b = r[i + h];
            r[i] = _mm512_permutex2var_epi32(a, ilo, b);
            r[i + h] = _mm512_permutex2var_epi32(a, ihi, b);
        }
    }
}

// Pack rows [0, mr) of X (mr <= 16) as [pairs(K)][16] pairs, zero past mr (and past K).
static void pack_block(const bf16* X, long ldx, int mr, long K, uint32_t* out) {
    const long K2 = pairs(K);
    for (long k2 = 0; k2 < K2; k2 += 16) {
        const long n = (K - 2 * k2) < 32 ? K - 2 * k2 : 32;  // bf16 of each row in this block
        __m512i r[16];
        for (int m = 0; m < 16; ++m)
            r[m] = m < mr ? _mm512_maskz_loadu_epi16(_bzhi_u32(0xffffffffu, (unsigned)n), X + m * ldx + 2 * k2)
                          : _mm512_setzero_si512();
        transpose16(r);
        for (long j = 0; j < 16 && k2 + j < K2; ++j) _mm512_storeu_si512(out + (k2 + j) * WIDE_LANES, r[j]);
    }
}

// *acc += x . broadcast(pair at p), the pair broadcast by the load itself (an embedded broadcast:
// `_mm512_set1_epi32` of a load becomes a separate vpbroadcastd, which competes with the products
// for the vector pipes).
static inline __attribute__((always_inline)) void dp_bcast(__m512* acc, __m512bh x, const bf16* p) {
    __asm__("vdpbf16ps %1%{1to16%}, %2, %0" : "+v"(*acc) : "m"(*(const pair_t*)p), "v"(x));
}

// acc[n] (lane m) = dot(W[n], X[m]) for the 16 packed rows `xp` ([pairs(K)][16]) and the WIDE_N
// weight rows at w[n] (K bf16 each). With `next`, the next tile's weight rows are fetched into L2
// meanwhile, a cache line of each per 64 bytes of these rows consumed: their memory read overlaps
// these products instead of stalling the next tile (the weights of a prefill's experts come
// from memory once per layer, and at 16 rows a slot a stalled read costs about what its products do).
static inline __attribute__((always_inline)) void wide_tile(const uint32_t* xp, const bf16* const w[WIDE_N], long K,
                                                          __m512 acc[WIDE_N], const bf16* const* next) {
    for (int n = 0; n < WIDE_N; ++n) acc[n] = _mm512_setzero_ps();
    const long K2 = K / 2;
    long k2 = 0;
    for (; k2 + 4 <= K2; k2 += 4) {
        if (next != NULL && k2 % 16 == 0)
            for (int n = 0; n < WIDE_N; ++n) _mm_prefetch((const char*)(next[n] + 2 * k2), _MM_HINT_T1);
        __m512bh x0 = (__m512bh)_mm512_loadu_si512(xp + (k2 + 0) * WIDE_LANES);
        __m512bh x1 = (__m512bh)_mm512_loadu_si512(xp + (k2 + 1) * WIDE_LANES);
        __m512bh x2 = (__m512bh)_mm512_loadu_si512(xp + (k2 + 2) * WIDE_LANES);
        __m512bh x3 = (__m512bh)_mm512_loadu_si512(xp + (k2 + 3) * WIDE_LANES);
        for (int n = 0; n < WIDE_N; ++n) {
            const bf16* p = w[n] + 2 * k2;
            dp_bcast(&acc[n], x0, p);
            dp_bcast(&acc[n], x1, p + 2);
            dp_bcast(&acc[n], x2, p + 4);
            dp_bcast(&acc[n], x3, p + 6);
        }
    }
    for (; k2 < K2; ++k2) {
        __m512bh x = (__m512bh)_mm512_loadu_si512(xp + k2 * WIDE_LANES);
        for (int n = 0; n < WIDE_N; ++n)
            acc[n] = _mm512_dpbf16_ps(acc[n], x, (__m512bh)_mm512_set1_epi32((int)*(const pair_t*)(w[n] + 2 * k2)));
    }
    if (K & 1) {  // the last column alone: its pair's other half is zero on the packed side
        __m512bh x = (__m512bh)_mm512_loadu_si512(xp + K2 * WIDE_LANES);
        for (int n = 0; n < WIDE_N; ++n) acc[n] = _mm512_dpbf16_ps(acc[n], x, (__m512bh)_mm512_set1_epi32(w[n][K - 1]));
    }
}

// bf16(v) per lane, widened back to fp32 (round to nearest even, as f32_to_bf16).
static inline __m512i to_bf16_bits(__m512 v) { return _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)); }
static inline __m512 round_bf16_512(__m512 v) { return _mm512_castsi512_ps(_mm512_slli_epi32(to_bf16_bits(v), 16)); }

// exp(x) per lane: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by Cephes' expf polynomial (within an
// ulp or two of expf), scaled by 2^n (inf past ~88.7, 0 below ~-104, as expf).
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(89.0f)), _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

// `count` weight rows of a tile from row `first` of W ([N, K]), `nr` of them real: the rest repeat
// the last (read, not used), so a tile always has its WIDE_N rows.
static inline void tile_rows(const bf16* W, long K, long first, long nr, int count, const bf16** w) {
    for (long n = 0; n < count; ++n) w[n] = W + (first + (n < nr ? n : nr - 1)) * K;
}

static void grouped_pack_chunk(void* p, long c0, long c1) {
    const grouped_ctx* a = p;
    for (long c = c0; c < c1; ++c) {
        const long j = a->pack_slot[c], r = a->pack_row[c], end = a->row_off[2 * j + 1];
        const long block = a->wide_off[j] + (r - a->row_off[2 * j]) / WIDE_LANES;
        const int mr = end - r < WIDE_LANES ? (int)(end - r) : WIDE_LANES;
        pack_block(a->X + r * a->D, a->D, mr, a->D, a->xp + block * WIDE_LANES * pairs(a->D));
    }
}

// The SwiGLU of `nr` (<= 16) intermediate indices i + n of a block of 16 rows, lane m of g[n] and
// u[n] holding row m's gate and up products: act = bf16(bf16(silu(bf16(g))) * bf16(u)), stored at
// `out` (index i's pair of the block's packed act, i even) as pairs (i + n, i + n + 1).
static inline void pack_act(const __m512* g, const __m512* u, long nr, uint32_t* out) {
    __m512i bits[16];
    for (long n = 0; n < nr; ++n) {
        __m512 gn = round_bf16_512(g[n]), un = round_bf16_512(u[n]);
        __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), gn));
        __m512 silu = round_bf16_512(_mm512_div_ps(gn, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
        bits[n] = to_bf16_bits(_mm512_mul_ps(silu, un));
    }
    for (long n = 0; n < nr; n += 2) {
        __m512i hi = n + 1 < nr ? _mm512_slli_epi32(bits[n + 1], 16) : _mm512_setzero_si512();
        _mm512_storeu_si512(out + n / 2 * WIDE_LANES, _mm512_or_si512(bits[n], hi));
    }
}

// Gate and up rows [i0, i1) of a wide slot, WIDE_N / 2 of each per tile, for each block of its
// rows: act = bf16(bf16(silu(bf16(g))) * bf16(u)), written packed ([pairs(I)][16]) for the down tiles.
static void wide_gate_up(const grouped_ctx* a, long j, const bf16* w, long i0, long i1) {
    const long rows = a->row_off[2 * j + 1] - a->row_off[2 * j], I = a->I, D = a->D, half = WIDE_N / 2;
    for (long i = i0; i < i1; i += half) {
        const long nr = i1 - i < half ? i1 - i : half, next_nr = i1 - i - nr < half ? i1 - i - nr : half;
        const bf16 *wr[WIDE_N], *next[WIDE_N];
        tile_rows(w, D, i, nr, half, wr);
        tile_rows(w + I * D, D, i, nr, half, wr + half);
        if (next_nr > 0) {
            tile_rows(w, D, i + nr, next_nr, half, next);
            tile_rows(w + I * D, D, i + nr, next_nr, half, next + half);
        }
        for (long b = 0; b * WIDE_LANES < rows; ++b) {
            const long block = a->wide_off[j] + b;
            __m512 acc[WIDE_N];
            wide_tile(a->xp + block * WIDE_LANES * pairs(D), wr, D, acc, b == 0 && next_nr > 0 ? next : NULL);
            pack_act(acc, acc + half, nr, a->actp + block * WIDE_LANES * pairs(I) + i / 2 * WIDE_LANES);
        }
    }
}

// Outputs d .. d + nr - 1 of block b of slot j's rows, lane m of acc[n] holding row m's output d + n
// (fp32): transposed, so that each row's outputs are one vector, and stored rounded to bf16.
static inline void store_outputs(const grouped_ctx* a, long j, long b, long d, long nr, const __m512 acc[WIDE_N]) {
    const long first = a->row_off[2 * j] + b * WIDE_LANES, end = a->row_off[2 * j + 1];
    const long mr = end - first < WIDE_LANES ? end - first : WIDE_LANES;
    __m512i t[WIDE_N];
    for (int n = 0; n < WIDE_N; ++n) t[n] = _mm512_castps_si512(acc[n]);
    transpose16(t);
    for (long m = 0; m < mr; ++m)
        _mm256_mask_storeu_epi16(a->Y + (first + m) * a->D + d, (__mmask16)_bzhi_u32(0xffff, (unsigned)nr),
                                 (__m256i)_mm512_cvtneps_pbh(_mm512_castsi512_ps(t[m])));
}

// Down rows [d0, d1) of a wide slot from its packed act: Y[m, d] for each block of its rows.
static void wide_down(const grouped_ctx* a, long j, const bf16* w, long d0, long d1) {
    const long rows = a->row_off[2 * j + 1] - a->row_off[2 * j], I = a->I;
    for (long d = d0; d < d1; d += WIDE_N) {
        const long nr = d1 - d < WIDE_N ? d1 - d : WIDE_N, next_nr = d1 - d - nr < WIDE_N ? d1 - d - nr : WIDE_N;
        const bf16 *wr[WIDE_N], *next[WIDE_N];
        tile_rows(w, I, d, nr, WIDE_N, wr);
        if (next_nr > 0) tile_rows(w, I, d + nr, next_nr, WIDE_N, next);
        for (long b = 0; b * WIDE_LANES < rows; ++b) {
            __m512 acc[WIDE_N];
            wide_tile(a->actp + (a->wide_off[j] + b) * WIDE_LANES * pairs(I), wr, I, acc,
                      b == 0 && next_nr > 0 ? next : NULL);
            store_outputs(a, j, b, d, nr, acc);
        }
    }
}

#if DSRAY_AMX
// ---- AMX tiles: a packed slot's products on the matrix unit ---------------------------------------
//
// On a CPU with AMX (Sapphire Rapids and later) one `tdpbf16ps` multiplies a 16 x 32 bf16 tile by a
// 32 x 16 one into 16 x 16 fp32 sums, ~16x the products of a `vdpbf16ps` in about as many cycles:
// the products stop being the cost and a slot of a few rows runs at the speed of its weight read.
// The wide tiles' packed rows ([pairs(K)][16] pairs) are already the layout of tdpbf16ps's second
// operand (16 k-pairs by 16 rows per tile), and 16 weight rows at 32 columns are its first, loaded
// in place (rows ldw apart): the sums are the wide tiles' acc[n] lane m = dot(W[n], X[m]), so their
// epilogues (pack_act, store_outputs) are shared. Needs D and I multiples of 32 (amx_fits).
// Tiles: 0 and 1 the sums (gate, up; down uses 0), 2 and 3 the weight tiles, 4 the packed rows.
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

// Per thread: 16 rows of 64 bytes in tiles 0-4 (the config is thread state, loaded per phase).
static void amx_begin(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 5; ++t) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

// The 16 x 16 fp32 sums a tile stored at `buf`, as acc[n] = row n.
static inline void sums_of(const float* buf, __m512 acc[16]) {
    for (int n = 0; n < 16; ++n) acc[n] = _mm512_load_ps(buf + n * 16);
}

// Gate and up rows [i0, i1) of a packed slot (i0, i1 multiples of 16), 16 of each per tile. The next
// tile's weight rows are fetched into L2 while this one's are multiplied, a cache line of each row
// per 32 columns, as the tiles consume them.
static void amx_gate_up(const grouped_ctx* a, long j, const bf16* w, long i0, long i1) {
    const long rows = a->row_off[2 * j + 1] - a->row_off[2 * j], I = a->I, D = a->D;
    float g[256] __attribute__((aligned(64))), u[256] __attribute__((aligned(64)));
    for (long i = i0; i < i1; i += 16) {
        const bf16 *wg = w + i * D, *wu = w + (I + i) * D;
        const int fetch = i + 16 < i1;
        for (long b = 0; b * WIDE_LANES < rows; ++b) {
            const long block = a->wide_off[j] + b;
            const uint32_t* xp = a->xp + block * WIDE_LANES * pairs(D);
            _tile_zero(0);
            _tile_zero(1);
            for (long k = 0; k < D; k += 32) {
                if (fetch && b == 0)
                    for (int n = 16; n < 32; ++n) {
                        _mm_prefetch((const char*)(wg + n * D + k), _MM_HINT_T1);
                        _mm_prefetch((const char*)(wu + n * D + k), _MM_HINT_T1);
                    }
                _tile_loadd(4, xp + k / 2 * WIDE_LANES, 64);
                _tile_loadd(2, wg + k, D * sizeof(bf16));
                _tile_loadd(3, wu + k, D * sizeof(bf16));
                _tile_dpbf16ps(0, 2, 4);
                _tile_dpbf16ps(1, 3, 4);
            }
            _tile_stored(0, g, 64);
            _tile_stored(1, u, 64);
            __m512 gs[16], us[16];
            sums_of(g, gs);
            sums_of(u, us);
            pack_act(gs, us, 16, a->actp + block * WIDE_LANES * pairs(I) + i / 2 * WIDE_LANES);
        }
    }
}

// Down rows [d0, d1) of a packed slot (multiples of 16) from its packed act, 16 per tile.
static void amx_down(const grouped_ctx* a, long j, const bf16* w, long d0, long d1) {
    const long rows = a->row_off[2 * j + 1] - a->row_off[2 * j], I = a->I;
    float y[256] __attribute__((aligned(64)));
    for (long d = d0; d < d1; d += 16) {
        const bf16* wd = w + d * I;
        const int fetch = d + 16 < d1;
        for (long b = 0; b * WIDE_LANES < rows; ++b) {
            const uint32_t* act = a->actp + (a->wide_off[j] + b) * WIDE_LANES * pairs(I);
            _tile_zero(0);
            for (long k = 0; k < I; k += 32) {
                if (fetch && b == 0)
                    for (int n = 16; n < 32; ++n) _mm_prefetch((const char*)(wd + n * I + k), _MM_HINT_T1);
                _tile_loadd(4, act + k / 2 * WIDE_LANES, 64);
                _tile_loadd(2, wd + k, I * sizeof(bf16));
                _tile_dpbf16ps(0, 2, 4);
            }
            _tile_stored(0, y, 64);
            __m512 acc[16];
            sums_of(y, acc);
            store_outputs(a, j, b, d, 16, acc);
        }
    }
}
#endif
#endif

// Whether packed slots take the AMX tiles (dsray_use_amx): a build with AMX, on a CPU and kernel
// that grant this process the tiles' state, and not turned off.
static int amx_on;

// Where the tiles take a call: whole 32-column steps of D and I, and slots of AMX_MIN_ROWS rows or
// more (fewer cost only their weight read, which the narrow tiles already run at).
static inline int amx_fits(long D, long I) { return DSRAY_AMX && amx_on && D % 32 == 0 && I % 32 == 0; }
#define AMX_MIN_ROWS 2

// Asks for the AMX tiles (1) or gives them up (0); returns whether the kernels now use them (-1:
// only that). Linux grants a process the tiles' 8 KiB of register state on request (arch_prctl),
// once for all its threads.
int dsray_use_amx(int on) {
#if DSRAY_AMX
    static int granted = -1;
    if (on < 0) return amx_on;
    if (on && granted < 0) granted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
    amx_on = on && granted > 0;
#else
    (void)on;
#endif
    return amx_on;
}

// The narrow tiles take a slot's rows NARROW_MAX_ROWS at a time: a narrow slot's in one pass, a
// wide slot's in several where the memory to pack its rows could not be had.
static void grouped_gate_up_chunk(void* p, long c0, long c1) {
    const grouped_ctx* a = p;
    float g[NARROW_MAX_ROWS * a->per_index], u[NARROW_MAX_ROWS * a->per_index];
#if DSRAY_AMX
    if (a->amx) amx_begin();
#endif
    for (long c = c0; c < c1; ++c) {
        long j = c / a->blocks1, i0 = (c % a->blocks1) * a->per_index;
        long i1 = i0 + a->per_index < a->I ? i0 + a->per_index : a->I;
        const bf16* w = a->w13 + (long)a->slots[j] * 2 * a->I * a->D;
#if DSRAY_WIDE_TILES
        if (a->wide_off[j] >= 0) {  // the first tile's rows; each tile fetches the next one's
            const long tile = a->amx ? 16 : WIDE_N / 2, first = i1 - i0 < tile ? i1 - i0 : tile;
            warm(w + i0 * a->D, first * a->D);
            warm(w + (a->I + i0) * a->D, first * a->D);
#if DSRAY_AMX
            if (a->amx) {
                amx_gate_up(a, j, w, i0, i1);
                continue;
            }
#endif
            wide_gate_up(a, j, w, i0, i1);
            continue;
        }
#endif
        for (long r = a->row_off[2 * j]; r < a->row_off[2 * j + 1]; r += NARROW_MAX_ROWS) {
            int mr = a->row_off[2 * j + 1] - r < NARROW_MAX_ROWS ? (int)(a->row_off[2 * j + 1] - r) : NARROW_MAX_ROWS;
            const bf16* x = a->X + r * a->D;
            block_products(w, a->D, i0, i1, x, a->D, mr, a->D, g, a->per_index);
            block_products(w + a->I * a->D, a->D, i0, i1, x, a->D, mr, a->D, u, a->per_index);
            for (int m = 0; m < mr; ++m)
                for (long i = i0; i < i1; ++i) {
                    float gi = round_bf16(g[m * a->per_index + i - i0]), ui = round_bf16(u[m * a->per_index + i - i0]);
                    float silu = silu_bf16(gi);
                    a->act[(r + m) * a->I + i] = f32_to_bf16(silu * ui);
                }
        }
    }
#if DSRAY_AMX
    if (a->amx) _tile_release();
#endif
}

static void grouped_down_chunk(void* p, long c0, long c1) {
    const grouped_ctx* a = p;
    float y[NARROW_MAX_ROWS * a->per_row];
#if DSRAY_AMX
    if (a->amx) amx_begin();
#endif
    for (long c = c0; c < c1; ++c) {
        long j = c / a->blocks2, d0 = (c % a->blocks2) * a->per_row;
        long d1 = d0 + a->per_row < a->D ? d0 + a->per_row : a->D;
        const bf16* w = a->w2 + (long)a->slots[j] * a->D * a->I;
#if DSRAY_WIDE_TILES
        if (a->wide_off[j] >= 0) {
            warm(w + d0 * a->I, (d1 - d0 < WIDE_N ? d1 - d0 : WIDE_N) * a->I);
#if DSRAY_AMX
            if (a->amx) {
                amx_down(a, j, w, d0, d1);
                continue;
            }
#endif
            wide_down(a, j, w, d0, d1);
            continue;
        }
#endif
        for (long r = a->row_off[2 * j]; r < a->row_off[2 * j + 1]; r += NARROW_MAX_ROWS) {
            int mr = a->row_off[2 * j + 1] - r < NARROW_MAX_ROWS ? (int)(a->row_off[2 * j + 1] - r) : NARROW_MAX_ROWS;
            block_products(w, a->I, d0, d1, a->act + r * a->I, a->I, mr, a->I, y, a->per_row);
            for (int m = 0; m < mr; ++m)
                for (long d = d0; d < d1; ++d) a->Y[(r + m) * a->D + d] = f32_to_bf16(y[m * a->per_row + d - d0]);
        }
    }
#if DSRAY_AMX
    if (a->amx) _tile_release();
#endif
}

void dsray_swiglu_grouped_bf16(const bf16* X, const bf16* w13, const bf16* w2, int num_slots, const int* slots,
                               const long* row_off, long D, long I, bf16* act, bf16* Y, int nthreads) {
    // Chunks of ~128 KiB of one slot's weight rows (its rows pass over them from L2): 32 KiB chunks
    // made ~3,000 claims per layer on the pool's cursor, its cache line bouncing.
    long per_index = 32768 / D > 0 ? 32768 / D : 1;
    long per_row = 65536 / I > 0 ? 65536 / I : 1;
    // Even, so a wide tile's intermediate pairs never straddle two chunks; whole wide tiles when large.
    per_index = per_index < WIDE_N ? (per_index + 1) / 2 * 2 : per_index / (WIDE_N / 2) * (WIDE_N / 2);
    per_row = per_row < WIDE_N ? per_row : per_row / WIDE_N * WIDE_N;
    const int amx = amx_fits(D, I);
    if (amx) {  // whole AMX tiles: 16 intermediate indices, 16 outputs
        per_index = (per_index + 15) / 16 * 16;
        per_row = (per_row + 15) / 16 * 16;
    }
    long* wide_off = malloc(sizeof(long) * (size_t)(num_slots > 0 ? num_slots : 1));
    long blocks = 0;
    for (int j = 0; j < num_slots; ++j) {
        const long rows = row_off[2 * j + 1] - row_off[2 * j];
        const int wide = DSRAY_WIDE_TILES && (rows > NARROW_MAX_ROWS || (amx && rows >= AMX_MIN_ROWS));
        wide_off[j] = wide ? blocks : -1;
        if (wide) blocks += (rows + WIDE_LANES - 1) / WIDE_LANES;
    }
    long *pack_slot = malloc(sizeof(long) * (size_t)(blocks > 0 ? 2 * blocks : 1)), *pack_row = pack_slot + blocks;
    uint32_t *xp = NULL, *actp = NULL;
    if (blocks > 0) {
        for (int j = 0, c = 0; j < num_slots; ++j)
            for (long r = row_off[2 * j]; wide_off[j] >= 0 && r < row_off[2 * j + 1]; r += WIDE_LANES, ++c) {
                pack_slot[c] = j;
                pack_row[c] = r;
            }
        xp = aligned_alloc(64, (size_t)blocks * WIDE_LANES * (size_t)(pairs(D) + pairs(I)) * sizeof(uint32_t));
        actp = xp + blocks * WIDE_LANES * pairs(D);
    }
    if (blocks > 0 && xp == NULL) {  // no memory for the packed rows: every slot takes the narrow tiles
        for (int j = 0; j < num_slots; ++j) wide_off[j] = -1;
        blocks = 0;
    }
    grouped_ctx a = {X,         w13,       w2,         Y,        act,      row_off, slots, D, I, per_index, per_row,
                     num_chunks(I, per_index), num_chunks(D, per_row), wide_off, pack_slot, pack_row, xp, actp,
                     amx && blocks > 0};  // no packed slot (a batch-1 step): no tile config to load
#if DSRAY_WIDE_TILES
    if (blocks > 0) parallel_chunks(grouped_pack_chunk, &a, blocks, nthreads);
#endif
    parallel_chunks(grouped_gate_up_chunk, &a, num_slots * a.blocks1, nthreads);
    parallel_chunks(grouped_down_chunk, &a, num_slots * a.blocks2, nthreads);
    free(xp);
    free(pack_slot);
    free(wide_off);
}

// The combine of an MoE exchange (`router/exchange.py`, `Combine.wait`): out[t] = bf16(sum_k
// w[t, k] * back[pos[t * K + k]]), the K results of token t weighted and summed in k order in fp32,
// where back holds the results in sorted order and order[i] is the (token, k) pair of sorted row
// i. One pass over the results instead of a scatter, an fp32 copy, a product and a sum.
typedef struct {
    const bf16* back;
    const int64_t* pos;
    const float* w;
    bf16* out;
    int K, D;
} combine_ctx;

static void combine_chunk(void* p, long c0, long c1) {
    const combine_ctx* a = p;
    for (long t = c0; t < c1; ++t) {
        for (int d = 0; d < a->D; d += VF) {
            const int n = a->D - d >= VF ? VF : a->D - d;
            vf32 acc = vf_zero();
            for (int k = 0; k < a->K; ++k) {
                const bf16* row = a->back + a->pos[t * a->K + k] * (long)a->D + d;
                acc = vf_add(acc, vf_mul(vf_set1(a->w[t * a->K + k]), load_f32(row, n)));
            }
            store_bf16(a->out + t * (long)a->D + d, acc, n);
        }
    }
}

void dsray_combine_bf16(const bf16* back, const int64_t* order, const float* weights, int T, int K, int D,
                        bf16* out, int nthreads) {
    int64_t* pos = malloc(sizeof(int64_t) * (size_t)(T > 0 ? T * K : 1));
    for (long i = 0; i < (long)T * K; ++i) pos[order[i]] = i;
    combine_ctx a = {back, pos, weights, out, K, D};
    parallel_chunks(combine_chunk, &a, T, T * (long)K * D >= 65536 ? nthreads : 1);
    free(pos);
}
