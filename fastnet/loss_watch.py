"""Noticing a run that is blowing up: a training loss that rises many-fold. The NaN check
(fastnet.step.diverged) misses a run that survives its blow-up and ends far below where it was
heading; this one warns, once, and the run goes on.

The watch reads the loss each step already returns, a Python float, and compares the mean loss of
consecutive blocks of steps with the lowest block mean so far, which starts at ln(classes): the loss
of a uniform guess, near which an untrained network starts, so that a run that blows up in its first
block is seen too. It changes no number of the run.
The thresholds come from the runs that docs/recipes.md ("When the loss blows up") sums up.
"""

import dataclasses
import math

from fastnet.config import TrainConfig

# A block is the steps of this many images (25 at the default batch of 128), an epoch at most: long
# enough that its mean moves little by chance, short enough to see a blow-up in the epoch it starts.
BLOCK_IMAGES = 3200
# In the runs on CIFAR-10 of benchmarks/RESULTS.md, those that trained well rose at most 1.32-fold over
# their lowest block (the one-cycle warm-up's noise included), those that wobbled at too high a rate and
# recovered up to 1.72-fold, the blow-ups at least 2.23-fold, most of them tens- to millions-fold.
RISE = 2.0
# A rise is measured from this share of ln(classes), a uniform guess's loss, at least: below it a
# network fits its training set so nearly that a few hard images can double a block's mean.
FLOOR = 0.1


@dataclasses.dataclass
class LossWatch:
    """Block means of the training loss, the lowest so far, and the first block that rose RISE-fold
    above it. Plain numbers: the checkpoint keeps them with the run's Progress, so a resumed run
    warns where, and as often as, one that never stopped."""

    block: int                 # steps per block
    floor: float               # the least loss a rise is measured from
    lowest: float              # the lowest block mean so far
    total: float = 0.0         # the current block's losses so far,
    steps: int = 0             # and its steps
    rise: list | None = None   # [lowest, block mean] when a block first rose RISE-fold
    warned: bool = False

    @classmethod
    def for_run(cls, batch_size, steps_per_epoch, classes):
        guess = math.log(classes)
        return cls(max(1, min(steps_per_epoch, round(BLOCK_IMAGES / batch_size))), FLOOR * guess, guess)

    def see(self, loss):
        """One step's mean loss."""
        self.total += loss
        self.steps += 1
        if self.steps == self.block:
            mean = self.total / self.block
            self.total, self.steps = 0.0, 0
            if self.rise is None and mean > RISE * max(self.lowest, self.floor):
                self.rise = [self.lowest, mean]
            self.lowest = min(self.lowest, mean)

    def warning(self, epoch, lr, batch_size, train_size):
        """The line that says the run is blowing up, the first time it is asked after a block rose;
        None otherwise. `lr` is the run's --lr, `train_size` its number of training images."""
        if self.rise is None or self.warned:
            return None
        self.warned = True
        low, high = self.rise
        lower, larger = suggestion(lr, batch_size)
        batch = f" or raise --batch-size to {larger}" if larger <= train_size else ""
        return (f"warning: the training loss rose {high / low:.3g}-fold in epoch {epoch}, from {low:.3g} to "
                f"{high:.3g} (means over {self.block} steps): the run is blowing up at --lr {lr:g} with --batch-size "
                f"{batch_size}; lower --lr to {lower:.3g}{batch} (see 'When the loss blows up' in docs/recipes.md)")


def suggestion(lr, batch_size):
    """(a learning rate, a batch size at `lr`) to try after a blow-up: at most half the ratio of rate to
    batch size that blew up, and at most the defaults' ratio (--lr 0.05 per 128 images), which did not
    blow up any measured network but one 2048-wide hidden layer, and, scaled down with the batch,
    cured --hidden 128 at 64 and 32."""
    lower = min(lr / 2, TrainConfig.lr * batch_size / TrainConfig.batch_size)
    return lower, round(batch_size * lr / lower)
