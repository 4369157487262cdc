/* qdqkit._histogram: the bin assignment of ModelOpt's histogram calibration over an observed tensor, compiled.
 *
 * Used by patch 6 in qdqkit/modelopt_compat.py, which falls back to its numpy code wherever this module is
 * missing or declines. It releases the GIL, so the patch's thread pool runs tensors in parallel.
 *
 *   counts(data, edges, first, denom, bins, shifted_double, quotient_double, hist) -> bool
 *       Adds to hist (int64, `bins` long) the bins np.histogram gives the elements of data, all of them inside
 *       [edges[0], edges[bins]]: numpy's guess, truncate(((x - first) / denom) * bins) computed in numpy's
 *       dtypes (x converted to the edges' dtype; the difference in double or float as shifted_double says, the
 *       quotient likewise; first and denom already of those dtypes), the top edge moved into the last bin, then
 *       numpy's corrections against the edges: one bin down where x lies below the guessed bin's lower edge,
 *       otherwise one up where it lies on or above the next edge (not from the last bin). Every operation is a
 *       single correctly rounded IEEE operation, as numpy's ufuncs are (built with -ffp-contract=off, no fast
 *       math). Returns False, with hist untouched, where a guess or a correction leaves the bins (numpy would
 *       index out of range or wrap): the caller then runs numpy's own code.
 *
 *   counts_extremes(data, edges, first, denom, bins, shifted_double, quotient_double, hist) -> (placed, min, max)
 *       | None
 *       counts() and, in the same pass, the data's minimum and maximum (Python floats; both NaN where the data
 *       holds a NaN). `placed` is what counts() returns (False: hist untouched); the extremes are the whole
 *       data's either way (the pass goes on with them alone). Placing every element does not mean all lie inside
 *       [edges[0], edges[bins]] (a value just above the top edge can still guess the last bin): the caller checks
 *       the extremes. None where this level has no such pass (AVX-512 and float32 data and edges only): the
 *       caller then takes the extremes and the counts separately. The sign of a zero extreme is not numpy's
 *       (which zero a reduction returns depends on its order).
 *
 *   product_bounds(edges) -> (scale, below, above) | None
 *       The product guess the AVX-512 pass takes instead of numpy's where both are bounded (bounds_product below):
 *       its scale and the fractional parts between which no element needs a correction; None where it has no
 *       bounds. For the tests, which check that the common cases take it.
 *
 *   simd([level]) -> str
 *       The code counts() runs for float32 data and edges: "avx512" (sixteen elements at a time, chosen at run
 *       time where the processor has AVX-512) or "scalar"; sets it when a level is given (the tests run both).
 *   simd_levels() -> tuple of the levels this processor can run.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 2048
#define LANES 4 /* sub-histograms: repeated bins do not wait on each other's increments */

static int get_buffer(PyObject *obj, Py_buffer *view, int writable)
{
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0)
        return -1;
    if (view->ndim > 1) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "expected a one-dimensional buffer");
        return -1;
    }
    return 0;
}

/* 'f' float32, 'd' float64, 'q' int64; 0 otherwise. Native byte order only. */
static char kind_of(const Py_buffer *view)
{
    const char *f = view->format ? view->format : "B";
    if (*f == '@' || *f == '=')
        f++;
    if (f[1] != '\0')
        return 0;
    if (*f == 'f' && view->itemsize == 4)
        return 'f';
    if (*f == 'd' && view->itemsize == 8)
        return 'd';
    if ((*f == 'q' || *f == 'l') && view->itemsize == 8)
        return 'q';
    return 0;
}

/* One element type X, edge type E, difference type S, quotient type F. The guess loop has no branches, so
 * the compiler vectorizes it; the correction loop reads two edges per element. */
