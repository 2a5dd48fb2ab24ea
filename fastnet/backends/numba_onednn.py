"""oneDNN's bfloat16 GEMM behind the signature the GEMM driver calls (numba_bf16.CBLAS_GEMM, MKL's).

dnnl_gemm_bf16bf16f32 is row-major, as every call of the driver is, and says whether an operand is
transposed with a character, 'N' or 'T', where CBLAS passes its enum. `cblas_gemm_bf16` translates the
one call into the other; the driver binds its address where it would bind MKL's, so its tiles, their
epilogues and their bits' independence of the thread count are the same whichever library multiplies.

numba_blas loads oneDNN and binds its function to ONEDNN_SYMBOL before it imports this module, whose
compiled code (or the disk cache's) names that symbol.
"""

import numpy as np
from numba import cfunc, types

from fastnet.backends.numba_bf16 import CBLAS_GEMM
from fastnet.backends.numba_blas import ONEDNN_SYMBOL, TRANS

# dnnl_gemm_bf16bf16f32(transa, transb, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc) -> dnnl_status_t.
# The two characters are passed as C ints: a char argument travels in a whole register, and declaring
# it 32 bits wide leaves no upper bits for the callee to trust or not.
_dnnl_gemm_bf16 = types.ExternalFunction(ONEDNN_SYMBOL, types.int32(
    types.int32, types.int32, types.int64, types.int64, types.int64, types.float32, types.voidptr, types.int64,
    types.voidptr, types.int64, types.float32, types.voidptr, types.int64))
NOT_TRANSPOSED, TRANSPOSED = ord("N"), ord("T")


@cfunc(CBLAS_GEMM, cache=True)
def cblas_gemm_bf16(layout, trans_a, trans_b, m, n, k, alpha, a, lead_a, b, lead_b, beta, c, lead_c):
    """C = alpha * op(A) @ op(B) + beta * C, row-major (the driver's only layout). oneDNN's status is not
    read: it reports arguments that the driver never passes (sizes below 1, leading dimensions
    narrower than a row), and the tests call every layout the driver does."""
    _dnnl_gemm_bf16(np.int32(TRANSPOSED if trans_a == TRANS else NOT_TRANSPOSED),
                    np.int32(TRANSPOSED if trans_b == TRANS else NOT_TRANSPOSED),
                    m, n, k, alpha, a, lead_a, b, lead_b, beta, c, lead_c)
