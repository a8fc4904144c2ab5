"""Untrusted tars parsed in a child process under a time bound.

The interpreter's tarfile parses every header of a tar, and crafted headers have made it loop
forever or backtrack for minutes (CPython bugs fixed only in later patch releases). A signal
cannot interrupt that inside a Ray worker thread, so the parsing runs in a child interpreter that
streams the members back through a pipe, and the parent kills it once it has waited on it for
the bound. The child is started with exec, never forked (the parent holds pyarrow and Ray
threads), and imports only the standard library (pyarrow's filesystems for a URI).

In: a tar's path or URI. Out: its file members in order (`TarMember`), then the end; or
TarUnreadable (a corrupt tar, after the members before the fault), TarTimeout (past the bound,
after the members read in time) or TarOpenError (no such tar, or it could not be opened).
"""

from __future__ import annotations

import fcntl
import os
import resource
import selectors
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zlib
from typing import NamedTuple

# pyarrow's filesystems are imported inside the reader, for a URI only: the reader's child process
# imports nothing but the standard library.

# A frame: kind, name length, size, offset of the data in the tar, data length (-1: none), then
# the name (UTF-8) and the data. Kinds: a member, an error (the member's name, the message as
# data), a tar that could not be opened (the message as data), the end.
_FRAME = struct.Struct("<cIqqq")
_MEMBER, _ERROR, _OPEN_ERROR, _END = b"M", b"E", b"O", b"Z"
# Tar faults tarfile raises on a cut or corrupt tar, reported by their message alone.
_TAR_FAULTS = (tarfile.TarError, EOFError, OSError, zlib.error)
_READ_CHUNK = 1 << 20


class TarMember(NamedTuple):
    """A file member: its name, size from the header, offset of its data in the tar (-1 for a
    compressed tar, where offsets are into the decompressed stream) and its bytes (None where
    they were not asked for)."""

    name: str
    size: int
    offset: int
    data: bytes | None


class TarUnreadable(Exception):
    """A tar cut short or corrupt: `member` is the member whose data failed (None: a header)."""

    def __init__(self, path: str, member: str | None, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.member, self.reason = path, member, reason


class TarTimeout(TimeoutError):
    """A tar whose reader was waited on for `timeout_s` without reaching its end."""

    def __init__(self, path: str, timeout_s: float):
        super().__init__(f"{path}: not read within {timeout_s:g} s")
        self.path, self.timeout_s = path, timeout_s


class TarOpenError(OSError):
    """A tar that could not be opened (missing, no permission, storage unreachable)."""


def read_members(path: str, extensions, max_member_bytes: int, timeout_s: float):
    """Stream a tar (plain or compressed) member by member, as index_corpus reads WebDataset
    shards.

    Args:
        path: a local path or a URI pyarrow can open.
        extensions: name suffixes (".jpg", ".txt", case-insensitive) whose bytes are read.
        max_member_bytes: members larger than this (from the header) are not read: data None.
        timeout_s: the most seconds to wait on the reader, start-up included.

    Yields:
        TarMember for every file member, in tar order.

    Raises:
        TarUnreadable, TarTimeout, TarOpenError (see the module docstring).
    """
    wanted = ",".join(sorted({e.lower().lstrip(".") for e in extensions}))
    args = ["read", path, str(max_member_bytes), wanted]
    yield from _child_members(path, args, timeout_s)


def list_members(path: str, timeout_s: float):
    """The file members of a tar without their bytes: offsets into the file for a plain tar
    (a member is then one ranged read), offset -1 for a compressed one. Args, raises: as
    read_members."""
    yield from _child_members(path, ["list", path, "0", ""], timeout_s)


# -- the parent: start the child, enforce the bound, decode its frames -------------------------


def _child_members(path: str, args: list[str], timeout_s: float):
    root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))  # above align/
    code = f"import sys; sys.path.insert(0, {root!r}); import align.data.tars as t; t._child_main()"
    # -I: no environment variables, user site or working directory shape the child; -S (no
    # site-packages, a faster start) unless pyarrow must open a URI.
    flags = ["-I"] if "://" in path else ["-I", "-S"]
    # CPU seconds after which the child dies on its own: a guard for a child whose parent died
    # while it looped. Generous, since it also runs while the parent handles what it sent.
    cpu_s = str(int(2 * timeout_s) + 60)
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(
            [sys.executable, *flags, "-c", code, tarfile.ENCODING, cpu_s, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        try:
            _widen_pipe(child.stdout.fileno())
            yield from _frames(child, path, timeout_s, stderr)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait()
            child.stdout.close()


def _widen_pipe(fd: int) -> None:
    """A 1 MiB pipe (Linux; 64 KiB by default): fewer round trips between child and parent."""
    try:
        fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), _READ_CHUNK)
    except OSError:  # over /proc/sys/fs/pipe-max-size, or not Linux: the default pipe works
        pass