#define COUNTS(NAME, X, E, S, F)                                                                             \
    static int NAME(const X *x, Py_ssize_t n, const E *edges, double first_, double denom_, Py_ssize_t bins, \
                    int64_t *hist)                                                                           \
    {                                                                                                        \
        const S first = (S)first_;                                                                           \
        const F denom = (F)denom_, nbins = (F)bins;                                                          \
        F f[BLOCK];                                                                                          \
        int64_t *sub = calloc((size_t)bins * LANES, sizeof(int64_t));                                        \
        if (!sub)                                                                                            \
            return -2;                                                                                       \
        int ok = 1;                                                                                          \
        for (Py_ssize_t start = 0; start < n && ok; start += BLOCK) {                                        \
            Py_ssize_t m = n - start < BLOCK ? n - start : BLOCK;                                            \
            const X *xb = x + start;                                                                         \
            for (Py_ssize_t i = 0; i < m; i++) {                                                             \
                S shifted = (S)(E)xb[i] - first;                                                             \
                F q = (F)shifted / denom;                                                                    \
                f[i] = q * nbins;                                                                            \
            }                                                                                                \
            for (Py_ssize_t i = 0; i < m; i++) {                                                             \
                if (!(f[i] >= 0 && f[i] <= nbins)) { /* also NaN */                                          \
                    ok = 0;                                                                                  \
                    break;                                                                                   \
                }                                                                                            \
                Py_ssize_t k = (Py_ssize_t)f[i]; /* truncation, as astype(intp) */                           \
                if (k == bins)                                                                               \
                    k = bins - 1;                                                                            \
                E v = (E)xb[i];                                                                              \
                if (v < edges[k]) {                                                                          \
                    if (--k < 0) {                                                                           \
                        ok = 0;                                                                              \
                        break;                                                                               \
                    }                                                                                        \
                } else if (k != bins - 1 && v >= edges[k + 1]) {                                             \
                    k++;                                                                                     \
                }                                                                                            \
                sub[(i & (LANES - 1)) * bins + k]++;                                                         \
            }                                                                                                \
        }                                                                                                    \
        if (ok)                                                                                              \
            for (int l = 0; l < LANES; l++)                                                                  \
                for (Py_ssize_t b = 0; b < bins; b++)                                                        \
                    hist[b] += sub[l * bins + b];                                                            \
        free(sub);                                                                                           \
        return ok;                                                                                           \
    }
/* numpy's dtypes: data float32 or float64; edges of the data's type or wider; the difference and the quotient
 * as numpy's promotion of the operands made them (the caller finds out by asking numpy) */
COUNTS(counts_fff, float, float, float, float)
COUNTS(counts_ffd, float, float, float, double)
COUNTS(counts_fdd, float, double, double, double)
COUNTS(counts_ddd, double, double, double, double)

/* The product guess: (x - edges[0]) * scale, in float32, with scale near bins / (edges[bins] - edges[0]). It is not
 * numpy's guess, which divides (in float64 where numpy promotes the quotient to it), but it is cheaper and, like
 * numpy's, never decreases as x grows (two correctly rounded operations, scale > 0). Where both guesses lie within
 * half a bin of every edge's index, each is at most one bin off the bin the edges give, and numpy's corrections
 * (one bin down, or one up) end in that bin from either: so the counts are numpy's. *below and *above as for
 * BOUNDS; scale is lowered until the top edge's guess is at most bins (every element inside the edges then has a
 * guess in [0, bins]). Returns 0 where the product form has no such bounds (bins too many for float32, say). */
static int bounds_product(const float *edges, Py_ssize_t bins, float *scale, float *below, float *above)
{
    const float e0 = edges[0], top = edges[bins] - e0, nbins = (float)bins;
    float s = (float)((double)bins / (double)top);
    for (int tries = 0; tries < 4 && top * s > nbins; tries++)
        s = nextafterf(s, 0.f);
    if (!(s > 0.f && s < INFINITY && top * s <= nbins && (double)nbins == (double)bins))
        return 0;
    float lo = -INFINITY, hi = INFINITY;
    for (Py_ssize_t k = 0; k < bins; k++) {
        const float f = (nextafterf(edges[k], -INFINITY) - e0) * s;
        if (!(fabsf(f - (float)k) <= 0.5f))
            return 0;
        if (f - (float)k > lo)
            lo = f - (float)k;
        if (k + 1 < bins) {
            const float g = (edges[k + 1] - e0) * s;
            if (!(fabsf(g - (float)(k + 1)) <= 0.5f))
                return 0;
            if (g - (float)k < hi)
                hi = g - (float)k;
        }
    }
    *scale = s;
    *below = lo;
    *above = hi;
    return 1;
}

