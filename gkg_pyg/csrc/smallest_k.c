/* Exact k smallest entries of every row of a float32 matrix, for gkg_pyg.native.
 *
 * Per row of n values (k <= M / 2 buckets' worth, see gkg_smallest_k):
 *   1. the minimum of each of M strided buckets (index mod M), in vector registers;
 *   2. T = the k-th smallest of those M minima: they are M distinct entries, so at
 *      least k entries are <= T, and the k smallest entries are all <= T;
 *   3. the entries <= T (about k of them for any ordering of the row), in index order,
 *      sorted by value with a stable insertion sort: the first k are the answer,
 *      ascending, ties broken by the lower index.
 * Blocks of 16 entries without any entry <= T are skipped with two vector compares.
 * A row holding a NaN makes the call return 1, and the caller falls back to torch.topk.
 *
 * Vectors are GCC/Clang vector extensions, compiled with -march=native.
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

static inline vf8 load8(const float *p) {
    vf8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vf8 min8(vf8 x, vf8 m) {
    vi8 lt = x < m;
    return (vf8)(((vi8)x & lt) | ((vi8)m & ~lt));
}

static inline int any8(vi8 m) {
    uint64_t w[4];
    memcpy(w, &m, sizeof w);
    return (w[0] | w[1] | w[2] | w[3]) != 0;
}

/* L vectors of 8 buckets: M = 8 L. Needs k <= M and n >= M. Returns 1 on a NaN. */
static inline __attribute__((always_inline)) int row_smallest_k(const float *a, int64_t n, int64_t k, int64_t *out,
                                                                  float *cand_val, int64_t *cand_idx, const int L) {
    const int M = 8 * L;
    vf8 mins[L];
    vi8 nan = {0};
    for (int l = 0; l < L; ++l) {
        mins[l] = load8(a + 8 * l);
        nan |= mins[l] != mins[l];
    }
    int64_t j = M;
    for (; j + M <= n; j += M)
        for (int l = 0; l < L; ++l) {
            vf8 v = load8(a + j + 8 * l);
            mins[l] = min8(v, mins[l]);
            nan |= v != v;
        }
    if (any8(nan)) return 1;
    float m[M];
    memcpy(m, mins, sizeof m);
    for (int64_t t = 0; j + t < n; ++t) {
        float v = a[j + t];
        if (v != v) return 1;
        m[t] = v < m[t] ? v : m[t];
    }
    /* The bucket of rank k - 1 (ranks by value, then bucket: a permutation of 0..M-1). */
    float T = m[0];
    for (int t = 0; t < M; ++t) {
        int rank = 0;
        for (int s = 0; s < M; ++s) rank += (m[s] < m[t]) | ((m[s] == m[t]) & (s < t));
        T = rank == k - 1 ? m[t] : T;
    }
    int64_t c = 0, b = 0;
    for (; b + 16 <= n; b += 16) {
        if (!any8((load8(a + b) <= T) | (load8(a + b + 8) <= T))) continue;
        for (int64_t i = b; i < b + 16; ++i) {
            cand_val[c] = a[i];
            cand_idx[c] = i;
            c += a[i] <= T;
        }
    }
    for (int64_t i = b; i < n; ++i) {
        cand_val[c] = a[i];
        cand_idx[c] = i;
        c += a[i] <= T;
    }
    for (int64_t p = 1; p < c; ++p) {
        float v = cand_val[p];
        int64_t x = cand_idx[p], q = p;
        for (; q > 0 && cand_val[q - 1] > v; --q) {
            cand_val[q] = cand_val[q - 1];
            cand_idx[q] = cand_idx[q - 1];
        }
        cand_val[q] = v;
        cand_idx[q] = x;
    }
    memcpy(out, cand_idx, k * sizeof *out);
    return 0;
}

struct job {
    const float *dist;
    int64_t rows, n, k;
    int64_t *out;
    int status;
};

static void *run_job(void *arg) {
    struct job *jb = arg;
    float *cand_val = malloc(jb->n * sizeof *cand_val);
    int64_t *cand_idx = malloc(jb->n * sizeof *cand_idx);
    jb->status = 3;
    if (cand_val && cand_idx) {
        jb->status = 0;
        for (int64_t r = 0; r < jb->rows && !jb->status; ++r) {
            const float *a = jb->dist + r * jb->n;
            int64_t *o = jb->out + r * jb->k;
            jb->status = jb->k <= 16 ? row_smallest_k(a, jb->n, jb->k, o, cand_val, cand_idx, 4)
                                     : row_smallest_k(a, jb->n, jb->k, o, cand_val, cand_idx, 8);
        }
    }
    free(cand_val);
    free(cand_idx);
    return NULL;
}

/* Indices of the k smallest entries of each row of the contiguous (rows, n) matrix dist into the
 * contiguous (rows, k) out, ascending, ties by the lower index, on up to `threads` threads.
 * Returns 0 on success, 1 if a row holds a NaN, 2 for an unsupported shape (needs 1 <= k <= 16 and
 * n >= 64, or k <= 32 and n >= 128), 3 if memory ran out. out is undefined unless 0 is returned. */
int gkg_smallest_k(const float *dist, int64_t rows, int64_t n, int64_t k, int64_t *out, int threads) {
    if (k < 1 || !((k <= 16 && n >= 64) || (k <= 32 && n >= 128))) return 2;
    if (threads < 1) threads = 1;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    struct job jobs[threads];
    pthread_t tid[threads];
    int started[threads];
    for (int t = 0; t < threads; ++t) {
        int64_t r0 = rows * t / threads, r1 = rows * (t + 1) / threads;
        jobs[t] = (struct job){dist + r0 * n, r1 - r0, n, k, out + r0 * k, 0};
        started[t] = t > 0 && pthread_create(&tid[t], NULL, run_job, &jobs[t]) == 0;
    }
    for (int t = 0; t < threads; ++t)
        if (!started[t]) run_job(&jobs[t]);
    int status = 0;
    for (int t = 0; t < threads; ++t) {
        if (started[t]) pthread_join(tid[t], NULL);
        if (jobs[t].status > status) status = jobs[t].status;
    }
    return status;
}
