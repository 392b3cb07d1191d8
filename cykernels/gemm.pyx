# cython: language_level=3
"""Row-major float32 matrix products for the kernels, through a CBLAS sgemm called
without the GIL when one is loaded:

    c = op(a) @ op(b) + beta c          op(x) = x or x.T;  beta 0 (overwrite) or 1 (add)

Why: numpy's matmul uses the BLAS numpy was built with (OpenBLAS in the wheels) and has
no "+=" form. Intel MKL's cblas_sgemm is 15-20% faster on the char transformer's
shapes on this machine (scripts/bench_kernels.py prints both), and beta = 1 accumulates
a gradient with no temporary. torch's CPU build uses MKL too.

Which library, decided once per process on first use (`library()`), by ZEROTRAIN_BLAS:

    auto (default)  MKL when the `mkl` package is installed (pip install 'zerotrain[mkl]'),
                    else numpy
    mkl             MKL, or an ImportError that says how to install it
    numpy           numpy's matmul, whatever BLAS numpy was built with

An installed MKL that does not load is an ImportError naming it under auto too: never a
silent fall back to the slower library (a run that trains at numpy speed is a bug).

MKL runs with the sequential threading layer (one thread: a rank owns one core), the
LP64 interface whatever MKL_INTERFACE_LAYER says, and conditional numerical
reproducibility AUTO|STRICT: the same inputs give the same bits whatever the arrays'
alignment (a restarted rank's buffers land at other addresses). Two libraries give
different last bits; summary.json records which one a run used ("blas").

The kernels (linear, attention) cimport sgemm_fits / sgemm from gemm.pxd; their numpy
twins are unchanged (the twin of sgemm is np.matmul). `matmul` here is the Python face,
for tests and benchmarks.
"""

from libc.limits cimport INT_MAX

import ctypes
import importlib.metadata
import os

import numpy as np

from cykernels._checks import check_array, check_no_alias

LIBRARIES = ("auto", "mkl", "numpy")

# CBLAS and MKL service constants (cblas.h, mkl_service.h, mkl_cbwr.h)
cdef enum:
    ROW_MAJOR = 101
    NO_TRANS = 111
    TRANS = 112
_MKL_THREADING_SEQUENTIAL = 1
_MKL_INTERFACE_LP64 = 0
_MKL_CBWR_AUTO = 2
_MKL_CBWR_STRICT = 0x10000
_MKL_CBWR_SUCCESS = 0

ctypedef void (*cblas_sgemm_t)(int layout, int trans_a, int trans_b, int m, int n, int k,
                               float alpha, const float* a, int lda, const float* b,
                               int ldb, float beta, float* c, int ldc) noexcept nogil

cdef cblas_sgemm_t _sgemm = NULL
_chosen = None  # "mkl" or "numpy" once library() has run
_loaded = {}  # libmkl_rt path -> (ctypes handle, kept alive; cblas_sgemm's address)


cdef bint sgemm_fits(Py_ssize_t m, Py_ssize_t n, Py_ssize_t k) noexcept nogil:
    """True when a library is loaded and m, n, k are positive C ints."""
    return _sgemm != NULL and 0 < m <= INT_MAX and 0 < n <= INT_MAX and 0 < k <= INT_MAX


cdef void sgemm(bint trans_a, bint trans_b, int m, int n, int k,
                const float* a, int lda, const float* b, int ldb,
                float beta, float* c, int ldc) noexcept nogil:
    """c (m, n) = op(a) (m, k) @ op(b) (k, n) + beta c, row-major with leading dims."""
    _sgemm(ROW_MAJOR, TRANS if trans_a else NO_TRANS, TRANS if trans_b else NO_TRANS,
           m, n, k, 1.0, a, lda, b, ldb, beta, c, ldc)


# ---- choosing the library ------------------------------------------------------------


def _mkl_path():
    """The installed mkl wheel's libmkl_rt, or None."""
    try:
        dist = importlib.metadata.distribution("mkl")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or ():
        if f.name.startswith("libmkl_rt.so"):
            path = dist.locate_file(f)
            if os.path.exists(path):
                return os.fspath(path)
    return None


