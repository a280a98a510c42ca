/* CPU kernels for gkg_pyg.ops (float32, plain C, no torch headers).
 *
 * gkg_smallest_k: exact k smallest entries of every row of a matrix.
 * gkg_knn: the dense kNN (distances from products, then gkg_smallest_k's selection), tile by tile.
 * gkg_max_relative: the interleaved max-relative features of a regular neighbour table.
 * gkg_bn_gelu, gkg_bn_gelu_backward, gkg_bn_backward: the elementwise passes of the backward of
 *   GELU(BatchNorm(h)) and linear(GELU(BatchNorm(h))) (gkg_pyg::bn_gelu, gkg_pyg::bn_gelu_linear), two
 *   or three passes over h instead of about ten.
 *
 * The selection, per row of n values and k <= 32 (M = 32 buckets for k <= 16, else 64):
 *   1. the minimum of each of M strided buckets (index mod M), in vector registers;
 *   2. T = the k-th smallest of those M minima: they are M distinct entries, so at
 *      least k entries are <= T, and the k smallest entries are all <= T;
 *   3. the entries <= T (about k + 1 of them for any ordering of the row), in index order,
 *      each ranked by how many are smaller, or equal and earlier: ranks 0 .. k - 1 are the
 *      answer, ascending, ties broken by the lower index.
 * Rows shorter than M skip steps 1-2 (every entry is a candidate).
 * A row holding a NaN makes the call return 1, and the caller falls back to torch.topk.
 *
 * Vectors are GCC/Clang vector extensions, compiled with -march=native -ffp-contract=off (no implicit
 * fused multiply-add, so that every operation rounds as PyTorch's does; gkg_knn's products use
 * explicit ones). Threads come from OpenMP (see run_rows).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

static inline vf8 load8(const float *p) {
    vf8 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Lane by lane: a where mask is set, else b. */
static inline vf8 select8(vi8 mask, vf8 a, vf8 b) { return (vf8)(((vi8)a & mask) | ((vi8)b & ~mask)); }

static inline vf8 bcast8(float x) { return (vf8){x, x, x, x, x, x, x, x}; }

static inline vf8 max8(vf8 a, vf8 v) { return select8(v > a, v, a); }

static inline int any8(vi8 m) {
    uint64_t w[4];
    memcpy(w, &m, sizeof w);
    return (w[0] | w[1] | w[2] | w[3]) != 0;
}

/* The entries of the row a (n >= M = 8 L) that are <= T, T the k-th smallest of the minima of M strided
 * buckets, into cand_val / cand_idx in index order: their number, or -1 on a NaN. */
static inline __attribute__((always_inline)) int64_t threshold_candidates(const float *a, int64_t n, int64_t k,
                                                                          float *cand_val, int32_t *cand_idx, const int L) {
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
    if (any8(nan)) return -1;
    float m[M];
    memcpy(m, mins, sizeof m);
    for (int64_t t = 0; j + t < n; ++t) {
        float v = a[j + t];
        if (v != v) return -1;
        m[t] = v < m[t] ? v : m[t];
    }
    /* T = the k-th smallest of the M minima = the largest minimum with fewer than k minima below it,
     * found for 8 minima at a time without horizontal sums. */
    vf8 best = bcast8(-__builtin_inff());
    for (int l = 0; l < L; ++l) {
        vf8 mt = load8(m + 8 * l);
        vi8 below = {0};
        for (int s = 0; s < M; ++s) below -= bcast8(m[s]) < mt;
        best = max8(best, select8(below < (int32_t)k, mt, best));
    }
    float T = best[0];
    for (int l = 1; l < 8; ++l) T = best[l] > T ? best[l] : T;
    int64_t c = 0, b = 0;
#ifdef __AVX512F__
    /* Compressed in registers: branch-free (a compressing store to memory is slow on some CPUs). */
    const __m512i lane16 = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (; b + 16 <= n; b += 16) {
        __m512 v = _mm512_loadu_ps(a + b);
        __mmask16 hit = _mm512_cmp_ps_mask(v, _mm512_set1_ps(T), _CMP_LE_OQ);
        _mm512_storeu_ps(cand_val + c, _mm512_maskz_compress_ps(hit, v));
        __m512i idx = _mm512_add_epi32(lane16, _mm512_set1_epi32((int32_t)b));
        _mm512_storeu_si512(cand_idx + c, _mm512_maskz_compress_epi32(hit, idx));
        c += __builtin_popcount(hit);
    }
#endif
    for (; b + 8 <= n; b += 8) {
        if (!any8(load8(a + b) <= T)) continue;
        for (int64_t i = b; i < b + 8; ++i) {
            cand_val[c] = a[i];
            cand_idx[c] = (int32_t)i;
            c += a[i] <= T;
        }
    }
    for (int64_t i = b; i < n; ++i) {
        cand_val[c] = a[i];
        cand_idx[c] = (int32_t)i;
        c += a[i] <= T;
    }
    return c;
}