/* The same counts over sixteen elements at a time with AVX-512 (float32 data and edges, the quotient in float32
 * or float64: the variants fff and ffd, which are ModelOpt's merges and first histograms), chosen at run time
 * where the processor has it. Where bounds_product holds (and numpy's own guesses are bounded), every lane takes
 * the product guess; otherwise it does the scalar code's operations: the same correctly rounded subtraction,
 * division and multiplication, truncation. Either way the lanes near an edge get the two corrections against
 * edges read by gathers; only the increments stay scalar (into 8 sub-histograms). The product guess halves the
 * pass on ModelOpt's first histograms, whose quotient numpy computes in float64 (two float64 divisions a vector
 * before). */
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define HAVE_AVX512 1
#define AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))
#define SIMD_LANES 8
#define SIMD_RUN 2048 /* a multiple of 16 */
#ifndef PREFETCH
#define PREFETCH 1024 /* bytes ahead: without it the loop reads memory at a third of the rate */
#endif

/* The guesses' bounds (as in patch 6's numpy code): the quotient never decreases as the value grows, so an element
 * whose guessed bin k needs the downward correction has a fractional part (quotient - k) no greater than that of
 * the float just below edge k, and one that needs the upward correction a fractional part no smaller than that of
 * edge k + 1. *below and *above are the extremes of those over all bins, computed with the same operations as the
 * elements' quotients; elements strictly between them keep their guess, and the edges are read only for a vector
 * that holds another. Within half a bin of k, quotient - k is exact (Sterbenz); where an edge's quotient lies
 * further from its bin, there are no bounds (every vector is compared). */
#define BOUNDS(NAME, F)                                                                                        \
    static int NAME(const float *edges, Py_ssize_t bins, float first, F denom, F nbins, F *below, F *above)  \
    {                                                                                                        \
        F lo = -INFINITY, hi = INFINITY;                                                                     \
        for (Py_ssize_t k = 0; k < bins; k++) {                                                              \
            float e = nextafterf(edges[k], -INFINITY);                                                       \
            F f = ((F)(float)(e - first) / denom) * nbins;                                                   \
            if (!(fabs((double)f - (double)k) <= 0.5))                                                       \
                return 0;                                                                                    \
            if (f - (F)k > lo)                                                                               \
                lo = f - (F)k;                                                                               \
            if (k + 1 < bins) {                                                                              \
                F g = ((F)(float)(edges[k + 1] - first) / denom) * nbins;                                    \
                if (!(fabs((double)g - (double)(k + 1)) <= 0.5))                                             \
                    return 0;                                                                                \
                if (g - (F)k < hi)                                                                           \
                    hi = g - (F)k;                                                                           \
            }                                                                                                \
        }                                                                                                    \
        *below = lo;                                                                                         \
        *above = hi;                                                                                         \
        return 1;                                                                                            \
    }
BOUNDS(bounds_fff, float)
BOUNDS(bounds_ffd, double)

/* numpy's bin for zero (the scalar code above on one element), or -1 where the guess or a correction leaves the
 * bins. A tensor after a ReLU is half zeros, and zero lies on the middle edge of a symmetric range, where every
 * vector holding one would otherwise read its edges. */
static Py_ssize_t zero_bin_of(int quotient_double, const float *edges, double first, double denom, Py_ssize_t bins)
{
    const float zero = 0.f;
    int64_t *one = calloc((size_t)bins, sizeof(int64_t));
    if (!one)
        return -1;
    int ok = (quotient_double ? counts_ffd : counts_fff)(&zero, 1, edges, first, denom, bins, one);
    Py_ssize_t k = -1;
    for (Py_ssize_t b = 0; ok == 1 && b < bins; b++)
        if (one[b])
            k = b;
    free(one);
    return k;
}

