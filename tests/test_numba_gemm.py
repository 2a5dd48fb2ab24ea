"""The numba backend's GEMM driver (fastnet/backends/numba_gemm.py): its partition, its products
against float64 NumPy on any number of threads, and the BLAS it drives."""

import ctypes
import math
from itertools import pairwise

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_info

from helpers import FLOAT64_TOL, assert_close, bf16_values, float32_tol, to_bf16

numba_gemm = pytest.importorskip("fastnet.backends.numba_gemm", reason="the numba backend needs numba")
from fastnet.backends import numba_backend, numba_blas  # noqa: E402  (after the skip: it needs numba too)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(0, 300), parts=st.integers(1, 6), align=st.sampled_from([1, 4, 16]))
def test_spans_cover_the_range_in_order_with_aligned_inner_edges(length, parts, align):
    spans = [numba_gemm.span(length, parts, part, align) for part in range(parts)]
    assert spans[0][0] == 0 and spans[-1][1] == length
    for (_, stop), (start, _) in pairwise(spans):
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
    # The skipped elements are NaN, also as bfloat16 bits (0xFFFF), so reading one shows.
    fill = np.nan if a.dtype.kind == "f" else 0xFFFF
    strided = np.full((a.shape[0], 2 * a.shape[1]), fill, a.dtype)[:, ::2]
    strided[...] = a
    return {"C": np.ascontiguousarray(a), "transposed": np.ascontiguousarray(a.T).T, "strided": strided}