/* The indices of the k smallest entries of the row a into out, ascending, ties by the lower index:
 * the candidates (all entries of a short row, else those up to the bucket threshold, which include the
 * k smallest) ranked by value, then index. L = 4 (32 buckets) for k <= 16, else 8. Returns 1 on a NaN. */
static inline __attribute__((always_inline)) int row_smallest_k(const float *a, int64_t n, int64_t k, int64_t *out,
                                                                  float *cand_val, int32_t *cand_idx, const int L) {
    int64_t c = n;
    if (n < 8 * L) {
        for (int64_t i = 0; i < n; ++i) {
            if (a[i] != a[i]) return 1;
            cand_val[i] = a[i];
            cand_idx[i] = (int32_t)i;
        }
    } else if ((c = threshold_candidates(a, n, k, cand_val, cand_idx, L)) < 0) {
        return 1;
    }
    /* Candidates are in index order: rank = how many are smaller, or equal and earlier. The ranks below
     * k place the answer. Padded to a multiple of 8 with +inf past c. */
    for (int64_t i = c; i < ((c + 7) & ~(int64_t)7); ++i) cand_val[i] = __builtin_inff();
    const vi8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    int64_t placed[33];
    for (int64_t i0 = 0; i0 < c; i0 += 8) {
        vf8 vi = load8(cand_val + i0);
        vi8 pos = lane + (int32_t)i0, rank = {0};
        for (int64_t j = 0; j < c; ++j) {
            vf8 vj = bcast8(cand_val[j]);
            rank -= (vj < vi) | ((vj == vi) & ((vi8){0} + (int32_t)j < pos));
        }
        for (int l = 0; l < 8 && i0 + l < c; ++l) placed[rank[l] < k ? rank[l] : k] = cand_idx[i0 + l];
    }
    memcpy(out, placed, k * sizeof *out);
    return 0;
}

/* Rows r0 .. r1 - 1 of a call's work; fn sets status. */
struct rows_job {
    const void *args;
    int64_t r0, r1;
    int status, index; /* index: the job's number, 0 .. threads - 1 */
};

/* The number of jobs run_rows makes: `threads`, at least 1 and at most `rows` (for a caller that keeps
 * per-job results). */
static int job_count(int64_t rows, int threads) {
    if (threads < 1) threads = 1;
    return threads > rows ? (rows > 0 ? (int)rows : 1) : threads;
}

/* Splits rows 0 .. rows - 1 into `threads` contiguous ranges and runs fn on each, in an OpenMP
 * parallel region: compiled with -fopenmp this library shares PyTorch's libgomp and its worker threads
 * (threads of our own would compete on the same cores with PyTorch's workers, which spin for a while
 * after each parallel operation: measured 1.7x slower on 2 cores). Without OpenMP the ranges run one
 * after the other. Returns the largest status. */
static int run_rows(void *(*fn)(void *), const void *args, int64_t rows, int threads) {
    threads = job_count(rows, threads);
    struct rows_job jobs[threads];
    for (int t = 0; t < threads; ++t) jobs[t] = (struct rows_job){args, rows * t / threads, rows * (t + 1) / threads, 0, t};
#pragma omp parallel for num_threads(threads) schedule(static, 1)
    for (int t = 0; t < threads; ++t) fn(&jobs[t]);
    int status = 0;
    for (int t = 0; t < threads; ++t)
        if (jobs[t].status > status) status = jobs[t].status;
    return status;
}

