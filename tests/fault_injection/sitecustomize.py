"""A failing disk for the `fastnet` command that tests/test_storage_faults.py starts; not part of
fastnet. That test puts this folder first on the command's PYTHONPATH, and Python imports the
`sitecustomize` it finds there at startup, before any of fastnet's code runs.

It wraps the calls through which every file gets written: io.open for writing (which is also
open(), os.fdopen and pathlib's), os.pwrite, os.mkdir (and so os.makedirs and Path.mkdir),
os.replace and os.rename. Each such call on a path that matches the glob FAULT_PATHS is an event:

- with FAULT_RECORD=FILE, each event is appended to FILE as `kind path` (`rename source target`
  for a rename), and nothing fails;
- else event number FAULT_AT (1, the first, by default) fails with errno FAULT_ERRNO (a name such
  as ENOSPC), as the storage would fail it: a directory or a rename is refused, a pwrite writes
  nothing, and a file that was opened gets half of its first write and then the error (or the
  error at its close, when nothing was written), every later write to it failing too.

Each process counts its own events: those that a sweep's Dask workers inherit the variables too.
"""

import builtins
import errno
import fnmatch
import io
import os

PATHS = os.environ.get("FAULT_PATHS")
RECORD = os.environ.get("FAULT_RECORD")
AT = int(os.environ.get("FAULT_AT", "1"))
ERRNO = getattr(errno, os.environ.get("FAULT_ERRNO", "ENOSPC"))

_open, _pwrite, _mkdir, _replace, _rename = io.open, os.pwrite, os.mkdir, os.replace, os.rename
_events = 0


def _error(*paths):
    return OSError(ERRNO, os.strerror(ERRNO), *paths)


def _path(target):
    if isinstance(target, int):  # a file descriptor: the kernel knows its path
        return os.readlink(f"/proc/self/fd/{target}")
    return os.path.abspath(os.fsdecode(target))


def _fails(kind, path, source=None):
    """Whether this event is the one to fail; records it in record mode."""
    global _events
    if not fnmatch.fnmatchcase(path, PATHS):
        return False
    if RECORD is not None:
        with _open(RECORD, "a", encoding="utf-8") as record:
            record.write(" ".join([kind, *([source] if source else []), path]) + "\n")
        return False
    _events += 1
    return _events == AT


class FailingFile:
    """A file being written when the disk fills up: half of the first write lands, then the error."""

    def __init__(self, file, path):
        self._file, self._path, self._failed = file, path, False

    def write(self, data):
        if not self._failed:
            self._failed = True
            self._file.write(data[: len(data) // 2])
        raise _error()

    def flush(self):
        if self._failed:
            raise _error()
        self._file.flush()

    def close(self):
        self._file.close()
        if not self._failed:
            self._failed = True
            raise _error(self._path)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def _open_for_writing(file, mode="r", *args, **kwargs):
    opened = _open(file, mode, *args, **kwargs)
    if not set(mode) & set("wax+"):
        return opened
    path = _path(file if not isinstance(file, int) else opened.fileno())
    return FailingFile(opened, path) if _fails("write", path) else opened


def _failing_pwrite(fd, data, offset):
    if _fails("write", _path(fd)):
        raise _error()
    return _pwrite(fd, data, offset)


def _failing_mkdir(path, *args, **kwargs):
    if _fails("mkdir", _path(path)):
        raise _error(path)
    return _mkdir(path, *args, **kwargs)


def _renaming(original):
    def rename(source, target, *args, **kwargs):
        if _fails("rename", _path(target), _path(source)):
            raise _error(source, target)
        return original(source, target, *args, **kwargs)
    return rename


if PATHS is not None:
    builtins.open = io.open = _open_for_writing
    os.pwrite, os.mkdir = _failing_pwrite, _failing_mkdir
    os.replace, os.rename = _renaming(_replace), _renaming(_rename)
