"""The numba backend's GEMM driver (fastnet/backends/numba_gemm.py): its partition, its products
against float64 NumPy on any number of threads, and the BLAS it drives."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_info

from helpers import assert_close

numba_gemm = pytest.importorskip("fastnet.backends.numba_gemm", reason="the numba backend needs numba")
from fastnet.backends import numba_backend  # noqa: E402  (after the skip: it needs numba too)

EPS32 = float(np.finfo(np.float32).eps)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(0, 300), parts=st.integers(1, 6), align=st.sampled_from([1, 4, 16]))
def test_spans_cover_the_range_in_order_with_aligned_inner_edges(length, parts, align):
    spans = [numba_gemm.span(length, parts, part, align) for part in range(parts)]
    assert spans[0][0] == 0 and spans[-1][1] == length
    for (_, stop), (start, _) in zip(spans, spans[1:]):
        assert stop == start
    for start, stop in spans:
        assert start <= stop
        assert start % align == 0 or start == length
    sizes = [stop - start for start, stop in spans]
    blocks = math.ceil(length / align)
    # As equal as whole aligned blocks allow: one block, and the last block's shortfall, at most.
    assert max(sizes) - min(sizes) <= 2 * align
    assert sum(size > 0 for size in sizes) == min(parts, blocks)


def layouts(a):
    """a as a row-major array, as the transpose of a row-major array, and as a strided view."""
    strided = np.full((a.shape[0], 2 * a.shape[1]), np.nan, a.dtype)[:, ::2]
    strided[...] = a
    return {"C": np.ascontiguousarray(a), "transposed": np.ascontiguousarray(a.T).T, "strided": strided}


SHAPES = [(1, 1, 1), (1, 300, 7), (5, 1, 9), (17, 33, 15), (130, 70, 47), (64, 3072, 128)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matmul_matches_float64_numpy_in_every_layout_and_thread_count(shape, dtype, threads):
    m, k, n = shape
    rng = np.random.default_rng(m * k * n)
    a64, b64 = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    magnitude = np.abs(a64) @ np.abs(b64)
    rtol = 4 * math.sqrt(k) * EPS32 if dtype == "float32" else 1e-12
    with numba_backend.use_threads(threads):
        for name_a, a in layouts(a64.astype(dtype)).items():
            for name_b, b in layouts(b64.astype(dtype)).items():
                out = np.full((m, n), np.nan, dtype)
                assert numba_gemm.matmul(a, b, out) is out
                # Rounding the inputs to float32 is part of the error: compare with what they hold.
                wide = a.astype(np.float64) @ b.astype(np.float64)
                try:
                    assert_close(out, wide, rtol=rtol, atol=rtol * magnitude.max(), dtype=dtype)
                except AssertionError as exc:
                    raise AssertionError(f"{name_a} @ {name_b}: {exc}") from None


def test_matmul_on_one_thread_and_two_agree_and_repeat_bit_for_bit():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((129, 513), dtype=np.float32), rng.standard_normal((513, 257), dtype=np.float32)
    results = {}
    for threads in (1, 2, 1, 2):
        with numba_backend.use_threads(threads):
            out = numba_gemm.matmul(a, b, np.empty((129, 257), np.float32))
        if threads in results:
            assert np.array_equal(out, results[threads]), f"{threads} threads: two calls differ"
        results[threads] = out
    assert_close(results[1], results[2], rtol=4 * math.sqrt(513) * EPS32, atol=1e-4)


def test_the_backend_holds_the_blas_it_drives_to_one_thread():
    driven = [lib for lib in threadpool_info() if lib["filepath"] == numba_gemm.BLAS.path]
    assert driven and all(lib["num_threads"] == 1 for lib in driven), driven
    described = numba_backend.parallelism()
    assert described["blas_path"] == numba_gemm.BLAS.path and described["threads"] == numba_gemm.threads()
    assert set(described["partition"]) == set(numba_gemm.PARTITION)


def test_use_threads_sets_the_tile_count_and_restores_it():
    before = numba_gemm.threads()
    with numba_backend.use_threads(1):
        assert numba_gemm.threads() == 1 and numba_gemm.thread_count() == 1
    assert numba_gemm.threads() == before


def test_blas_choice():
    assert numba_gemm.find_blas("openblas").name == "openblas"
    with pytest.raises(ValueError, match="set it to mkl or openblas"):
        numba_gemm.find_blas("atlas")
    if numba_gemm._mkl_path() is None:
        with pytest.raises(ValueError, match="pip install mkl"):
            numba_gemm.find_blas("mkl")
    else:
        assert numba_gemm.find_blas("mkl").name == "mkl"
