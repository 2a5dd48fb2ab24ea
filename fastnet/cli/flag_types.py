"""The types of the command line's flags: each turns a flag's text into its value. Text that is no
value is argparse's one-line complaint, which names the flag and says what to type instead; a value
that a setting's rule judges (none_word, tta_flag) gets that rule's message (fastnet.settings)."""

import argparse

from fastnet import settings
from fastnet.errors import SettingError
from fastnet.model import NORMS


def whole_number(text, minimum=None):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if minimum is not None and value < minimum:
        raise argparse.ArgumentTypeError(f"{text} is {'not positive' if minimum > 0 else 'negative'}")
    return value


def positive_int(text):
    return whole_number(text, 1)


def widths(text):
    """--hidden: a comma list of positive integers, e.g. 512,512."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of positive integers, e.g. 512,512")
    return values


def image_size(text):
    """--image-size: HxW, e.g. 32x32."""
    try:
        return settings.image_size("image_size", text)
    except SettingError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size HxW in pixels, e.g. 32x32") from None


def norm_name(text):
    """--norm: layernorm, or none for None. The rule is the one MLP applies to its norm (settings.one_of
    over model.NORMS); the message is the command line's, which spells None as none."""
    try:
        return settings.one_of("norm", none_word(text), NORMS)
    except SettingError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a normalisation: choose layernorm or none") from None


def decay_or_none(text):
    """--ema: a decay for the settings' rule to judge, or none for no average (how a recipe's is
    turned off)."""
    if text == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a decay: pass one such as 0.9998, or none") from None


def none_word(text):
    """The command line's none as Python's None; any other word as it is, for the setting's rule
    (fastnet.settings) to judge, so that its message is the one the Python API gives."""
    return None if text == "none" else text


def tta_flag(args):
    """evaluate's and predict's --tta as report and predict take it: "run" when not given."""
    if args.tta is None:
        return "run"
    return settings.test_time_augmentation("tta", none_word(args.tta))


def names(text):
    """--backend for bench: a comma list of backend names."""
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of backend names, e.g. numpy,numba")
    return values
