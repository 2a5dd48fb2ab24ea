"""Reading image files: the one set of rules that `fastnet predict` and the image-tree loader share.

A file becomes pixels the same way whoever reads it: oriented as its EXIF tag says, 16-bit grey
scaled rather than clipped to 8 bits, transparent pixels put on white (as a viewer shows them), and
then converted to the Pillow mode asked for. Kept apart from fastnet.predict so that the processes
that decode a training set import Pillow and NumPy, not the trainer.

Only a regular file is read, and only up to a limit: a named pipe or a device where an image should be
would block the reader or never end, and a few bytes of PNG can declare 50,000 x 50,000 pixels (7.5 GB
of RGB). Symbolic links are followed wherever they lead (a dataset of links into a shared store of
pictures is common), but what they reach is held to the same rules.
"""

import errno
import math
import os
import stat
import warnings

import numpy as np

from fastnet.errors import FastnetError

# What counts as an image file in a folder. A file named on the command line is tried whatever its
# name: Pillow recognises formats by content.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class ImageError(FastnetError):
    """An image file that cannot be read or used; the message starts with the file's name."""


# The most pixels an image may declare: 64 megapixels, far beyond any picture a network of fastnet's is
# trained on or classifies (each is resized to its input size; CIFAR-10's is 32 x 32), and below
# Pillow's own warning (89 megapixels), so that no image fastnet decodes makes Pillow warn.
MAX_PIXELS = 64_000_000
MAX_PIXELS_TEXT = f"{MAX_PIXELS // 10**6} megapixels ({math.isqrt(MAX_PIXELS)} x {math.isqrt(MAX_PIXELS)})"
# The largest file read as an image: 1 GiB, above the largest image within MAX_PIXELS stored
# uncompressed (16-bit RGBA, 8 bytes a pixel: 512 MB).
MAX_FILE_BYTES = 2**30
MAX_FILE_TEXT = f"{MAX_FILE_BYTES // 2**30} GiB"

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


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


def regular_file(path):
    """os.stat of the file at `path`, through symbolic links, when it may be read as an image: an
    ImageError otherwise, whose message names what it is instead (a link that loops or leads nowhere,
    a named pipe, a device, a file larger than MAX_FILE_BYTES). Nothing is opened."""
    try:
        found = os.stat(path)
    except OSError as exc:
        raise ImageError(f"{path}: {_unreachable(path, exc)}") from exc
    for is_kind, kind in _KINDS:
        if is_kind(found.st_mode):
            raise ImageError(f"{path}: {_through_link(path, kind)}, not a regular file, and only regular files are "
                             f"read as images; replace it with an image file, or remove it")
    if found.st_size > MAX_FILE_BYTES:
        raise ImageError(f"{path}: a file of {found.st_size / 2**30:.1f} GiB, larger than any image fastnet decodes "
                         f"needs ({MAX_FILE_TEXT} at most), so it is not read; replace it with an image file, or "
                         f"remove it")
    return found


def _unreachable(path, exc):
    """Why os.stat failed, in the user's words, with what to do."""
    link = os.path.islink(path)
    if link and exc.errno == errno.ELOOP:
        return "a symbolic link that loops (following it leads back to it); fix or remove the link"
    if link and exc.errno == errno.ENOENT:
        return f"a symbolic link to {os.readlink(path)}, which does not exist; fix or remove the link"
    if exc.errno == errno.ENOENT:
        return "no such file; check the path"
    if exc.errno == errno.EACCES:
        return f"cannot be read ({exc.strerror}); check its permissions"
    return f"cannot be read ({exc.strerror}); check the file"


def _through_link(path, kind):
    return f"a symbolic link to {os.readlink(path)}, which is {kind}" if os.path.islink(path) else kind


def _open_regular(path):
    """The file at `path`, opened for reading only if regular_file allows it. The open does not wait
    (O_NONBLOCK), and what was opened is checked again, in case the name changed hands in between."""
    regular_file(path)
    try:
        handle = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise ImageError(f"{path}: {_unreachable(path, exc)}") from exc
    if not stat.S_ISREG(os.fstat(handle).st_mode):
        os.close(handle)
        raise ImageError(f"{path}: not a regular file, and only regular files are read as images; replace it with "
                         f"an image file, or remove it")
    return os.fdopen(handle, "rb")


def too_many_pixels(path, size=None):
    """The ImageError of a file whose header declares more than MAX_PIXELS: `size` (width, height)
    when known, else only that it declares more (Pillow refused it first)."""
    declared = f"{size[0]} x {size[1]} pixels, more than" if size else "more than"
    return ImageError(f"{path}: its header declares {declared} the {MAX_PIXELS_TEXT} fastnet decodes, so its "
                      f"pixels are not read; resize it, or replace it with a smaller image")


def decode(path, mode):
    """The pixels of the image file at `path` in Pillow `mode` ("L", "RGB" or "RGBA"), as uint8 of
    shape (height, width) or (height, width, channels), at the file's own size after EXIF rotation.
    Refused before decoding: what regular_file refuses, and a header that declares more than MAX_PIXELS."""
    Image, _ = pillow()
    with _open_regular(path) as file, warnings.catch_warnings():
        # Pillow warns on stderr of images over its own limit, all of which are over MAX_PIXELS and
        # refused below in one line; beyond twice its limit it raises DecompressionBombError.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        opened = _header(path, file)
        with opened:
            if opened.width * opened.height > MAX_PIXELS:
                raise too_many_pixels(path, opened.size)
            return _pixels(path, opened, mode)


def _header(path, file):
    """The image Pillow opens from `file`, having read its header only."""
    Image, _ = pillow()
    # Pillow raises a zoo of types on malformed files (OSError, SyntaxError, ValueError, struct.error,
    # DecompressionBombError, ...); each of them means "this file cannot be used", and is reported so.
    try:
        return Image.open(file)
    except Image.DecompressionBombError as exc:
        raise too_many_pixels(path) from exc
    except Exception as exc:
        raise ImageError(f"{path}: {describe(exc)}; pass a PNG, JPEG or BMP image") from exc


def _pixels(path, opened, mode):
    """The pixels of an image whose header Pillow has read, decoded and converted as decode says."""
    Image, ImageOps = pillow()
    try:
        opened.load()
    except Image.DecompressionBombError as exc:  # a frame or tile of a file larger than the image it declares
        raise too_many_pixels(path) from exc
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
    from PIL import UnidentifiedImageError

    if isinstance(exc, UnidentifiedImageError):
        return "not an image file Pillow can read"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
