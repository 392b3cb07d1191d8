"""cykernels.gemm: which matrix library a process uses, and its sgemm against numpy."""

import subprocess
import sys

import numpy as np
import pytest

from cykernels import gemm

pytestmark = pytest.mark.usefixtures("blas")


def operands(rng, m, n, k, trans_a, trans_b):
    a = rng.standard_normal((k, m) if trans_a else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    return a, b


@pytest.mark.parametrize("trans_a", [False, True], ids=["a", "aT"])
@pytest.mark.parametrize("trans_b", [False, True], ids=["b", "bT"])
def test_matmul_equals_numpy_for_every_transpose(rng, tolerance, trans_a, trans_b):
    for m, n, k in [(1, 1, 1), (7, 5, 3), (33, 17, 65), (0, 4, 3), (4, 3, 0)]:
        a, b = operands(rng, m, n, k, trans_a, trans_b)
        want = (a.T if trans_a else a).astype(np.float64) @ (b.T if trans_b else b)
        out = np.full((m, n), np.nan, np.float32)
        gemm.matmul(out, a, b, trans_a, trans_b)
        np.testing.assert_allclose(out, want, **tolerance[np.float32])


def test_accumulate_adds_to_what_out_holds(rng, tolerance):
    a, b = operands(rng, 9, 6, 4, False, True)
    start = rng.standard_normal((9, 6)).astype(np.float32)
    out = start.copy()
    gemm.matmul(out, a, b, trans_b=True, accumulate=True)
    np.testing.assert_allclose(out, start + a @ b.T, **tolerance[np.float32])


def test_same_bits_whatever_the_alignment(rng):
    """A restarted rank's buffers land at other addresses: the bits must not move.
    (MKL runs in CNR STRICT mode for this; on this machine's CPU it gave equal bits for
    these shifts even without it, so this guards the property, not the flag.)"""
    m, n, k = 67, 45, 129
    a, b = operands(rng, m, n, k, False, False)
    results = []
    for shift in range(4):  # 0..3 floats into a bigger buffer: 16-byte and odd alignments
        abuf = np.empty(a.size + 8, np.float32)[shift : shift + a.size].reshape(a.shape)
        bbuf = np.empty(b.size + 8, np.float32)[shift : shift + b.size].reshape(b.shape)
        obuf = np.empty(m * n + 8, np.float32)[shift : shift + m * n].reshape(m, n)
        abuf[...], bbuf[...] = a, b
        gemm.matmul(obuf, abuf, bbuf)
        results.append(obuf.tobytes())
    assert len(set(results)) == 1


def test_bad_shapes_are_one_line_errors(rng):
    a, b = operands(rng, 3, 4, 5, False, False)
    with pytest.raises(ValueError, match="b: expected 5 rows"):
        gemm.matmul(np.empty((3, 4), np.float32), a, b.T.copy())
    with pytest.raises(ValueError, match=r"out: expected shape \(3, 4\)"):
        gemm.matmul(np.empty((4, 3), np.float32), a, b)
    square = rng.standard_normal((3, 3)).astype(np.float32)
    with pytest.raises(ValueError, match="out: must not share memory with a"):
        gemm.matmul(square, square, square.copy())


def test_use_rejects_an_unknown_library():
    with pytest.raises(ValueError, match="ZEROTRAIN_BLAS: expected one of auto, mkl, numpy"):
        gemm.use("openblas")


def test_a_library_that_does_not_load_is_one_import_error(tmp_path, monkeypatch):
    fake = tmp_path / "libmkl_rt.so.3"
    fake.write_bytes(b"not a shared library")
    monkeypatch.setattr(gemm, "_mkl_path", lambda: str(fake))
    with pytest.raises(ImportError, match=r"^MKL at .*libmkl_rt.so.3 is not usable: "):
        gemm.use("mkl")
    with pytest.raises(ImportError, match="is not usable"):
        gemm.use("auto")  # auto means MKL when installed: a broken one is an error too


def _library_in_a_fresh_process(value):
    env_code = (
        "import os, sys; os.environ['ZEROTRAIN_BLAS'] = sys.argv[1]; "
        "from cykernels import gemm; print(gemm.library())"
    )
    return subprocess.run(
        [sys.executable, "-c", env_code, value], capture_output=True, text=True, timeout=60
    )


def test_the_environment_chooses_the_library_once_per_process(blas):
    done = _library_in_a_fresh_process(blas)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == blas
    auto = _library_in_a_fresh_process("auto")
    expected = "mkl" if gemm._mkl_path() is not None else "numpy"
    assert auto.stdout.strip() == expected
