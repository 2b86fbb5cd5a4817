/* CPU kernels for the choice after each model step: one pass or two over each row instead of the dozen
 * torch operations (each a full pass, some of them scalar) that the same choice takes on the CPU.
 *
 * Every kernel reads the step's logits x (R, V) and the bias b (R, V: 0 / -inf masks, minus repetition
 * penalties). Greedy and sampling rank b + x: the log-sum-exp is a per-row constant, so they need none.
 * Beam search compares rows, so it ranks log-probs plus each beam's score: (b + score) + (x - lse). Each row is
 * handled on its own: a row's result never depends on the rest of the batch. engine/sampling/kernels.py checks
 * shapes and types; the C functions check the buffer sizes again so that a mistake there cannot read out
 * of bounds.
 *
 *   logsumexp(x, R, V, out)                                   out[r] = log Σ exp x[r]
 *   greedy(x, b, R, V, out)                                   out[r] = first argmax of b + x
 *   beam(x, b, score, R, V, width, keep, lse, values, flat)   each row's lse; the best `keep` of
 *                                                             (b + score) + (x - lse) per `width` rows
 *   sample(x, b, R, V, rows, temperature, top_k, top_p, uniform, out)   one draw per listed row
 *
 * Speed: loops marked `omp simd` are vectorised (-fopenmp-simd: no OpenMP runtime, only the permission
 * to reorder a reduction); on x86-64 the hot functions are also built for x86-64-v3 (AVX2, FMA) and
 * picked at load time. exp is a polynomial (Cephes' expf) that vectorises, accurate to 2 ulp on [-87, 0].
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif

#define MIN_LOG_SHARE (-87.0f) /* tokens this far below the row's best have no float32 share */
/* The kernels keep a summary per block of this many tokens (its best score, its mass in play) and read
 * again only the blocks that matter. Each block's summary ends in a horizontal reduction (16 serial adds
 * for a 64-token block); at 256 tokens a 6,000-token row pays only 24 of them. */
#define BLOCK 256

/* e^x for x in [-87, 0]. Rounding by adding and subtracting 1.5·2^23 keeps it vectorisable on SSE2. */
static inline float exp_neg(float x)
{
    const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23}; /* 2^n (memcpy would not vectorise) */
    return p * scale.f;
}

HOT static float row_max(const float *v, Py_ssize_t n)
{
    float m = -INFINITY;
#pragma omp simd reduction(max : m)
    for (Py_ssize_t j = 0; j < n; j++)
        m = v[j] > m ? v[j] : m;
    return m;
}

HOT static void logsumexp_rows(const float *x, Py_ssize_t R, Py_ssize_t V, float *out)
{
    for (Py_ssize_t r = 0; r < R; r++) {
        const float *row = x + r * V;
        const float m = row_max(row, V);
        if (!isfinite(m)) { /* all -inf, or a NaN / inf logit: no distribution; torch gives the same */
            out[r] = m;
            continue;
        }
        float s = 0.0f; /* a logit more than 87 nats below the best adds e^-87 instead of less: nothing */
#pragma omp simd reduction(+ : s)
        for (Py_ssize_t j = 0; j < V; j++) {
            const float d = row[j] - m;
            s += exp_neg(d > MIN_LOG_SHARE ? d : MIN_LOG_SHARE);
        }
        out[r] = m + logf(s);
    }
}

/* The first token with the row's best score (as torch.argmax): the best block by its maximum, in one
 * vectorised pass, then the first token of that block that reaches it. */
/* The bias a choice adds to the logits, sparse: row r is row index[r] of a small shared table (the
 * constraint masks, as 0 / -inf), with the entries tok[ptr[r]..ptr[r+1]) replaced by val[...] (its
 * repetition penalties, bans and forced token). A row with replacements is materialised in `scratch`,
 * which stays in this core's cache; the dense (rows, V) bias it replaces came from the other core. */
typedef struct {
    const float *table, *val;
    const int64_t *index, *ptr, *tok;
} Bias;

static inline const float *bias_row(const Bias *b, Py_ssize_t r, Py_ssize_t V, float *scratch)
{
    const float *row = b->table + b->index[r] * V;
    const int64_t e0 = b->ptr[r], e1 = b->ptr[r + 1];
    if (e0 == e1)
        return row;
    memcpy(scratch, row, (size_t)V * sizeof(float));
    for (int64_t e = e0; e < e1; e++)
        scratch[b->tok[e]] = b->val[e];
    return scratch;
}

