"""Reading image files: the one set of rules that `fastnet predict` and the image-tree loader share.

A file becomes pixels the same way whoever reads it: oriented as its EXIF tag says, 16-bit grey
scaled rather than clipped to 8 bits, transparent pixels put on white (as a viewer shows them), and
then converted to the Pillow mode asked for. Kept apart from fastnet.predict so that the processes
that decode a training set import Pillow and NumPy, not the trainer.
"""

import os

import numpy as np

from fastnet.errors import FastnetError

# What counts as an image file in a folder. A file named on the command line is tried whatever its
# name: Pillow recognises formats by content.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageError(FastnetError):
    """An image file that cannot be read or used; the message starts with the file's name."""


def is_image_name(name):
    """Whether a file in a folder is taken for an image: by its extension, in any case."""
    return name.lower().endswith(IMAGE_SUFFIXES)


SHOWN = 3  # names a warning line lists before "and N more"


def shown(names):
    """The first few of `names`, for a warning line."""
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def walk(top, tree=None):
    """(image files, skipped files, links not followed) under the folder `top`, as paths relative to
    it, each list sorted. An image file is one with an image suffix, not a dot file. Symbolic links to
    folders are followed, except one whose target is inside a folder already walked or holds one: it
    would loop, or read a folder twice. `tree`, a folder that holds `top` (a class folder's split),
    counts as walked whole. The walk is breadth first in name order, so of two links to one folder the
    shallower is followed."""
    files, skipped, loops = [], [], []
    walked = [os.path.realpath(tree or top)]  # the real folders whose whole trees are read
    pending = [(top, "")]
    while pending:
        folder, relative = pending.pop(0)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as exc:
            raise FastnetError(f"cannot list folder {folder} ({exc.strerror}): check its permissions") from exc
        for entry in entries:
            name = os.path.join(relative, entry.name)
            try:
                is_folder = entry.is_dir()  # through a symbolic link too
            except OSError:
                is_folder = False
            if is_folder:
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if any(_inside(target, tree) or _inside(tree, target) for tree in walked):
                        loops.append(name)
                        continue
                    walked.append(target)
                pending.append((entry.path, name))
            elif entry.name.startswith(".") or not is_image_name(entry.name):
                skipped.append(name)
            else:
                files.append(name)
    return sorted(files), sorted(skipped), sorted(loops)


def unfollowed(where, loops, done):
    """The one warning line that names the links to folders walk did not follow under `where`; each
    image is `done` once ("read", "classified")."""
    noun = "link" if len(loops) == 1 else "links"
    return (f"did not follow {len(loops)} symbolic {noun} to folders in {where} that would loop or read a folder "
            f"twice (each image is {done} once): {shown(loops)}")


def _inside(path, folder):
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def pillow():
    try:
        from PIL import Image, ImageOps
    except ImportError as exc:
        raise FastnetError("Pillow is not installed, and fastnet reads image files with it: "
                           "pip install pillow") from exc
    return Image, ImageOps


def decode(path, mode):
    """The pixels of the image file at `path` in Pillow `mode` ("L", "RGB" or "RGBA"), as uint8 of
    shape (height, width) or (height, width, channels), at the file's own size after EXIF rotation."""
    Image, ImageOps = pillow()
    if not os.path.exists(path):
        raise ImageError(f"{path}: no such file; check the path")
    # Pillow raises a zoo of types on malformed files (OSError, SyntaxError, ValueError, struct.error,
    # DecompressionBombError, ...); each of them means "this file cannot be used", and is reported so.
    try:
        opened = Image.open(path)  # reads the header only
    except PermissionError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror}); check its permissions") from exc
    except Exception as exc:
        raise ImageError(f"{path}: {describe(exc)}; pass a PNG, JPEG or BMP image") from exc
    with opened:
        try:
            opened.load()
        except Exception as exc:  # the header was fine, so it is the file that is broken
            raise ImageError(f"{path}: this {opened.format or 'image'} file is damaged or truncated, so its pixels "
                             f"cannot be read; replace it with an intact copy") from exc
        try:
            ImageOps.exif_transpose(opened, in_place=True)  # in place: most files need no turn, and no copy
            return np.asarray(to_mode(opened, mode), dtype=np.uint8)
        except Exception as exc:
            raise ImageError(f"{path}: {describe(exc)}; pass a PNG, JPEG or BMP image") from exc


def resize(pixels, height, width):
    """uint8 pixels stretched (not cropped) to height x width with Pillow's antialiasing Lanczos filter."""
    Image, _ = pillow()
    return np.asarray(Image.fromarray(pixels).resize((width, height), Image.Resampling.LANCZOS), dtype=np.uint8)


def to_mode(picture, mode):
    Image, _ = pillow()
    if picture.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit and float greyscale: convert() would clip to 255 rather than scale.
        values = np.asarray(picture, dtype=np.float64)
        top = values.max() if values.size else 0
        scale = 255.0 / 65535.0 if top > 255 else 1.0
        picture = Image.fromarray(np.clip(values * scale, 0, 255).astype(np.uint8))
    if mode != "RGBA" and ("A" in picture.mode or "transparency" in picture.info):
        # Put transparent pixels on white, as a viewer shows them, instead of on whatever colour the
        # transparent pixels happen to carry (often black).
        rgba = picture.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        picture = Image.alpha_composite(background, rgba)
    return picture if picture.mode == mode else picture.convert(mode)


def describe(exc):
    from PIL import Image, UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image file Pillow can read"
    if isinstance(exc, Image.DecompressionBombError):
        return "too many pixels to decode safely"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
