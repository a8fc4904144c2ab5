"""Image bytes by id, from the corpus index_corpus read, for ids in its index only.

Where each indexed id lies in the corpus is a sorted table on disk, built once per corpus and
index (by the first replica, then shared through $AESTHETIC_ALIGN_CACHE) and memory-mapped: a
lookup is a binary search over the sorted ids (numpy searchsorted on a memory map), so a replica
holds no per-id Python objects. By layout:
- parquet with an image column: id -> (file, row group, row); a read fetches one row group's image
  column (kept in an LRU bounded by bytes) and slices one row;
- parquet with a path column: id -> the path that table lists;
- folder: the id is the path under the folder; the resolved file must still lie inside it;
- webdataset tars: id -> (tar, offset, size) from the tar headers, listed by a child process
  under a time bound (align.data.tars: crafted headers can stall the tar parser); a read is one ranged
  read, refused for a member whose header size is over the limit.

Only ids in the index are in the table, so nothing outside the configured corpus can be served
(and `serve.search.check_image_id` refuses traversal before any lookup). For corpora of hundreds
of millions of images, serve images from object storage instead (`image_url_template`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import threading
import uuid
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from align.config import IndexCorpusConfig
from align.data.images import IMAGE_EXTENSIONS
from align.data.tars import list_members
from align.log import get_logger
from align.storage import io

log = get_logger(__name__)

# location columns: parquet (file, row group, row); tar (tar, offset, size; size -1: compressed,
# the member's name in `names`); path-listing parquet and folders use `names` / the id itself.
LOCATIONS = ("ids.npy", "where.npy", "names.arrow", "files.json")
ROW_GROUP_CACHE_BYTES = 256 * 2**20


def _arrow_strings(values) -> pa.Array:
    """Ids as one Arrow string array, whether given as Arrow (chunked or not) or numpy."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    return values if isinstance(values, pa.Array) else pa.array(values, pa.string())


def _as_bytes(values) -> np.ndarray:
    """Arrow or numpy strings -> numpy fixed-width UTF-8 bytes (sortable, memory-mappable)."""
    return pc.cast(_arrow_strings(values), pa.binary()).to_numpy(zero_copy_only=False).astype("S")


