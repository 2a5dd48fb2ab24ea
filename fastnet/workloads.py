"""The fixed workloads that fastnet's speed is measured on, and what one training sample of a network
costs in FLOPs.

`fastnet bench`, tools/compare_workloads.py, the asv suite (benchmarks/) and the pytest-benchmark
kernels (tests/benchmarks/) all read R1 and R2 from here, so a figure from one harness names the same
network as a figure from another.

This file imports nothing from fastnet: the asv suite loads it from the source tree by path, so that
a benchmark of an older commit, which has no fastnet.workloads, still measures these networks.
"""

from dataclasses import dataclass
from itertools import pairwise

# Every workload trains in float32 with SGD and heavy-ball momentum 0.9, on whole epochs of CIFAR-10's
# 50,000 training images (or synthetic images of their shape, where a harness needs no dataset).
DTYPE = "float32"
MOMENTUM = 0.9


@dataclass(frozen=True)
class Workload:
    name: str
    sizes: tuple[int, ...]  # layer widths, the 3072 inputs of a 32 x 32 x 3 image first
    batch_size: int

    @property
    def hidden(self) -> tuple[int, ...]:
        return self.sizes[1:-1]

    @property
    def flops_per_sample(self) -> int:
        return flops_per_sample(self.sizes)

    def __str__(self) -> str:
        return f"{self.name}: MLP {'-'.join(map(str, self.sizes))}, batch {self.batch_size}"


R1 = Workload("R1", (3072, 512, 512, 10), 128)
R2 = Workload("R2", (3072, 128, 10), 64)  # the network fastnet started from
WORKLOADS = {workload.name: workload for workload in (R1, R2)}


def product_flops(rows, inner, columns) -> int:
    """FLOPs of the product of a (rows, inner) and an (inner, columns) matrix: a multiply and an add
    for each of the inner terms of each output element. Every FLOP rate fastnet prints counts this."""
    return 2 * rows * inner * columns


def flops_per_sample(sizes) -> int:
    """Useful FLOPs of one training sample through layers of these widths: per layer, the forward
    product, the weight gradient and the input gradient are product_flops(1, fan_in, fan_out) each,
    except the first layer's input gradient, which no trainer computes. Bias, activation, loss and
    update are left out: they are memory-bound, and a FLOP rate against the sgemm peak is about the
    products."""
    layer_flops = [product_flops(1, fan_in, fan_out) for fan_in, fan_out in pairwise(sizes)]
    return 3 * sum(layer_flops) - layer_flops[0]


def parameter_count(sizes, layernorm=False) -> int:
    """Weights and biases of layers of these widths, and layer norm's gain and bias on every hidden
    layer: what a data-parallel step sums across processes."""
    dense = sum(fan_in * fan_out + fan_out for fan_in, fan_out in pairwise(sizes))
    return dense + (2 * sum(sizes[1:-1]) if layernorm else 0)


def named(sizes, batch_size) -> str | None:
    """The name of the workload with these layer widths and batch size, or None."""
    for workload in WORKLOADS.values():
        if tuple(sizes) == workload.sizes and batch_size == workload.batch_size:
            return workload.name
    return None
