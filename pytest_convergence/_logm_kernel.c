/*
 * One-pass sum of log2|w| over a float32 or float64 buffer, exact to float64 rounding.
 *
 * Why a compiled kernel: LoGM must be exact to 1e-9 (float32 logs are not: their rounding is
 * biased for quantized weights), and the exact tensor-library path needs a float64 copy of every
 * chunk plus several passes over it. Here each weight is read once. Its exponent field goes into
 * an integer sum (exact) and its mantissa, as a float64 in [1, 2), into one of LANES running
 * products; every BLOCK weights each product is split into exponent and mantissa again (exact).
 * Each multiplication rounds by at most 2^-53 relative, so the total log2 is off by at most
 * n * 2^-53 / ln 2: 1.6e-16 per weight on the mean, whatever the data. One log2 per lane and
 * block is all the transcendental work.
 *
 * Zeros are counted and skipped, NaN and Inf counted (the caller raises), and subnormals take
 * log2 of the exact float64 value. A block holding any of these is redone element by element,
 * so the fast loop has no branches and vectorizes. The element-by-element loop, which also
 * takes each tensor's last n % BLOCK weights, multiplies mantissas the same way (folding every
 * SCALAR_FOLD): a log2 per weight there would dominate the small tensors of a model's biases.
 *
 * Called from pytest_convergence.metrics with the GIL released, so several threads can each
 * take a slice of one tensor.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <string.h>

#define LANES 4   /* running products kept across blocks */
#define BLOCK 1024 /* per block each of 16 partial products takes 64 mantissas < 2: < 2^64 */
#define SCALAR_FOLD 512 /* 512 mantissas < 2 on a product < 2: < 2^513, far from overflow */

typedef struct {
    int64_t exponent_sum; /* sum of unbiased binary exponents of normal nonzero weights */
    double mantissa_log2; /* sum of log2 of their mantissas, plus log2|w| of subnormals */
    int64_t nonzero;
    int64_t zeros;
    int64_t nans;
    int64_t infs;
    double squares; /* with_squares: sum of w^2 (NaN or Inf when any weight is); else partial */
} Totals;

static inline double mantissa_from_bits(uint64_t fraction_bits) {
    /* A float64 in [1, 2) whose fraction field is the given (left-aligned) fraction. */
    uint64_t bits = UINT64_C(0x3FF0000000000000) | fraction_bits;
    double value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* Fold a product (>= 1) back to [1, 2): the exponent goes to the integer sum. */
static inline void fold(double *product, int64_t *exponent_sum) {
    uint64_t bits;
    memcpy(&bits, product, sizeof bits);
    *exponent_sum += (int64_t)((bits >> 52) & 0x7FF) - 1023;
    *product = mantissa_from_bits(bits & UINT64_C(0x000FFFFFFFFFFFFF));
}

static inline void fold_lanes(double *products, int64_t *exponent_sum) {
    for (int lane = 0; lane < LANES; lane++) fold(&products[lane], exponent_sum);
}

/* ---- float32 ---------------------------------------------------------------------------- */

/* Element by element into one running product (>= 1, < 2 on entry). */
static void f32_scalar(const uint32_t *words, Py_ssize_t n, Totals *t, double *product) {
    int pending = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t magnitude = words[i] & 0x7FFFFFFFu;
        float weight;
        memcpy(&weight, &magnitude, sizeof weight);
        t->squares += (double)weight * (double)weight;
        uint32_t field = magnitude >> 23;
        if (magnitude == 0) {
            t->zeros++;
        } else if (field == 0xFF) {
            if (magnitude & 0x7FFFFFu) t->nans++; else t->infs++;
        } else if (field == 0) {
            t->mantissa_log2 += log2((double)weight);
            t->nonzero++;
        } else {
            t->exponent_sum += (int64_t)field - 127;
            *product *= mantissa_from_bits((uint64_t)(magnitude & 0x7FFFFFu) << 29);
            t->nonzero++;
            if (++pending == SCALAR_FOLD) {
                fold(product, &t->exponent_sum);
                pending = 0;
            }
        }
    }
}

