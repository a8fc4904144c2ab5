"""Paths and files on any filesystem pyarrow knows (local paths, file://, s3://, gs://, ...)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from contextlib import contextmanager, suppress
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from align.errors import InputNotFound, OutputWriteError, UserError

# OS errors about an output the user can fix: a full disk or quota, a read-only or forbidden folder.
_USER_FIXABLE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES}


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or a URI."""
    if is_uri(uri):
        return pafs.FileSystem.from_uri(uri)
    return pafs.LocalFileSystem(), os.path.abspath(uri)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def require_exists(uri: str, what: str) -> None:
    """Raise InputNotFound (a FileNotFoundError) naming `what` when `uri` does not exist."""
    if not exists(uri):
        raise InputNotFound(f"{what} not found: {uri}")


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)


def list_files(uri: str, suffix: str = "", hidden: bool = False) -> list[str]:
    """Files below `uri` (recursive) whose names end with `suffix`, sorted, as full URIs/paths;
    names starting with '.' or '_' (markers like _manifest.json) only when `hidden`."""
    fs, path = filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    scheme = uri.split("://", 1)[0] + "://" if is_uri(uri) else ""
    out = []
    for info in infos:
        if info.type == pafs.FileType.File and info.path.endswith(suffix):
            if not hidden and info.base_name.startswith((".", "_")):
                continue
            out.append(scheme + info.path)
    return sorted(out)


def empty_dir(uri: str) -> None:
    """Create `uri` as a folder, or empty it: a job's output is replaced, never appended to."""
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    fs.delete_dir_contents(path)


def delete_file(uri: str) -> None:
    """Delete one file if it exists."""
    if exists(uri):
        fs, path = filesystem(uri)
        fs.delete_file(path)


def delete_files_except(uri: str, suffix: str, keep: set[str]) -> None:
    """Delete the files below `uri` ending in `suffix` whose names are not in `keep` (shards a
    previous, larger run left behind)."""
    for stale in list_files(uri, suffix):
        if stale.rsplit("/", 1)[-1] not in keep:
            fs, path = filesystem(stale)
            fs.delete_file(path)


def _temporary_name(path: str) -> str:
    """A name beside `path` that no other writer uses (several Ray workers may write one file)."""
    head, _, name = path.rpartition("/")
    return f"{head}/.{name}.{uuid.uuid4().hex[:12]}.tmp"


@contextmanager
def _atomic_target(uri: str):
    """Yield (filesystem, temporary path) for writing `uri`; on success the temporary file is
    moved onto `uri`, on failure it is removed. A full disk or a read-only folder becomes an
    OutputWriteError naming `uri`."""
    fs, path = filesystem(uri)
    tmp = _temporary_name(path)
    try:
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        yield fs, tmp
        fs.move(tmp, path)
    except BaseException as e:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass  # never created, or already gone
        if isinstance(e, OSError) and e.errno in _USER_FIXABLE_ERRNOS:
            raise OutputWriteError(e.errno, f"cannot write {uri}: {os.strerror(e.errno)}") from e
        raise


# Public: writers that stream (pyarrow.parquet.ParquetWriter) get the same atomic move.
atomic_target = _atomic_target


def write_bytes(uri: str, data: bytes) -> None:
    """Write atomically where the filesystem allows: to a temporary name of this writer's own,
    then move; the temporary file is removed if the write fails.

    Raises:
        OutputWriteError: naming `uri`, when the disk is full or the folder is not writable.
    """
    with _atomic_target(uri) as (fs, tmp), fs.open_output_stream(tmp) as f:
        f.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def is_uri(path: str) -> bool:
    return "://" in path


def absolute(path: str) -> str:
    """A URI as it is, a local path made absolute (so Ray workers, whose working directory may
    differ, read and write the same place)."""
    return path if is_uri(path) else os.path.abspath(path)


def file_version(uri: str) -> dict | None:
    """What tells one version of a file from another where no content hash was recorded: its
    size and modification time (S3's Last-Modified, a local file's mtime), or None when missing.
    A file rewritten at the same path, even at the same size, is another version."""
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        return None
    return {"bytes": info.size, "mtime_ns": info.mtime_ns}


