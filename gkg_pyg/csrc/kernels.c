/* CPU kernels for gkg_pyg.native (float32, plain C, no torch headers).
 *
 * gkg_smallest_k: exact k smallest entries of every row of a matrix.
 * gkg_max_relative: the interleaved max-relative features of a regular neighbour table.
 *
 * gkg_smallest_k, per row of n values (k <= M / 2 buckets' worth, see gkg_smallest_k):
 *   1. the minimum of each of M strided buckets (index mod M), in vector registers;
 *   2. T = the k-th smallest of those M minima: they are M distinct entries, so at
 *      least k entries are <= T, and the k smallest entries are all <= T;
 *   3. the entries <= T (about k of them for any ordering of the row), in index order,
 *      sorted by value with a stable insertion sort: the first k are the answer,
 *      ascending, ties broken by the lower index.
 * Blocks of 16 entries without any entry <= T are skipped with two vector compares.
 * A row holding a NaN makes the call return 1, and the caller falls back to torch.topk.
 *
 * Vectors are GCC/Clang vector extensions, compiled with -march=native -ffp-contract=off (no fused
 * multiply-add, so that every operation rounds as PyTorch's does).
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

/* Lane by lane: a where mask is set, else b. */
static inline vf8 select8(vi8 mask, vf8 a, vf8 b) { return (vf8)(((vi8)a & mask) | ((vi8)b & ~mask)); }

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
            mins[l] = select8(v < mins[l], v, mins[l]);
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

/* Rows r0 .. r1 - 1 of a call's work; fn sets status. */
struct rows_job {
    const void *args;
    int64_t r0, r1;
    int status;
};

/* Splits rows 0 .. rows - 1 into `threads` contiguous ranges and runs fn on each, the first on the
 * calling thread and the others on POSIX threads (a range whose thread cannot start runs here too).
 * Returns the largest status. */
static int run_rows(void *(*fn)(void *), const void *args, int64_t rows, int threads) {
    if (threads < 1) threads = 1;
    if (threads > rows) threads = rows > 0 ? (int)rows : 1;
    struct rows_job jobs[threads];
    pthread_t tid[threads];
    int started[threads];
    for (int t = 0; t < threads; ++t) {
        jobs[t] = (struct rows_job){args, rows * t / threads, rows * (t + 1) / threads, 0};
        started[t] = t > 0 && pthread_create(&tid[t], NULL, fn, &jobs[t]) == 0;
    }
    for (int t = 0; t < threads; ++t)
        if (!started[t]) fn(&jobs[t]);
    int status = 0;
    for (int t = 0; t < threads; ++t) {
        if (started[t]) pthread_join(tid[t], NULL);
        if (jobs[t].status > status) status = jobs[t].status;
    }
    return status;
}

struct topk_args {
    const float *dist, *row_add, *col_add, *bias;
    int64_t n, block_rows, k;
    int64_t *out;
};

static void *run_topk(void *arg) {
    struct rows_job *jb = arg;
    const struct topk_args *ta = jb->args;
    const int64_t n = ta->n, k = ta->k;
    float *cand_val = malloc(n * sizeof *cand_val);
    int64_t *cand_idx = malloc(n * sizeof *cand_idx);
    float *row = ta->row_add ? malloc(n * sizeof *row) : NULL;
    jb->status = 3;
    if (cand_val && cand_idx && (row || !ta->row_add)) {
        jb->status = 0;
        for (int64_t r = jb->r0; r < jb->r1 && !jb->status; ++r) {
            const float *a = ta->dist + r * n;
            if (row) {
                /* The dense kNN's ((-2 a.b + |a|^2) + |b|^2) - B, one rounding per operation, in the
                 * order of the PyTorch path's in-place operations (compiled without FMA contraction). */
                const float ra = ta->row_add[r];
                const float *ca = ta->col_add + (r / ta->block_rows) * n;
                const float *bias = ta->bias ? ta->bias + (r % ta->block_rows) * n : NULL;
                for (int64_t j = 0; j < n; ++j) row[j] = (a[j] * -2.0f + ra) + ca[j];
                if (bias)
                    for (int64_t j = 0; j < n; ++j) row[j] -= bias[j];
                a = row;
            }
            int64_t *o = ta->out + r * k;
            jb->status = k <= 16 ? row_smallest_k(a, n, k, o, cand_val, cand_idx, 4)
                                 : row_smallest_k(a, n, k, o, cand_val, cand_idx, 8);
        }
    }
    free(cand_val);
    free(cand_idx);
    free(row);
    return NULL;
}

/* Indices of the k smallest entries of each row of a (rows, n) matrix into the contiguous (rows, k)
 * out, ascending, ties by the lower index, on up to `threads` threads. The matrix is dist itself, or,
 * with row_add != NULL, ((dist * -2 + row_add[r]) + col_add[r / block_rows, j]) - bias[r % block_rows, j]
 * (bias may be NULL): the dense kNN's distances from its matrix product. All arrays contiguous.
 * Returns 0 on success, 1 if a row holds a NaN, 2 for an unsupported shape (needs 1 <= k <= 16 and
 * n >= 64, or k <= 32 and n >= 128), 3 if memory ran out. out is undefined unless 0 is returned. */
int gkg_smallest_k(const float *dist, const float *row_add, const float *col_add, const float *bias, int64_t rows,
                   int64_t n, int64_t block_rows, int64_t k, int64_t *out, int threads) {
    if (k < 1 || !((k <= 16 && n >= 64) || (k <= 32 && n >= 128))) return 2;
    if (row_add && (!col_add || block_rows < 1)) return 2;
    struct topk_args args = {dist, row_add, col_add, bias, n, block_rows, k, out};
    return run_rows(run_topk, &args, rows, threads);
}

