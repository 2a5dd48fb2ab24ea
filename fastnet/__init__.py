"""fastnet: dense neural networks trained fast on the CPU, with NumPy reference kernels and Numba twins."""

__version__ = "0.1.0"

from fastnet.model import MLP

__all__ = ["MLP", "load", "__version__"]


def __getattr__(name):
    # fastnet.load lives with the image code; importing it on first use keeps `import fastnet`
    # (and so every CLI start) free of the trainer and Pillow until someone predicts.
    if name == "load":
        from fastnet.predict import load

        return load
    raise AttributeError(f"module 'fastnet' has no attribute {name!r}")