/* Per-thread scratch of the selection: candidates (+ 16 for the vector stores past the last one). */
struct select_buffers {
    float *val;
    int32_t *idx;
};

static int select_alloc(struct select_buffers *sb, int64_t n) {
    sb->val = malloc((n + 16) * sizeof *sb->val);
    sb->idx = malloc((n + 16) * sizeof *sb->idx);
    return sb->val && sb->idx;
}

static void select_free(struct select_buffers *sb) {
    free(sb->val);
    free(sb->idx);
}

static inline int select_row(const float *a, int64_t n, int64_t k, int64_t *out, struct select_buffers *sb) {
    return k <= 16 ? row_smallest_k(a, n, k, out, sb->val, sb->idx, 4) : row_smallest_k(a, n, k, out, sb->val, sb->idx, 8);
}

struct topk_args {
    const float *dist;
    int64_t n, k;
    int64_t *out;
};

static void *run_topk(void *arg) {
    struct rows_job *jb = arg;
    const struct topk_args *ta = jb->args;
    struct select_buffers sb;
    jb->status = 3;
    if (select_alloc(&sb, ta->n)) {
        jb->status = 0;
        for (int64_t r = jb->r0; r < jb->r1 && !jb->status; ++r)
            jb->status = select_row(ta->dist + r * ta->n, ta->n, ta->k, ta->out + r * ta->k, &sb);
    }
    select_free(&sb);
    return NULL;
}

static int select_shape_ok(int64_t n, int64_t k) { return 1 <= k && k <= 32 && k <= n && n <= INT32_MAX; }

/* Indices of the k smallest entries of each row of the contiguous (rows, n) dist into the contiguous
 * (rows, k) out, ascending, ties by the lower index, on up to `threads` threads. Returns 0 on success,
 * 1 if a row holds a NaN, 2 for an unsupported shape (needs 1 <= k <= min(32, n)), 3 if memory ran
 * out. out is undefined unless 0 is returned. */
int gkg_smallest_k(const float *dist, int64_t rows, int64_t n, int64_t k, int64_t *out, int threads) {
    if (!select_shape_ok(n, k)) return 2;
    struct topk_args args = {dist, n, k, out};
    return run_rows(run_topk, &args, rows, threads);
}

/* gkg_knn: the dense kNN of (group, graph) pairs. For pair p = (g, b), destination i and source j,
 *   dist[i, j] = ((prod[i, j] * -2 + dst_sq[p, i]) + src_sq[p, j]) - bias[i, j]
 * with prod[i, j] = sum_t dst[p, i, t] src[p, j, t] accumulated in t order by fused multiply-adds
 * from 0, every other operation rounded once in this order (the PyTorch path's in-place operations;
 * its matrix product rounds in an order of MKL's choosing, which differs by shape), then the k smallest
 * of each row as in gkg_smallest_k. Products come in tiles of TILE_ROWS destinations x TILE_COLS
 * sources from packed panels, and each row is ranked at once: no (destinations x sources) matrix is
 * written. The pairs go in blocks whose panels fit the second-level cache, each tile of destinations
 * for all pairs of a block, so that the tile's bias rows are read from memory once per block. */
#if defined(__FMA__)
static inline vf8 fma8(vf8 a, vf8 b, vf8 c) { return (vf8)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c); }
#else
static inline vf8 fma8(vf8 a, vf8 b, vf8 c) {
    for (int l = 0; l < 8; ++l) c[l] = __builtin_fmaf(a[l], b[l], c[l]);
    return c;
}
#endif

/* 6 x 2 accumulators + 2 source vectors + 1 broadcast: within the 16 vector registers of AVX2. */
enum { TILE_ROWS = 6, TILE_COLS = 16, PANEL_BLOCK_BYTES = 512 << 10 };

/* tile[q, j] = d[q] . source j for the sources packed in panels of TILE_COLS: panels[j / TILE_COLS][t][j %
 * TILE_COLS], zero past the last source, so that each panel is read in order. */
