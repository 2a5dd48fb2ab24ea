"""What defines a run: TrainConfig, the settings `fastnet train` takes (config.json records them),
checked by the rules of fastnet.settings; and the named recipes that `--recipe` starts from."""

import dataclasses
import math

from fastnet import backends, precision, settings
from fastnet.errors import FastnetError
from fastnet.model import check_settings as check_model_settings
from fastnet.optim import check_optimizer, check_schedule


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run. The defaults are the recipe `fastnet train` uses."""

    data: str | None = None
    backend: str | None = None
    hidden: tuple = (512, 512)
    epochs: int = 18
    batch_size: int = 128
    optimizer: str = "nesterov"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-3
    schedule: str = "onecycle"
    warmup: float | None = None
    seed: int = 0
    val: int = 0
    test_fraction: float = 0.0       # of an image tree without test/: the share of each class held out to test on
    image_size: tuple | None = None  # (height, width) every image of an image tree is resized to; None: one size
    out: str | None = None
    dtype: str = "float32"
    precision: str = "fp32"          # "bf16": mixed precision, bfloat16 GEMM operands (fastnet.model); "auto"
    activation: str = "relu"
    norm: str | None = None          # "layernorm": on every hidden layer, before the activation
    dropout: float = 0.0             # after every hidden activation
    label_smoothing: float = 0.0
    flip: bool = False               # augmentation: random horizontal flips,
    translate: int = 0               # random shifts of up to this many pixels (zero padding),
    cutout: int = 0                  # and a blanked square of this side
    clip: float | None = None        # gradient clipping by global norm
    pca: int = 0                     # train on this many principal components of the images; 0: pixels
    whiten: bool = False             # with pca: scale each component to unit variance
    tta: str | None = None           # "flip": evaluate on the mean logits of each image and its mirror image;
                                     # "flip+shift": of those two each also shifted a pixel each way
    ema: float | None = None         # decay per step of the weight average evaluated and saved (fastnet.averaging)
    recipe: str | None = None        # the named recipe these settings started from, if any
    checkpoint_every: int | None = None  # steps; a checkpoint is also written after every epoch
    eval_every: int = 1              # evaluate every this many epochs, and after the last

    def check(self):
        """Apply the rule of every setting (fastnet.settings) before anything is read, and ask whether
        this machine can run the backend and precision: SettingError (FastnetError) for the first that no
        run (this machine) can use. Returns what config.json records of the precision: its "precision"
        is the one to run, which "auto" leaves to this machine (fastnet.precision)."""
        self.check_rules()
        backends.get(self.backend)
        return precision.check(self.precision, self.backend, dtype=self.dtype)

    def check_rules(self):
        """The rule of every setting alone, whatever the machine: what the configuration saved in a
        checkpoint must keep (fastnet.checkpoint)."""
        defaults = TrainConfig()
        settings.positive_integer("epochs", self.epochs, defaults.epochs)
        settings.positive_integer("batch_size", self.batch_size, defaults.batch_size)
        settings.widths("hidden", self.hidden, ",".join(map(str, defaults.hidden)))
        check_optimizer(self.optimizer, self.momentum, self.weight_decay)
        check_schedule(self.schedule, self.lr, self.warmup)
        if self.checkpoint_every is not None:
            settings.positive_integer("checkpoint_every", self.checkpoint_every, 1000)
        settings.positive_integer("eval_every", self.eval_every, 5)
        settings.not_negative("val", self.val, "pass 0 for no validation split")
        settings.test_fraction("test_fraction", self.test_fraction)
        settings.image_size("image_size", self.image_size)
        settings.one_of("precision", self.precision, precision.CHOICES)
        check_model_settings(self.dtype, self.activation, self.dropout, self.norm,
                             "fp32" if self.precision == "auto" else self.precision)
        settings.fraction("label_smoothing", self.label_smoothing, 0.1)
        settings.pixels("translate", self.translate)
        settings.pixels("cutout", self.cutout)
        if self.clip is not None:
            settings.positive_number("clip", self.clip, 5, what="gradient norm")
        settings.components("pca", self.pca)
        settings.whitening("whiten", self.whiten, self.pca)
        settings.test_time_augmentation("tta", self.tta)
        if self.ema is not None:
            settings.decay("ema", self.ema, 0.9998)
        settings.seed("seed", self.seed)

    def check_against_data(self, sample_shape, source, training):
        """Apply the rules of the settings that the data limits (fastnet.settings), once a run has its
        data: samples of `sample_shape` from `source`, and `training` training images left after
        `val` went to validation. SettingError (FastnetError for image flags on samples that are not
        images) for the first that this data cannot take."""
        from fastnet.data.components import PCA_SAMPLE  # here: the settings alone need no SciPy

        settings.batch_size_for("batch_size", self.batch_size, training, self.val)
        settings.image_flags_for(self.flip or self.translate or self.cutout or self.tta, sample_shape, source)
        if self.translate:
            settings.translation_for("translate", self.translate, sample_shape)
        if self.cutout:
            settings.cutout_for("cutout", self.cutout, sample_shape)
        if self.pca:
            sampled = training > PCA_SAMPLE  # the components are fitted to a sample of the images
            settings.components_for("pca", self.pca, math.prod(sample_shape), min(training, PCA_SAMPLE), self.val,
                                    sampled_from=training if sampled else None)


# Named starting points for `fastnet train --recipe NAME`; flags given with it override its settings.
# docs/recipes.md says how they were found.
RECIPES = {
    "fast": dict(backend="numba", precision="auto", pca=256, whiten=True, hidden=(1024, 1024), activation="gelu",
                 norm="layernorm", epochs=20, lr=0.05, flip=True, dropout=0.1, label_smoothing=0.1, tta="flip+shift",
                 eval_every=5),
    "best": dict(backend="numba", precision="auto", pca=512, whiten=True, hidden=(2048, 2048), activation="gelu",
                 norm="layernorm", epochs=80, lr=0.03, weight_decay=5e-4, flip=True, translate=2, dropout=0.1,
                 label_smoothing=0.1, tta="flip+shift", eval_every=5),
}


def recipe_config(recipe=None, **settings):
    """The TrainConfig of `recipe` (None: the plain defaults) with `settings` on top. A recipe's
    whitening goes with its components: `pca=0` turns it off too, unless `whiten` is given as well."""
    if recipe is not None and recipe not in RECIPES:
        raise FastnetError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
    chosen = RECIPES.get(recipe, {}) | settings
    if not chosen.get("pca") and "whiten" not in settings:
        chosen.pop("whiten", None)
    return TrainConfig(**chosen, recipe=recipe)
