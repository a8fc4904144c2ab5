"""Tars parsed in a child process under a time bound (align.data.tars): a tar whose parsing stalls
becomes an error row naming it after the samples read in time, the next tar is read, and a
normal tar reads exactly as the interpreter's tarfile gives it."""

import io as _io
import json
import os
import random
import sys
import tarfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from align.data.sources import read_tars, tar_samples
from align.data.tars import TarOpenError, TarTimeout, list_members

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 1.5
# Start-up of the reader, the kill and a busy CI machine: the most a stall may add to the bound.
SLACK_S = 5.0


def _tar_bytes(members: list[tuple[str, bytes | None]], mode: str = "w") -> bytes:
    """A tar of (name, data) members in order; data None makes a directory."""
    buffer = _io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, _io.BytesIO(data))
    return buffer.getvalue()


def _sample(key: str, image: bytes | None = None, read_error: str = "", **metadata) -> dict:
    empty = {"caption": None, "url": None, "sha256": None}
    return {"image_id": key, "image": image, "read_error": read_error, **empty, **metadata}


@contextmanager
def _stalling_fifo(path: Path, prefix: bytes | None):
    """A named pipe as a tar: it delivers `prefix` and then holds the tar open without another
    byte, the way a parse that never ends holds its reader. prefix None: no writer ever opens
    it, so even opening the tar stalls."""
    os.mkfifo(path)
    release = threading.Event()

    def feed():
        try:
            with open(path, "wb") as fifo:
                fifo.write(prefix)
                fifo.flush()
                release.wait(60)
        except BrokenPipeError:  # the reader was killed before it took everything
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    if prefix is not None:
        feeder.start()
    try:
        yield str(path)
    finally:
        release.set()
        if feeder.is_alive():  # a writer still waiting for a reader: give it one to finish
            os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
            feeder.join(10)


