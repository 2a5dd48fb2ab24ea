"""The rule of every setting, written once.

A setting is a value a person chooses: a flag of `fastnet train`, a field of TrainConfig, an argument
of MLP, Optimizer, Schedule or Augmentation. The classes apply the rules of their own arguments
through these functions, and TrainConfig.check applies all of them before a run reads any data, so
a bad flag costs no wait. A broken rule raises SettingError, whose message names the setting as its
reader spells it: `dropout` from Python, `--dropout` from the command line.

Each function returns the value it checked, converted where the rule says so (an int, a float).
"""

import math
import numbers

from fastnet.errors import FastnetError, SettingError


def positive_integer(setting, value, example):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise SettingError(setting, f"{{setting}} must be a positive integer, got {value}: pass one such as {example}")
    return int(value)


def positive_number(setting, value, example, what="number"):
    if not (isinstance(value, numbers.Real) and value > 0 and math.isfinite(value)):
        raise SettingError(setting, f"{{setting}} must be a positive {what}, got {value}: pass one such as {example}")
    return float(value)


def not_negative(setting, value, advice):
    """0 or more, and finite; `advice` ends the message, e.g. 'pass 0 for none'."""
    if not (isinstance(value, numbers.Real) and value >= 0 and math.isfinite(value)):
        raise SettingError(setting, f"{{setting}} must be 0 or more, got {value}: {advice}")
    return value


def fraction(setting, value, example, what="must be in [0, 1)"):
    """A number in [0, 1): a rate, a probability, a share of the run."""
    if not (isinstance(value, numbers.Real) and 0 <= value < 1):
        raise SettingError(setting, f"{{setting}} {what}, got {value}: pass one such as {example}")
    return float(value)


def decay(setting, value, example):
    """The decay of a moving average per step: in (0, 1), where 0 would forget all but the last value
    and 1 never move."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) and 0 < value < 1):
        raise SettingError(setting, f"{{setting}} is a decay per step, in (0, 1), got {value}: pass one such as "
                                    f"{example}")
    return float(value)


def test_fraction(setting, value):
    """The share of an image tree's train/ held out as its test split when it has no test/; 0: none."""
    return fraction(setting, value, 0.1, what="is the share of train/ held out as the test split, in [0, 1)")


def image_size(setting, value):
    """(height, width) that every image of an image tree is resized to, or None: the images must then
    have one size. Written HxW, "32x32", on the command line; a pair from Python."""
    if value is None:
        return None
    given = value
    if isinstance(value, str):
        try:
            value = tuple(int(part) for part in value.lower().split("x"))
        except ValueError:
            value = ()
    if not (isinstance(value, (tuple, list)) and len(value) == 2
            and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise SettingError(setting, f"{{setting}} is a size in pixels, height x width, got {given!r}: pass one such "
                                    f"as 32x32")
    return int(value[0]), int(value[1])


def seed(setting, value):
    """What NumPy's generators take as a seed: an integer, 0 or more."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise SettingError(setting, f"{{setting}} must be an integer 0 or more, got {value}: pass one such as 0")
    return int(value)


def pixels(setting, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise SettingError(setting, f"{{setting}} is a size in pixels, got {value}: pass 0 or more")
    return int(value)


def one_of(setting, value, choices, advice=None):
    """One of `choices`; `advice` replaces the list of them in the message where a list would mislead
    (e.g. a choice of None)."""
    if value not in choices:
        advice = advice or f"choose one of {', '.join(map(str, choices))}"
        raise SettingError(setting, f"unknown {{setting}} {value!r}: {advice}")
    return value


def widths(setting, values, example, at_least=1):
    """Layer widths: at least `at_least` of them, each a positive integer."""
    values = tuple(values) if values is not None else ()
    if (len(values) < at_least or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in values)
            or min(values, default=1) < 1):  # min() after the types: "lots" would not compare with 1
        what = "a comma list of positive widths" if at_least == 1 else f"at least {at_least} positive widths"
        raise SettingError(setting, f"{{setting}} must be {what}, got {values}: pass one such as {example}")
    return tuple(int(v) for v in values)


# Test-time augmentations (--tta): None evaluates each image as it is; "flip" on the mean of the logits
# of the image and of its mirror image, which a network trained with --flip has learnt to classify alike;
# "flip+shift" on the mean over those two, each also moved a pixel each way, for one trained with
# --translate too (fastnet.data.tta_views).
TEST_TIME_AUGMENTATIONS = (None, "flip", "flip+shift")


def components(setting, value):
    """A number of principal components to train on (--pca); 0 trains on the pixels."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise SettingError(setting, f"{{setting}} must be a number of components, got {value}: pass one such as 256, "
                                    f"or 0 for none")
    return int(value)


