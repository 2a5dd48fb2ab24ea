"""Weight averaging (`fastnet train --ema DECAY`): an exponential moving average of the parameters,
which the run evaluates every epoch and saves as its model.

After every optimizer step t, counted from 1 over the whole run, every parameter (the weights, the
biases, layer norm's gains and biases) moves its average towards it:

    average = d_t * average + (1 - d_t) * param,    d_t = min(DECAY, (1 + t) / (10 + t))

The average starts equal to the initial parameters. The warm-up (1 + t) / (10 + t), as in
TensorFlow's ExponentialMovingAverage given num_updates, keeps those from dominating it early on: d_t
is 0.18 at step 1, 0.9 at step 80 and 0.99 at step 890, and reaches a DECAY of 0.9998 only after
44,990 steps; until then the average is, roughly, of the last tenth of the steps so far.

Averaging reads every parameter once a step, less traffic than the optimizer's own update, so it runs
on every step: measured on the --recipe best network (benchmarks/RESULTS.md, "Weight averaging"),
the pass is about 3 % of a step, and updating every 4 steps with d_t**4 saved less than the steps'
own spread, for one more rule.

The average follows the float32 master weights in bf16 mixed precision (it never reads the bfloat16
copies), and every rank of a data-parallel run holds the same parameters and so the same average. A
checkpoint keeps it as `ema_<i>`, beside the raw parameters and the optimizer's state, so a resumed
run continues it exactly.
"""

from fastnet import settings
from fastnet.model import MLP

WARMUP_OFFSET = 10  # d_t = (1 + t) / (10 + t) early on


def decay_at(decay, step):
    """The decay d_t of step `step` (counted from 1): DECAY, or less while the run warms up."""
    return min(decay, (1 + step) / (WARMUP_OFFSET + step))


class WeightAverage:
    """The moving average of `net`'s parameters, held as the parameters of a network of its own
    (`model`), which evaluation runs and checkpoint.save writes like any other. It computes in float32
    whatever the training precision: evaluation and saved models always do."""

    def __init__(self, net, decay):
        self.decay = settings.decay("ema", decay, 0.9998)
        self.net = net  # the network it follows, through whose kernels it updates
        self.model = MLP(net.sizes, backend=net.backend, dtype=net.dtype, **net.spec())
        self.restart()

    def restart(self):
        """Start the average again from the parameters as they are (a run, or a warm start, begins)."""
        self.model.load_params(self.net.params)

    def update(self, step):
        """Move the average after optimizer step `step` (counted from 1)."""
        decay = decay_at(self.decay, step)
        for average, param in zip(self.model.params, self.net.params, strict=True):
            self.net.kernels.ema_update(average, param, decay)

    def state_arrays(self):
        """The averages as a flat {name: array} mapping, for checkpoints."""
        return {f"ema_{i}": a for i, a in enumerate(self.model.params)}

    def load_state_arrays(self, arrays):
        """Restore what state_arrays() returned, into the existing arrays: KeyError for a missing one,
        ValueError for one of another shape or dtype."""
        for i, a in enumerate(self.model.params):
            saved = arrays[f"ema_{i}"]
            if saved.shape != a.shape or saved.dtype != a.dtype:
                raise ValueError(f"ema_{i} is {saved.dtype} {saved.shape} where the network needs {a.dtype} {a.shape}")
            a[...] = saved