/* The fast loops use GCC/Clang vector extensions (SSE2 everywhere on x86-64, AVX2 through
 * target_clones where the CPU has it); other compilers take the scalar path, still exact. */
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__aarch64__)) && !defined(LOGM_SCALAR_ONLY)
#define VECTORIZED 1
typedef uint32_t u32x4 __attribute__((vector_size(16)));
typedef uint64_t u64x4 __attribute__((vector_size(32)));
typedef int64_t i64x4 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
/* Unaligned vector loads straight into registers: a memcpy into a vector array went through
 * the stack in 16-byte halves, and reloading them as 32 bytes stalled store forwarding (it
 * made the float64 loop 6x slower per weight). */
typedef uint32_t u32x4_unaligned __attribute__((vector_size(16), aligned(4), may_alias));
typedef uint32_t u32x8 __attribute__((vector_size(32)));
typedef uint32_t u32x8_unaligned __attribute__((vector_size(32), aligned(4), may_alias));
typedef uint64_t u64x4_unaligned __attribute__((vector_size(32), aligned(8), may_alias));
#if defined(__x86_64__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif

/* Macros, not functions: a 32-byte vector passed by value changes the ABI without AVX. */
#define MANTISSAS_F32(magnitudes)                                                          \
    ((f64x4)((__builtin_convertvector((magnitudes) & 0x7FFFFFu, u64x4) << 29) |           \
             UINT64_C(0x3FF0000000000000)))

/* Returns 0 when the block holds only normal nonzero weights (and then adds it to t). */
MULTIVERSION static int f32_block(const uint32_t *words, Totals *t, double *products,
                                  int with_squares) {
    u32x8 exponents = {0, 0, 0, 0, 0, 0, 0, 0}, special = exponents;
    f64x4 a = {1, 1, 1, 1}, b = a, c = a, d = a, squares = {0, 0, 0, 0};
    for (int i = 0; i < BLOCK; i += 16) {
        /* Exponent fields 8 at a time; field 0 (zero, subnormal) or 255 (NaN, Inf) is special
         * (equality compares: AVX2 has no unsigned ordering compare). */
        for (int half = 0; half < 2; half++) {
            u32x8 field = (*(const u32x8_unaligned *)(words + i + 8 * half) & 0x7FFFFFFFu) >> 23;
            special |= (u32x8)((field == 0u) | (field == 255u));
            exponents += field;
        }
        u32x4 w[4];
        for (int k = 0; k < 4; k++) {
            w[k] = *(const u32x4_unaligned *)(words + i + 4 * k);
            if (with_squares) { /* loop-invariant: -O3 unswitches the loop */
                f64x4 weight = __builtin_convertvector((f32x4)w[k], f64x4);
                squares += weight * weight;
            }
        }
        a *= MANTISSAS_F32(w[0]);
        b *= MANTISSAS_F32(w[1]);
        c *= MANTISSAS_F32(w[2]);
        d *= MANTISSAS_F32(w[3]);
    }
    uint32_t any_special = 0;
    int64_t exponent_total = 0;
    for (int lane = 0; lane < 8; lane++) {
        any_special |= special[lane];
        exponent_total += exponents[lane];
    }
    if (any_special) return 1;
    t->exponent_sum += exponent_total - (int64_t)127 * BLOCK;
    t->squares += (squares[0] + squares[1]) + (squares[2] + squares[3]);
    f64x4 product = (a * b) * (c * d);
    for (int lane = 0; lane < 4; lane++) products[lane] *= product[lane];
    t->nonzero += BLOCK;
    return 0;
}

#define MANTISSAS_F64(magnitudes)                                                          \
    ((f64x4)(((magnitudes) & UINT64_C(0x000FFFFFFFFFFFFF)) | UINT64_C(0x3FF0000000000000)))