/* the running extremes of the lanes in m, and whether any of them is NaN (min and max would lose it) */
AVX512 static inline __attribute__((always_inline)) void extremes_step(__m512 v, __mmask16 m, __m512 *lo, __m512 *hi,
                                                                     __mmask16 *nan_seen)
{
    *lo = _mm512_mask_min_ps(*lo, m, *lo, v);
    *hi = _mm512_mask_max_ps(*hi, m, *hi, v);
    *nan_seen |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
}

typedef struct {
    __m512 first, denom_f, nbins_f, below_f, above_f, scale_f;
    __m512d denom_d, nbins_d, below_d, above_d;
} guess_args;

/* The guesses (truncated, the top edge moved into the last bin) of sixteen elements from their quotients f in
 * float32; lanes whose quotient lies outside [0, bins] (or is NaN) are set in *bad, lanes that may need a correction
 * in *near. */
AVX512 static inline __attribute__((always_inline)) __m512i guess_of(__m512 f, const guess_args *a, __m512i last,
                                                                   __mmask16 m, __mmask16 *bad, __mmask16 *near)
{
    __mmask16 ok = _mm512_cmp_ps_mask(f, _mm512_setzero_ps(), _CMP_GE_OQ) &
                   _mm512_cmp_ps_mask(f, a->nbins_f, _CMP_LE_OQ);
    *bad = (__mmask16)(~ok & m);
    __m512i k = _mm512_min_epi32(_mm512_cvttps_epi32(f), last);
    __m512 frac = _mm512_sub_ps(f, _mm512_cvtepi32_ps(k));
    *near = (__mmask16)((_mm512_cmp_ps_mask(frac, a->below_f, _CMP_LE_OQ) |
                         _mm512_cmp_ps_mask(frac, a->above_f, _CMP_GE_OQ)) & m);
    return k;
}

/* numpy's guess with the quotient in float32 */
AVX512 static inline __attribute__((always_inline)) __m512i guess_fff(__m512 v, const guess_args *a, __m512i last,
                                                                    __mmask16 m, __mmask16 *bad, __mmask16 *near)
{
    return guess_of(_mm512_mul_ps(_mm512_div_ps(_mm512_sub_ps(v, a->first), a->denom_f), a->nbins_f), a, last, m,
                    bad, near);
}

/* the product guess (bounds_product): (v - edges[0]) * scale, both in float32 */
AVX512 static inline __attribute__((always_inline)) __m512i guess_product(__m512 v, const guess_args *a, __m512i last,
                                                                        __mmask16 m, __mmask16 *bad, __mmask16 *near)
{
    return guess_of(_mm512_mul_ps(_mm512_sub_ps(v, a->first), a->scale_f), a, last, m, bad, near);
}

/* the same with the difference in float32 and the quotient in float64 (eight lanes a half) */
AVX512 static inline __attribute__((always_inline)) __m512i guess_ffd(__m512 v, const guess_args *a, __m512i last,
                                                                    __mmask16 m, __mmask16 *bad, __mmask16 *near)
{
    __m512 s = _mm512_sub_ps(v, a->first);
    __m512d f[2] = {_mm512_cvtps_pd(_mm512_castps512_ps256(s)), _mm512_cvtps_pd(_mm512_extractf32x8_ps(s, 1))};
    __m256i k[2];
    __mmask16 ok = 0, close = 0;
    for (int h = 0; h < 2; h++) {
        f[h] = _mm512_mul_pd(_mm512_div_pd(f[h], a->denom_d), a->nbins_d);
        ok |= (__mmask16)((__mmask16)(_mm512_cmp_pd_mask(f[h], _mm512_setzero_pd(), _CMP_GE_OQ) &
                                      _mm512_cmp_pd_mask(f[h], a->nbins_d, _CMP_LE_OQ)) << (8 * h));
        k[h] = _mm256_min_epi32(_mm512_cvttpd_epi32(f[h]), _mm512_castsi512_si256(last));
        __m512d frac = _mm512_sub_pd(f[h], _mm512_cvtepi32_pd(k[h]));
        close |= (__mmask16)((__mmask16)(_mm512_cmp_pd_mask(frac, a->below_d, _CMP_LE_OQ) |
                                         _mm512_cmp_pd_mask(frac, a->above_d, _CMP_GE_OQ)) << (8 * h));
    }
    *bad = (__mmask16)(~ok & m);
    *near = (__mmask16)(close & m);
    return _mm512_inserti64x4(_mm512_castsi256_si512(k[0]), k[1], 1);
}