/* gkg_max_relative: for destination i, group g of G (channels g*cg .. g*cg+cg-1, cg = C / G) and the
 * table's k sources j of (g, i), m[i, c] = max_j x_src[j, c] (sources holding a NaN are left to the
 * caller's torch.maximum, which propagates it), and out[i] = [x_dst[i, 0], m[i, 0] - x_dst[i, 0], x_dst[i, 1], m[i, 1] - x_dst[i, 1], ...].
 * With rank != NULL, rank[i, c] = the number of ranks j < k - 1 whose running maximum over ranks
 * 0..j is below m[i, c]: the rank of the first maximal neighbour (what the backward pass needs). */
struct maxrel_args {
    const float *x_src, *x_dst;
    const int64_t *neighbors;
    int64_t n_src, n_dst, c, g, k;
    float *out;
    uint8_t *rank;
};

/* The caller has checked that x_src holds no NaN, so a plain maximum equals torch.maximum. */
static inline float max1(float a, float v) { return v > a ? v : a; }

static inline vf8 max8(vf8 a, vf8 v) { return select8(v > a, v, a); }

/* [x0, d0, x1, d1, ...] into o[0 .. 15]. */
static inline void store_interleaved8(float *o, vf8 x, vf8 d) {
#ifdef __clang__
    vf8 lo = __builtin_shufflevector(x, d, 0, 8, 1, 9, 2, 10, 3, 11);
    vf8 hi = __builtin_shufflevector(x, d, 4, 12, 5, 13, 6, 14, 7, 15);
#else
    vf8 lo = __builtin_shuffle(x, d, (vi8){0, 8, 1, 9, 2, 10, 3, 11});
    vf8 hi = __builtin_shuffle(x, d, (vi8){4, 12, 5, 13, 6, 14, 7, 15});
#endif
    memcpy(o, &lo, sizeof lo);
    memcpy(o + 8, &hi, sizeof hi);
}

/* Destinations r0 .. r1 - 1: per group, 8 channels at a time in vectors, then the group's last cg % 8
 * channels one by one. */
static void *run_maxrel(void *arg) {
    struct rows_job *jb = arg;
    const struct maxrel_args *ma = jb->args;
    const int64_t c = ma->c, cg = c / ma->g, k = ma->k, cg8 = cg & ~(int64_t)7;
    const float *rows[k];
    jb->status = 0;
    for (int64_t i = jb->r0; i < jb->r1; ++i) {
        for (int64_t g = 0; g < ma->g; ++g) {
            const int64_t *nb = ma->neighbors + (g * ma->n_dst + i) * k;
            for (int64_t j = 0; j < k; ++j) {
                if (nb[j] < 0 || nb[j] >= ma->n_src) {
                    jb->status = 4;
                    return NULL;
                }
                rows[j] = ma->x_src + nb[j] * c + g * cg;
            }
            const float *xd = ma->x_dst + i * c + g * cg;
            float *o = ma->out + 2 * (i * c + g * cg);
            uint8_t *r = ma->rank ? ma->rank + i * c + g * cg : NULL;
            for (int64_t t = 0; t < cg8; t += 8) {
                vf8 best = load8(rows[0] + t);
                for (int64_t j = 1; j < k; ++j) best = max8(best, load8(rows[j] + t));
                vf8 x = load8(xd + t);
                store_interleaved8(o + 2 * t, x, best - x);
                if (!r) continue;
                vf8 running = load8(rows[0] + t);
                vi8 count = -(running < best);
                for (int64_t j = 1; j < k - 1; ++j) {
                    running = max8(running, load8(rows[j] + t));
                    count -= running < best;
                }
                for (int l = 0; l < 8; ++l) r[t + l] = (uint8_t)count[l];
            }
            for (int64_t t = cg8; t < cg; ++t) {
                float best = rows[0][t];
                for (int64_t j = 1; j < k; ++j) best = max1(best, rows[j][t]);
                o[2 * t] = xd[t];
                o[2 * t + 1] = best - xd[t];
                if (!r) continue;
                float running = rows[0][t];
                int count = running < best;
                for (int64_t j = 1; j < k - 1; ++j) {
                    running = max1(running, rows[j][t]);
                    count += running < best;
                }
                r[t] = (uint8_t)count;
            }
        }
    }
    return NULL;
}

/* x_src (n_src, c), x_dst (n_dst, c), neighbors (g, n_dst, k) int64, out (n_dst, 2c), rank NULL or
 * (n_dst, c) uint8, all contiguous. Returns 0; 1 if x_src holds a NaN (the caller's torch.maximum
 * propagates it); 2 for an unsupported shape (c % g, k < 1, k > 256 with rank); 4 for a source index
 * out of range. out and rank are undefined unless 0 is returned. */
int gkg_max_relative(const float *x_src, int64_t n_src, const float *x_dst, int64_t n_dst, int64_t c, int64_t g,
                     const int64_t *neighbors, int64_t k, float *out, uint8_t *rank, int threads) {
    if (g < 1 || c % g || k < 1 || (rank && k > 256)) return 2;
    vi8 nan8 = {0};
    int64_t i = 0;
    for (; i + 8 <= n_src * c; i += 8) {
        vf8 v = load8(x_src + i);
        nan8 |= v != v;
    }
    int nan = any8(nan8);
    for (; i < n_src * c; ++i) nan |= x_src[i] != x_src[i];
    if (nan) return 1;
    struct maxrel_args args = {x_src, x_dst, neighbors, n_src, n_dst, c, g, k, out, rank};
    return run_rows(run_maxrel, &args, n_dst, threads);
}