SHAPES = [(1, 1, 1), (1, 300, 7), (5, 1, 9), (17, 33, 15), (130, 70, 47), (64, 3072, 128), (1001, 67, 259)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape", SHAPES)
def test_matmul_matches_float64_numpy_in_every_layout_and_thread_count(shape, dtype, threads):
    m, k, n = shape
    rng = np.random.default_rng(m * k * n)
    a64, b64 = rng.standard_normal((m, k)), rng.standard_normal((k, n))
    magnitude = np.abs(a64) @ np.abs(b64)
    rtol = float32_tol(k) if dtype == "float32" else FLOAT64_TOL
    with numba_backend.use_threads(threads):
        for name_a, a in layouts(a64.astype(dtype)).items():
            for name_b, b in layouts(b64.astype(dtype)).items():
                out = np.full((m, n), np.nan, dtype)
                assert numba_gemm.matmul(a, b, out) is None
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
        out = np.empty((129, 257), np.float32)
        with numba_backend.use_threads(threads):
            numba_gemm.matmul(a, b, out)
        if threads in results:
            assert np.array_equal(out, results[threads]), f"{threads} threads: two calls differ"
        results[threads] = out
    assert_close(results[1], results[2], rtol=float32_tol(513), atol=1e-4)


@pytest.mark.parametrize("rows, columns, depth", [(1000, 2048, 2048), (1024, 512, 3072), (300, 4096, 64),
                                                  (128, 2048, 2048), (128, 512, 3072), (64, 128, 3072)])
def test_column_tiles_are_at_least_a_quarter_as_wide_as_the_product_is_tall(rows, columns, depth):
    # Every column tile packs all of x's rows again: tiles thinner than that spend their time packing.
    tiles = numba_gemm.product_tiles(rows, columns, depth, 4)
    edges = [numba_gemm.product_tile(rows, columns, tiles, part) for part in range(tiles)]
    assert all((r0, r1) == (0, rows) for r0, r1, _, _ in edges)
    widths = [c1 - c0 for _, _, c0, c1 in edges]
    assert sum(widths) == columns and min(widths) >= rows // numba_gemm.MIN_WIDTH_PER_ROW - numba_gemm.ALIGN_COLUMNS
    grain_alone = numba_gemm.tiles_along(2 * rows * columns * depth, numba_gemm.tile_grain(4), columns,
                                         numba_gemm.ALIGN_COLUMNS)
    assert tiles <= grain_alone  # the rule only ever makes tiles wider than the plan's grain would


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
    assert numba_blas.find_blas("openblas").name == "openblas"
    with pytest.raises(ValueError, match="set it to mkl or openblas"):
        numba_blas.find_blas("atlas")
    if numba_blas._mkl_path() is None:
        with pytest.raises(ValueError, match="pip install mkl"):
            numba_blas.find_blas("mkl")
    else:
        assert numba_blas.find_blas("mkl").name == "mkl"


# --- bfloat16 products ---------------------------------------------------------------------------------

def bf16_operand(rng, shape):
    """Random bfloat16 bits (uint16) and their exact values in float64."""
    bits = to_bf16(rng.standard_normal(shape))
    return bits, bf16_values(bits).astype(np.float64)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_products_are_the_float64_products_of_the_bf16_values(shape, threads):
    """Through the driver's bf16 GEMM (MKL's where installed), in every layout: the products of bf16
    numbers are exact in float32, so only the float32 sums err."""
    m, k, n = shape
    rng = np.random.default_rng(m + k + n)
    (a, a64), (b, b64) = bf16_operand(rng, (m, k)), bf16_operand(rng, (k, n))
    rtol = float32_tol(k)
    atol = rtol * (np.abs(a64) @ np.abs(b64)).max()
    with numba_backend.use_threads(threads):
        for name_a, a_laid in layouts(a).items():
            for name_b, b_laid in layouts(b).items():
                out = np.full((m, n), np.nan, np.float32)
                numba_gemm.matmul(a_laid, b_laid, out)
                try:
                    assert_close(out, a64 @ b64, rtol=rtol, atol=atol, dtype=np.float32)
                except AssertionError as exc:
                    raise AssertionError(f"{name_a} @ {name_b}: {exc}") from None


def bf16_gemms():
    """Every C bf16 GEMM the driver can bind here, by name: the stand-in loops, and MKL's and oneDNN's
    (through its adapter) where installed."""
    from fastnet.backends.numba_bf16 import reference_gemm

    found = {"reference": reference_gemm.address}
    for name in numba_blas.BF16_GEMMS:
        try:
            found[name] = numba_blas.find_bf16_gemm(name).address
        except numba_blas.VariableError:  # not installed here
            pass
    return found


@pytest.mark.parametrize("gemm", list(bf16_gemms()))
@pytest.mark.parametrize("trans_a, trans_b", [(False, False), (True, False), (False, True)])
def test_each_bf16_gemm_computes_what_cblas_says(trans_a, trans_b, gemm):
    """Each bf16 GEMM the driver may bind, called as the driver calls MKL's: row-major, transpose flags,
    leading dimensions wider than the matrices, alpha and beta. The products of bf16 numbers are exact
    in float32, so only the float32 sums may differ from float64's."""
    m, k, n, pad = 7, 33, 5, 3
    rng = np.random.default_rng(1)
    a, a64 = bf16_operand(rng, (k, m) if trans_a else (m, k))
    b, b64 = bf16_operand(rng, (n, k) if trans_b else (k, n))
    a_store = np.zeros((a.shape[0], a.shape[1] + pad), np.uint16)
    a_store[:, :a.shape[1]] = a
    b_store = np.zeros((b.shape[0], b.shape[1] + pad), np.uint16)
    b_store[:, :b.shape[1]] = b
    c = np.full((m, n + pad), 2.0, np.float32)
    flag = {False: numba_blas.NO_TRANS, True: numba_blas.TRANS}
    signature = [ctypes.c_int32] * 3 + [ctypes.c_int64] * 3 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int64,
                                                               ctypes.c_void_p, ctypes.c_int64, ctypes.c_float,
                                                               ctypes.c_void_p, ctypes.c_int64]
    call = ctypes.CFUNCTYPE(None, *signature)(bf16_gemms()[gemm])
    call(numba_blas.ROW_MAJOR, flag[trans_a], flag[trans_b], m, n, k, 1.5, a_store.ctypes.data, a_store.shape[1],
         b_store.ctypes.data, b_store.shape[1], 0.5, c.ctypes.data, c.shape[1])
    op_a, op_b = (a64.T if trans_a else a64), (b64.T if trans_b else b64)
    expected = 1.5 * (op_a @ op_b) + 0.5 * 2.0
    assert_close(c[:, :n], expected.astype(np.float32), rtol=float32_tol(k), atol=1e-5)
    assert np.all(c[:, n:] == 2.0), "wrote past the matrix into the padding"