def _frames(child: subprocess.Popen, path: str, timeout_s: float, stderr):
    fd = child.stdout.fileno()
    os.set_blocking(fd, False)  # read what has arrived; wait (and count it) only when nothing has
    buffer, scratch, waited = bytearray(), bytearray(_READ_CHUNK), 0.0
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while True:
            position = 0
            while (frame := _next_frame(buffer, position)) is not None:
                kind, name, size, offset, data, position = frame
                if kind == _MEMBER:
                    yield TarMember(name, size, offset, data)
                elif kind == _END:
                    return
                elif kind == _ERROR:
                    raise TarUnreadable(path, name or None, data.decode())
                else:
                    raise TarOpenError(f"could not open {path}: {data.decode()}")
            del buffer[:position]
            try:
                count = os.readv(fd, [scratch])  # into one reused buffer: no allocation per read
            except BlockingIOError:
                # The bound counts the time spent waiting on the child, not the time the
                # consumer holds a member (a Ray generator may be paused downstream a while).
                start = time.monotonic()
                ready = selector.select(timeout_s - waited) if waited < timeout_s else []
                waited += time.monotonic() - start
                if not ready:
                    raise TarTimeout(path, timeout_s) from None
                continue
            if not count:  # the child ended without its end frame: killed, or it crashed
                raise TarUnreadable(path, None, _exit_reason(child, stderr))
            buffer += memoryview(scratch)[:count]


def _exit_reason(child: subprocess.Popen, stderr) -> str:
    code = child.wait()
    stderr.seek(0)
    last = stderr.read().decode(errors="replace").strip().splitlines()[-1:]
    return f"tar reader exited with code {code}" + (f": {last[0]}" if last else "")


def _next_frame(buffer: bytearray, position: int):
    """(kind, name, size, offset, data, next position) of the frame at `position`, or None
    when the buffer does not hold it whole yet."""
    start = position + _FRAME.size
    if len(buffer) < start:
        return None
    kind, name_length, size, offset, data_length = _FRAME.unpack_from(buffer, position)
    end = start + name_length + max(data_length, 0)
    if len(buffer) < end:
        return None
    with memoryview(buffer) as view:  # slices copied once, into bytes
        name = str(view[start : start + name_length], "utf-8", "surrogateescape")
        data = bytes(view[start + name_length : end]) if data_length >= 0 else None
    return kind, name, size, offset, data, end


# -- the child: parse the tar, write frames to stdout ------------------------------------------


def _child_main() -> None:
    encoding, cpu_s, mode, path, max_member_bytes, wanted = sys.argv[1:7]
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard == resource.RLIM_INFINITY or int(cpu_s) < hard:
        resource.setrlimit(resource.RLIMIT_CPU, (int(cpu_s), hard))
    out = sys.stdout.fileno()

    def send(kind: bytes, name: str = "", size=0, offset=0, data: bytes | None = None):
        # Unbuffered: each member reaches the parent before the next header is parsed.
        encoded = name.encode("utf-8", "surrogateescape")
        length = -1 if data is None else len(data)
        parts = [_FRAME.pack(kind, len(encoded), size, offset, length), encoded, data or b""]
        written = os.writev(out, parts)
        rest = memoryview(b"".join(parts))[written:] if written < sum(map(len, parts)) else b""
        while rest:  # a write cut short (by a signal): the rest, plainly
            rest = rest[os.write(out, rest) :]

    try:
        stream = _open(path, seekable=mode == "list")
    except Exception as e:  # noqa: BLE001 (reported to the parent, which raises it)
        send(_OPEN_ERROR, data=_message(e))
        return
    try:
        with stream:
            if mode == "list":
                _child_list(path, stream, encoding, send)
            else:
                extensions = set(wanted.split(",")) - {""}
                _child_read(stream, encoding, int(max_member_bytes), extensions, send)
    except Exception as e:  # noqa: BLE001 (a fault of the tar: the parent makes it an error)
        send(_ERROR, data=_message(e))
        return
    send(_END)


def _child_read(stream, encoding: str, max_member_bytes: int, extensions: set, send) -> None:
    with tarfile.open(fileobj=stream, mode="r|*", encoding=encoding) as tar:  # "|": no seeking
        for member in tar:
            if not member.isfile():
                continue
            data = None
            if member.name.rpartition(".")[2].lower() in extensions:
                if member.size <= max_member_bytes:
                    try:
                        data = tar.extractfile(member).read()
                    except Exception as e:  # noqa: BLE001 (the member's error, then the tar's)
                        send(_ERROR, member.name, data=_message(e))
                        return
            send(_MEMBER, member.name, member.size, member.offset_data, data)


def _child_list(path: str, stream, encoding: str, send) -> None:
    try:
        tar = tarfile.open(fileobj=stream, mode="r:", encoding=encoding)
    except tarfile.ReadError:  # not a plain tar: gzip, bzip2 or xz inside, streamed
        with _open(path, seekable=False) as again:
            with tarfile.open(fileobj=again, mode="r|*", encoding=encoding) as tar:
                for member in tar:
                    if member.isfile():
                        send(_MEMBER, member.name, member.size, -1)
        return
    with tar:
        for member in tar:
            if member.isfile():
                send(_MEMBER, member.name, member.size, member.offset_data)


def _open(path: str, seekable: bool):
    if "://" not in path:  # align.storage.io.is_uri, not imported: the child stays light
        # Unbuffered for streaming: tarfile buffers itself, and a read returns what has arrived
        # instead of waiting for a full buffer (a pipe, a slow mount).
        return open(path, "rb", buffering=-1 if seekable else 0)  # noqa: SIM115 (caller closes)
    import pyarrow.fs

    fs, inner = pyarrow.fs.FileSystem.from_uri(path)
    return fs.open_input_file(inner) if seekable else fs.open_input_stream(inner)


def _message(e: BaseException) -> bytes:
    text = str(e) if isinstance(e, _TAR_FAULTS) else f"{type(e).__name__}: {e}"
    return text.encode("utf-8", "replace")
