"""How every kernel of the Numba backend is entered: compiled for C-contiguous arrays alone, with
arrays of another layout copied on the way in and the written ones copied back on the way out."""

import functools
import inspect

import numpy as np


def on_contiguous(*written):
    """Compile a kernel for C-contiguous arrays alone; `written` names the arguments it writes.

    Numba compiles a function once per combination of its arguments' layouts (C, Fortran, strided),
    and the equivalence suite passes all three: a seven-array backward kernel compiled 36 times, and
    the first test run spent most of its time compiling. The entry this returns hands the compiled
    kernel its arguments as they are when every array is C-contiguous, as the model's and the
    optimizer's always are; otherwise it passes C-contiguous copies and writes the written ones back.
    """
    def decorate(kernel):
        signature = inspect.signature(kernel.py_func)
        positions = [list(signature.parameters).index(name) for name in written]

        @functools.wraps(kernel.py_func)
        def entry(*args, **kwargs):
            if kwargs:
                args = signature.bind(*args, **kwargs).args
            for a in args:  # a loop, not all(...): this runs before every kernel call of every step
                if isinstance(a, np.ndarray) and not a.flags["C_CONTIGUOUS"]:
                    break
            else:
                return kernel(*args)
            work = [np.ascontiguousarray(a) if isinstance(a, np.ndarray) else a for a in args]
            result = kernel(*work)
            for i in positions:
                if i < len(args) and work[i] is not args[i]:
                    args[i][...] = work[i]
            return result

        entry.compiled = kernel  # the Numba dispatcher, for what inspects its compilations
        return entry
    return decorate