static void dot_tile(const float *const d[TILE_ROWS], const float *panels, int64_t n_pad, int64_t c, float *tile) {
    for (int64_t j = 0; j < n_pad; j += TILE_COLS) {
        const float *s = panels + j * c;
        vf8 acc[TILE_ROWS][2] = {{{0}}};
        for (int64_t t = 0; t < c; ++t, s += TILE_COLS) {
            vf8 s0 = load8(s), s1 = load8(s + 8);
            for (int q = 0; q < TILE_ROWS; ++q) {
                vf8 x = bcast8(d[q][t]);
                acc[q][0] = fma8(x, s0, acc[q][0]);
                acc[q][1] = fma8(x, s1, acc[q][1]);
            }
        }
        for (int q = 0; q < TILE_ROWS; ++q) memcpy(tile + q * n_pad + j, acc[q], sizeof acc[q]);
    }
}

struct knn_args {
    const float *dst, *dst_sq, *src_sq, *bias, *panels;
    int64_t dst_stride[3]; /* group, graph, node; channels contiguous */
    int64_t graphs, pairs, n_dst, n_src, n_pad, c, k;
    int64_t *out;
};

static void *run_knn(void *arg) {
    struct rows_job *jb = arg;
    const struct knn_args *ka = jb->args;
    const int64_t n = ka->n_src, n_pad = ka->n_pad, c = ka->c, k = ka->k, panel = c * n_pad;
    int64_t block = PANEL_BLOCK_BYTES / (panel * (int64_t)sizeof(float));
    block = block < 1 ? 1 : block;
    float *tile = malloc(TILE_ROWS * n_pad * sizeof *tile), *row = malloc(n * sizeof *row);
    struct select_buffers sb;
    jb->status = 3;
    if (select_alloc(&sb, n) && tile && row) {
        jb->status = 0;
        for (int64_t p0 = 0; p0 < ka->pairs; p0 += block) {
            const int64_t p1 = p0 + block < ka->pairs ? p0 + block : ka->pairs;
            for (int64_t i = jb->r0; i < jb->r1 && !jb->status; i += TILE_ROWS) {
                const int64_t rows = jb->r1 - i < TILE_ROWS ? jb->r1 - i : TILE_ROWS;
                for (int64_t p = p0; p < p1 && !jb->status; ++p) {
                    const float *base = ka->dst + (p / ka->graphs) * ka->dst_stride[0] + (p % ka->graphs) * ka->dst_stride[1];
                    const float *d[TILE_ROWS];
                    for (int q = 0; q < TILE_ROWS; ++q) /* a short tile repeats its last row */
                        d[q] = base + (i + (q < rows ? q : rows - 1)) * ka->dst_stride[2];
                    dot_tile(d, ka->panels + p * panel, n_pad, c, tile);
                    const float *col = ka->src_sq + p * n;
                    for (int64_t q = 0; q < rows && !jb->status; ++q) {
                        const float ra = ka->dst_sq[p * ka->n_dst + i + q], *tq = tile + q * n_pad;
                        if (ka->bias) {
                            const float *bias = ka->bias + (i + q) * n;
                            for (int64_t j = 0; j < n; ++j) row[j] = ((tq[j] * -2.0f + ra) + col[j]) - bias[j];
                        } else {
                            for (int64_t j = 0; j < n; ++j) row[j] = (tq[j] * -2.0f + ra) + col[j];
                        }
                        jb->status = select_row(row, n, k, ka->out + (p * ka->n_dst + i + q) * k, &sb);
                    }
                }
            }
        }
    }
    select_free(&sb);
    free(tile);
    free(row);
    return NULL;
}

/* dst (groups, graphs, n_dst, c) and src (groups, graphs, n_src, c) with the given strides in floats
 * (channels contiguous); dst_sq (groups, graphs, n_dst), src_sq (groups, graphs, n_src), bias NULL or
 * (n_dst, n_src), out (groups, graphs, n_dst, k) int64, all contiguous. Returns as gkg_smallest_k. */