def _tar_readers() -> list[int]:
    """Pids of this process's tar reader children still alive (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        if ppid == os.getpid() and b"align.data.tars" in cmdline and stat.split()[2] != "Z":
            pids.append(int(entry.name))
    return pids


SAMPLES = [
    ("000000001.jpg", b"\xff\xd8one"),
    ("000000001.txt", "a caption é".encode()),
    ("000000002.png", b"\x89PNGtwo"),
    ("000000002.json", json.dumps({"url": "https://a/2.png", "sha256": "ab"}).encode()),
    ("000000003.jpg", b"\xff\xd8three"),
]
READ_IN_TIME = [
    _sample("000000001", b"\xff\xd8one", caption="a caption é"),
    _sample("000000002", b"\x89PNGtwo", url="https://a/2.png", sha256="ab"),
]


@pytest.mark.timeout(60)  # a reader without the bound would wait on the pipe for ever
@pytest.mark.skipif(sys.platform != "linux", reason="named pipes and /proc")
def test_a_tar_whose_parse_stalls_is_an_error_row_after_the_samples_read_in_time(tmp_path):
    data = _tar_bytes(SAMPLES)
    third = tarfile.open(fileobj=_io.BytesIO(data)).getmembers()[4].offset
    with _stalling_fifo(tmp_path / "stalls.tar", data[:third]) as path:  # stalls at a header
        start = time.monotonic()
        rows = list(tar_samples(path, 1000, tar_timeout_s=TIMEOUT_S))
        elapsed = time.monotonic() - start
        assert not _tar_readers(), "the stalled reader was not killed"
    assert rows[:2] == READ_IN_TIME
    assert rows[2]["image_id"] == f"{path}#unread" and rows[2]["image"] is None
    assert "not read within index_corpus.tar_timeout_s=1.5 s" in rows[2]["read_error"]
    assert len(rows) == 3
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + SLACK_S


@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.platform != "linux", reason="named pipes")
def test_read_tars_goes_on_to_the_next_tar_after_one_that_stalls(tmp_path):
    """The map_batches stage index_corpus runs: a tar that never delivers a byte (even its open
    stalls) is one error row, and the tar after it is read in full."""
    good = tmp_path / "good.tar"
    good.write_bytes(_tar_bytes(SAMPLES))
    with _stalling_fifo(tmp_path / "stalls.tar", None) as stalled:
        start = time.monotonic()
        blocks = list(read_tars({"path": [stalled, str(good)]}, 1000, tar_timeout_s=TIMEOUT_S))
        assert time.monotonic() - start < TIMEOUT_S + SLACK_S
    rows = [row for block in blocks for row in block.to_pylist()]
    assert rows[0]["image_id"] == f"{stalled}#unread"
    assert "index_corpus.tar_timeout_s" in rows[0]["read_error"]
    assert [r["image_id"] for r in rows[1:]] == ["000000001", "000000002", "000000003"]
    assert rows[1]["image"] == b"\xff\xd8one" and rows[1]["caption"] == "a caption é"


@pytest.mark.timeout(60)
@pytest.mark.skipif(sys.platform != "linux", reason="named pipes")
def test_a_tar_listing_that_stalls_is_a_timeout_naming_the_tar(tmp_path):
    with _stalling_fifo(tmp_path / "stalls.tar", None) as path:
        start = time.monotonic()
        with pytest.raises(TarTimeout, match=r"stalls\.tar: not read within 1\.5 s"):
            list(list_members(path, TIMEOUT_S))
        assert time.monotonic() - start < TIMEOUT_S + SLACK_S


def _webdataset(count: int, seed: int = 0) -> tuple[list[tuple[str, bytes | None]], list[dict]]:
    """A shard as img2dataset writes it, with the odd members real shards carry (a directory,
    an unknown extension, upper-case extensions, a sample without an image, binary captions),
    and the samples the reader must give for it."""
    rng = random.Random(seed)
    members: list[tuple[str, bytes | None]] = [("shard/", None)]
    expected = []
    for i in range(count):
        key = f"shard/{i:09d}"
        image = rng.randbytes(rng.randrange(0, 3000))
        caption = rng.randbytes(rng.randrange(0, 80))  # not UTF-8: decoded with replacement
        meta = {"url": f"https://e.com/{i}.jpg", "sha256": f"{i:064x}", "caption": "ignored"}
        ext = ("jpg", "png", "webp", "JPEG", "jpeg")[i % 5]
        if i % 7 == 3:  # a failed download: only the sidecars
            members += [(f"{key}.txt", caption), (f"{key}.json", json.dumps(meta).encode())]
            row = _sample(key, None, "empty file (no image member)")
        else:
            members += [(f"{key}.{ext}", image), (f"{key}.txt", caption)]
            members += [(f"{key}.json", json.dumps(meta).encode()), (f"{key}.cls", b"7")]
            row = _sample(key, image)
        row["caption"] = caption.decode("utf-8", "replace")
        row["url"], row["sha256"] = meta["url"], meta["sha256"]
        expected.append(row)
    return members, expected


@pytest.mark.parametrize("mode", ["w", "w:gz"], ids=["plain", "gzip"])
def test_a_normal_tar_reads_exactly_the_samples_it_holds(tmp_path, mode):
    members, expected = _webdataset(300)
    path = tmp_path / "shard.tar"
    path.write_bytes(_tar_bytes(members, mode))
    assert list(tar_samples(str(path), 2**20)) == expected


@pytest.mark.parametrize("mode", ["w", "w:gz"], ids=["plain", "gzip"])
def test_a_tar_lists_as_the_interpreter_lists_it(tmp_path, mode):
    members, _ = _webdataset(50)
    path = tmp_path / "shard.tar"
    path.write_bytes(_tar_bytes(members, mode))
    with tarfile.open(path) as tar:
        wanted = [
            (m.name, m.size, m.offset_data if mode == "w" else -1)
            for m in tar.getmembers()
            if m.isfile()
        ]
    listed = [(m.name, m.size, m.offset) for m in list_members(str(path), 30)]
    assert listed == wanted and all(m.data is None for m in list_members(str(path), 30))


def test_a_missing_tar_is_an_open_error(tmp_path):
    with pytest.raises(TarOpenError, match="could not open .*nowhere.tar: .*No such file"):
        list(tar_samples(str(tmp_path / "nowhere.tar"), 1000))


def test_the_tar_reader_starts_light():
    """The child imports the standard library for a local tar: no pyarrow, numpy or pydantic."""
    import subprocess

    code = "import sys, align.data.tars; print(' '.join(sorted(sys.modules)))"
    command = [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); {code}"]
    modules = subprocess.run(command, capture_output=True, text=True, check=True).stdout.split()
    assert "tarfile" in modules
    assert not {"pyarrow", "numpy", "pydantic", "align.config", "align.storage.io"} & set(modules)


def test_a_tar_by_uri_reads_as_by_path(tmp_path):
    """A URI is opened by pyarrow in the child (object stores), a path by the child itself."""
    members, expected = _webdataset(20)
    path = tmp_path / "shard.tar"
    path.write_bytes(_tar_bytes(members))
    assert list(tar_samples(f"file://{path}", 2**20)) == expected