def file_versions(uris: list[str]) -> list[list[int]]:
    """[size, mtime_ns] of each file ([-1, -1] where missing), listing each parent folder once
    (one LIST on object storage for a folder's files, not one HEAD per file)."""
    by_folder: dict[str, dict[str, tuple[int, int]]] = {}
    out = []
    for uri in uris:
        folder = uri.rsplit("/", 1)[0]
        if folder not in by_folder:
            fs, path = filesystem(folder)
            infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            by_folder[folder] = {
                i.base_name: (i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File
            }
        size, mtime = by_folder[folder].get(uri.rsplit("/", 1)[-1], (-1, -1))
        out.append([int(size), int(mtime or 0)])
    return out


def cache_root() -> str:
    """Where remote files are cached locally: $AESTHETIC_ALIGN_CACHE, else
    ~/.cache/aesthetic-align."""
    return os.environ.get("AESTHETIC_ALIGN_CACHE") or os.path.expanduser("~/.cache/aesthetic-align")


class RemoteFileChanged(UserError):
    """A remote file's content differs from the hash recorded when it was written (an index
    rebuilt at the same path while this one was read); the message names the file."""


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def local_copy(uri: str, sha256: str | None = None) -> str:
    """A local path for a file that may be remote: the path itself when local, else a copy in
    the cache (cache_root()), kept per version of the file: the content hash `sha256` when the
    writer recorded one (index shards in `_index.json`), else its size and modification time.
    A file rewritten at the same path is fetched again, never served from an older copy; other
    versions of the same URI are removed from the cache. For libraries that only open local
    files (open_clip, torch.load with mmap, FAISS memory maps).

    Raises:
        FileNotFoundError: naming the URI.
        RemoteFileChanged: the fetched bytes do not have the hash `sha256`.
    """
    if not is_uri(uri):
        return uri
    version = file_version(uri)
    if version is None:
        raise InputNotFound(f"not found: {uri}")
    key = sha256 or f"{version['bytes']}-{version['mtime_ns']}"
    folder = os.path.join(cache_root(), "files", hashlib.sha1(uri.encode()).hexdigest()[:16])
    name = os.path.basename(filesystem(uri)[1])
    local = os.path.join(folder, f"{hashlib.sha1(key.encode()).hexdigest()[:16]}-{name}")
    if os.path.isfile(local):
        return local
    os.makedirs(folder, exist_ok=True)
    data = read_bytes(uri)
    if sha256 is not None and sha256_hex(data) != sha256:
        raise RemoteFileChanged(
            f"{uri} changed since its index manifest was written (content hash differs): the "
            f"index is being rebuilt there; search again once it is done"
        )
    tmp = f"{local}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"  # several workers may fetch at once
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, local)
    for other in os.listdir(folder):  # older versions: processes that mapped them keep them open
        if other != os.path.basename(local) and not other.endswith(".tmp"):
            with suppress(OSError):
                os.remove(os.path.join(folder, other))
    return local


def write_json(uri: str, obj: Any) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_parquet(table, uri: str) -> None:
    """Write one Parquet file atomically (temporary name, then move), so a killed job never leaves
    a half-written shard that a resumed run would take as finished."""
    with _atomic_target(uri) as (fs, tmp):
        pq.write_table(table, tmp, filesystem=fs, compression="zstd")


def read_parquet(uri: str, columns: list[str] | None = None):
    """Read one Parquet file or every Parquet file below a folder into one Arrow table."""
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def parquet_schema(uri: str):
    """The Arrow schema of one Parquet file, read from its footer (no data pages)."""
    fs, path = filesystem(uri)
    with fs.open_input_file(path) as fh:
        return pq.read_schema(fh)


def parquet_files(source: str) -> list[str]:
    """A Parquet file, or the Parquet files under a folder (FileNotFoundError if none)."""
    files = [source] if is_file(source) else list_files(source, ".parquet")
    if not files:
        raise InputNotFound(f"no Parquet files under {source}")
    return files