HOT static int64_t row_greedy(const float *x, const float *b, Py_ssize_t V)
{
    float best = -INFINITY;
    Py_ssize_t best_block = 0;
    for (Py_ssize_t j0 = 0; j0 < V; j0 += BLOCK) {
        const Py_ssize_t n = V - j0 < BLOCK ? V - j0 : BLOCK;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (Py_ssize_t j = j0; j < j0 + n; j++) {
            const float v = b[j] + x[j];
            m = v > m ? v : m;
        }
        if (m > best) {
            best = m;
            best_block = j0;
        }
    }
    const Py_ssize_t end = V - best_block < BLOCK ? V : best_block + BLOCK;
    for (Py_ssize_t j = best_block; j < end; j++)
        if (b[j] + x[j] == best)
            return j;
    return best_block; /* every score NaN or -inf: nothing to rank, the first token */
}

/* Keep the `width` best (value, flat index) pairs, best first; on a tie the lower index stays ahead
 * (candidates arrive in index order, so an equal value never displaces an earlier one). */
static inline void top_insert(float *vals, int64_t *idx, int width, float v, int64_t i)
{
    int k = width - 1;
    while (k > 0 && v > vals[k - 1]) {
        vals[k] = vals[k - 1];
        idx[k] = idx[k - 1];
        k--;
    }
    vals[k] = v;
    idx[k] = i;
}

/* One beam-search step for one request: its rows' log-sum-exps, and the best `keep` (>= width) of
 * (b + score) + (x - lse) over its `width` rows. Per row, one vectorised pass finds the row's maximum
 * logit and each block's best b + x, a second sums the exps; then only the blocks whose best could enter
 * the list are read again, exactly (a margin covers the rounding of the estimate), which after the first
 * blocks is rare. */
HOT static void group_top(const float *x, const Bias *b, Py_ssize_t g, const float *score, Py_ssize_t V,
                          int width, int keep, float *lse, float *vals, int64_t *idx, float *bm, float *scratch)
{
    for (int k = 0; k < keep; k++) {
        vals[k] = -INFINITY;
        idx[k] = k; /* -inf candidates: beam_search_step turns them into dead copies */
    }
    const Py_ssize_t nblocks = (V + BLOCK - 1) / BLOCK;
    for (int r = 0; r < width; r++) {
        const float *xr = x + (Py_ssize_t)r * V, *br = bias_row(b, g + r, V, scratch);
        float mx = -INFINITY;
        for (Py_ssize_t k = 0; k < nblocks; k++) {
            const Py_ssize_t j0 = k * BLOCK, j1 = j0 + BLOCK < V ? j0 + BLOCK : V;
            float m = -INFINITY, mb = -INFINITY;
#pragma omp simd reduction(max : m, mb)
            for (Py_ssize_t j = j0; j < j1; j++) {
                m = xr[j] > m ? xr[j] : m;
                const float v = br[j] + xr[j];
                mb = v > mb ? v : mb;
            }
            mx = m > mx ? m : mx;
            bm[k] = mb;
        }
        float l = mx;
        if (isfinite(mx)) {
            float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
            for (Py_ssize_t j = 0; j < V; j++) {
                const float d = xr[j] - mx;
                sum += exp_neg(d > MIN_LOG_SHARE ? d : MIN_LOG_SHARE);
            }
            l = mx + logf(sum);
        }
        lse[r] = l;
        const float sc = score[r];
        for (Py_ssize_t k = 0; k < nblocks; k++) {
            const float estimate = (bm[k] + sc) - l;
            const float margin = 1e-5f * (fabsf(bm[k]) + fabsf(sc) + fabsf(l) + 1.0f);
            if (!(estimate + margin > vals[keep - 1]))
                continue;
            const Py_ssize_t j0 = k * BLOCK, j1 = j0 + BLOCK < V ? j0 + BLOCK : V;
            for (Py_ssize_t j = j0; j < j1; j++) {
                const float v = (br[j] + sc) + (xr[j] - l);
                if (v > vals[keep - 1])
                    top_insert(vals, idx, keep, v, (int64_t)r * V + j);
            }
        }
    }
}

