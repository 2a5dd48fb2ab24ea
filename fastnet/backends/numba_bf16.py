"""bfloat16 in the Numba backend: Numba has no such type, so bf16 data live in uint16 arrays, each
element the top half of a float32's bits, and the kernels convert with the functions here: to_bf16
and from_bf16 a value at a time, round_row a row after the pass that wrote it.

Rounding is to nearest, ties to even, as numpy_backend.round_to_bf16 defines it. A float32's bits
reach integer code through a bit cast (an LLVM intrinsic below), not through a view of the array,
so the epilogues convert a value while it is still in a register.

`reference_gemm` is a C-callable bf16 GEMM with MKL's signature, written as plain loops. The GEMM
driver binds it when MKL is not installed, so that a kernel given bf16 operands still computes the
right numbers, slowly; fastnet itself refuses --precision bf16 on the numba backend without MKL.
"""

import numpy as np
from llvmlite import ir
from numba import carray, cfunc, njit, types
from numba.extending import intrinsic

from fastnet.backends.numba_blas import NO_TRANS
from fastnet.backends.numpy_backend import BF16_QUIET_BIT, BF16_ROUNDING_BIAS, FLOAT32_INF, FLOAT32_MAGNITUDE


@intrinsic
def float32_bits(typingctx, value):
    """The IEEE bits of a float32, as a uint32."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(types.float32), codegen


@intrinsic
def bits_float32(typingctx, bits):
    """The float32 whose IEEE bits are the uint32 `bits`."""
    if bits != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.uint32), codegen


@njit(cache=True, nogil=True, inline="always")
def to_bf16(value):
    """The bfloat16 (as uint16 bits) nearest to the float32 `value`, ties to even. Adding 0x7FFF
    plus the lowest kept bit carries into the kept half exactly when the dropped half is over
    one half, or is one half and the kept half is odd. NaN keeps its sign and top payload bits, with
    the quiet bit set, so that no NaN rounds to inf."""
    bits = np.int64(float32_bits(np.float32(value)))
    if (bits & FLOAT32_MAGNITUDE) > FLOAT32_INF:
        return np.uint16((bits >> 16) | BF16_QUIET_BIT)
    return np.uint16((bits + BF16_ROUNDING_BIAS + ((bits >> 16) & 1)) >> 16)


@njit(cache=True, nogil=True, inline="always")
def from_bf16(bits):
    """The float32 value of bfloat16 bits: exact, the low half of the float32 is zero."""
    return bits_float32(np.uint32(np.uint32(bits) << np.uint32(16)))


@njit(cache=True, nogil=True, error_model="numpy")
def round_row(row, row16):
    """row16 = row rounded to bfloat16. A loop of its own after the row's pass, which LLVM vectorises:
    written inside that pass, the rounding left it scalar, about three times slower."""
    for j in range(row.shape[0]):
        row16[j] = to_bf16(row[j])


# The C signature of cblas_sgemm and cblas_gemm_bf16bf16f32 (ILP64): CBLAS's enums stay C ints, the
# sizes and leading dimensions are 64-bit, alpha and beta float32, the matrices pointers.
CBLAS_GEMM = types.void(types.int32, types.int32, types.int32, types.int64, types.int64, types.int64,
                        types.float32, types.voidptr, types.int64, types.voidptr, types.int64, types.float32,
                        types.voidptr, types.int64)


@cfunc(CBLAS_GEMM, cache=True)
def reference_gemm(layout, trans_a, trans_b, m, n, k, alpha, a, lead_a, b, lead_b, beta, c, lead_c):
    """C = alpha * op(A) @ op(B) + beta * C for row-major bf16 A and B and float32 C, as MKL's
    cblas_gemm_bf16bf16f32 computes it: the products exact in float32, summed in float32."""
    rows_a = m if trans_a == NO_TRANS else k
    rows_b = k if trans_b == NO_TRANS else n
    a_bits = carray(a, (rows_a * lead_a,), np.uint16)
    b_bits = carray(b, (rows_b * lead_b,), np.uint16)
    out = carray(c, (m * lead_c,), np.float32)
    for i in range(m):
        for j in range(n):
            total = np.float32(0)
            for p in range(k):
                left = a_bits[i * lead_a + p] if trans_a == NO_TRANS else a_bits[p * lead_a + i]
                right = b_bits[p * lead_b + j] if trans_b == NO_TRANS else b_bits[j * lead_b + p]
                total += from_bf16(left) * from_bf16(right)
            previous = out[i * lead_c + j] * beta if beta != 0 else np.float32(0)
            out[i * lead_c + j] = alpha * total + previous
