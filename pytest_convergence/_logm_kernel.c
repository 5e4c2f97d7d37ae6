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
 * log2 of the exact float64 value. A block holding NaN, Inf or a subnormal is redone element by
 * element, so the fast loop has no branches and vectorizes; zeros stay on it (pruned and
 * quantized models have many). The element-by-element loop, which also takes each tensor's
 * last n % 16 weights, multiplies mantissas the same way (folding every SCALAR_FOLD): a log2
 * per weight there would dominate the small tensors of a model's biases.
 *
 * trace_parameters does a co-simulation step's bookkeeping in the same pass: each weight,
 * widened to float64 once, also goes into the step's flat snapshot and into its parameter's
 * sums of squares and of squared change since the previous snapshot. A small model's training
 * step takes a few hundred microseconds, so this, not the per-call cost of many tensor
 * operations, is what a trace may cost (benchmarks/tracing_overhead.py).
 *
 * compare_segments sums the products of a co-simulation step's comparison (update and error of
 * every weight) per parameter in one pass, in NumPy's own order of summation, so that the
 * compiled and the NumPy path give the same bits.
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

/* The next block of the fast loop over `left` weights: BLOCK, or the multiple of 16 that
 * remains (0 when fewer than 16 remain for the element-by-element loop). A tensor's tail and
 * a model's small biases stay vectorized. */