MULTIVERSION static int f64_block(const uint64_t *words, Totals *t, double *products,
                                  int with_squares) {
    i64x4 exponents = {0, 0, 0, 0}, normal = {-1, -1, -1, -1};
    f64x4 a = {1, 1, 1, 1}, b = a, c = a, d = a, squares = {0, 0, 0, 0};
    for (int i = 0; i < BLOCK; i += 16) {
        u64x4 w[4];
        for (int k = 0; k < 4; k++) {
            w[k] = *(const u64x4_unaligned *)(words + i + 4 * k);
            u64x4 magnitude = w[k] & UINT64_C(0x7FFFFFFFFFFFFFFF);
            /* Normal nonzero finite: DBL_MIN <= |x| <= DBL_MAX (false for NaN). A floating
             * compare, because 64-bit integer compares are slow or missing before AVX-512. */
            f64x4 value = (f64x4)magnitude;
            normal &= (value >= 0x1p-1022) & (value <= 0x1.fffffffffffffp+1023);
            exponents += (i64x4)(magnitude >> 52);
            if (with_squares) squares += value * value;
        }
        a *= MANTISSAS_F64(w[0]);
        b *= MANTISSAS_F64(w[1]);
        c *= MANTISSAS_F64(w[2]);
        d *= MANTISSAS_F64(w[3]);
    }
    if ((normal[0] & normal[1] & normal[2] & normal[3]) != -1) return 1;
    t->exponent_sum += exponents[0] + exponents[1] + exponents[2] + exponents[3]
                       - (int64_t)1023 * BLOCK;
    t->squares += (squares[0] + squares[1]) + (squares[2] + squares[3]);
    f64x4 product = (a * b) * (c * d);
    for (int lane = 0; lane < 4; lane++) products[lane] *= product[lane];
    t->nonzero += BLOCK;
    return 0;
}
#else
#define VECTORIZED 0
static int f32_block(const uint32_t *words, Totals *t, double *products, int with_squares) {
    (void)words, (void)t, (void)products, (void)with_squares;
    return 1;
}
static int f64_block(const uint64_t *words, Totals *t, double *products, int with_squares) {
    (void)words, (void)t, (void)products, (void)with_squares;
    return 1;
}
#endif

/* with_squares: also sum w^2 (segment_log2_sums; it costs log2_sum a third of its speed). */
static void f32_log2_sum(const uint32_t *words, Py_ssize_t n, Totals *t, int with_squares) {
    double products[LANES];
    for (int lane = 0; lane < LANES; lane++) products[lane] = 1.0;
    Py_ssize_t i = 0;
    for (; i + BLOCK <= n; i += BLOCK) {
        if (f32_block(words + i, t, products, with_squares)) {
            f32_scalar(words + i, BLOCK, t, &products[0]);
        }
        fold_lanes(products, &t->exponent_sum);
    }
    f32_scalar(words + i, n - i, t, &products[0]);
    for (int lane = 0; lane < LANES; lane++) t->mantissa_log2 += log2(products[lane]);
}

/* ---- float64 ---------------------------------------------------------------------------- */

static void f64_scalar(const uint64_t *words, Py_ssize_t n, Totals *t, double *product) {
    int pending = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t magnitude = words[i] & UINT64_C(0x7FFFFFFFFFFFFFFF);
        double weight;
        memcpy(&weight, &magnitude, sizeof weight);
        t->squares += weight * weight;
        uint64_t field = magnitude >> 52;
        if (magnitude == 0) {
            t->zeros++;
        } else if (field == 0x7FF) {
            if (magnitude & UINT64_C(0x000FFFFFFFFFFFFF)) t->nans++; else t->infs++;
        } else if (field == 0) {
            t->mantissa_log2 += log2(weight);
            t->nonzero++;
        } else {
            t->exponent_sum += (int64_t)field - 1023;
            *product *= mantissa_from_bits(magnitude & UINT64_C(0x000FFFFFFFFFFFFF));
            t->nonzero++;
            if (++pending == SCALAR_FOLD) {
                fold(product, &t->exponent_sum);
                pending = 0;
            }
        }
    }
}

static void f64_log2_sum(const uint64_t *words, Py_ssize_t n, Totals *t, int with_squares) {
    double products[LANES];
    for (int lane = 0; lane < LANES; lane++) products[lane] = 1.0;
    Py_ssize_t i = 0;
    for (; i + BLOCK <= n; i += BLOCK) {
        if (f64_block(words + i, t, products, with_squares)) {
            f64_scalar(words + i, BLOCK, t, &products[0]);
        }
        fold_lanes(products, &t->exponent_sum);
    }
    f64_scalar(words + i, n - i, t, &products[0]);
    for (int lane = 0; lane < LANES; lane++) t->mantissa_log2 += log2(products[lane]);
}

/* ---- Python binding --------------------------------------------------------------------- */

PyDoc_STRVAR(log2_sum_doc,
    "log2_sum(buffer, itemsize) -> (exponent_sum, mantissa_log2, nonzero, zeros, nans, infs)\n\n"
    "Sum of log2|w| over a C-contiguous float32 (itemsize 4) or float64 (itemsize 8) buffer,\n"
    "as an exact integer part and a float64 part. Releases the GIL.");

