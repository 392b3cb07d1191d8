# cython: language_level=3
#
# Private inline float32 helpers shared by the kernel modules (activations, norms,
# attention): polynomial exp / erf / tanh, and row reductions on 8-float vectors.
# `from cykernels._simd cimport zt_expf, zt_sum` pastes the C below into that module's
# generated .c file; nothing is imported at run time and there is no _simd module.
#
# Why they exist: libm's expf / erff / tanhf are scalar calls that stop gcc's vectoriser
# (tanhf alone cost 19 ms per million elements), and a plain `t += x[i]` sum loop only
# vectorises under -ffast-math, which setup.py leaves out (it would break NaN/Inf
# detection and bitwise determinism). These are plain float32 arithmetic gcc vectorises
# with -O3 alone.
#
# Determinism: the reductions give lane j the elements j, j+8, j+16, ..., join the lanes
# in a fixed tree and add the tail in order, so the same row gives the same bits on every
# call and in every module. Changing any line here changes the bits of softmax, gelu,
# silu, tanh, swiglu, layernorm, rmsnorm and attention: the twin and torch tests in
# tests/cykernels guard the accuracy (figures in activations.pyx's module note).
#
# References: Cephes expf and tanhf (the polynomials); Eigen/XLA's float erf (the rational
# approximation); GCC's vector extensions (vector_size, one ymm register with -mavx, two
# xmm registers without).

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <math.h>

    /* ---- polynomial exp, erf, tanh ---------------------------------------------- */

    /* exp(x) in float32 arithmetic gcc vectorises (Cephes expf: x = n ln2 + r,
       |r| <= ln2/2, a degree-6 polynomial for exp(r), 2^n built from its bits).
       About 2 ulp over [-87, 88]; 0 below -87; +inf above 88; NaN stays NaN. */
    static inline float zt_expf(float x) {
        float xc = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
        /* round to nearest integer by the 1.5 * 2^23 trick (no floorf: it is a call) */
        float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
        float r = xc - n * 0.693359375f;
        r = r - n * -2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        float y = p * (r * r) + r + 1.0f;
        /* the bits of 2^n, (n + 127) << 23, formed in float arithmetic (exact: 8
           significant bits) so no integer vector op is needed (AVX1 has none 8-wide) */
        int32_t bits = (int32_t)((n + 127.0f) * 8388608.0f);
        float two_n;
        memcpy(&two_n, &bits, sizeof two_n);
        y = y * two_n;
        y = x > 88.0f ? INFINITY : y;
        return x < -87.0f ? 0.0f : y;
    }

    /* erf(x) in float32 arithmetic gcc vectorises: Eigen/XLA's rational approximation,
       odd degree-13 over even degree-8, on x clamped to [-4, 4] (erf is +-1 in float32
       beyond). Absolute error below 5e-7 (measured against math.erf). */
    static inline float zt_erff(float x) {
        float xc = x < -4.0f ? -4.0f : (x > 4.0f ? 4.0f : x);
        float x2 = xc * xc;
        float p = -2.72614225801306e-10f;
        p = p * x2 + 2.77068142495902e-08f;
        p = p * x2 + -2.10102402082508e-06f;
        p = p * x2 + -5.69250639462346e-05f;
        p = p * x2 + -7.34990630326855e-04f;
        p = p * x2 + -2.95459980854025e-03f;
        p = p * x2 + -1.60960333262415e-02f;
        p = p * xc;
        float q = -1.45660718464996e-05f;
        q = q * x2 + -2.13374055278905e-04f;
        q = q * x2 + -1.68282697438203e-03f;
        q = q * x2 + -7.37332916720468e-03f;
        q = q * x2 + -1.42647390514189e-02f;
        return p / q;
    }

    /* tanh(x) in float32 arithmetic gcc vectorises (Cephes tanhf): an odd polynomial
       for |x| < 0.625, where 1 - 2 / (e^2|x| + 1) would cancel; that form beyond. */
    static inline float zt_tanhf(float x) {
        float a = fabsf(x);
        float big = 1.0f - 2.0f / (zt_expf(a + a) + 1.0f);
        float z = x * x;
        float small = -5.70498872745e-3f;
        small = small * z + 2.06390887954e-2f;
        small = small * z + -5.37397155531e-2f;
        small = small * z + 1.33314422036e-1f;
        small = small * z + -3.33332819422e-1f;
        small = small * z * x + x;
        return a < 0.625f ? small : copysignf(big, x);
    }

    /* ---- row reductions on 8-float vectors ---------------------------------------- */

    typedef float zt_v8 __attribute__((vector_size(32)));
    typedef int32_t zt_v8i __attribute__((vector_size(32)));
    #define ZT_LOAD8(v, p) memcpy(&(v), (p), sizeof(v))
    #define ZT_HSUM8(s) ((((s)[0] + (s)[4]) + ((s)[1] + (s)[5])) + (((s)[2] + (s)[6]) + ((s)[3] + (s)[7])))

    /* sum x */
    static inline float zt_sum(const float *x, Py_ssize_t n) {
        zt_v8 s = {0}, v;
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8) { ZT_LOAD8(v, x + i); s += v; }
        float t = ZT_HSUM8(s);
        for (; i < n; i++) t += x[i];
        return t;
    }

    /* sum a b */
    static inline float zt_dot(const float *a, const float *b, Py_ssize_t n) {
        zt_v8 s = {0}, va, vb;
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8) { ZT_LOAD8(va, a + i); ZT_LOAD8(vb, b + i); s += va * vb; }
        float t = ZT_HSUM8(s);
        for (; i < n; i++) t += a[i] * b[i];
        return t;
    }

    /* sum (x - m)^2 */
    static inline float zt_sumsq_dev(const float *x, float m, Py_ssize_t n) {
        zt_v8 s = {0}, v;
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8) { ZT_LOAD8(v, x + i); v = v - m; s += v * v; }
        float t = ZT_HSUM8(s);
        for (; i < n; i++) t += (x[i] - m) * (x[i] - m);
        return t;
    }

    /* sum a b (x - m)   (m = 0 for RMSNorm) */
    static inline float zt_dot3_dev(const float *a, const float *b, const float *x, float m,
                                    Py_ssize_t n) {
        zt_v8 s = {0}, va, vb, vx;
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8) {
            ZT_LOAD8(va, a + i); ZT_LOAD8(vb, b + i); ZT_LOAD8(vx, x + i);
            s += va * vb * (vx - m);
        }
        float t = ZT_HSUM8(s);
        for (; i < n; i++) t += a[i] * b[i] * (x[i] - m);
        return t;
    }

    /* max of x[0..n), n >= 1; NaN elements are skipped unless x[0] is NaN (a NaN row
       still comes out NaN from a softmax: exp(NaN - m) is NaN) */
    static inline float zt_max(const float *x, Py_ssize_t n) {
        float t = x[0];
        Py_ssize_t i = 0;
        if (n >= 8) {
            zt_v8 m, v;
            ZT_LOAD8(m, x);
            for (i = 8; i + 8 <= n; i += 8) {
                ZT_LOAD8(v, x + i);
                zt_v8i gt = v > m;
                m = (zt_v8)(((zt_v8i)v & gt) | ((zt_v8i)m & ~gt));
            }
            t = m[0];
            for (int j = 1; j < 8; j++) t = m[j] > t ? m[j] : t;
        }
        for (; i < n; i++) t = x[i] > t ? x[i] : t;
        return t;
    }
    """
    float zt_expf(float x) noexcept nogil
    float zt_erff(float x) noexcept nogil
    float zt_tanhf(float x) noexcept nogil
    float zt_sum(const float *x, Py_ssize_t n) noexcept nogil
    float zt_dot(const float *a, const float *b, Py_ssize_t n) noexcept nogil
    float zt_sumsq_dev(const float *x, float m, Py_ssize_t n) noexcept nogil
    float zt_dot3_dev(const float *a, const float *b, const float *x, float m,
                      Py_ssize_t n) noexcept nogil
    float zt_max(const float *x, Py_ssize_t n) noexcept nogil