class CorpusImages:
    def __init__(
        self,
        corpus: dict,
        ids,
        cache_bytes: int = ROW_GROUP_CACHE_BYTES,
        key: str | None = None,
        max_member_bytes: int = IndexCorpusConfig.model_fields["max_member_bytes"].default,
        tar_timeout_s: float = IndexCorpusConfig.model_fields["tar_timeout_s"].default,
    ):
        """corpus: the served model's corpus facts (serve.config.ServedModel.corpus); ids: the
        image ids of its index (Arrow or numpy strings, or a callable returning them, called only
        when the table must be built); cache_bytes: the most bytes of parquet image columns kept
        (least recently used row groups go first; a row group larger than this is read, not
        kept); key: names the table in the cache (default: a hash of the corpus facts and the
        ids); max_member_bytes: a tar member larger than this, by its header, is refused (read
        gives None), never read; tar_timeout_s: the most seconds listing one tar may take.

        Raises:
            align.data.tars.TarTimeout: naming the tar, when listing a tar takes over tar_timeout_s.
            align.data.tars.TarUnreadable: naming the tar, when it is corrupt.
        """
        self.format = corpus["input_format"]
        self.source = corpus["input"]
        self.corpus = corpus
        self.max_member_bytes = max_member_bytes
        self.tar_timeout_s = tar_timeout_s
        self._cache: OrderedDict = OrderedDict()  # (file, row group) -> (column, its nbytes)
        self._cache_bytes = cache_bytes
        self._cached_bytes = 0
        self._cache_lock = threading.Lock()  # Serve may call read from several threads
        if self.format == "folder":
            self.root = self.source if io.is_uri(self.source) else os.path.realpath(self.source)
        elif self.format != "webdataset" and corpus["image_column"]:
            self.column = corpus["image_column"]
        if key is None:
            ids = ids() if callable(ids) else ids
            digest = hashlib.sha1(json.dumps(corpus, sort_keys=True).encode())
            digest.update(np.sort(_as_bytes(ids)).tobytes())
            key = digest.hexdigest()[:20]
        folder = os.path.join(io.cache_root(), "image_locations", key)
        if not os.path.isfile(os.path.join(folder, LOCATIONS[-1])):
            self._build(folder, ids() if callable(ids) else ids)
        self.ids = np.load(os.path.join(folder, "ids.npy"), mmap_mode="r")
        self.where = np.load(os.path.join(folder, "where.npy"), mmap_mode="r")
        with open(os.path.join(folder, "files.json")) as f:
            self.files = json.load(f)
        names = os.path.join(folder, "names.arrow")
        self.names = (
            pa.ipc.open_file(pa.memory_map(names)).read_all()["name"]
            if os.path.isfile(names)
            else None
        )

    def __len__(self) -> int:
        return len(self.ids)

    def _find(self, image_id: str) -> int | None:
        """Row of the id in the sorted table (binary search), or None."""
        key = image_id.encode()
        i = int(np.searchsorted(self.ids, key))
        return i if i < len(self.ids) and self.ids[i] == key else None

    def __contains__(self, image_id: str) -> bool:
        return self._find(image_id) is not None

    # -- building the table (once per corpus and index) ------------------------------------------

    def _build(self, folder: str, ids) -> None:
        known = _arrow_strings(ids)
        if self.format == "folder":
            found, where, names, files = known, np.zeros((len(known), 3), np.int64), None, []
        elif self.format == "webdataset":
            found, where, names, files = self._tar_members(known)
        elif self.corpus["image_column"]:
            found, where, names, files = self._parquet_rows(self.corpus["id_column"], known)
        else:
            found, where, names, files = self._parquet_paths(
                self.corpus["id_column"], self.corpus["path_column"], known
            )
        keys = _as_bytes(found)
        order = np.argsort(keys, kind="stable")
        tmp = f"{folder}.{uuid.uuid4().hex[:8]}.tmp"
        os.makedirs(tmp)
        np.save(os.path.join(tmp, "ids.npy"), keys[order])
        np.save(os.path.join(tmp, "where.npy"), np.asarray(where, np.int64).reshape(-1, 3)[order])
        if names is not None:
            table = pa.table({"name": pa.array(names, pa.string()).take(pa.array(order))})
            with pa.OSFile(os.path.join(tmp, "names.arrow"), "wb") as sink:
                with pa.ipc.new_file(sink, table.schema) as writer:
                    writer.write_table(table)
        with open(os.path.join(tmp, "files.json"), "w") as f:
            json.dump(files, f)
        try:  # another replica may have built it meanwhile: theirs is as good
            os.makedirs(os.path.dirname(folder), exist_ok=True)
            os.rename(tmp, folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)

    def _files(self, suffix: str) -> list[str]:
        return [self.source] if io.is_file(self.source) else io.list_files(self.source, suffix)

    def _parquet_rows(self, id_column: str, known):
        files = self._files(".parquet")
        found, where = [], []
        for f, path in enumerate(files):
            fs, p = io.filesystem(path)
            with fs.open_input_file(p) as fh:
                pf = pq.ParquetFile(fh)
                for g in range(pf.num_row_groups):
                    ids = pf.read_row_group(g, columns=[id_column])[id_column]
                    rows = np.flatnonzero(
                        pc.is_in(ids, value_set=known).to_numpy(zero_copy_only=False)
                    )
                    found.append(ids.take(pa.array(rows)))
                    where.append(
                        np.stack([np.full(len(rows), f), np.full(len(rows), g), rows], axis=1)
                    )
        return _concat(found), np.concatenate(where) if where else np.zeros((0, 3)), None, files

    def _parquet_paths(self, id_column: str, path_column: str, known):
        table = io.read_parquet(self.source, columns=[id_column, path_column])
        table = table.filter(pc.is_in(table[id_column], value_set=known))
        where = np.zeros((table.num_rows, 3), np.int64)
        return table[id_column].combine_chunks(), where, table[path_column].combine_chunks(), []

    def _tar_members(self, known):
        """(tar, offset, size) for plain tars (a read is one ranged read), or the member's name
        with size -1 for compressed ones, which index_corpus also reads: no offsets there, so a
        read streams the tar up to the member (slower; keep served corpora uncompressed). A tar
        has no index: its headers are the listing, parsed in a child process within
        tar_timeout_s (align.data.tars)."""
        files = self._files(".tar")
        keys, where, names = [], [], []
        for t, path in enumerate(files):
            for member in list_members(path, self.tar_timeout_s):
                key, _, ext = member.name.rpartition(".")
                if f".{ext.lower()}" in IMAGE_EXTENSIONS:
                    keys.append(key)
                    plain = member.offset >= 0
                    where.append((t, member.offset, member.size) if plain else (t, 0, -1))
                    names.append(member.name)
        keys = pa.array(keys, pa.string())
        keep = pc.is_in(keys, value_set=known)
        rows = np.flatnonzero(keep.to_numpy(zero_copy_only=False))
        where = np.asarray(where, np.int64).reshape(-1, 3)[rows]
        return (
            keys.take(pa.array(rows)),
            where,
            pa.array(names, pa.string()).take(pa.array(rows)),
            files,
        )

    # -- reading ---------------------------------------------------------------------------------

    def _row_group_images(self, f: int, g: int):
        key = (f, g)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key][0]
        fs, p = io.filesystem(self.files[f])
        with fs.open_input_file(p) as fh:
            column = pq.ParquetFile(fh).read_row_group(g, columns=[self.column])[self.column]
        size = column.nbytes
        if size > self._cache_bytes:  # kept, it would evict everything and still not fit
            return column
        with self._cache_lock:
            if key not in self._cache:  # another thread may have read it meanwhile
                self._cache[key] = (column, size)
                self._cached_bytes += size
            while self._cached_bytes > self._cache_bytes:
                self._cached_bytes -= self._cache.popitem(last=False)[1][1]
        return column

    def _tar_member(self, image_id: str, tar: str, offset: int, size: int, row: int):
        """A member's bytes, refused (None) when its header gives more than max_member_bytes."""
        fs, p = io.filesystem(tar)
        if size < 0:  # a compressed tar: found by the member's name, streaming
            # Parsed here, not in a child: the listing parsed these same headers within the
            # bound, and an unchanged tar parses the same way again.
            name = self.names[row].as_py()
            with fs.open_input_stream(p) as stream, tarfile.open(fileobj=stream, mode="r|*") as t:
                for member in t:
                    if member.name == name:
                        if member.size > self.max_member_bytes:
                            return self._refused(image_id, tar, member.size)
                        return t.extractfile(member).read()
            return None
        if size > self.max_member_bytes:
            return self._refused(image_id, tar, size)
        with fs.open_input_file(p) as fh:
            fh.seek(offset)
            return fh.read(size)

    def _refused(self, image_id: str, tar: str, size: int) -> None:
        log.warning(
            "image %s refused: its member of %s is %d bytes, over max_member_bytes=%d",
            image_id,
            tar,
            size,
            self.max_member_bytes,
        )
        return None

    def read(self, image_id: str) -> bytes | None:
        """The image's encoded bytes, or None for an id not in the index (or a tar member over
        max_member_bytes)."""
        row = self._find(image_id)
        if row is None:
            return None
        if self.format == "folder":
            if io.is_uri(self.root):
                return io.read_bytes(f"{self.root.rstrip('/')}/{image_id}")
            path = os.path.realpath(os.path.join(self.root, image_id))
            if os.path.commonpath([path, self.root]) != self.root:  # a symlink out of the corpus
                return None
            return io.read_bytes(path)
        first, second, third = (int(v) for v in self.where[row])
        if self.format == "webdataset":
            return self._tar_member(image_id, self.files[first], second, third, row)
        if not self.corpus["image_column"]:  # a listing of paths
            return io.read_bytes(self.names[row].as_py())
        image = self._row_group_images(first, second)[third].as_py()
        # Hugging Face's image struct {bytes, path}, which index_corpus reads too.
        return image.get("bytes") if isinstance(image, dict) else image


def _concat(arrays: list) -> pa.Array:
    return (
        pa.concat_arrays(
            [a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a for a in arrays]
        )
        if arrays
        else pa.array([], pa.string())
    )