static inline int block_length(Py_ssize_t left) {
    return left >= BLOCK ? BLOCK : (int)(left & ~(Py_ssize_t)15);
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
typedef float f32x4_unaligned __attribute__((vector_size(16), aligned(4), may_alias));
typedef double f64x4_unaligned __attribute__((vector_size(32), aligned(8), may_alias));
#if defined(__x86_64__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx2", "default")))
#else
#define MULTIVERSION
#endif
#else
#define VECTORIZED 0
#define MULTIVERSION
#endif

/* ---- widening copies and sums of squares: a step's weight vector and norms ------------- */

/* Copies n weights, widened to float64, to dst; adds their squares to *squares and, with prev,
 * the squares of (dst - prev) to *update: a step's flat snapshot, weight norms and update
 * norms. For float32 f32_block does this for all but a tensor's last n % 16 weights, so this
 * loop takes only those (and everything in a build without the vector loops). */
static void f32_widen(const float *src, double *dst, const double *prev, Py_ssize_t n,
                      double *squares, double *update) {
    double square_sum = 0.0, update_sum = 0.0; /* locals: dst might alias the outputs */
    for (Py_ssize_t i = 0; i < n; i++) {
        double x = (double)src[i];
        dst[i] = x;
        square_sum += x * x;
        if (prev) update_sum += (x - prev[i]) * (x - prev[i]);
    }
    *squares += square_sum;
    *update += update_sum;
}

/* As f32_widen, for float64 weights (a whole tensor: no log2 block widens them). */
MULTIVERSION static void f64_widen(const double *src, double *dst, const double *prev,
                                   Py_ssize_t n, double *squares, double *update) {
    Py_ssize_t i = 0;
#if VECTORIZED
    f64x4 s0 = {0, 0, 0, 0}, s1 = s0, u0 = s0, u1 = s0;
    for (; i + 8 <= n; i += 8) {
        f64x4 x0 = *(const f64x4_unaligned *)(src + i);
        f64x4 x1 = *(const f64x4_unaligned *)(src + i + 4);
        *(f64x4_unaligned *)(dst + i) = x0;
        *(f64x4_unaligned *)(dst + i + 4) = x1;
        s0 += x0 * x0;
        s1 += x1 * x1;
        if (prev) {
            f64x4 d0 = x0 - *(const f64x4_unaligned *)(prev + i);
            f64x4 d1 = x1 - *(const f64x4_unaligned *)(prev + i + 4);
            u0 += d0 * d0;
            u1 += d1 * d1;
        }
    }
    s0 += s1;
    u0 += u1;
    *squares += (s0[0] + s0[1]) + (s0[2] + s0[3]);
    *update += (u0[0] + u0[1]) + (u0[2] + u0[3]);
#endif
    double tail_squares = 0.0, tail_update = 0.0; /* locals: dst might alias the outputs */
    for (; i < n; i++) {
        double x = src[i];
        dst[i] = x;
        tail_squares += x * x;
        if (prev) tail_update += (x - prev[i]) * (x - prev[i]);
    }
    *squares += tail_squares;
    *update += tail_update;
}

/* Sum of squares in float64 (a gradient's norm, squared). */
MULTIVERSION static double f32_squares(const float *src, Py_ssize_t n) {
    double total = 0.0;
    Py_ssize_t i = 0;
#if VECTORIZED
    f64x4 s0 = {0, 0, 0, 0}, s1 = s0;
    for (; i + 8 <= n; i += 8) {
        f64x4 x0 = __builtin_convertvector(*(const f32x4_unaligned *)(src + i), f64x4);
        f64x4 x1 = __builtin_convertvector(*(const f32x4_unaligned *)(src + i + 4), f64x4);
        s0 += x0 * x0;
        s1 += x1 * x1;
    }
    s0 += s1;
    total = (s0[0] + s0[1]) + (s0[2] + s0[3]);
#endif
    for (; i < n; i++) total += (double)src[i] * (double)src[i];
    return total;
}

MULTIVERSION static double f64_squares(const double *src, Py_ssize_t n) {
    double total = 0.0;
    Py_ssize_t i = 0;
#if VECTORIZED
    f64x4 s0 = {0, 0, 0, 0}, s1 = s0;
    for (; i + 8 <= n; i += 8) {
        f64x4 x0 = *(const f64x4_unaligned *)(src + i);
        f64x4 x1 = *(const f64x4_unaligned *)(src + i + 4);
        s0 += x0 * x0;
        s1 += x1 * x1;
    }
    s0 += s1;
    total = (s0[0] + s0[1]) + (s0[2] + s0[3]);
#endif
    for (; i < n; i++) total += src[i] * src[i];
    return total;
}

/* ---- float32 ---------------------------------------------------------------------------- */

/* Element by element into one running product (>= 1, < 2 on entry). */
static void f32_scalar(const uint32_t *words, Py_ssize_t n, Totals *t, double *product) {
    int pending = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t magnitude = words[i] & 0x7FFFFFFFu;
        float weight;
        memcpy(&weight, &magnitude, sizeof weight);
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

#if VECTORIZED
/* Mantissas in [1, 2) of float64 values (as many as the vector holds). A macro, not a
 * function: a 32-byte vector passed by value changes the ABI without AVX. */
#define MANTISSAS(values)                                                                  \
    ((f64x4)(((u64x4)(values) & UINT64_C(0x000FFFFFFFFFFFFF)) | UINT64_C(0x3FF0000000000000)))

/* Returns 0 when the block holds only zeros and normal weights (and then adds it to t).
 * A zero's exponent field is 0 and its mantissa 1: it adds nothing but a count, so pruned and
 * quantized weights stay on the fast path. With dst (a trace), each weight is widened to
 * float64 once, exactly, for its mantissa, its copy in dst and its square (and, with prev, its
 * squared change), added to widened[0] (and widened[1]) whatever the block holds: a step's
 * snapshot and norms in the same pass. */
MULTIVERSION static int f32_block(const uint32_t *words, int count, Totals *t, double *products,
                                  double *dst, const double *prev, double *widened) {
    u32x8 exponents = {0, 0, 0, 0, 0, 0, 0, 0}, special = exponents, zeros = exponents;
    f64x4 a = {1, 1, 1, 1}, b = a, c = a, d = a;
    f64x4 squares[2] = {{0, 0, 0, 0}, {0, 0, 0, 0}}, update[2] = {{0, 0, 0, 0}, {0, 0, 0, 0}};
    for (int i = 0; i < count; i += 16) {
        /* Exponent fields 8 at a time; field 0 (subnormal) or 255 (NaN, Inf) is special
         * (equality compares: AVX2 has no unsigned ordering compare). */
        for (int half = 0; half < 2; half++) {
            u32x8 magnitude = *(const u32x8_unaligned *)(words + i + 8 * half) & 0x7FFFFFFFu;
            u32x8 field = magnitude >> 23, zero = (u32x8)(magnitude == 0u);
            special |= (u32x8)(((field == 0u) & ~zero) | (field == 255u));
            zeros -= zero; /* a true compare is all ones: -1 */
            exponents += field;
        }
        f64x4 mantissas[4];
        for (int k = 0; k < 4; k++) {
            const float *at = (const float *)words + i + 4 * k;
            if (dst) { /* loop-invariant: -O3 unswitches the loop */
                f64x4 x = __builtin_convertvector(*(const f32x4_unaligned *)at, f64x4);
                *(f64x4_unaligned *)(dst + i + 4 * k) = x;
                squares[k & 1] += x * x;
                if (prev) {
                    f64x4 change = x - *(const f64x4_unaligned *)(prev + i + 4 * k);
                    update[k & 1] += change * change;
                }
                mantissas[k] = MANTISSAS(x); /* exact widening keeps the float32's bits */
            } else { /* cheaper than widening when nothing else needs the float64 */
                u32x4 fraction = *(const u32x4_unaligned *)at & 0x7FFFFFu;
                mantissas[k] = (f64x4)((__builtin_convertvector(fraction, u64x4) << 29) |
                                       UINT64_C(0x3FF0000000000000));
            }
        }
        a *= mantissas[0];
        b *= mantissas[1];
        c *= mantissas[2];
        d *= mantissas[3];
    }
    if (dst) {
        f64x4 square_sum = squares[0] + squares[1], update_sum = update[0] + update[1];
        widened[0] += (square_sum[0] + square_sum[1]) + (square_sum[2] + square_sum[3]);
        widened[1] += (update_sum[0] + update_sum[1]) + (update_sum[2] + update_sum[3]);
    }
    uint32_t any_special = 0;
    int64_t exponent_total = 0, zero_total = 0;
    for (int lane = 0; lane < 8; lane++) {
        any_special |= special[lane];
        exponent_total += exponents[lane];
        zero_total += zeros[lane];
    }
    if (any_special) return 1;
    t->exponent_sum += exponent_total - (int64_t)127 * (count - zero_total);
    f64x4 product = (a * b) * (c * d);
    for (int lane = 0; lane < 4; lane++) products[lane] *= product[lane];
    t->nonzero += count - zero_total;
    t->zeros += zero_total;
    return 0;
}

MULTIVERSION static int f64_block(const uint64_t *words, int count, Totals *t, double *products) {
    i64x4 exponents = {0, 0, 0, 0}, normal = {-1, -1, -1, -1}, zeros = exponents;
    f64x4 a = {1, 1, 1, 1}, b = a, c = a, d = a;
    for (int i = 0; i < count; i += 16) {
        u64x4 w[4];
        for (int k = 0; k < 4; k++) {
            w[k] = *(const u64x4_unaligned *)(words + i + 4 * k);
            u64x4 magnitude = w[k] & UINT64_C(0x7FFFFFFFFFFFFFFF);
            /* Zero, or normal and finite: DBL_MIN <= |x| <= DBL_MAX (false for NaN). Floating
             * compares, because 64-bit integer compares are slow or missing before AVX-512. */
            f64x4 value = (f64x4)magnitude;
            i64x4 zero = value == 0.0;
            normal &= ((value >= 0x1p-1022) & (value <= 0x1.fffffffffffffp+1023)) | zero;
            zeros -= zero;
            exponents += (i64x4)(magnitude >> 52);
        }
        a *= MANTISSAS(w[0]);
        b *= MANTISSAS(w[1]);
        c *= MANTISSAS(w[2]);
        d *= MANTISSAS(w[3]);
    }
    if ((normal[0] & normal[1] & normal[2] & normal[3]) != -1) return 1;
    int64_t zero_total = zeros[0] + zeros[1] + zeros[2] + zeros[3];
    t->exponent_sum += exponents[0] + exponents[1] + exponents[2] + exponents[3]
                       - (int64_t)1023 * (count - zero_total);
    f64x4 product = (a * b) * (c * d);
    for (int lane = 0; lane < 4; lane++) products[lane] *= product[lane];
    t->nonzero += count - zero_total;
    t->zeros += zero_total;
    return 0;
}
#else
static int f32_block(const uint32_t *words, int count, Totals *t, double *products,
                     double *dst, const double *prev, double *widened) {
    (void)t, (void)products;
    if (dst) f32_widen((const float *)words, dst, prev, count, &widened[0], &widened[1]);
    return 1;
}
static int f64_block(const uint64_t *words, int count, Totals *t, double *products) {
    (void)words, (void)count, (void)t, (void)products;
    return 1;
}
#endif

/* Sum of log2|w| into t. With dst, also the widening pass of f32_widen, fused with it. */
static void f32_log2_sum(const uint32_t *words, Py_ssize_t n, Totals *t, double *dst,
                         const double *prev, double *widened) {
    double products[LANES];
    for (int lane = 0; lane < LANES; lane++) products[lane] = 1.0;
    Py_ssize_t i = 0;
    for (int count; (count = block_length(n - i)) > 0; i += count) {
        if (f32_block(words + i, count, t, products, dst ? dst + i : NULL,
                      prev ? prev + i : NULL, widened)) {
            f32_scalar(words + i, count, t, &products[0]);
        }
        fold_lanes(products, &t->exponent_sum);
    }
    f32_scalar(words + i, n - i, t, &products[0]);
    if (dst) {
        f32_widen((const float *)words + i, dst + i, prev ? prev + i : NULL, n - i, &widened[0],
                  &widened[1]);
    }
    for (int lane = 0; lane < LANES; lane++) t->mantissa_log2 += log2(products[lane]);
}

/* ---- float64 ---------------------------------------------------------------------------- */

static void f64_scalar(const uint64_t *words, Py_ssize_t n, Totals *t, double *product) {
    int pending = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t magnitude = words[i] & UINT64_C(0x7FFFFFFFFFFFFFFF);
        double weight;
        memcpy(&weight, &magnitude, sizeof weight);
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

static void f64_log2_sum(const uint64_t *words, Py_ssize_t n, Totals *t) {
    double products[LANES];
    for (int lane = 0; lane < LANES; lane++) products[lane] = 1.0;
    Py_ssize_t i = 0;
    for (int count; (count = block_length(n - i)) > 0; i += count) {
        if (f64_block(words + i, count, t, products)) {
            f64_scalar(words + i, count, t, &products[0]);
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
    Totals totals = {0, 0.0, 0, 0, 0, 0};
    Py_ssize_t n = view.len / itemsize;
    Py_BEGIN_ALLOW_THREADS
    if (itemsize == 4) {
        f32_log2_sum((const uint32_t *)view.buf, n, &totals, NULL, NULL, NULL);
    } else {
        f64_log2_sum((const uint64_t *)view.buf, n, &totals);
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
        Totals t = {0, 0.0, 0, 0, 0, 0};
        Py_ssize_t length = (Py_ssize_t)(ends[i] - start);
        double squares;
        if (itemsize == 4) {
            f32_log2_sum((const uint32_t *)view.buf + start, length, &t, NULL, NULL, NULL);
            squares = f32_squares((const float *)view.buf + start, length);
        } else {
            f64_log2_sum((const uint64_t *)view.buf + start, length, &t);
            squares = f64_squares((const double *)view.buf + start, length);
        }
        out[5 * i] = (double)t.exponent_sum;
        out[5 * i + 1] = t.mantissa_log2;
        out[5 * i + 2] = (double)t.zeros;
        out[5 * i + 3] = (double)(t.nans + t.infs);
        out[5 * i + 4] = squares;
        start = ends[i];
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    PyBuffer_Release(&ends_view);
    PyBuffer_Release(&out_view);
    Py_RETURN_NONE;
}

/* ---- comparisons of two steps: sums of products, bit for bit NumPy's ---------------------- */

/* Per segment, the sums of four products of the update u = after - before and the error
 * e = candidate - after: u*u, e*e, e*u and e*after, as np.add.reduceat over the products stored
 * in rows would give them, to the last bit. So this is NumPy's own order of summation: a
 * segment's first product plus the pairwise sum of the rest (numpy/_core/src/umath/
 * loops_utils.h.src: blocks of at most 128 summed in 8 lanes, longer runs split in halves
 * rounded down to a multiple of 8). Each product is rounded before it is added (no fused
 * multiply-add: the extension is compiled with -ffp-contract=off), as when NumPy stores it. */
#define PAIRWISE_BLOCK 128

typedef struct {
    const double *before, *after, *candidate;
} StepVectors;

static inline void step_products(const StepVectors *v, Py_ssize_t i, double p[4]) {
    double after = v->after[i];
    double update = after - v->before[i];
    double error = v->candidate[i] - after;
    p[0] = update * update;
    p[1] = error * error;
    p[2] = error * update;
    p[3] = error * after;
}

static void pairwise_products(const StepVectors *v, Py_ssize_t first, Py_ssize_t n,
                              double sums[4]) {
    double p[4];
    if (n < 8) {
        /* -0.0, as NumPy starts: a run of negative zeros sums to -0.0. */
        for (int q = 0; q < 4; q++) sums[q] = -0.;
        for (Py_ssize_t i = 0; i < n; i++) {
            step_products(v, first + i, p);
            for (int q = 0; q < 4; q++) sums[q] += p[q];
        }
    } else if (n <= PAIRWISE_BLOCK) {
        double lanes[4][8];
        for (int j = 0; j < 8; j++) {
            step_products(v, first + j, p);
            for (int q = 0; q < 4; q++) lanes[q][j] = p[q];
        }
        Py_ssize_t i;
        for (i = 8; i < n - (n % 8); i += 8) {
            for (int j = 0; j < 8; j++) {
                step_products(v, first + i + j, p);
                for (int q = 0; q < 4; q++) lanes[q][j] += p[q];
            }
        }
        for (int q = 0; q < 4; q++) {
            const double *r = lanes[q];
            sums[q] = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        }
        for (; i < n; i++) {
            step_products(v, first + i, p);
            for (int q = 0; q < 4; q++) sums[q] += p[q];
        }
    } else {
        Py_ssize_t half = n / 2;
        half -= half % 8;
        double left[4], right[4];
        pairwise_products(v, first, half, left);
        pairwise_products(v, first + half, n - half, right);
        for (int q = 0; q < 4; q++) sums[q] = left[q] + right[q];
    }
}

PyDoc_STRVAR(
    compare_segments_doc,
    "compare_segments(before, after, candidate, ends, out)\n\n"
    "Per segment of three float64 vectors of one length (segment i ends before ends[i], an\n"
    "int64 buffer; an empty segment gives zeros), writes the sums of u*u, e*e, e*u and e*after\n"
    "into row i of out (4 float64 values a segment), with u = after - before and\n"
    "e = candidate - after: exactly np.add.reduceat of those products, in one pass.");

static PyObject *compare_segments(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer before_view, after_view, candidate_view, ends_view, out_view;
    if (!PyArg_ParseTuple(args, "y*y*y*y*w*", &before_view, &after_view, &candidate_view,
                          &ends_view, &out_view))
        return NULL;
    Py_ssize_t n = after_view.len / (Py_ssize_t)sizeof(double);
    Py_ssize_t segments = ends_view.len / (Py_ssize_t)sizeof(int64_t);
    const int64_t *ends = (const int64_t *)ends_view.buf;
    int valid = after_view.len % (Py_ssize_t)sizeof(double) == 0 &&
                before_view.len == after_view.len && candidate_view.len == after_view.len &&
                out_view.len >= segments * 4 * (Py_ssize_t)sizeof(double);
    for (Py_ssize_t i = 0; valid && i < segments; i++) {
        if (ends[i] < (i ? ends[i - 1] : 0) || ends[i] > n) valid = 0;
    }
    if (valid) {
        StepVectors v = {(const double *)before_view.buf, (const double *)after_view.buf,
                         (const double *)candidate_view.buf};
        double *out = (double *)out_view.buf;
        Py_BEGIN_ALLOW_THREADS
        int64_t start = 0;
        for (Py_ssize_t i = 0; i < segments; i++) {
            Py_ssize_t length = (Py_ssize_t)(ends[i] - start);
            double *row = out + 4 * i;
            if (length == 0) {
                for (int q = 0; q < 4; q++) row[q] = 0.;
            } else {
                double head[4], rest[4];
                step_products(&v, start, head);
                if (length == 1) {
                    for (int q = 0; q < 4; q++) row[q] = head[q];
                } else {
                    pairwise_products(&v, start + 1, length - 1, rest);
                    for (int q = 0; q < 4; q++) row[q] = head[q] + rest[q];
                }
            }
            start = ends[i];
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&before_view);
    PyBuffer_Release(&after_view);
    PyBuffer_Release(&candidate_view);
    PyBuffer_Release(&ends_view);
    PyBuffer_Release(&out_view);
    if (!valid) {
        PyErr_SetString(PyExc_ValueError,
                        "compare_segments needs three float64 buffers of one length, "
                        "non-decreasing int64 segment ends within them, and 4 float64 outputs "
                        "per segment");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* A C-contiguous float32 or float64 buffer ("f" or "d", native byte order), or 0 with no
 * error set when obj exports another kind (the caller takes its general path). */
static int float_buffer(PyObject *obj, Py_buffer *view) {
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        /* NumPy refuses a strided array with ValueError; objects without buffers, TypeError */
        if (!PyErr_ExceptionMatches(PyExc_BufferError) &&
            !PyErr_ExceptionMatches(PyExc_TypeError) &&
            !PyErr_ExceptionMatches(PyExc_ValueError)) {
            return -1;
        }
        PyErr_Clear();
        return 0;
    }
    const char *format = view->format ? view->format : "B";
    if (*format == '=' || *format == '@' || *format == '<') format++;
    if ((strcmp(format, "f") == 0 && view->itemsize == 4) ||
        (strcmp(format, "d") == 0 && view->itemsize == 8)) {
        return 1;
    }
    PyBuffer_Release(view);
    return 0;
}

/* DLPack's tensor description (the unversioned ABI, stable since DLPack 0.2), so that a torch
 * tensor can be read through torch.utils.dlpack.to_dlpack: a third of the cost of
 * Tensor.numpy() per tensor, which a step's gradients, new tensors every step, pay each time. */
typedef struct {
    int32_t device_type;
    int32_t device_id;
} DLDevice;
typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} DLDataType;
typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides; /* in elements; NULL: compact row-major */
    uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;
#define DLPACK_CPU 1
#define DLPACK_FLOAT 2

/* Weights or gradients to read: a buffer (held until released) or a DLPack capsule (borrowed:
 * the caller's capsule outlives the call, and its destructor frees the tensor). */
typedef struct {
    const void *data;
    Py_ssize_t length;
    Py_ssize_t itemsize;
    int held;
    Py_buffer view;
} FloatArray;

/* A CPU float32/float64 tensor in compact row-major order from a DLPack capsule; 0 for
 * anything else (another device or dtype, strided, a consumed capsule). */
static int dlpack_array(PyObject *capsule, FloatArray *array) {
    if (!PyCapsule_IsValid(capsule, "dltensor")) return 0;
    const DLManagedTensor *managed = PyCapsule_GetPointer(capsule, "dltensor");
    if (!managed) return -1;
    const DLTensor *tensor = &managed->dl_tensor;
    if (tensor->device.device_type != DLPACK_CPU || tensor->dtype.code != DLPACK_FLOAT ||
        tensor->dtype.lanes != 1 || (tensor->dtype.bits != 32 && tensor->dtype.bits != 64)) {
        return 0;
    }
    int64_t length = 1;
    for (int32_t dim = tensor->ndim - 1; dim >= 0; dim--) {
        int64_t size = tensor->shape[dim];
        if (tensor->strides && size > 1 && tensor->strides[dim] != length) return 0;
        length *= size;
    }
    array->data = (const char *)tensor->data + tensor->byte_offset;
    array->length = (Py_ssize_t)length;
    array->itemsize = tensor->dtype.bits / 8;
    array->held = 0;
    return 1;
}

static int float_array(PyObject *obj, FloatArray *array) {
    if (PyCapsule_CheckExact(obj)) return dlpack_array(obj, array);
    int status = float_buffer(obj, &array->view);
    if (status != 1) return status;
    array->data = array->view.buf;
    array->itemsize = array->view.itemsize;
    array->length = array->view.len / array->view.itemsize;
    array->held = 1;
    return 1;
}

static void release_all(FloatArray *arrays, Py_ssize_t count) {
    for (Py_ssize_t i = 0; i < count; i++) {
        if (arrays[i].held) PyBuffer_Release(&arrays[i].view);
        arrays[i].held = 0;
    }
}

/* Reads every item of a sequence: 1 when each is a float array (buffers held), 0 when one is
 * not (none held), -1 with an error set (none held). */
static int float_arrays(PyObject *items, Py_ssize_t n, FloatArray *arrays) {
    for (Py_ssize_t i = 0; i < n; i++) {
        int status = float_array(PySequence_Fast_GET_ITEM(items, i), &arrays[i]);
        if (status != 1) {
            release_all(arrays, i);
            return status;
        }
    }
    return 1;
}

#define TRACE_COLUMNS 4
#define LOG10_2 0.30102999566398119521

/* A float, or None for NaN: a LoGM that does not exist. */
static PyObject *float_or_none(double value) {
    return isnan(value) ? Py_NewRef(Py_None) : PyFloat_FromDouble(value);
}

/* The columns of trace_parameters and the global LoGM as a tuple: four lists (zero counts as
 * ints, LoGMs None for NaN) and a float or None. */
static PyObject *trace_lists(const double *columns, Py_ssize_t n, double global_logm) {
    PyObject *lists = PyTuple_New(TRACE_COLUMNS + 1);
    if (!lists) return NULL;
    for (int column = 0; column < TRACE_COLUMNS; column++) {
        PyObject *list = PyList_New(n);
        if (!list) {
            Py_DECREF(lists);
            return NULL;
        }
        PyTuple_SET_ITEM(lists, column, list);
        for (Py_ssize_t i = 0; i < n; i++) {
            double value = columns[column * n + i];
            PyObject *item = column == 0   ? float_or_none(value)
                             : column == 1 ? PyLong_FromDouble(value)
                                           : PyFloat_FromDouble(value);
            if (!item) {
                Py_DECREF(lists);
                return NULL;
            }
            PyList_SET_ITEM(list, i, item);
        }
    }
    PyObject *global = float_or_none(global_logm);
    if (!global) {
        Py_DECREF(lists);
        return NULL;
    }
    PyTuple_SET_ITEM(lists, TRACE_COLUMNS, global);
    return lists;
}

PyDoc_STRVAR(trace_parameters_doc,
    "trace_parameters(weights, previous, out)\n"
    "    -> (logms, zeros, squares, update_norms, global_logm) | None\n\n"
    "One step's trace of a model's parameters in one call. weights: a sequence of C-contiguous\n"
    "float32 or float64 buffers or DLPack capsules of such CPU tensors, one per parameter.\n"
    "Copies them, widened to float64, into out (a float64 buffer of their total length), and\n"
    "returns one list per statistic, one value per parameter: LoGM, the mean of log10|w| over\n"
    "nonzero weights (None without one, or when any weight is NaN or Inf), zero count, sum of\n"
    "squares and norm of the change from previous (a float64 buffer like out, or None: 0);\n"
    "then the LoGM of all weights (None as above). Returns None, having written nothing, when\n"
    "an item of weights is none of these. Releases the GIL.");

static PyObject *trace_parameters(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *weights_arg, *previous_arg;
    Py_buffer out_view, previous_view;
    if (!PyArg_ParseTuple(args, "OOw*", &weights_arg, &previous_arg, &out_view)) return NULL;
    PyObject *weights = NULL, *result = NULL;
    FloatArray *views = NULL;
    double *columns = NULL;
    Py_ssize_t n = 0, held = 0;
    int has_previous = 0, ok;
    weights = PySequence_Fast(weights_arg, "trace_parameters: weights must be a sequence");
    if (!weights) goto done;
    n = PySequence_Fast_GET_SIZE(weights);
    if (previous_arg != Py_None) {
        if (PyObject_GetBuffer(previous_arg, &previous_view, PyBUF_C_CONTIGUOUS) < 0) goto done;
        has_previous = 1;
    }
    views = PyMem_Calloc((size_t)(n ? n : 1), sizeof(FloatArray));
    columns = PyMem_Calloc((size_t)(n ? n : 1) * TRACE_COLUMNS, sizeof(double));
    if (!views || !columns) {
        PyErr_NoMemory();
        goto done;
    }
    ok = float_arrays(weights, n, views);
    if (ok < 0) goto done;
    held = ok ? n : 0;
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; ok && i < n; i++) total += views[i].length;
    if (!ok) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (out_view.len != total * (Py_ssize_t)sizeof(double) ||
        (has_previous && previous_view.len != out_view.len)) {
        PyErr_SetString(PyExc_ValueError,
                        "trace_parameters: out (and previous) must hold every weight as float64");
        goto done;
    }
    double *out = (double *)out_view.buf;
    const double *previous = has_previous ? (const double *)previous_view.buf : NULL;
    /* The global LoGM from exact integer exponent sums: summing per-parameter LoGMs back
     * would round once more per parameter. */
    int64_t all_exponents = 0, all_nonzero = 0, non_finite = 0;
    double all_mantissas = 0.0;
    Py_BEGIN_ALLOW_THREADS
    Py_ssize_t start = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Totals t = {0, 0.0, 0, 0, 0, 0};
        Py_ssize_t length = views[i].length;
        const double *since = previous ? previous + start : NULL;
        double squares = 0.0, update = 0.0;
        if (views[i].itemsize == 4) {
            double widened[2] = {0.0, 0.0};
            f32_log2_sum((const uint32_t *)views[i].data, length, &t, out + start, since, widened);
            squares = widened[0];
            update = widened[1];
        } else {
            const double *values = (const double *)views[i].data;
            f64_log2_sum((const uint64_t *)values, length, &t);
            f64_widen(values, out + start, since, length, &squares, &update);
        }
        double log2_total = (double)t.exponent_sum + t.mantissa_log2;
        int finite = t.nans + t.infs == 0;
        columns[i] = finite && t.nonzero ? log2_total * LOG10_2 / (double)t.nonzero : NAN;
        all_exponents += t.exponent_sum;
        all_mantissas += t.mantissa_log2;
        all_nonzero += t.nonzero;
        non_finite += !finite;
        columns[n + i] = (double)t.zeros;
        columns[2 * n + i] = squares;
        columns[3 * n + i] = sqrt(update);
        start += length;
    }
    Py_END_ALLOW_THREADS
    double global_logm = NAN;
    if (!non_finite && all_nonzero) {
        global_logm = ((double)all_exponents + all_mantissas) * LOG10_2 / (double)all_nonzero;
    }
    result = trace_lists(columns, n, global_logm);
done:
    if (views) release_all(views, held);
    PyMem_Free(views);
    PyMem_Free(columns);
    if (has_previous) PyBuffer_Release(&previous_view);
    Py_XDECREF(weights);
    PyBuffer_Release(&out_view);
    return result;
}

PyDoc_STRVAR(sums_of_squares_doc,
    "sums_of_squares(arrays) -> list[float] | None\n\n"
    "The sum of squares, in float64, of each item of a sequence of C-contiguous float32 or\n"
    "float64 buffers or DLPack capsules of such CPU tensors (a step's gradients, as the\n"
    "optimizer is about to see them); None when an item is none of these. Releases the GIL.");

static PyObject *sums_of_squares(PyObject *self, PyObject *arrays_arg) {
    (void)self;
    PyObject *arrays = PySequence_Fast(arrays_arg, "sums_of_squares: a sequence of arrays");
    if (!arrays) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(arrays);
    PyObject *result = NULL;
    FloatArray *views = PyMem_Calloc((size_t)(n ? n : 1), sizeof(FloatArray));
    double *sums = PyMem_Calloc((size_t)(n ? n : 1), sizeof(double));
    if (!views || !sums) {
        PyErr_NoMemory();
        goto done;
    }
    int ok = float_arrays(arrays, n, views);
    if (ok < 0) goto done;
    if (!ok) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < n; i++) {
        sums[i] = views[i].itemsize == 4
                      ? f32_squares((const float *)views[i].data, views[i].length)
                      : f64_squares((const double *)views[i].data, views[i].length);
    }
    Py_END_ALLOW_THREADS
    release_all(views, n);
    result = PyList_New(n);
    for (Py_ssize_t i = 0; result && i < n; i++) {
        PyObject *item = PyFloat_FromDouble(sums[i]);
        if (!item) {
            Py_CLEAR(result);
            break;
        }
        PyList_SET_ITEM(result, i, item);
    }
done:
    PyMem_Free(views);
    PyMem_Free(sums);
    Py_DECREF(arrays);
    return result;
}

static PyMethodDef methods[] = {
    {"log2_sum", log2_sum, METH_VARARGS, log2_sum_doc},
    {"segment_log2_sums", segment_log2_sums, METH_VARARGS, segment_log2_sums_doc},
    {"trace_parameters", trace_parameters, METH_VARARGS, trace_parameters_doc},
    {"sums_of_squares", sums_of_squares, METH_O, sums_of_squares_doc},
    {"compare_segments", compare_segments, METH_VARARGS, compare_segments_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_logm_kernel",
    .m_doc = "Compiled one-pass exact log2 sum for LoGM (optional: pure torch is the fallback).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__logm_kernel(void) {
    PyObject *created = PyModule_Create(&module);
    /* Whether the vector loops were compiled in (tests and benchmarks report it). */
    if (created && PyModule_AddIntConstant(created, "VECTORIZED", VECTORIZED) < 0) {
        Py_DECREF(created);
        return NULL;
    }
    return created;
}