def test_the_bf16_gemm_is_the_one_chosen_and_says_which_instructions_it_uses(monkeypatch):
    """Without a plan or $FASTNET_BF16_GEMM: MKL first on Intel's CPUs, oneDNN first elsewhere, where
    MKL's takes no bf16 instructions; the choice is named with what it uses."""
    installed = [name for name in numba_blas.BF16_GEMMS if name in bf16_gemms()]
    monkeypatch.delenv("FASTNET_BF16_GEMM", raising=False)
    for vendor, preferred in (("GenuineIntel", ["mkl", "onednn"]), ("AuthenticAMD", ["onednn", "mkl"])):
        monkeypatch.setattr(numba_blas.cpu, "vendor", lambda vendor=vendor: vendor)
        found = numba_blas.find_bf16_gemm()
        assert found.name == next((name for name in preferred if name in installed), "none")
    for name in installed:
        found = numba_blas.find_bf16_gemm(name)
        routine = {"mkl": "cblas_gemm_bf16bf16f32", "onednn": "dnnl_gemm_bf16bf16f32"}[name]
        assert found.name == name and routine in found.describe()
        assert f"({' and '.join(found.instructions)})" in found.describe() or "converts to float32" in found.describe()
    described = numba_backend.parallelism()["bf16_gemm"]
    assert described == numba_gemm.BF16_GEMM.describe()
    assert (numba_backend.bf16_gemm() is None) == (numba_gemm.BF16_GEMM.name == "none")


@pytest.mark.parametrize("processor, instructions", [
    (("Intel(R) Advanced Vector Extensions 512 (Intel(R) AVX-512) with support for INT8, BF16, FP16 (limited) "
     "instructions, and Intel(R) Advanced Matrix Extensions (Intel(R) AMX) with INT8 and BF16"),
     ["AMX-BF16", "AVX512-BF16"]),  # Emerald Rapids, MKL 2026.2
    (("Intel(R) Advanced Vector Extensions 512 (Intel(R) AVX-512) with support of Intel(R) Deep Learning Boost "
     "(Intel(R) DL Boost) and BF16"), ["AVX512-BF16"]),
    ("Intel(R) Advanced Vector Extensions 2 (Intel(R) AVX2) enabled processors", []),  # MKL's path on an AMD CPU
])
def test_mkls_bf16_instructions_are_read_from_the_path_it_took(processor, instructions):
    assert numba_blas.mkl_bf16_instructions(processor) == instructions


@pytest.mark.parametrize("isa, instructions", [(0xFEF, ["AMX-BF16", "AVX512-BF16"]), (0xE7, ["AVX512-BF16"]),
                                               (0x67, []), (0x7, [])])
def test_onednns_bf16_instructions_are_read_from_its_isa(isa, instructions):
    assert numba_blas.onednn_bf16_instructions(isa) == instructions


@pytest.mark.parametrize("value, phrase", [
    ("openblas", ("FASTNET_BF16_GEMM='openblas' is not a bfloat16 GEMM fastnet can call: set it to mkl or onednn, or "
                 "unset it")),
    ("mkl", "FASTNET_BF16_GEMM=mkl but mkl is not installed: pip install 'fastnet[mkl]', or unset FASTNET_BF16_GEMM"),
    ("onednn", ("FASTNET_BF16_GEMM=onednn but onednn is not installed: pip install 'fastnet[onednn]', or unset "
               "FASTNET_BF16_GEMM")),
])
def test_a_bf16_gemm_that_cannot_be_had_is_one_line(value, phrase, monkeypatch):
    monkeypatch.setenv("FASTNET_BF16_GEMM", value)
    monkeypatch.setattr(numba_blas, "_mkl_path", lambda: None)  # as on a machine without either
    monkeypatch.setattr(numba_blas, "_onednn_path", lambda: None)
    with pytest.raises(numba_blas.VariableError) as caught:
        numba_blas.find_bf16_gemm()
    assert str(caught.value) == phrase
