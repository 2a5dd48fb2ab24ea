"""Tests of fastnet.data.download against a local HTTP server on 127.0.0.1 (no internet needed).

The server's behaviour (honour Range or not, cut the body short, fail) is switched per test, and it
records every request so the tests can tell a resumed download from a fresh one, and none at all.
"""

import errno
import hashlib
import http.server
import os
import socket
import threading

import numpy as np
import pytest

from fastnet.data import download
from fastnet.errors import DataError

PAYLOAD = np.random.default_rng(42).integers(0, 256, 200_000, dtype=np.uint8).tobytes()
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()
NAME = "cifar-10-python.tar.gz"


class FakeServer:
    """What the handler serves and what it has seen."""

    def __init__(self):
        self.payload = PAYLOAD
        self.honour_range = True
        self.cut_after = None  # send only this many body bytes while announcing the full length
        self.status = 200  # anything else: answer this error code
        self.requests = []  # (path, Range header or None)
        self.url = ""


def make_handler(state):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            wanted = self.headers.get("Range")
            state.requests.append((self.path, wanted))
            if state.status != 200:
                self.send_error(state.status)
                return
            body, start = state.payload, 0
            if wanted and state.honour_range:
                start = int(wanted.removeprefix("bytes=").split("-")[0])
                if start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(body) - start))
            self.end_headers()
            sent = body[start:] if state.cut_after is None else body[start:start + state.cut_after]
            self.wfile.write(sent)
            if state.cut_after is not None:
                self.close_connection = True

        def log_message(self, *args):  # keep the test output clean
            pass

    return Handler


@pytest.fixture
def server():
    state = FakeServer()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}/files/{NAME}"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def fetch(server, folder, **kwargs):
    return download(folder, url=server.url, md5=kwargs.pop("md5", PAYLOAD_MD5), progress=False, timeout=5, **kwargs)


def test_download_writes_the_file_atomically(server, tmp_path):
    folder = tmp_path / "new" / "folder"  # created on demand
    path = fetch(server, folder)
    assert path == folder / NAME
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in folder.iterdir()) == [NAME]
    assert server.requests == [(f"/files/{NAME}", None)]


def test_download_resumes_a_partial_file(server, tmp_path):
    (tmp_path / f"{NAME}.part").write_bytes(PAYLOAD[:100_000])
    path = fetch(server, tmp_path)
    assert server.requests == [(f"/files/{NAME}", "bytes=100000-")]
    assert path.read_bytes() == PAYLOAD
    assert not (tmp_path / f"{NAME}.part").exists()


def test_download_starts_over_when_the_server_ignores_range(server, tmp_path):
    server.honour_range = False
    (tmp_path / f"{NAME}.part").write_bytes(b"x" * 50_000)  # would corrupt the file if appended to
    path = fetch(server, tmp_path)
    assert server.requests[0][1] == "bytes=50000-"
    assert path.read_bytes() == PAYLOAD


def test_download_of_a_complete_part_file_checks_it(server, tmp_path):
    (tmp_path / f"{NAME}.part").write_bytes(PAYLOAD)  # e.g. a crash between download and rename
    path = fetch(server, tmp_path)
    assert path.read_bytes() == PAYLOAD
    assert server.requests == [(f"/files/{NAME}", f"bytes={len(PAYLOAD)}-")]


def test_interrupted_download_keeps_the_part_for_resuming(server, tmp_path):
    server.cut_after = 80_000
    with pytest.raises(DataError) as err:
        fetch(server, tmp_path)
    assert "\n" not in str(err.value)
    assert (tmp_path / f"{NAME}.part").read_bytes() == PAYLOAD[:80_000]
    assert not (tmp_path / NAME).exists()
    server.cut_after = None
    assert fetch(server, tmp_path).read_bytes() == PAYLOAD
    assert server.requests[-1][1] == "bytes=80000-"


class FullDisk:
    """A .part file on a disk that has room for `room` more bytes; past it, writes fail as a full disk's
    do, and so does the flush of bytes still buffered (open's buffer holds up to 8 KB)."""

    def __init__(self, file, room):
        self.file, self.room, self.buffered = file, room, 0

    def write(self, block):
        if len(block) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(block)
        return self.file.write(block)

    def flush(self):
        self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.file.close()


@pytest.mark.parametrize("room", [0, 70_000, len(PAYLOAD) - 1])
def test_a_full_disk_is_a_storage_error_and_the_part_resumes(server, tmp_path, monkeypatch, room):
    import builtins

    from fastnet.data import downloading
    from fastnet.errors import StorageError
    monkeypatch.setattr(downloading, "open", lambda path, mode: FullDisk(builtins.open(path, mode), room),
                        raising=False)
    with pytest.raises(StorageError) as err:
        fetch(server, tmp_path)
    part = tmp_path / f"{NAME}.part"
    message = str(err.value)
    assert message.startswith(f"cannot write {part} (No space left on device): free space on the filesystem "
                              f"mounted at ") and message.endswith(", then run the same command again")
    assert err.value.exit_status == 3 and not (tmp_path / NAME).exists()
    kept = part.read_bytes()
    assert kept == PAYLOAD[:len(kept)] and len(kept) <= room
    monkeypatch.undo()
    assert fetch(server, tmp_path).read_bytes() == PAYLOAD  # the same command, once there is room
    assert server.requests[-1][1] == (f"bytes={len(kept)}-" if kept else None)


