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

static PyObject *py_counts(PyObject *self, PyObject *args)
{
    (void)self;
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
    if (xk == 'f' && ek == 'f' && !shifted_double && !quotient_double)
        fn = (void *)counts_fff;
    else if (xk == 'f' && ek == 'f' && !shifted_double && quotient_double)
        fn = (void *)counts_ffd;
    else if (xk == 'f' && ek == 'd' && shifted_double && quotient_double)
        fn = (void *)counts_fdd;
    else if (xk == 'd' && ek == 'd' && shifted_double && quotient_double)
        fn = (void *)counts_ddd;
    int rc = -3;
    if (fn && hk == 'q' && bins > 0 && edges.len / edges.itemsize == bins + 1 && hist.len / hist.itemsize == bins) {
        Py_BEGIN_ALLOW_THREADS
        rc = fn(data.buf, n, edges.buf, first, denom, bins, (int64_t *)hist.buf);
        Py_END_ALLOW_THREADS
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
    return PyBool_FromLong(rc);
}

static PyMethodDef methods[] = {
    {"counts", py_counts, METH_VARARGS,
     "counts(data, edges, first, denom, bins, shifted_double, quotient_double, hist) -> bool"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_histogram",
                                    "Compiled passes of patch 6 (qdqkit/modelopt_compat.py).", -1, methods};

PyMODINIT_FUNC PyInit__histogram(void) { return PyModule_Create(&module); }
