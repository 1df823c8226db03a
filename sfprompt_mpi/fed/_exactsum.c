/* The exact sum's inner loops in C: limbs += weight * x, value by value, and the sum rounded.
 *
 * The same arithmetic as ``_add_chunk`` in aggregate.py, which stays the
 * fallback and the oracle (tests/test_fed.py checks that both leave the
 * same limbs): a float32 x is +-M 2^shift 2^-149 with M < 2^24 and shift in
 * 0..253; v = +-M weight < 2^55 is split at the 32-bit limb boundaries below
 * and above 2^shift and its three parts are added to limbs q, q+1 and q+2
 * (q = shift / 32). Limbs are int64 rows of ``stride`` values each. The loop
 * runs without the GIL: the server's other threads go on meanwhile.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static void add_values(int64_t *limbs, const float *x, Py_ssize_t n, Py_ssize_t stride, int64_t weight)
{
    const int64_t mask = 0xFFFFFFFFLL;
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t bits32;
        memcpy(&bits32, &x[i], sizeof bits32);
        const int64_t bits = bits32;
        const int64_t biased = (bits >> 23) & 0xFF;
        int64_t v = ((bits & 0x7FFFFF) | ((int64_t)(biased > 0) << 23)) * weight;
        if (bits < 0)
            v = -v;
        const int64_t shift = biased > 0 ? biased - 1 : 0;
        const int64_t r = shift & 31;
        const int64_t lo = (v & mask) << r;              /* in [0, 2^63) */
        const int64_t hi = (v >> 32) * ((int64_t)1 << r); /* |.| < 2^55; a product: shifting a negative is undefined */
        int64_t *limb = limbs + (shift >> 5) * stride + i;
        limb[0] += lo & mask;
        limb[stride] += (lo >> 32) + (hi & mask);
        limb[2 * stride] += hi >> 32;
    }
}

/* out = the limbs' sum rounded to float64, as ``ExactSum.total`` does in torch: carries propagated
 * (limbs 0..8 into [0, 2^32), the top one signed), then Horner from the top limb in float64, each
 * step rounded, times 2^-149. The limbs themselves are left as they are. */
static void total_values(const int64_t *limbs, double *out, Py_ssize_t n, Py_ssize_t stride, int nlimbs)
{
    int64_t l[16];
    for (Py_ssize_t i = 0; i < n; i++) {
        for (int j = 0; j < nlimbs; j++)
            l[j] = limbs[j * stride + i];
        for (int j = 0; j < nlimbs - 1; j++) {
            const int64_t carry = l[j] >> 32;
            l[j] -= carry * ((int64_t)1 << 32);
            l[j + 1] += carry;
        }
        double acc = (double)l[nlimbs - 1];
        for (int j = nlimbs - 2; j >= 0; j--)
            acc = acc * 4294967296.0 + (double)l[j];
        out[i] = acc * 0x1p-149;
    }
}

static PyObject *total(PyObject *self, PyObject *args)
{
    unsigned long long limbs, out;
    Py_ssize_t n, stride;
    int nlimbs;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnni", &limbs, &out, &n, &stride, &nlimbs))
        return NULL;
    if (nlimbs < 1 || nlimbs > 16) {
        PyErr_SetString(PyExc_ValueError, "1..16 limbs");
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    total_values((const int64_t *)(uintptr_t)limbs, (double *)(uintptr_t)out, n, stride, nlimbs);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *add(PyObject *self, PyObject *args)
{
    unsigned long long limbs, x;
    Py_ssize_t n, stride;
    long long weight;
    (void)self;
    if (!PyArg_ParseTuple(args, "KKnnL", &limbs, &x, &n, &stride, &weight))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    add_values((int64_t *)(uintptr_t)limbs, (const float *)(uintptr_t)x, n, stride, weight);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add", add, METH_VARARGS,
     "add(limbs_address, x_address, n, stride, weight): limbs += weight * x for n float32 values (see ExactSum)"},
    {"total", total, METH_VARARGS,
     "total(limbs_address, out_address, n, stride, limbs): out = the sum rounded to float64 (see ExactSum.total)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_exactsum", "The exact sum's inner loops (see ExactSum).",
                                    -1, methods};

PyMODINIT_FUNC PyInit__exactsum(void) { return PyModule_Create(&module); }