def test_bytes_the_disk_refuses_at_the_last_flush_are_a_storage_error_not_offline(server, tmp_path, monkeypatch):
    import builtins

    from fastnet.data import downloading
    from fastnet.errors import StorageError

    class RefusedAtFlush(FullDisk):
        def flush(self):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(downloading, "open", lambda path, mode: RefusedAtFlush(builtins.open(path, mode), 10**9),
                        raising=False)
    with pytest.raises(StorageError, match=r"No space left on device\): free space"):
        fetch(server, tmp_path)


def test_wrong_checksum_is_a_data_error_and_leaves_nothing(server, tmp_path):
    wrong = "0" * 32
    with pytest.raises(DataError) as err:
        fetch(server, tmp_path, md5=wrong)
    message = str(err.value)
    assert "\n" not in message and wrong in message and PAYLOAD_MD5 in message
    assert list(tmp_path.iterdir()) == []


def test_existing_complete_file_needs_no_request(server, tmp_path):
    (tmp_path / NAME).write_bytes(PAYLOAD)
    assert fetch(server, tmp_path) == tmp_path / NAME
    assert server.requests == []


def test_existing_wrong_file_is_replaced(server, tmp_path):
    (tmp_path / NAME).write_bytes(b"not the archive")
    said = []
    assert fetch(server, tmp_path, log=said.append).read_bytes() == PAYLOAD
    assert len(server.requests) == 1
    wrong = hashlib.md5(b"not the archive").hexdigest()
    assert said == [(f"{tmp_path / NAME} is here but its md5 is {wrong}, not the official {PAYLOAD_MD5}: "
                     "downloading it again")]


def test_an_intact_archive_already_there_is_kept_and_says_so(server, tmp_path):
    (tmp_path / NAME).write_bytes(PAYLOAD)
    said = []
    assert fetch(server, tmp_path, log=said.append) == tmp_path / NAME and server.requests == []
    assert said == [f"{tmp_path / NAME} is already here, with the md5 of the official archive: nothing to download"]


def test_a_failed_download_leaves_no_folder_it_created(tmp_path):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(DataError):
        download(tmp_path / "new" / "deeper", url=f"http://127.0.0.1:{port}/{NAME}", md5=PAYLOAD_MD5,
                 progress=False, timeout=5)
    assert list(tmp_path.iterdir()) == []


def test_default_folder_comes_from_the_environment(server, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTNET_DATA", str(tmp_path / "env"))
    path = download(url=server.url, md5=PAYLOAD_MD5, progress=False, timeout=5)
    assert path == tmp_path / "env" / NAME and path.read_bytes() == PAYLOAD


def test_progress_bar_does_not_break_the_download(server, tmp_path, capsys):
    path = download(tmp_path, url=server.url, md5=PAYLOAD_MD5, progress=True, timeout=5)
    assert path.read_bytes() == PAYLOAD
    assert NAME in capsys.readouterr().err  # tqdm writes its bar, labelled with the file, to stderr


def test_http_error_is_a_data_error(server, tmp_path):
    server.status = 404
    with pytest.raises(DataError) as err:
        fetch(server, tmp_path)
    message = str(err.value)
    assert "\n" not in message and "404" in message and server.url in message
    assert not (tmp_path / NAME).exists()


def test_unreachable_server_says_offline(tmp_path):
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there any more: connections are refused at once
    with pytest.raises(DataError) as err:
        download(tmp_path, url=f"http://127.0.0.1:{port}/{NAME}", md5=PAYLOAD_MD5, progress=False, timeout=5)
    message = str(err.value)
    assert "\n" not in message
    assert "offline" in message and str(tmp_path) in message and NAME in message
    # `fastnet data download` has no --data: the advice says which command takes it.
    assert "fastnet train finds it there, or reads it from anywhere with --data PATH" in message
    assert not (tmp_path / NAME).exists()


def test_train_downloads_into_the_default_folder_when_it_finds_no_data(server, tmp_path, monkeypatch):
    from fastnet.config import TrainConfig
    from fastnet.data import downloading
    from fastnet.train import train
    from helpers import make_arrays, write_archive

    archive = write_archive(tmp_path / "build" / NAME, make_arrays()).read_bytes()
    server.payload = archive
    monkeypatch.setattr(downloading, "CIFAR10_URL", server.url)
    monkeypatch.setattr(downloading, "CIFAR10_MD5", hashlib.md5(archive).hexdigest())
    monkeypatch.setenv("FASTNET_DATA", str(tmp_path / "data"))
    said = []
    summary = train(TrainConfig(epochs=1, hidden=(4,), batch_size=5, out=str(tmp_path / "run")), log=said.append)
    assert said[0].startswith(f"No dataset found in {tmp_path / 'data'}") and "downloading" in said[0]
    assert (tmp_path / "data" / NAME).read_bytes() == archive
    assert len(server.requests) == 1 and summary["epoch"] == 1