int gkg_knn(const float *dst, const int64_t *dst_stride, const float *dst_sq, const float *src,
            const int64_t *src_stride, const float *src_sq, const float *bias, int64_t groups, int64_t graphs,
            int64_t n_dst, int64_t n_src, int64_t c, int64_t k, int64_t *out, int threads) {
    if (!select_shape_ok(n_src, k) || c < 1 || groups < 1 || graphs < 1) return 2;
    const int64_t pairs = groups * graphs, n_pad = (n_src + TILE_COLS - 1) / TILE_COLS * TILE_COLS;
    float *panels = malloc(pairs * c * n_pad * sizeof *panels);
    if (!panels) return 3;
#pragma omp parallel for num_threads(threads > pairs ? (int)pairs : threads) schedule(static)
    for (int64_t p = 0; p < pairs; ++p) {
        const float *s = src + (p / graphs) * src_stride[0] + (p % graphs) * src_stride[1];
        float *panel = panels + p * c * n_pad;
        for (int64_t j = 0; j < n_pad; ++j)
            for (int64_t t = 0; t < c; ++t)
                panel[(j - j % TILE_COLS) * c + t * TILE_COLS + j % TILE_COLS] = j < n_src ? s[j * src_stride[2] + t] : 0.0f;
    }
    struct knn_args args = {dst, dst_sq, src_sq, bias, panels, {0}, graphs, pairs, n_dst, n_src, n_pad, c, k, out};
    memcpy(args.dst_stride, dst_stride, sizeof args.dst_stride);
    int status = run_rows(run_knn, &args, n_dst, threads);
    free(panels);
    return status;
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

/* gkg_max_relative_backward: grad_src[j, c] += grad_out[i, 2c + 1] for j = neighbors[g(c), i, rank[i, c]],
 * the first maximal neighbour of gkg_max_relative, summed over the destinations i in increasing order
 * (as ATen's scatter_add sums). Each thread owns a range of channels, so no two threads write one value. */
struct maxrel_backward_args {
    const float *grad_out;
    const int64_t *neighbors;
    const uint8_t *rank;
    int64_t n_src, n_dst, c, g, k;
    float *grad_src;
};

static void *run_maxrel_backward(void *arg) {
    struct rows_job *jb = arg;
    const struct maxrel_backward_args *ma = jb->args;
    const int64_t c = ma->c, cg = c / ma->g, k = ma->k;
    jb->status = 0;
    for (int64_t i = 0; i < ma->n_dst; ++i) {
        const float *go = ma->grad_out + 2 * i * c;
        const uint8_t *r = ma->rank + i * c;
        for (int64_t ch = jb->r0; ch < jb->r1;) {
            const int64_t *nb = ma->neighbors + ((ch / cg) * ma->n_dst + i) * k;
            const int64_t end = (ch / cg + 1) * cg < jb->r1 ? (ch / cg + 1) * cg : jb->r1; /* this group's part */
            for (; ch < end; ++ch) {
                const int64_t j = r[ch] < k ? nb[r[ch]] : -1;
                if (j < 0 || j >= ma->n_src) {
                    jb->status = 4;
                    return NULL;
                }
                ma->grad_src[j * c + ch] += go[2 * ch + 1];
            }
        }
    }
    return NULL;
}

/* grad_out (n_dst, 2c), neighbors (g, n_dst, k) int64, rank (n_dst, c) uint8, grad_src (n_src, c) zeroed,
 * all contiguous. Returns 0; 2 for an unsupported shape; 4 for a rank or source index out of range
 * (grad_src is then undefined). */
int gkg_max_relative_backward(const float *grad_out, const int64_t *neighbors, const uint8_t *rank, int64_t n_src,
                              int64_t n_dst, int64_t c, int64_t g, int64_t k, float *grad_src, int threads) {
    if (g < 1 || c % g || k < 1 || k > 256) return 2;
    struct maxrel_backward_args args = {grad_out, neighbors, rank, n_src, n_dst, c, g, k, grad_src};
    return run_rows(run_maxrel_backward, &args, c, threads);
}


/* The vectors of these passes: 16 lanes with AVX-512 (half the instructions of 8-lane code, which measured
 * 1.5x slower on these compute-bound passes), else 8. */
#if defined(__AVX512F__)
#define GW 16
typedef float vfw __attribute__((vector_size(64)));
typedef int32_t viw __attribute__((vector_size(64)));
static inline vfw fmaw(vfw a, vfw b, vfw c) { return (vfw)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c); }
#else
#define GW 8
typedef vf8 vfw;
typedef vi8 viw;
static inline vfw fmaw(vfw a, vfw b, vfw c) { return fma8(a, b, c); }
#endif
static inline vfw bcastw(float x) { vfw v; for (int l = 0; l < GW; ++l) v[l] = x; return v; }
static inline vfw selectw(viw mask, vfw a, vfw b) { return (vfw)(((viw)a & mask) | ((viw)b & ~mask)); }
static inline vfw loadw(const float *p) { vfw v; memcpy(&v, p, sizeof v); return v; }
/* gkg_bn_gelu*: with z = h * alpha + beta per channel (a BatchNorm as an affine map) on a contiguous
 * (rows, c) float32 h, the three elementwise passes of the backward of linear(GELU(z)):
 *   gkg_bn_gelu:          out = GELU(z)                                  (for the weight's gradient)
 *   gkg_bn_gelu_backward: grad <- grad_in * GELU'(z) (times scale if given; grad_in may be grad), with the
 *                         per-channel sums of the unscaled grad_in * GELU'(z) and of it times (h - mean),
 *                         in double
 *   gkg_bn_backward:      grad <- grad * scale + (h - mean) * xmu_scale + shift, in place
 * GELU is PyTorch's vectorised one in form: GELU(z) = z cdf(z), GELU'(z) = cdf(z) + z pdf(z), with
 * cdf(z) = (1 + erf(z / sqrt 2)) / 2 from erf's rational approximation 7.1.26 of Abramowitz and Stegun
 * (absolute error below 1.5e-7), as ATen's Vectorized<float>::erf computes it, and exp from a degree-6
 * polynomial after a two-part reduction by ln 2 (Cephes' expf, about 1 ulp). Values agree with ATen's
 * GELU and its backward to a few units in the last place, not bit for bit: this backs a backward pass
 * only, whose recomputed z differs in rounding from the forward pass's anyway. Each value is computed
 * by the same vector code wherever it lies (a row's last c % GW channels go through a padded vector). */
