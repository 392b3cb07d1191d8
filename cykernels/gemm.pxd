# cython: language_level=3
# The C side of cykernels/gemm.pyx, for kernels that multiply matrices without the GIL:
#
#     from cykernels.gemm cimport sgemm, sgemm_fits
#
# Call gemm.library() once (it picks the library), then take the sgemm path only when
# sgemm_fits(m, n, k): a library is loaded and the sizes are positive C ints. Otherwise
# the kernel multiplies with numpy.

cdef bint sgemm_fits(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k) noexcept nogil
cdef void sgemm(bint trans_a, bint trans_b, int m, int n, int k,
                const float* a, int lda, const float* b, int ldb,
                float beta, float* c, int ldc) noexcept nogil