/* Scratch for one row of the sampler. */
typedef struct {
    float *share;  /* (V) exp(score - best score): 0 where masked or more than 87 nats below the best */
    double *block; /* (V / BLOCK + 1) mass per block of the tokens still in play */
    float *top;    /* (V / BLOCK + 1) each block's largest share: a block whose largest is <= s holds no
                    * token more likely than s, so the passes that look for those skip it */
} Scratch;

/* A uniform number in [0, 1) for rejection round r > 0, from the row's own: splitmix64 of its bits. */
static double next_uniform(double u, int r)
{
    uint64_t z;
    memcpy(&z, &u, sizeof z);
    z += 0x9E3779B97F4A7C15ull * (uint64_t)r;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53;
}

/* The token where the running mass of the tokens with share > pivot, in vocabulary order, passes u times
 * their total; the block masses must be those of the same tokens. */
static Py_ssize_t walk(const float *share, const double *block, Py_ssize_t V, float pivot, double u)
{
    const Py_ssize_t nblocks = (V + BLOCK - 1) / BLOCK;
    double total = 0.0;
    for (Py_ssize_t k = 0; k < nblocks; k++)
        total += block[k];
    const double target = u * total;
    double run = 0.0;
    for (Py_ssize_t k = 0; k < nblocks; k++) {
        if (run + block[k] <= target) {
            run += block[k];
            continue;
        }
        const Py_ssize_t j1 = (k + 1) * BLOCK < V ? (k + 1) * BLOCK : V;
        for (Py_ssize_t j = k * BLOCK; j < j1; j++)
            if (share[j] > pivot) {
                run += share[j];
                if (run > target)
                    return j;
            }
    }
    for (Py_ssize_t j = V - 1; j >= 0; j--) /* u · total rounded up to the total: the last token in play */
        if (share[j] > pivot)
            return j;
    return 0; /* nothing in play: the row had no finite score */
}

HOT static void block_masses(const float *share, const float *top, Py_ssize_t V, float pivot, double *block)
{
    for (Py_ssize_t j0 = 0; j0 < V; j0 += BLOCK) {
        const Py_ssize_t j1 = j0 + BLOCK < V ? j0 + BLOCK : V;
        float m = 0.0f;
        if (top[j0 / BLOCK] > pivot) {
#pragma omp simd reduction(+ : m)
            for (Py_ssize_t j = j0; j < j1; j++)
                m += share[j] > pivot ? share[j] : 0.0f;
        }
        block[j0 / BLOCK] = m;
    }
}

/* The mass and number of the tokens with a share above s, reading only the blocks that hold one. */
HOT static double mass_above(const float *share, const float *top, Py_ssize_t V, float s, int64_t *count)
{
    double above = 0.0;
    int64_t n = 0;
    for (Py_ssize_t j0 = 0; j0 < V; j0 += BLOCK) {
        if (!(top[j0 / BLOCK] > s))
            continue;
        const Py_ssize_t j1 = j0 + BLOCK < V ? j0 + BLOCK : V;
        float m = 0.0f;
        int64_t c = 0;
#pragma omp simd reduction(+ : m, c)
        for (Py_ssize_t j = j0; j < j1; j++) {
            m += share[j] > s ? share[j] : 0.0f;
            c += share[j] > s;
        }
        above += m;
        n += c;
    }
    *count = n;
    return above;
}

/* One draw from the kept tokens of decoding.sample_batch's rule: the tokens at least as likely as the one
 * at which the most-likely-first running mass reaches top_p (ties stay) and, with top-k, at least as likely
 * as the k-th — in proportion to their shares exp(score - best).
 *
 * By rejection, without a sort (as FlashInfer samples top-p): draw from every token in play; a token is
 * kept exactly when the tokens more likely than it hold less than top_p of the mass (and number fewer than
 * top_k), which one vectorised pass tells. If it is not kept, neither is any token as unlikely: they leave
 * play and the next round draws again, with a uniform number made from the row's own. The kept tokens
 * never leave, so the draw lands on each in proportion to its share. One round or two is the rule: a
 * rejected draw lies below the boundary, and everything below it leaves with it. */