static PyObject *log2_sum(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer view;
    int itemsize;
    if (!PyArg_ParseTuple(args, "y*i", &view, &itemsize)) return NULL;
    if ((itemsize != 4 && itemsize != 8) || view.len % itemsize != 0) {
        PyBuffer_Release(&view);
        PyErr_Format(PyExc_ValueError,
                     "log2_sum needs a float32 or float64 buffer, got itemsize %d and %zd bytes",
                     itemsize, view.len);
        return NULL;
    }
    Totals totals = {0, 0.0, 0, 0, 0, 0, 0.0};
    Py_ssize_t n = view.len / itemsize;
    Py_BEGIN_ALLOW_THREADS
    if (itemsize == 4) {
        f32_log2_sum((const uint32_t *)view.buf, n, &totals, 0);
    } else {
        f64_log2_sum((const uint64_t *)view.buf, n, &totals, 0);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return Py_BuildValue("(LdLLLL)", (long long)totals.exponent_sum, totals.mantissa_log2,
                         (long long)totals.nonzero, (long long)totals.zeros,
                         (long long)totals.nans, (long long)totals.infs);
}

PyDoc_STRVAR(segment_log2_sums_doc,
    "segment_log2_sums(buffer, itemsize, ends, out) -> None\n\n"
    "Per segment of a float32 or float64 buffer (segment i ends before ends[i], an int64\n"
    "buffer), writes exponent sum, mantissa log2 sum, zero count, non-finite count and sum of\n"
    "squares into row i of out (a float64 buffer of 5 * len(ends) values). One call for all\n"
    "of a model's parameters, flattened: per-step tracing costs one pass, not one per\n"
    "parameter and statistic.");

static PyObject *segment_log2_sums(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer view, ends_view, out_view;
    int itemsize;
    if (!PyArg_ParseTuple(args, "y*iy*w*", &view, &itemsize, &ends_view, &out_view)) return NULL;
    Py_ssize_t segments = ends_view.len / (Py_ssize_t)sizeof(int64_t);
    Py_ssize_t n = itemsize > 0 ? view.len / itemsize : 0;
    const int64_t *ends = (const int64_t *)ends_view.buf;
    int valid = (itemsize == 4 || itemsize == 8) && view.len % itemsize == 0 &&
                out_view.len >= segments * 5 * (Py_ssize_t)sizeof(double);
    for (Py_ssize_t i = 0; valid && i < segments; i++) {
        if (ends[i] < (i ? ends[i - 1] : 0) || ends[i] > n) valid = 0;
    }
    if (!valid) {
        PyBuffer_Release(&view);
        PyBuffer_Release(&ends_view);
        PyBuffer_Release(&out_view);
        PyErr_SetString(PyExc_ValueError,
                        "segment_log2_sums needs a float32/float64 buffer, non-decreasing int64 "
                        "segment ends within it, and 5 float64 outputs per segment");
        return NULL;
    }
    double *out = (double *)out_view.buf;
    Py_BEGIN_ALLOW_THREADS
    int64_t start = 0;
    for (Py_ssize_t i = 0; i < segments; i++) {
        Totals t = {0, 0.0, 0, 0, 0, 0, 0.0};
        Py_ssize_t length = (Py_ssize_t)(ends[i] - start);
        if (itemsize == 4) {
            f32_log2_sum((const uint32_t *)view.buf + start, length, &t, 1);
        } else {
            f64_log2_sum((const uint64_t *)view.buf + start, length, &t, 1);
        }
        out[5 * i] = (double)t.exponent_sum;
        out[5 * i + 1] = t.mantissa_log2;
        out[5 * i + 2] = (double)t.zeros;
        out[5 * i + 3] = (double)(t.nans + t.infs);
        out[5 * i + 4] = t.squares;
        start = ends[i];
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    PyBuffer_Release(&ends_view);
    PyBuffer_Release(&out_view);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"log2_sum", log2_sum, METH_VARARGS, log2_sum_doc},
    {"segment_log2_sums", segment_log2_sums, METH_VARARGS, segment_log2_sums_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_logm_kernel",
    .m_doc = "Compiled one-pass exact log2 sum for LoGM (optional: pure torch is the fallback).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__logm_kernel(void) { return PyModule_Create(&module); }
