"""Writing files so that a failure loses nothing.

Each file is written under a temporary name beside its final one, flushed to disk and renamed over
it: a reader, a crash or a full disk leaves either the old file or the new one, never a mix, and a
write that fails removes its temporary.
"""

import contextlib
import os
import tempfile

TEMPORARY_PREFIX = ".tmp-fastnet-"


def write_atomically(path, write):
    """Call write(binary file) on a temporary file beside `path`, flush it to disk, then rename it
    over `path`. A crash at any moment leaves either the old file or the new one, never a mix: the
    rename is atomic, and the fsync makes sure the data is on disk before the name points at it."""
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=folder)
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual mode
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def write_text_atomically(path, text):
    write_atomically(path, lambda f: f.write(text.encode()))


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_temporaries(folder):
    """Delete what a killed writer left behind: temporaries are never read, only renamed."""
    for name in os.listdir(folder):
        if name.startswith(TEMPORARY_PREFIX):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(folder, name))