def _load_mkl(path):
    """Load libmkl_rt at `path`, sequential / LP64 / CNR strict; return (handle, address).
    A library that does not load, or lacks a function we call, is an ImportError."""
    try:
        lib = ctypes.CDLL(path)
        for name in ("MKL_Set_Threading_Layer", "MKL_Set_Interface_Layer", "MKL_CBWR_Set",
                     "cblas_sgemm"):
            getattr(lib, name)
    except (OSError, AttributeError) as exc:
        raise ImportError(f"MKL at {path} is not usable: {exc}") from None
    # Both must precede every other MKL call, or MKL has already picked its layers.
    lib.MKL_Set_Threading_Layer.argtypes = [ctypes.c_int]
    lib.MKL_Set_Interface_Layer.argtypes = [ctypes.c_int]
    lib.MKL_Set_Threading_Layer(_MKL_THREADING_SEQUENTIAL)
    lib.MKL_Set_Interface_Layer(_MKL_INTERFACE_LP64)
    lib.MKL_CBWR_Set.argtypes = [ctypes.c_int]
    status = lib.MKL_CBWR_Set(_MKL_CBWR_AUTO | _MKL_CBWR_STRICT)
    if status != _MKL_CBWR_SUCCESS:
        raise ImportError(f"MKL at {path} refused reproducible mode AUTO|STRICT (status {status})")
    return lib, ctypes.cast(lib.cblas_sgemm, ctypes.c_void_p).value


def resolve(name):
    """The libmkl_rt path library `name` ("auto", "mkl" or "numpy") would load, or None
    for numpy. Loads nothing: the CLI checks ZEROTRAIN_BLAS with it before any rank starts.
    An unknown name is a ValueError; "mkl" without the package an ImportError."""
    if name not in LIBRARIES:
        raise ValueError(f"ZEROTRAIN_BLAS: expected one of {', '.join(LIBRARIES)}, got {name!r}")
    path = None if name == "numpy" else _mkl_path()
    if name == "mkl" and path is None:
        raise ImportError(
            "ZEROTRAIN_BLAS=mkl but the mkl package is not installed "
            "(pip install 'zerotrain[mkl]')"
        )
    return path


def environment_choice():
    """ZEROTRAIN_BLAS, or "auto" when unset or empty."""
    return os.environ.get("ZEROTRAIN_BLAS", "auto") or "auto"


def use(name):
    """Switch this process to library `name` ("auto", "mkl" or "numpy"); return the one
    chosen. Tests and benchmarks call it; runs set ZEROTRAIN_BLAS instead."""
    global _sgemm, _chosen
    path = resolve(name)
    if path is None:
        _sgemm, _chosen = NULL, "numpy"
        return _chosen
    if path not in _loaded:
        _loaded[path] = _load_mkl(path)
    _sgemm = <cblas_sgemm_t><size_t>_loaded[path][1]
    _chosen = "mkl"
    return _chosen


def library():
    """The library this process multiplies with: "mkl" or "numpy" (chosen on first call
    from ZEROTRAIN_BLAS, default auto)."""
    if _chosen is None:
        use(environment_choice())
    return _chosen


# ---- the Python face -----------------------------------------------------------------


def matmul(out, a, b, trans_a=False, trans_b=False, accumulate=False):
    """out = op(a) @ op(b), or out += ... with accumulate=True (float32 C-contiguous)."""
    check_array("a", a, ndim=2)
    check_array("b", b, ndim=2)
    check_array("out", out, ndim=2, writable=True)
    check_no_alias({"out": out}, {"a": a, "b": b})
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    k2, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k2 != k:
        raise ValueError(f"b: expected {k} rows after the transpose to match a, got {k2}")
    check_array("out", out, shape=(m, n))
    library()
    if not sgemm_fits(m, n, k):
        product = np.matmul(a.T if trans_a else a, b.T if trans_b else b)
        if accumulate:
            out += product
        else:
            out[...] = product
        return
    cdef const float[:, ::1] av = a
    cdef const float[:, ::1] bv = b
    cdef float[:, ::1] cv = out
    cdef bint ta = trans_a, tb = trans_b
    cdef int cm = m, cn = n, ck = k
    cdef float beta = 1.0 if accumulate else 0.0
    with nogil:
        sgemm(ta, tb, cm, cn, ck, &av[0, 0], av.shape[1], &bv[0, 0], bv.shape[1],
              beta, &cv[0, 0], cv.shape[1])

