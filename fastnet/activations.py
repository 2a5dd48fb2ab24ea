"""The hidden layers' activations, each described once: its kernels, the scalars they take, and
which array its backward pass reads. The model calls the kernels through these descriptions, and
the tests build their cases from them.

Every activation's kernels share one argument order (see numpy_backend.py):

    <name>_forward(x, *scalars, out, out16=None)
    <name>_backward(dout, saved, *scalars, dx)
    dense_<name>_forward(x, W, b, *scalars, [pre,] out, out16=None)      pre when backward reads the input
    dense_<name>_backward(dout, saved, x, W, *scalars, dW, db, dx, dout16=None)

where `saved` is the activation's output, or its input for GELU, whose derivative is cheapest from
the input. ReLU's standalone backward is relu_backward, like the others'.
"""

import dataclasses

LEAKY_RELU_SLOPE = 0.01


@dataclasses.dataclass(frozen=True)
class Activation:
    name: str
    scalars: tuple = ()        # the kernels' arguments after their arrays' inputs: leaky ReLU's slope
    reads_input: bool = False  # backward needs the activation's input (GELU), else its output

    @property
    def forward(self):
        return f"{self.name}_forward"

    @property
    def backward(self):
        return f"{self.name}_backward"

    @property
    def dense_forward(self):
        return f"dense_{self.name}_forward"

    @property
    def dense_backward(self):
        return f"dense_{self.name}_backward"


ACTIVATIONS = {a.name: a for a in (
    Activation("relu"),
    Activation("leaky_relu", scalars=(LEAKY_RELU_SLOPE,)),
    Activation("gelu", reads_input=True),
    Activation("tanh"),
)}
