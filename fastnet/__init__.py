"""fastnet: dense neural networks trained fast on the CPU, with NumPy reference kernels and Numba twins."""

__version__ = "0.1.0"

from fastnet.model import MLP  # noqa: E402

__all__ = ["MLP", "__version__"]
