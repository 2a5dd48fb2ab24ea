"""Writing files so that a failure loses nothing, and what a write the storage refuses says.

Each file is written under a temporary name beside its final one, flushed to disk and renamed over
it: a reader, a crash or a full disk leaves either the old file or the new one, never a mix, and a
write that fails removes its temporary. A write the storage refuses (a full disk, a quota, an I/O
error, a filesystem gone read-only) is a StorageError that names the file, the system's reason and
what to do; one refused for its path (a missing folder, no permission) stays an OSError, for the
caller to say which path to pass instead.
"""

import contextlib
import errno
import os
import tempfile

from fastnet.errors import FastnetError, StorageError

TEMPORARY_PREFIX = ".tmp-fastnet-"
# The errors by which the storage, not the path, refuses a write, and what to do about each.
REMEDIES = {
    errno.ENOSPC: "free space on {filesystem}",
    errno.EDQUOT: "free space on {filesystem} or raise your disk quota there",
    errno.EIO: "check the disk of {filesystem} (the system log says what failed)",
    errno.EROFS: "make {filesystem} writable again",
}


def write_atomically(path, write):
    """Call write(binary file) on a temporary file beside `path`, flush it to disk, then rename it
    over `path`. A crash at any moment leaves either the old file or the new one, never a mix: the
    rename is atomic, and the fsync makes sure the data is on disk before the name points at it.
    StorageError when the storage refuses any of it."""
    try:
        _write_then_rename(path, write)
    except OSError as exc:
        fault = refused(path, exc)
        if fault is None:
            raise
        raise fault from exc


def _write_then_rename(path, write):
    folder = os.path.dirname(os.path.abspath(path))
    handle, temporary = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, dir=folder)
    try:
        with os.fdopen(handle, "wb") as f:
            os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual mode
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a disk that fails this too: the next run's remove_temporaries
            os.unlink(temporary)
        raise


def refused(path, exc):
    """The StorageError of OSError `exc` from writing `path`, or None when `exc` is not the
    storage's doing."""
    what_to_do = remedy(path, exc)
    return None if what_to_do is None else StorageError(f"cannot write {path} ({exc.strerror}): {what_to_do}")


def unwritable_out(out, path, exc):
    """The error of OSError `exc` from writing `path` in the --out folder `out`: a StorageError when
    the storage refused it, else bad input, a folder that cannot be written."""
    return refused(path, exc) or FastnetError(f"cannot write to --out {out} ({exc.strerror}): pass a writable folder")


def remedy(path, exc):
    """What to do when the storage refused to write `path` with OSError `exc`, or None when `exc`
    is not the storage's doing."""
    if exc.errno not in REMEDIES:
        return None
    return REMEDIES[exc.errno].format(filesystem=f"the filesystem mounted at {mount_point(path)}")


def mount_point(path):
    """Where the filesystem that holds `path` (or would, were it there) is mounted: what `df` lists."""
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


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