AVX512 static inline __attribute__((always_inline)) int counts_ff_avx512(const float *x, Py_ssize_t n,
                                                                       const float *edges, double first_,
                                                                       double denom_, Py_ssize_t bins,
                                                                       int64_t *hist, int quotient_double,
                                                                       float *extremes)
{
    guess_args a;
    a.first = _mm512_set1_ps((float)first_);
    a.denom_f = _mm512_set1_ps((float)denom_);
    a.nbins_f = _mm512_set1_ps((float)bins);
    a.denom_d = _mm512_set1_pd(denom_);
    a.nbins_d = _mm512_set1_pd((double)bins);
    int bounded;
    const Py_ssize_t zero_bin = zero_bin_of(quotient_double, edges, first_, denom_, bins);
    if (quotient_double) {
        double below, above;
        bounded = bounds_ffd(edges, bins, (float)first_, denom_, (double)bins, &below, &above);
        a.below_d = _mm512_set1_pd(bounded ? below : INFINITY);
        a.above_d = _mm512_set1_pd(bounded ? above : -INFINITY);
    } else {
        float below, above;
        bounded = bounds_fff(edges, bins, (float)first_, (float)denom_, (float)bins, &below, &above);
        a.below_f = _mm512_set1_ps(bounded ? below : INFINITY);
        a.above_f = _mm512_set1_ps(bounded ? above : -INFINITY);
    }
    float scale, pbelow, pabove;
    const int product = bounded && bounds_product(edges, bins, &scale, &pbelow, &pabove);
    if (product) {
        a.first = _mm512_set1_ps(edges[0]);
        a.scale_f = _mm512_set1_ps(scale);
        a.below_f = _mm512_set1_ps(pbelow);
        a.above_f = _mm512_set1_ps(pabove);
    }
    const __m512i one = _mm512_set1_epi32(1), last = _mm512_set1_epi32((int)(bins - 1));
    int64_t *sub = calloc((size_t)bins * SIMD_LANES, sizeof(int64_t));
    if (!sub)
        return -2;
    /* the bins of a run's nonzero elements, packed, counted after the run in a plain loop (faster than sixteen
     * increments after every vector: the vector loop and the increments each run without waiting on the other);
     * zeros are only counted, and added to their bin at the end. A store writes sixteen lanes at `kept`, which
     * never exceeds the run's elements before the vector, so the last store ends within the array. */
    int32_t idx[SIMD_RUN] __attribute__((aligned(64)));
    int64_t zero_count = 0;
    /* the extremes so far, and whether a NaN was seen (min and max would lose it) */
    __m512 lo_v = _mm512_set1_ps(INFINITY), hi_v = _mm512_set1_ps(-INFINITY);
    __mmask16 nan_seen = 0;
    int placed = 1;
    Py_ssize_t i = 0;
    for (Py_ssize_t run = 0; run < n && placed; run += SIMD_RUN) {
        const Py_ssize_t run_end = n - run < SIMD_RUN ? n : run + SIMD_RUN;
        Py_ssize_t kept = 0;
        for (i = run; i < run_end; i += 16) {
            Py_ssize_t m = run_end - i < 16 ? run_end - i : 16;
            __mmask16 mask = m == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << m) - 1), bad, near;
            _mm_prefetch((const char *)(x + i) + PREFETCH, _MM_HINT_T0);
            __m512 v = _mm512_maskz_loadu_ps(mask, x + i);
            __m512i k = product           ? guess_product(v, &a, last, mask, &bad, &near)
                        : quotient_double ? guess_ffd(v, &a, last, mask, &bad, &near)
                                          : guess_fff(v, &a, last, mask, &bad, &near);
            if (extremes)
                extremes_step(v, mask, &lo_v, &hi_v, &nan_seen);
            if (bad) { /* a guess outside the bins: numpy would index out of range; the caller runs numpy's code */
                placed = 0;
                break;
            }
            const __mmask16 zeros = _mm512_mask_cmp_ps_mask(mask, v, _mm512_setzero_ps(), _CMP_EQ_OQ); /* and -0 */
            if (zeros) { /* their bin is known (zero's guess is in range here, but a correction may leave it) */
                if (zero_bin < 0) {
                    placed = 0;
                    break;
                }
                zero_count += __builtin_popcount(zeros);
                near &= (__mmask16)~zeros;
            }
            if (near) { /* numpy's corrections, for the lanes that may need one */
                __m512 lo = _mm512_mask_i32gather_ps(v, near, k, edges, 4);
                __m512 hi = _mm512_mask_i32gather_ps(v, near, _mm512_add_epi32(k, one), edges, 4);
                __mmask16 down = _mm512_mask_cmp_ps_mask(near, v, lo, _CMP_LT_OQ);
                __mmask16 up = _mm512_mask_cmp_ps_mask(
                    (__mmask16)(near & ~down & _mm512_cmpneq_epi32_mask(k, last)), v, hi, _CMP_GE_OQ);
                k = _mm512_mask_sub_epi32(k, down, k, one);
                k = _mm512_mask_add_epi32(k, up, k, one);
                if (_mm512_mask_cmplt_epi32_mask(mask, k, _mm512_setzero_si512())) {
                    placed = 0;
                    break;
                }
            }
            /* compressed in a register and stored whole: a compressing store to memory is slow on some cores */
            const __mmask16 nonzero = (__mmask16)(mask & ~zeros);
            _mm512_storeu_si512((void *)(idx + kept), _mm512_maskz_compress_epi32(nonzero, k));
            kept += __builtin_popcount(nonzero);
        }
        if (!placed)
            break;
        Py_ssize_t j = 0;
        for (; j + SIMD_LANES <= kept; j += SIMD_LANES)
            for (int l = 0; l < SIMD_LANES; l++)
                sub[l * bins + idx[j + l]]++;
        for (; j < kept; j++)
            sub[idx[j]]++;
    }
    if (placed && zero_count)
        hist[zero_bin] += zero_count;
    if (placed)
        for (int l = 0; l < SIMD_LANES; l++)
            for (Py_ssize_t b = 0; b < bins; b++)
                hist[b] += sub[l * bins + b];
    free(sub);
    if (extremes) {
        /* where an element could not be placed, the rest of the data still gives its extremes (the caller needs
         * them for the histogram it then builds) */
        for (i += 16; !placed && i < n; i += 16) {
            Py_ssize_t m = n - i < 16 ? n - i : 16;
            __mmask16 mask = m == 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << m) - 1);
            _mm_prefetch((const char *)(x + i) + PREFETCH, _MM_HINT_T0);
            extremes_step(_mm512_maskz_loadu_ps(mask, x + i), mask, &lo_v, &hi_v, &nan_seen);
        }
        extremes[0] = nan_seen ? NAN : _mm512_reduce_min_ps(lo_v);
        extremes[1] = nan_seen ? NAN : _mm512_reduce_max_ps(hi_v);
    }
    return placed;
}