HOT static int64_t row_sample(const float *x, const float *b, Py_ssize_t V, float t, int64_t top_k,
                              float top_p, float u, Scratch *s)
{
    float *share = s->share;
    const float inv_t = 1.0f / t;
    float best = -INFINITY;
#pragma omp simd reduction(max : best)
    for (Py_ssize_t j = 0; j < V; j++) {
        const float v = (b[j] + x[j]) * inv_t;
        best = v > best ? v : best;
    }
    for (Py_ssize_t j0 = 0; j0 < V; j0 += BLOCK) { /* shares, and the first round's block masses */
        const Py_ssize_t j1 = j0 + BLOCK < V ? j0 + BLOCK : V;
        float m = 0.0f, top = 0.0f;
#pragma omp simd reduction(+ : m) reduction(max : top)
        for (Py_ssize_t j = j0; j < j1; j++) {
            const float rel = (b[j] + x[j]) * inv_t - best; /* -inf where masked */
            const float e = exp_neg(rel >= MIN_LOG_SHARE ? rel : MIN_LOG_SHARE);
            share[j] = rel >= MIN_LOG_SHARE ? e : 0.0f;
            m += share[j];
            top = share[j] > top ? share[j] : top;
        }
        s->block[j0 / BLOCK] = m;
        s->top[j0 / BLOCK] = top;
    }
    const Py_ssize_t nblocks = (V + BLOCK - 1) / BLOCK;
    double mass = 0.0;
    for (Py_ssize_t k = 0; k < nblocks; k++)
        mass += s->block[k];
    if (!(mass > 0.0))
        return 0; /* no finite score: nothing to draw */
    const double need = (double)top_p * mass;
    const int64_t k_cap = top_k > 0 ? top_k : V;
    float pivot = 0.0f; /* tokens with share <= pivot are out of play */
    double uu = u;
    /* Ends: a rejected token leaves play, and the most likely token is never rejected; the bound only
     * guards the server's thread against a mistake here. */
    Py_ssize_t j = 0;
    for (Py_ssize_t round = 0; round <= V; round++) {
        if (round > 0) {
            block_masses(share, s->top, V, pivot, s->block);
            uu = next_uniform((double)u, (int)round);
        }
        j = walk(share, s->block, V, pivot, uu);
        if (top_p >= 1.0f && top_k <= 0)
            return j;
        const float sj = share[j];
        int64_t count; /* mass and number of the tokens more likely than j */
        const double above = mass_above(share, s->top, V, sj, &count);
        if ((above < need || count == 0) && count < k_cap) /* the most likely tokens are always kept */
            return j;
        pivot = sj;
    }
    return j;
}

/* ---- Python bindings ---------------------------------------------------------------------------- */

static int check_size(Py_buffer *buf, const char *name, Py_ssize_t n, Py_ssize_t itemsize)
{
    if (buf->len != n * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: expected %zd bytes, got %zd", name, n * itemsize, buf->len);
        return -1;
    }
    return 0;
}

/* Checks the bias buffers against R rows of V tokens and fills `b`; -1 with an exception set if they do
 * not fit (every index and token is checked: the kernels then read without bounds checks). */
static int check_bias(Py_buffer *table, Py_buffer *index, Py_buffer *ptr, Py_buffer *tok, Py_buffer *val,
                      Py_ssize_t R, Py_ssize_t V, Bias *b)
{
    const Py_ssize_t T = table->len / (V * 4), E = tok->len / 8;
    if (table->len % (V * 4) || T < 1 || check_size(index, "bias index", R, 8) ||
        check_size(ptr, "bias ptr", R + 1, 8) || check_size(tok, "bias tokens", E, 8) ||
        check_size(val, "bias values", E, 4)) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bias table: expected whole rows of V floats");
        return -1;
    }
    const int64_t *ip = index->buf, *pp = ptr->buf, *tp = tok->buf;
    if (pp[0] != 0 || pp[R] != E) {
        PyErr_SetString(PyExc_ValueError, "bias ptr: must run from 0 to the number of replaced entries");
        return -1;
    }
    for (Py_ssize_t r = 0; r < R; r++)
        if (ip[r] < 0 || ip[r] >= T || pp[r + 1] < pp[r]) {
            PyErr_Format(PyExc_ValueError, "bias row %zd: table row %lld of %zd, or ptr decreasing", r,
                         (long long)ip[r], T);
            return -1;
        }
    for (Py_ssize_t e = 0; e < E; e++)
        if (tp[e] < 0 || tp[e] >= V) {
            PyErr_Format(PyExc_ValueError, "bias token %lld out of range for %zd tokens", (long long)tp[e], V);
            return -1;
        }
    b->table = table->buf;
    b->val = val->buf;
    b->index = ip;
    b->ptr = pp;
    b->tok = tp;
    return 0;
}

