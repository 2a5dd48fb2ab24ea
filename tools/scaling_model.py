"""The communication cost of data-parallel training (`fastnet train --distributed`) on paper, against
measured training speeds: how large each machine's share of a batch must be for N machines to keep a
scaling efficiency.

    python tools/scaling_model.py --speed R1=13900 --speed best=2560 [--machines 8] [--efficiency 0.9]

--speed NAME=S: S training samples per second that one machine reaches on workload NAME (R1, R2, or
best: `--recipe best`'s network, 512 principal components, 2048-2048 with layer norm, batch 128), as
tools/compare_workloads.py and `fastnet train` measure them.

The model. A step sums every gradient across the N machines: 4 bytes per parameter in one flat buffer
(fastnet.distributed). A ring all-reduce (what fastnet's reduce-scatter plus all-gather moves) sends and
receives 2 (N - 1) / N of the buffer on each machine's link and takes 2 (N - 1) message latencies, so

    T = 2 (N - 1) / N * bytes / bandwidth + 2 (N - 1) * latency.

A machine computes its share of b samples in b / S seconds. Without overlap the efficiency is
E = (b / S) / (b / S + T), so E >= e needs b >= S * T * e / (1 - e).

With overlap (`--overlap`), the upper layers' gradients are summed while backward computes the first
layer's weight gradient, the last product of a step: at best, their share u of the bytes travels
within that product's share w of the step's FLOPs, and the visible time is T - min(u T, w b / S).
The columns "with overlap" are that bound, for a CPU that the sending costs nothing; on one 2-core
machine the thread that sends took more from the computing cores than it hid (docs/data-parallel.md,
benchmarks/RESULTS.md).
"""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fastnet.workloads import WORKLOADS, flops_per_sample, parameter_count, product_flops

# --recipe best's network on its 512 components (fastnet.config.RECIPES), with layer norm, batch 128.
NETWORKS = {name: (w.sizes, False, w.batch_size) for name, w in WORKLOADS.items()} | {
    "best": ((512, 2048, 2048, 10), True, 128)}
LINKS = {"10 Gbit/s": 10e9 / 8, "100 Gbit/s": 100e9 / 8}  # bytes per second
LATENCY = 10e-6  # seconds per message: TCP over a data-centre Ethernet switch, order of magnitude


def all_reduce_seconds(size_bytes, machines, bandwidth, latency=LATENCY):
    return 2 * (machines - 1) / machines * size_bytes / bandwidth + 2 * (machines - 1) * latency


def smallest_share(samples_per_second, seconds, efficiency):
    return math.ceil(samples_per_second * seconds * efficiency / (1 - efficiency))


def overlap_shares(sizes, layernorm):
    """(u, w): the share of the summed bytes that the layers above the first hold, and the share of a
    step's FLOPs of the first layer's weight gradient, which backward computes after them."""
    first = sizes[0] * sizes[1] + sizes[1] + (2 * sizes[1] if layernorm and len(sizes) > 2 else 0)
    total = parameter_count(sizes, layernorm)
    return (total - first) / total, product_flops(1, sizes[0], sizes[1]) / flops_per_sample(sizes)


def overlapped_efficiency(batch, samples_per_second, seconds, upper, window):
    compute = batch / samples_per_second
    return compute / (compute + seconds - min(upper * seconds, window * compute))


def smallest_overlapped_share(samples_per_second, seconds, efficiency, upper, window):
    batch = 1  # the efficiency grows with the batch: the first that reaches it
    while overlapped_efficiency(batch, samples_per_second, seconds, upper, window) < efficiency:
        batch += 1
    return batch


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--speed", action="append", required=True, metavar="NAME=S",
                        help="samples per second of one machine on workload NAME (R1, R2, best)")
    parser.add_argument("--machines", type=int, default=8)
    parser.add_argument("--efficiency", type=float, default=0.9)
    args = parser.parse_args()
    print(f"| workload | parameters | bytes per step | link | all-reduce on {args.machines} | step at its batch, "
          f"one machine | efficiency at that batch | smallest per-machine batch for {args.efficiency:.0%} | with "
          f"overlap: efficiency at that batch | with overlap: smallest batch for {args.efficiency:.0%} |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    shares = []
    for item in args.speed:
        name, _, speed = item.partition("=")
        sizes, layernorm, batch = NETWORKS[name]
        speed = float(speed)
        params = parameter_count(sizes, layernorm)
        size = 4 * params
        step = batch / speed
        upper, window = overlap_shares(sizes, layernorm)
        for link, bandwidth in LINKS.items():
            t = all_reduce_seconds(size, args.machines, bandwidth)
            print(f"| {name} (batch {batch}) | {params:,} | {size / 1e6:.1f} MB | {link} | {t * 1e3:.1f} ms | "
                  f"{step * 1e3:.1f} ms | {step / (step + t):.0%} | {smallest_share(speed, t, args.efficiency):,} | "
                  f"{overlapped_efficiency(batch, speed, t, upper, window):.0%} | "
                  f"{smallest_overlapped_share(speed, t, args.efficiency, upper, window):,} |")
        shares.append(f"{name}: the layers above the first hold {upper:.1%} of the bytes; the first layer's "
                      f"weight gradient is {window:.1%} of a step's FLOPs")
    print("\n" + "\n".join(shares))


if __name__ == "__main__":
    main()