AVX512 static int counts_fff_avx512(const void *x, Py_ssize_t n, const void *edges, double first, double denom,
                                    Py_ssize_t bins, int64_t *hist)
{
    return counts_ff_avx512(x, n, edges, first, denom, bins, hist, 0, NULL);
}

AVX512 static int counts_ffd_avx512(const void *x, Py_ssize_t n, const void *edges, double first, double denom,
                                    Py_ssize_t bins, int64_t *hist)
{
    return counts_ff_avx512(x, n, edges, first, denom, bins, hist, 1, NULL);
}

AVX512 static int counts_extremes_fff_avx512(const float *x, Py_ssize_t n, const float *edges, double first,
                                             double denom, Py_ssize_t bins, int64_t *hist, float *extremes)
{
    return counts_ff_avx512(x, n, edges, first, denom, bins, hist, 0, extremes);
}

AVX512 static int counts_extremes_ffd_avx512(const float *x, Py_ssize_t n, const float *edges, double first,
                                             double denom, Py_ssize_t bins, int64_t *hist, float *extremes)
{
    return counts_ff_avx512(x, n, edges, first, denom, bins, hist, 1, extremes);
}
#else
#define HAVE_AVX512 0
#endif

/* which code runs: "avx512" where the processor has it and it was compiled, otherwise "scalar"; simd() changes it
 * (the tests run both) */