#define BIAS_FORMAT "y*y*y*y*y*"
#define BIAS_ARGS &bt, &bi, &bp_, &bk, &bv
#define BIAS_RELEASE()                                                                                        \
    do {                                                                                                      \
        PyBuffer_Release(&bt);                                                                                \
        PyBuffer_Release(&bi);                                                                                \
        PyBuffer_Release(&bp_);                                                                               \
        PyBuffer_Release(&bk);                                                                                \
        PyBuffer_Release(&bv);                                                                                \
    } while (0)

static PyObject *py_logsumexp(PyObject *self, PyObject *args)
{
    Py_buffer x, out;
    Py_ssize_t R, V;
    if (!PyArg_ParseTuple(args, "y*nnw*", &x, &R, &V, &out))
        return NULL;
    PyObject *result = NULL;
    if (R >= 0 && V > 0 && !check_size(&x, "x", R * V, 4) && !check_size(&out, "out", R, 4)) {
        Py_BEGIN_ALLOW_THREADS logsumexp_rows(x.buf, R, V, out.buf);
        Py_END_ALLOW_THREADS result = Py_NewRef(Py_None);
    } else if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError, "bad shape");
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_greedy(PyObject *self, PyObject *args)
{
    Py_buffer x, bt, bi, bp_, bk, bv, out;
    Py_ssize_t R, V;
    if (!PyArg_ParseTuple(args, "y*" BIAS_FORMAT "nnw*", &x, BIAS_ARGS, &R, &V, &out))
        return NULL;
    PyObject *result = NULL;
    Bias bias;
    float *scratch = NULL;
    if (!(R >= 0 && V > 0 && !check_size(&x, "x", R * V, 4) && !check_size(&out, "out", R, 8) &&
          !check_bias(&bt, &bi, &bp_, &bk, &bv, R, V, &bias))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bad shape");
        goto done;
    }
    if (!(scratch = PyMem_RawMalloc((size_t)V * sizeof(float)))) {
        PyErr_NoMemory();
        goto done;
    }
    const float *xp = x.buf;
    int64_t *op = out.buf;
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t r = 0; r < R; r++) op[r] =
        row_greedy(xp + r * V, bias_row(&bias, r, V, scratch), V);
    Py_END_ALLOW_THREADS result = Py_NewRef(Py_None);
done:
    PyMem_RawFree(scratch);
    PyBuffer_Release(&x);
    BIAS_RELEASE();
    PyBuffer_Release(&out);
    return result;
}

static PyObject *py_beam(PyObject *self, PyObject *args)
{
    Py_buffer x, bt, bi, bp_, bk, bv, score, lse, vals, flat;
    Py_ssize_t R, V;
    int width, keep;
    if (!PyArg_ParseTuple(args, "y*" BIAS_FORMAT "y*nniiw*w*w*", &x, BIAS_ARGS, &score, &R, &V, &width, &keep, &lse,
                          &vals, &flat))
        return NULL;
    PyObject *result = NULL;
    Bias bias;
    float *bm = NULL, *scratch = NULL;
    if (!(R >= 0 && V > 0 && width > 0 && keep >= width && R % width == 0 && !check_size(&x, "x", R * V, 4) &&
          !check_size(&score, "score", R, 4) && !check_size(&lse, "lse", R, 4) &&
          !check_size(&vals, "values", R / width * keep, 4) && !check_size(&flat, "flat", R / width * keep, 8) && !check_bias(&bt, &bi, &bp_, &bk, &bv, R, V, &bias))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bad shape");
        goto done;
    }
    bm = PyMem_RawMalloc((size_t)(V / BLOCK + 1) * sizeof(float));
    scratch = PyMem_RawMalloc((size_t)V * sizeof(float));
    if (bm == NULL || scratch == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    const float *xp = x.buf, *sp = score.buf;
    float *lp = lse.buf, *vp = vals.buf;
    int64_t *fp = flat.buf;
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t g = 0; g < R; g += width)
        group_top(xp + g * V, &bias, g, sp + g, V, width, keep, lp + g, vp + g / width * keep, fp + g / width * keep,
                  bm, scratch);
    Py_END_ALLOW_THREADS result = Py_NewRef(Py_None);
done:
    PyMem_RawFree(bm);
    PyMem_RawFree(scratch);
    PyBuffer_Release(&x);
    BIAS_RELEASE();
    PyBuffer_Release(&score);
    PyBuffer_Release(&lse);
    PyBuffer_Release(&vals);
    PyBuffer_Release(&flat);
    return result;
}