def whitening(setting, whiten, pca):
    """--whiten scales the principal components of --pca `pca`: without them it has nothing to scale."""
    if whiten and not pca:
        raise SettingError(setting, "{setting} scales principal components, and this run has none: add --pca K "
                                    "(for example --pca 256) or drop {setting}")
    return bool(whiten)


def test_time_augmentation(setting, value):
    """One of TEST_TIME_AUGMENTATIONS; the command line spells None as none."""
    if value not in TEST_TIME_AUGMENTATIONS:
        raise SettingError(setting, f"{{setting}} {value!r} is not a test-time augmentation: choose flip, flip+shift "
                                    "or none")
    return value


# --- Settings against the data they meet -----------------------------------------------------------
# TrainConfig.check_against_data applies these once a run has its data and its validation split, before
# it builds anything or writes its folder. `training` is the number of training images the run trains
# on, `held_out` how many --val took from them for validation.

def _training_images(training, held_out):
    noun = "image" if training == 1 else "images"
    left = f" left after {held_out} are held out for validation" if held_out else ""
    return f"the {training} training {noun}{left}"


def _or_hold_out_fewer(held_out):
    return f", or hold out fewer than {held_out} for validation" if held_out else ""


def batch_size_for(setting, value, training, held_out=0):
    """A batch is drawn from the training images: at most all of them."""
    if value > training:
        raise SettingError(setting, f"{{setting}} {value} is larger than {_training_images(training, held_out)}: "
                                    f"pass at most {training}{_or_hold_out_fewer(held_out)}")
    return value


def components_for(setting, count, inputs, images, held_out=0, sampled_from=None):
    """K principal components (--pca K) are K directions among the `inputs` of a sample, fitted to
    `images` images: the training images (those left after `held_out` went to validation), or a
    sample of them when `sampled_from`, the number of training images, is given. They need K of each."""
    limit = min(inputs, images)
    if count <= limit:
        return count
    which, advice = "", ""
    if images < inputs:  # the images are what is short
        if sampled_from:
            which = f" (a sample of the {sampled_from} training images)"
        elif held_out:
            which = f" (those left after {held_out} are held out for validation)"
            advice = _or_hold_out_fewer(held_out)
    raise SettingError(setting, f"{{setting}} {count} asks for more components than {images} images{which} of "
                                f"{inputs} inputs can give: pass at most {limit}{advice}")


def image_flags_for(asked, sample_shape, source):
    """Flips, in training or at test time, shifts and cutouts (`asked`: whether a run asks for any)
    move pixels along a height and a width: the samples of `source` must have them."""
    if asked and len(sample_shape) not in (2, 3):
        raise FastnetError(f"--flip, --translate, --cutout and --tta need images, but the samples of {source} have "
                           f"shape {tuple(sample_shape)}: drop those flags")


def translation_for(setting, value, sample_shape):
    """A shift as large as the image's shorter side can move all of it out of view, leaving a blank."""
    height, width = sample_shape[:2]
    if value >= min(height, width):
        raise SettingError(setting, f"{{setting}} {value} can shift the {height}x{width} images wholly out of "
                                    f"view: pass at most {min(height, width) - 1}")
    return value


def cutout_for(setting, value, sample_shape):
    """The blanked square fits in the image."""
    height, width = sample_shape[:2]
    if value > min(height, width):
        raise SettingError(setting, f"{{setting}} {value} is a square larger than the {height}x{width} images: "
                                    f"pass at most {min(height, width)}")
    return value