static int use_avx512 = -1;

static int avx512_available(void)
{
#if HAVE_AVX512
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
#else
    return 0;
#endif
}

static PyObject *py_simd(PyObject *self, PyObject *args)
{
    (void)self;
    const char *level = NULL;
    if (!PyArg_ParseTuple(args, "|z", &level))
        return NULL;
    if (use_avx512 < 0)
        use_avx512 = avx512_available();
    if (level) {
        if (strcmp(level, "scalar") == 0)
            use_avx512 = 0;
        else if (strcmp(level, "avx512") == 0 && avx512_available())
            use_avx512 = 1;
        else {
            PyErr_Format(PyExc_ValueError, "simd: %s is not available here (scalar%s)", level,
                         avx512_available() ? ", avx512" : "");
            return NULL;
        }
    }
    return PyUnicode_FromString(use_avx512 ? "avx512" : "scalar");
}

static PyObject *py_product_bounds(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *edges_obj;
    if (!PyArg_ParseTuple(args, "O", &edges_obj))
        return NULL;
    Py_buffer edges;
    if (get_buffer(edges_obj, &edges, 0) != 0)
        return NULL;
    if (kind_of(&edges) != 'f' || edges.len / edges.itemsize < 2) {
        PyBuffer_Release(&edges);
        PyErr_SetString(PyExc_ValueError, "product_bounds: expected float32 edges, at least two");
        return NULL;
    }
    float scale, below, above;
    int ok = bounds_product(edges.buf, edges.len / edges.itemsize - 1, &scale, &below, &above);
    PyBuffer_Release(&edges);
    if (!ok)
        Py_RETURN_NONE;
    return Py_BuildValue("(ddd)", (double)scale, (double)below, (double)above);
}

static PyObject *py_simd_levels(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return avx512_available() ? Py_BuildValue("(ss)", "scalar", "avx512") : Py_BuildValue("(s)", "scalar");
}

