"""Downloading the CIFAR-10 archive: resumed where a partial download stopped, checked by md5.

The archive lands under the name that layouts.find_dataset looks for, in the folder it looks in by
default, so a download is found by the next `fastnet train` without a --data flag. (Not named
download.py: that would be shadowed by the download function the package re-exports.)
"""

from __future__ import annotations

import hashlib
import http.client
import os
import pathlib
import urllib.error
import urllib.parse
import urllib.request

from tqdm import tqdm

from fastnet import storage
from fastnet.data.layouts import CIFAR10_ARCHIVE, _reason, default_data_path
from fastnet.errors import DataError

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"


def _md5(path: pathlib.Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as file:
        while block := file.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def download(to: str | os.PathLike | None = None, url: str | None = None, md5: str | None = None,
             progress: bool = True, timeout: float = 30.0, log=None) -> pathlib.Path:
    """Download ``url`` (default: the official archive) into folder ``to``, resuming a partial download,
    check its md5 and return its path. An intact copy already there is kept, and says so through
    ``log``; a failed download leaves no folder behind that it created."""
    url, md5 = url or CIFAR10_URL, md5 or CIFAR10_MD5  # read now, so that a patched module value counts
    log = log or (lambda line: None)
    folder = pathlib.Path(to) if to is not None else default_data_path()
    created = [parent for parent in (folder, *folder.parents) if not parent.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create folder {folder} ({_reason(exc)}): pass a writable folder") from exc
    name = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1] or CIFAR10_ARCHIVE
    final, part = folder / name, folder / (name + ".part")
    if final.is_file():
        found = _md5(final)
        if found == md5:
            log(f"{final} is already here, with the md5 of the official archive: nothing to download")
            return final
        log(f"{final} is here but its md5 is {found}, not the official {md5}: downloading it again")
    if part.is_file():
        log(f"resuming the download in {part} after {part.stat().st_size:,} bytes")
    try:
        _fetch(url, part, progress, timeout)
    except urllib.error.HTTPError as exc:
        _remove_if_empty(part, created)
        raise DataError(f"could not download {url}: the server answered {_reason(exc)}; {_by_hand(name, folder)}") \
            from exc
    except (OSError, http.client.HTTPException) as exc:  # URLError, timeouts and resets are all OSError
        _remove_if_empty(part, created)
        reason = _reason(exc.reason if isinstance(exc, urllib.error.URLError) else exc)
        raise DataError(f"could not download {url} ({reason}): you seem to be offline; {_by_hand(name, folder)}") \
            from exc
    actual = _md5(part)
    if actual != md5:
        part.unlink()
        raise DataError(f"download of {url} has md5 {actual}, expected {md5}: the file is corrupt or not "
                        "the expected one; run the download again or fetch it by hand")
    os.replace(part, final)  # atomic, so a file under the final name is always complete
    return final


def _by_hand(name, folder):
    return (f"copy {name} from a machine with a network into {folder} (fastnet train finds it there, or reads "
            f"it from anywhere with --data PATH)")


def _remove_if_empty(part, created):
    """Undo what a download that got no byte made: its empty .part file, and the folders it created
    (a partial .part is kept, to be resumed)."""
    if part.is_file() and part.stat().st_size == 0:
        part.unlink()
    for folder in created:  # deepest first
        try:
            folder.rmdir()
        except OSError:  # not empty (a partial download, or someone else's file): keep it
            return


def _fetch(url: str, part: pathlib.Path, progress: bool, timeout: float) -> None:
    """Fill ``part`` with the bytes of ``url``, continuing from what it already holds if the server lets us."""
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "fastnet"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if offset and exc.code == 416:  # nothing left past offset: the part is whole, the md5 will tell
            return
        raise
    with response:
        if response.status != 206 or not (response.headers.get("Content-Range") or "").startswith(f"bytes {offset}-"):
            offset = 0  # the server sent the whole file: start over rather than append it
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length and length.isdigit() else None
        try:
            out = open(part, "ab" if offset else "wb")
        except OSError as exc:
            raise DataError(f"cannot write {part} ({_reason(exc)}): pass a writable folder") from exc
        with out, tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=part.name[:-5], disable=not progress) as bar:
            while block := response.read(1 << 16):
                _write(out, part, block)
                bar.update(len(block))
            _write(out, part)  # what is still buffered: a full disk may refuse it only now, not at the close
    if total is not None and part.stat().st_size < total:
        raise ConnectionError(f"connection closed after {part.stat().st_size} of {total} bytes; run again to resume")


def _write(out, part, block=None):
    """Write `block` to the open `part` file `out`, or flush it when there is no block. A write the
    storage refuses (a full disk) is a StorageError that says what to free, and the part is kept:
    the same command then resumes it."""
    try:
        if block is None:
            out.flush()
        else:
            out.write(block)
    except OSError as exc:
        raise storage.refused(part, exc) or DataError(f"cannot write {part} ({_reason(exc)}): pass a writable "
                                                      f"folder") from exc
