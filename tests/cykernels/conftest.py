"""Shared fixtures for kernel tests: a seeded rng, torch as an optional reference, and the
per-dtype tolerance table every kernel-vs-reference comparison uses.

    def test_kernel_matches_twin(rng, tolerance):
        x = rng.standard_normal((4, 8), dtype=np.float32)
        np.testing.assert_allclose(kernel(x), twin(x), **tolerance[np.float32])

`tolerance` is TOLERANCE as a fixture and `finite_differences` the one gradient check by
central differences (a conftest is not importable under --import-mode=importlib). Use the
`torch` fixture, not `import torch`, so a machine without torch skips those tests instead
of failing them.
"""

import zlib

import numpy as np
import pytest

# Allowed difference between a kernel and a reference (numpy twin or torch) computed in the
# same dtype: |actual - expected| <= atol + rtol * |expected|. float32: the parity budget
# (1e-5 max abs diff, also over 1,000 optimizer steps); float64: twins and rounding only.
TOLERANCE = {
    np.dtype(np.float32): {"rtol": 1e-6, "atol": 1e-5},
    np.dtype(np.float64): {"rtol": 1e-12, "atol": 1e-12},
}

# Central differences on the float64 twins: error ~ h^2 (truncation) + 1e-16 / h (rounding).
FD_STEP = 1e-6
FD_TOLERANCE = {"rtol": 1e-6, "atol": 1e-7}


def assert_matches_finite_differences(grad, loss, wrt, err_msg=""):
    """Assert `grad` is d loss() / d wrt, by central differences of step FD_STEP.

    `loss()` is a scalar that reads `wrt` (a float64 array) in place: each element is bumped
    by +-FD_STEP and restored, so `wrt` is unchanged when this returns.
    """
    assert wrt.dtype == np.float64, f"finite differences need float64, got {wrt.dtype}"
    numeric = np.empty_like(wrt)
    for i in np.ndindex(wrt.shape):
        keep = wrt[i]
        wrt[i] = keep + FD_STEP
        up = loss()
        wrt[i] = keep - FD_STEP
        down = loss()
        wrt[i] = keep
        numeric[i] = (up - down) / (2 * FD_STEP)
    np.testing.assert_allclose(grad, numeric, **FD_TOLERANCE, err_msg=err_msg)


@pytest.fixture
def finite_differences():
    """assert_matches_finite_differences(grad, loss, wrt, err_msg=""): the kernel tests'
    gradient check, `loss()` a scalar reading `wrt` in place."""
    return assert_matches_finite_differences


@pytest.fixture
def tolerance():
    """TOLERANCE, indexable by np.dtype or scalar type (tolerance[np.float32])."""
    return {**TOLERANCE, **{dtype.type: tol for dtype, tol in TOLERANCE.items()}}


@pytest.fixture
def rng(request):
    """A numpy Generator seeded from the test's id: reproducible, distinct per test."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def torch():
    """The torch module (single-threaded, deterministic), or skip the test without it."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    return torch


def _blas_params():
    from cykernels import gemm

    has_mkl = gemm._mkl_path() is not None
    skip_mkl = pytest.mark.skipif(not has_mkl, reason="the mkl package is not installed")
    return [pytest.param("mkl", marks=skip_mkl), "numpy"]


@pytest.fixture(params=_blas_params())
def blas(request):
    """Run the test once per matrix library (cykernels.gemm): MKL's sgemm when the mkl
    package is installed, and numpy's matmul. The process's choice is restored after."""
    from cykernels import gemm

    before = gemm.library()
    gemm.use(request.param)
    yield request.param
    gemm.use(before)