/* counts() and counts_extremes(): the same arguments, checked the same way. `extremes` is NULL for counts(). */
static PyObject *counts_call(PyObject *args, int with_extremes)
{
    PyObject *data_obj, *edges_obj, *hist_obj;
    double first, denom;
    Py_ssize_t bins;
    int shifted_double, quotient_double;
    if (!PyArg_ParseTuple(args, "OOddnppO", &data_obj, &edges_obj, &first, &denom, &bins, &shifted_double,
                          &quotient_double, &hist_obj))
        return NULL;
    Py_buffer data, edges, hist;
    if (get_buffer(data_obj, &data, 0) != 0)
        return NULL;
    if (get_buffer(edges_obj, &edges, 0) != 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    if (get_buffer(hist_obj, &hist, 1) != 0) {
        PyBuffer_Release(&data);
        PyBuffer_Release(&edges);
        return NULL;
    }
    char xk = kind_of(&data), ek = kind_of(&edges), hk = kind_of(&hist);
    Py_ssize_t n = data.itemsize ? data.len / data.itemsize : 0;
    int (*fn)(const void *, Py_ssize_t, const void *, double, double, Py_ssize_t, int64_t *) = NULL;
    int (*fn_extremes)(const float *, Py_ssize_t, const float *, double, double, Py_ssize_t, int64_t *, float *) =
        NULL;
    if (xk == 'f' && ek == 'f' && !shifted_double && !quotient_double)
        fn = (void *)counts_fff;
    else if (xk == 'f' && ek == 'f' && !shifted_double && quotient_double)
        fn = (void *)counts_ffd;
    else if (xk == 'f' && ek == 'd' && shifted_double && quotient_double)
        fn = (void *)counts_fdd;
    else if (xk == 'd' && ek == 'd' && shifted_double && quotient_double)
        fn = (void *)counts_ddd;
#if HAVE_AVX512
    if (use_avx512 < 0)
        use_avx512 = avx512_available();
    if (use_avx512 && bins < (1 << 30) && fn == (void *)counts_fff) {
        fn = counts_fff_avx512;
        fn_extremes = counts_extremes_fff_avx512;
    } else if (use_avx512 && bins < (1 << 30) && fn == (void *)counts_ffd) {
        fn = counts_ffd_avx512;
        fn_extremes = counts_extremes_ffd_avx512;
    }
#endif
    int rc = -3;
    float extremes[2] = {0.f, 0.f};
    if (fn && hk == 'q' && bins > 0 && edges.len / edges.itemsize == bins + 1 && hist.len / hist.itemsize == bins) {
        rc = -4;
        if (!with_extremes || fn_extremes) {
            Py_BEGIN_ALLOW_THREADS
            rc = with_extremes ? fn_extremes(data.buf, n, edges.buf, first, denom, bins, (int64_t *)hist.buf,
                                             extremes)
                               : fn(data.buf, n, edges.buf, first, denom, bins, (int64_t *)hist.buf);
            Py_END_ALLOW_THREADS
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&edges);
    PyBuffer_Release(&hist);
    if (rc == -2)
        return PyErr_NoMemory();
    if (rc == -3) {
        PyErr_SetString(PyExc_ValueError, "counts: unsupported dtypes or mismatched lengths");
        return NULL;
    }
    if (rc == -4) /* no fused pass at this level or for these dtypes */
        Py_RETURN_NONE;
    if (with_extremes && rc >= 0)
        return Py_BuildValue("(Odd)", rc ? Py_True : Py_False, (double)extremes[0], (double)extremes[1]);
    return PyBool_FromLong(rc);
}

static PyObject *py_counts(PyObject *self, PyObject *args)
{
    (void)self;
    return counts_call(args, 0);
}

static PyObject *py_counts_extremes(PyObject *self, PyObject *args)
{
    (void)self;
    return counts_call(args, 1);
}

static PyMethodDef methods[] = {
    {"counts", py_counts, METH_VARARGS,
     "counts(data, edges, first, denom, bins, shifted_double, quotient_double, hist) -> bool"},
    {"counts_extremes", py_counts_extremes, METH_VARARGS,
     "counts_extremes(<counts' arguments>) -> (placed, min, max) | None"},
    {"simd", py_simd, METH_VARARGS, "simd([level]) -> the level counts() runs at ('scalar' or 'avx512'), set if given"},
    {"simd_levels", py_simd_levels, METH_NOARGS, "simd_levels() -> the levels this processor can run"},
    {"product_bounds", py_product_bounds, METH_VARARGS,
     "product_bounds(edges) -> (scale, below, above) of the product guess, or None where it has none"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_histogram",
                                    "Compiled passes of patch 6 (qdqkit/modelopt_compat.py).", -1, methods};

PyMODINIT_FUNC PyInit__histogram(void) { return PyModule_Create(&module); }
