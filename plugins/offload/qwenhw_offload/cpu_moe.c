/* Routed experts of one MoE layer on the CPU, for a few tokens (decode), in one OpenMP region.
 *
 * Why a kernel: torch runs a token's 8 experts as 24 separate GEMVs, each a fork/join of the thread team
 * over a 3 MB matrix, and reaches about a third of the host's memory bandwidth. Here every selected
 * expert's weights are streamed once by one thread team: phase 1 splits the gate/up rows of all selected
 * experts over the threads, phase 2 splits the rows of the down projections.
 *
 * Numerics follow transformers' eager experts in bf16: gate, up, the activation product and each expert's
 * output are rounded to bf16, each output is scaled by its routing weight and added to the token's output
 * in ascending expert order, rounding after every step. Dot products accumulate in fp32.
 *
 * Layouts (transformers >= 5): gate_up [E, 2I, H] (gate rows first), down [E, H, I], x [T, H] bf16,
 * idx [T, K] int64, w [T, K] bf16, out [T, H] bf16. skip[e] != 0 leaves expert e out (the GPU computes it).
 * counts[e] (optional) is incremented once per token routed to e: routing statistics for the expert cache.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef uint16_t bf16;

static inline float bf2f(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2bf(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float round_bf(float f) { return bf2f(f2bf(f)); }

static float dot(const bf16 *a, const bf16 *b, int64_t n) {
    int64_t k = 0;
    float s = 0.f;
#if defined(__AVX512BF16__) && defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; k + 64 <= n; k += 64) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(a + k), (__m512bh)_mm512_loadu_si512(b + k));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(a + k + 32),
                              (__m512bh)_mm512_loadu_si512(b + k + 32));
    }
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#endif
    float t = 0.f;
#pragma omp simd reduction(+ : t)
    for (int64_t j = k; j < n; j++) t += bf2f(a[j]) * bf2f(b[j]);
    return s + t;
}

static inline float silu(float v) { return v / (1.f + expf(-v)); }

#define ROWS 16 /* rows per work item: small enough to balance 16 threads over one token's experts */

/* Returns how many (token, expert) pairs were skipped; -1 when an expert index is out of range, -2 for more than 256 tokens (nothing written then). */
int qwenhw_moe_experts(const bf16 *gate_up, const bf16 *down, int64_t E, int64_t H, int64_t I,
                       const bf16 *x, int64_t T, const int64_t *idx, const bf16 *w, int64_t K,
                       const uint8_t *skip, int64_t *counts, bf16 *out, int nthreads) {
    int64_t P = T * K;
    if (T > 256) return -2; /* decode-sized batches only: bounds the per-thread accumulators below */
    for (int64_t p = 0; p < P; p++)
        if (idx[p] < 0 || idx[p] >= E) return -1;
    /* pairs (token, slot) grouped by expert, experts ascending: each expert's rows are read once */
    int64_t *order = malloc(sizeof(int64_t) * (P > 0 ? P : 1));
    int64_t *first = malloc(sizeof(int64_t) * (P + 1)); /* experts[u] owns order[first[u]..first[u+1]) */
    int64_t *experts = malloc(sizeof(int64_t) * (P > 0 ? P : 1));
    bf16 *act = malloc(sizeof(bf16) * (P > 0 ? P : 1) * I);
    int64_t n = 0, U = 0;
    for (int64_t p = 0; p < P; p++) {
        if (counts) counts[idx[p]]++;
        if (!(skip && skip[idx[p]])) order[n++] = p;
    }
    for (int64_t a = 1; a < n; a++) { /* insertion sort by expert, stable: n <= T*K is small */
        int64_t v = order[a], b = a - 1;
        while (b >= 0 && idx[order[b]] > idx[v]) { order[b + 1] = order[b]; b--; }
        order[b + 1] = v;
    }
    for (int64_t a = 0; a < n; a++)
        if (a == 0 || idx[order[a]] != idx[order[a - 1]]) { experts[U] = idx[order[a]]; first[U++] = a; }
    first[U] = n;
    int64_t blocks1 = (I + ROWS - 1) / ROWS, blocks2 = (H + ROWS - 1) / ROWS;

#pragma omp parallel num_threads(nthreads)
    {
        /* phase 1: act[p] = silu(x W_gate^T) * (x W_up^T) for every selected pair */
#pragma omp for schedule(dynamic, 1)
        for (int64_t job = 0; job < U * blocks1; job++) {
            int64_t u = job / blocks1, j0 = (job % blocks1) * ROWS, j1 = j0 + ROWS < I ? j0 + ROWS : I;
            const bf16 *gu = gate_up + experts[u] * 2 * I * H;
            for (int64_t j = j0; j < j1; j++)
                for (int64_t a = first[u]; a < first[u + 1]; a++) {
                    int64_t p = order[a];
                    const bf16 *xt = x + (p / K) * H;
                    float g = round_bf(dot(gu + j * H, xt, H)), up = round_bf(dot(gu + (I + j) * H, xt, H));
                    act[p * I + j] = f2bf(round_bf(silu(g)) * up);
                }
        }
        /* phase 2: out[t] = sum over t's experts, ascending, of w * (act W_down^T); each thread owns rows */
#pragma omp for schedule(static)
        for (int64_t job = 0; job < blocks2; job++) {
            int64_t h0 = job * ROWS, h1 = h0 + ROWS < H ? h0 + ROWS : H;
            float acc[T][ROWS];
            memset(acc, 0, sizeof(acc));
            for (int64_t u = 0; u < U; u++) {
                const bf16 *dn = down + experts[u] * H * I;
                for (int64_t h = h0; h < h1; h++)
                    for (int64_t a = first[u]; a < first[u + 1]; a++) {
                        int64_t p = order[a];
                        float y = round_bf(dot(dn + h * I, act + p * I, I));
                        acc[p / K][h - h0] = round_bf(acc[p / K][h - h0] + round_bf(y * bf2f(w[p])));
                    }
            }
            for (int64_t t = 0; t < T; t++)
                for (int64_t h = h0; h < h1; h++) out[t * H + h] = f2bf(acc[t][h - h0]);
        }
    }
    free(order);
    free(first);
    free(experts);
    free(act);
    return P - n;
}
