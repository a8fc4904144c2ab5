"""Image bytes by id, from the corpus index_corpus read, for ids in its index only.

Where each indexed id lies in the corpus is a sorted table on disk, built once per corpus and
index (by the first replica, then shared through $AESTHETIC_ALIGN_CACHE) and memory-mapped: a
lookup is a binary search over the sorted ids (numpy searchsorted on a memory map), so a replica
holds no per-id Python objects. By layout:
- parquet with an image column: id -> (file, row group, row); a read fetches one row group's image
  column (a few kept in an LRU) and slices one row;
- parquet with a path column: id -> the path that table lists;
- folder: the id is the path under the folder; the resolved file must still lie inside it;
- webdataset tars: id -> (tar, offset, size) from the tar headers; a read is one ranged read.

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
import uuid
from collections import OrderedDict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from align import io
from align.images import IMAGE_EXTENSIONS

# location columns: parquet (file, row group, row); tar (tar, offset, size; size -1: compressed,
# the member's name in `names`); path-listing parquet and folders use `names` / the id itself.
LOCATIONS = ("ids.npy", "where.npy", "names.arrow", "files.json")


def cache_root() -> str:
    return os.environ.get("AESTHETIC_ALIGN_CACHE") or os.path.expanduser("~/.cache/aesthetic-align")


def _arrow_strings(values) -> pa.Array:
    """Ids as one Arrow string array, whether given as Arrow (chunked or not) or numpy."""
    if isinstance(values, pa.ChunkedArray):
        return values.combine_chunks()
    return values if isinstance(values, pa.Array) else pa.array(values, pa.string())


def _as_bytes(values) -> np.ndarray:
    """Arrow or numpy strings -> numpy fixed-width UTF-8 bytes (sortable, memory-mappable)."""
    return pc.cast(_arrow_strings(values), pa.binary()).to_numpy(zero_copy_only=False).astype("S")


class CorpusImages:
    def __init__(self, corpus: dict, ids, row_group_cache: int = 8, key: str | None = None):
        """corpus: the served model's corpus facts (serve.config.ServedModel.corpus); ids: the
        image ids of its index (Arrow or numpy strings, or a callable returning them, called only
        when the table must be built); key: names the table in the cache (default: a hash of
        the corpus facts and the ids)."""
        self.format = corpus["input_format"]
        self.source = corpus["input"]
        self.corpus = corpus
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = row_group_cache
        if self.format == "folder":
            self.root = self.source if io.is_uri(self.source) else os.path.realpath(self.source)
        elif self.format != "webdataset" and corpus["image_column"]:
            self.column = corpus["image_column"]
        if key is None:
            ids = ids() if callable(ids) else ids
            digest = hashlib.sha1(json.dumps(corpus, sort_keys=True).encode())
            digest.update(np.sort(_as_bytes(ids)).tobytes())
            key = digest.hexdigest()[:20]
        folder = os.path.join(cache_root(), "image_locations", key)
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
        import pyarrow.parquet as pq

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
        read streams the tar up to the member (slower; keep served corpora uncompressed)."""
        files = self._files(".tar")
        keys, where, names = [], [], []
        for t, path in enumerate(files):
            fs, p = io.filesystem(path)
            try:
                with fs.open_input_file(p) as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
                    for member in tar:  # a tar has no index: its headers are the listing
                        key = self._image_key(member)
                        if key is not None:
                            keys.append(key)
                            where.append((t, member.offset_data, member.size))
                            names.append(member.name)
            except tarfile.ReadError:  # not a plain tar: gzip, bzip2 or xz inside
                with (
                    fs.open_input_stream(p) as stream,
                    tarfile.open(fileobj=stream, mode="r|*") as tar,
                ):
                    for member in tar:
                        key = self._image_key(member)
                        if key is not None:
                            keys.append(key)
                            where.append((t, 0, -1))
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

    @staticmethod
    def _image_key(member: tarfile.TarInfo) -> str | None:
        key, _, ext = member.name.rpartition(".")
        if member.isfile() and f".{ext.lower()}" in IMAGE_EXTENSIONS:
            return key
        return None

    # -- reading ---------------------------------------------------------------------------------

    def _row_group_images(self, f: int, g: int):
        import pyarrow.parquet as pq

        key = (f, g)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        fs, p = io.filesystem(self.files[f])
        with fs.open_input_file(p) as fh:
            column = pq.ParquetFile(fh).read_row_group(g, columns=[self.column])[self.column]
        self._cache[key] = column
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return column

    def read(self, image_id: str) -> bytes | None:
        """The image's encoded bytes, or None for an id not in the index."""
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
            fs, p = io.filesystem(self.files[first])
            if third < 0:  # a compressed tar: found by the member's name, streaming
                name = self.names[row].as_py()
                with (
                    fs.open_input_stream(p) as stream,
                    tarfile.open(fileobj=stream, mode="r|*") as tar,
                ):
                    for member in tar:
                        if member.name == name:
                            return tar.extractfile(member).read()
                return None
            with fs.open_input_file(p) as fh:
                fh.seek(second)
                return fh.read(third)
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