static PyObject *py_sample(PyObject *self, PyObject *args)
{
    Py_buffer x, bt, bi, bp_, bk, bv, rows, t, k, p, u, out;
    Py_ssize_t R, V;
    if (!PyArg_ParseTuple(args, "y*" BIAS_FORMAT "nny*y*y*y*y*w*", &x, BIAS_ARGS, &R, &V, &rows, &t, &k, &p, &u,
                          &out))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t n = rows.len / 8;
    Scratch s = {0};
    Bias bias;
    float *scratch = NULL;
    if (!(R >= 0 && V > 0 && V <= INT32_MAX && !check_size(&x, "x", R * V, 4) &&
          !check_size(&rows, "rows", n, 8) && !check_size(&t, "temperature", n, 4) &&
          !check_size(&k, "top_k", n, 8) && !check_size(&p, "top_p", n, 4) && !check_size(&u, "uniform", n, 4) &&
          !check_size(&out, "out", n, 8) && !check_bias(&bt, &bi, &bp_, &bk, &bv, R, V, &bias))) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "bad shape");
        goto done;
    }
    const int64_t *rp = rows.buf;
    for (Py_ssize_t i = 0; i < n; i++)
        if (rp[i] < 0 || rp[i] >= R) {
            PyErr_Format(PyExc_IndexError, "row %lld out of range for %zd rows", (long long)rp[i], R);
            goto done;
        }
    s.share = PyMem_RawMalloc((size_t)V * sizeof(float));
    s.block = PyMem_RawMalloc((size_t)(V / BLOCK + 1) * sizeof(double));
    s.top = PyMem_RawMalloc((size_t)(V / BLOCK + 1) * sizeof(float));
    scratch = PyMem_RawMalloc((size_t)V * sizeof(float));
    if (!s.share || !s.block || !s.top || !scratch) {
        PyErr_NoMemory();
        goto done;
    }
    const float *xp = x.buf, *tp = t.buf, *pp = p.buf, *up = u.buf;
    const int64_t *kp = k.buf;
    int64_t *op = out.buf;
    Py_BEGIN_ALLOW_THREADS for (Py_ssize_t i = 0; i < n; i++)
    {
        const int64_t r = rp[i];
        op[i] = row_sample(xp + r * V, bias_row(&bias, r, V, scratch), V, tp[i], kp[i], pp[i], up[i], &s);
    }
    Py_END_ALLOW_THREADS result = Py_NewRef(Py_None);
done:
    PyMem_RawFree(s.share);
    PyMem_RawFree(s.block);
    PyMem_RawFree(s.top);
    PyMem_RawFree(scratch);
    PyBuffer_Release(&x);
    BIAS_RELEASE();
    PyBuffer_Release(&rows);
    PyBuffer_Release(&t);
    PyBuffer_Release(&k);
    PyBuffer_Release(&p);
    PyBuffer_Release(&u);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"logsumexp", py_logsumexp, METH_VARARGS, "logsumexp(x, R, V, out): out[r] = log sum exp x[r]"},
    {"greedy", py_greedy, METH_VARARGS, "greedy(x, *bias, R, V, out): first argmax of bias + x"},
    {"beam", py_beam, METH_VARARGS,
     "beam(x, *bias, score, R, V, width, keep, lse, values, flat): log-sum-exps and the top `keep` per group"},
    {"sample", py_sample, METH_VARARGS,
     "sample(x, *bias, R, V, rows, temperature, top_k, top_p, uniform, out): one draw per listed row"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels", "CPU kernels for engine/sampling/kernels.py", -1,
                                    methods};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