/* exp(x) for x <= 0 (here -z^2 / 2; a NaN stays NaN). */
static inline vfw exp_nonpositive(vfw x) {
    const vfw lo = bcastw(-87.0f); /* keeps 2^n normal; exp(-87) = 1.6e-38 */
#if GW == 16
    x = (vfw)_mm512_max_ps((__m512)lo, (__m512)x);
    vfw n = (vfw)_mm512_roundscale_ps((__m512)(x * bcastw(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT);
#else
    x = selectw(x < lo, lo, x);
    const vfw magic = bcastw(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    vfw n = (x * bcastw(1.44269504088896341f) + magic) - magic;
#endif
    vfw r = fmaw(n, bcastw(-0.693359375f), x);
    r = fmaw(n, bcastw(2.12194440e-4f), r);
    vfw p = bcastw(1.9875691500e-4f);
    p = fmaw(p, r, bcastw(1.3981999507e-3f));
    p = fmaw(p, r, bcastw(8.3334519073e-3f));
    p = fmaw(p, r, bcastw(4.1665795894e-2f));
    p = fmaw(p, r, bcastw(1.6666665459e-1f));
    p = fmaw(p, r, bcastw(5.0000001201e-1f));
    p = fmaw(p, r * r, r) + bcastw(1.0f);
#if GW == 16
    return (vfw)_mm512_scalef_ps((__m512)p, (__m512)n); /* p 2^n */
#else
    viw bits = (__builtin_convertvector(n, viw) + 127) << 23;
    return p * (vfw)bits;
#endif
}

/* GELU(z) into *gelu and GELU'(z) into *grad (either may be NULL). The sign of erf is applied as a
 * sign bit (erf is odd), which rounds as ATen's select does. */
static inline void geluw(vfw z, vfw *gelu, vfw *grad) {
    const viw sign_bit = (viw)bcastw(-0.0f);
    vfw u = z * bcastw(0.70710678118654752f);
    vfw e = exp_nonpositive(-(u * u)); /* exp(-z^2 / 2) */
    vfw au = (vfw)((viw)u & ~sign_bit);
    vfw t = bcastw(1.0f) / fmaw(au, bcastw(0.3275911f), bcastw(1.0f));
    vfw r = bcastw(1.061405429f);
    r = fmaw(r, t, bcastw(-1.453152027f));
    r = fmaw(r, t, bcastw(1.421413741f));
    r = fmaw(r, t, bcastw(-0.284496736f));
    r = fmaw(r, t, bcastw(0.254829592f));
    vfw erf = (vfw)((viw)(bcastw(1.0f) - r * t * e) ^ ((viw)u & sign_bit));
    vfw cdf = bcastw(0.5f) * (bcastw(1.0f) + erf);
    if (gelu) *gelu = z * cdf;
    if (grad) *grad = fmaw(z * bcastw(0.39894228040143268f), e, cdf); /* pdf(z) = e / sqrt(2 pi) */
}

struct bn_gelu_args {
    const float *h, *in; /* in: gkg_bn_gelu_backward's incoming gradient (may be out) */
    float *out; /* gkg_bn_gelu's output, or the gradient (updated in place by gkg_bn_backward) */
    int64_t c;
    const float *alpha, *beta, *mean, *scale, *xmu_scale, *shift;
    double *sums; /* per job: 2c partial sums */
};

/* Channels t .. t + GW - 1 of a row of c values: `full` (a constant where inlined) when t + GW <= c, else the
 * row's last c - t values, padded with 0 (stored: only those). The passes below run each row's full vectors
 * and its padded last one as two loops over one inlined body: one loop that decided per vector spilled its
 * registers around the rarely taken partial branch and ran 2x slower. */
static inline __attribute__((always_inline)) vfw load_at(const float *p, int64_t t, int64_t c, int full) {
    if (full) return loadw(p + t);
    vfw v = bcastw(0.0f);
    memcpy(&v, p + t, (c - t) * sizeof(float));
    return v;
}

static inline __attribute__((always_inline)) void store_at(float *p, int64_t t, int64_t c, vfw v, int full) {
    memcpy(p + t, &v, (full ? GW : c - t) * sizeof(float));
}

/* Calls body(..., i, t, c, full) for every vector t of every row i in r0 .. r1 - 1 of c channels. */
#define FOR_ROW_VECTORS(r0, r1, c, body, ...)                                      \
    for (int64_t i_ = (r0); i_ < (r1); ++i_) {                                     \
        int64_t t_ = 0;                                                            \
        for (; t_ + GW <= (c); t_ += GW) body(__VA_ARGS__, i_, t_, (c), 1);        \
        if (t_ < (c)) body(__VA_ARGS__, i_, t_, (c), 0);                           \
    }

static inline __attribute__((always_inline)) void bn_gelu_vector(const struct bn_gelu_args *a, int64_t i, int64_t t,
                                                                 int64_t c, int full) {
    vfw z = fmaw(load_at(a->h + i * c, t, c, full), load_at(a->alpha, t, c, full), load_at(a->beta, t, c, full)), g;
    geluw(z, &g, NULL);
    store_at(a->out + i * c, t, c, g, full);
}

static void *run_bn_gelu(void *arg) {
    struct rows_job *jb = arg;
    const struct bn_gelu_args *a = jb->args;
    FOR_ROW_VECTORS(jb->r0, jb->r1, a->c, bn_gelu_vector, a)
    jb->status = 0;
    return NULL;
}

/* grad <- grad_in * GELU'(z) (times scale), its sums added into part (2 c8 floats: the sums, then those
 * times h - mean). */
static inline __attribute__((always_inline)) void bn_gelu_backward_vector(const struct bn_gelu_args *a, float *part,
                                                                          int64_t c8, int64_t i, int64_t t, int64_t c,
                                                                          int full) {
    vfw x = load_at(a->h + i * c, t, c, full), d;
    geluw(fmaw(x, load_at(a->alpha, t, c, full), load_at(a->beta, t, c, full)), NULL, &d);
    vfw g = load_at(a->in + i * c, t, c, full) * d;
    vfw s = loadw(part + t) + g, p = fmaw(g, x - load_at(a->mean, t, c, full), loadw(part + c8 + t));
    memcpy(part + t, &s, sizeof s);
    memcpy(part + c8 + t, &p, sizeof p);
    store_at(a->out + i * c, t, c, a->scale ? g * load_at(a->scale, t, c, full) : g, full);
}

/* Partial sums in float over blocks of SUM_ROWS rows, added into the job's double sums. */
#define SUM_ROWS 64
static void *run_bn_gelu_backward(void *arg) {
    struct rows_job *jb = arg;
    const struct bn_gelu_args *a = jb->args;
    const int64_t c = a->c, c8 = (c + GW - 1) & ~(int64_t)(GW - 1);
    double *sums = a->sums + 2 * c * jb->index;
    float *part = malloc(2 * c8 * sizeof(float));
    jb->status = 3;
    if (!part) return NULL;
    for (int64_t i0 = jb->r0; i0 < jb->r1; i0 += SUM_ROWS) {
        memset(part, 0, 2 * c8 * sizeof(float));
        const int64_t i1 = i0 + SUM_ROWS < jb->r1 ? i0 + SUM_ROWS : jb->r1;
        FOR_ROW_VECTORS(i0, i1, c, bn_gelu_backward_vector, a, part, c8)
        for (int64_t t = 0; t < c; ++t) {
            sums[t] += part[t];
            sums[c + t] += part[c8 + t];
        }
    }
    free(part);
    jb->status = 0;
    return NULL;
}

static inline __attribute__((always_inline)) void bn_backward_vector(const struct bn_gelu_args *a, int64_t i, int64_t t,
                                                                     int64_t c, int full) {
    vfw xmu = load_at(a->h + i * c, t, c, full) - load_at(a->mean, t, c, full);
    vfw g = fmaw(load_at(a->out + i * c, t, c, full), load_at(a->scale, t, c, full), load_at(a->shift, t, c, full));
    store_at(a->out + i * c, t, c, fmaw(xmu, load_at(a->xmu_scale, t, c, full), g), full);
}

static void *run_bn_backward(void *arg) {
    struct rows_job *jb = arg;
    const struct bn_gelu_args *a = jb->args;
    FOR_ROW_VECTORS(jb->r0, jb->r1, a->c, bn_backward_vector, a)
    jb->status = 0;
    return NULL;
}

/* h, out (rows, c); alpha, beta (c). Returns 0. */
int gkg_bn_gelu(const float *h, int64_t rows, int64_t c, const float *alpha, const float *beta, float *out,
                int threads) {
    struct bn_gelu_args args = {h, NULL, out, c, alpha, beta, NULL, NULL, NULL, NULL, NULL};
    return run_rows(run_bn_gelu, &args, rows, threads);
}

/* h, grad_in, grad (rows, c); alpha, beta, mean (c); scale (c) or NULL; sums (2c) receives the sums of
 * grad_in * GELU'(z) and of grad_in * GELU'(z) * (h - mean) over the rows. Returns 0; 3 if memory ran out. */
int gkg_bn_gelu_backward(const float *h, const float *grad_in, float *grad, int64_t rows, int64_t c,
                         const float *alpha, const float *beta, const float *mean, const float *scale, double *sums,
                         int threads) {
    threads = job_count(rows, threads); /* one block of partial sums per job of run_rows */
    double *partial = calloc(2 * c * threads, sizeof(double));
    if (!partial) return 3;
    struct bn_gelu_args args = {h, grad_in, grad, c, alpha, beta, mean, scale, NULL, NULL, partial};
    int status = run_rows(run_bn_gelu_backward, &args, rows, threads);
    for (int64_t t = 0; t < 2 * c; ++t) {
        double s = 0.0;
        for (int j = 0; j < threads; ++j) s += partial[j * 2 * c + t];
        sums[t] = s;
    }
    free(partial);
    return status;
}

/* h, grad (rows, c); mean, scale, xmu_scale, shift (c). Returns 0. */
int gkg_bn_backward(const float *h, float *grad, int64_t rows, int64_t c, const float *mean, const float *scale,
                    const float *xmu_scale, const float *shift, int threads) {
    struct bn_gelu_args args = {h, NULL, grad, c, NULL, NULL, mean, scale, xmu_scale, shift, NULL};
    return run_rows(run_bn_backward, &args, rows, threads);
}
