"""Image bytes by id, from the corpus index_corpus read, for ids in its index only.

The lookup is built once (per replica of the images deployment) from the corpus' own layout:
- parquet with an image column: id -> (file, row group, row); a read fetches one row group's image
  column (a few kept in an LRU) and slices one row;
- parquet with a path column: id -> the path that table lists;
- folder: the id is the path under the folder; the resolved file must still lie inside it;
- webdataset tars: id -> (tar, offset, size) from the tar headers; a read is one ranged read.

Only ids in the index id map are known, so nothing outside the configured corpus can be served
(and `serve.search.check_image_id` refuses traversal before any lookup). For corpora of hundreds
of millions of images, serve images from object storage instead (`image_url_template`).
"""

from __future__ import annotations

import os
import tarfile
from collections import OrderedDict

import numpy as np

from align import io
from align.images import IMAGE_EXTENSIONS


class CorpusImages:
    def __init__(self, corpus: dict, ids: np.ndarray, row_group_cache: int = 8):
        """corpus: the served model's corpus facts (serve.config.ServedModel.corpus); ids: the
        image ids of its index."""
        self.format = corpus["input_format"]
        self.source = corpus["input"]
        known = set(ids.tolist())
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = row_group_cache
        if self.format == "folder":
            self.root = self.source if io.is_uri(self.source) else os.path.realpath(self.source)
            self.locations = dict.fromkeys(known)
        elif self.format == "webdataset":
            self.locations = self._tar_members(known)
        elif corpus["image_column"]:
            self.column = corpus["image_column"]
            self.locations = self._parquet_rows(corpus["id_column"], known)
        else:
            self.locations = self._parquet_paths(corpus["id_column"], corpus["path_column"], known)

    def __len__(self) -> int:
        return len(self.locations)

    def __contains__(self, image_id: str) -> bool:
        return image_id in self.locations

    def _files(self, suffix: str) -> list[str]:
        return [self.source] if io.is_file(self.source) else io.list_files(self.source, suffix)

    def _parquet_rows(self, id_column: str, known: set) -> dict:
        import pyarrow.parquet as pq

        self.files = self._files(".parquet")
        locations = {}
        for f, path in enumerate(self.files):
            fs, p = io.filesystem(path)
            with fs.open_input_file(p) as fh:
                pf = pq.ParquetFile(fh)
                for g in range(pf.num_row_groups):
                    ids = pf.read_row_group(g, columns=[id_column])[id_column].to_pylist()
                    locations.update(
                        (image_id, (f, g, r)) for r, image_id in enumerate(ids) if image_id in known
                    )
        return locations

    def _parquet_paths(self, id_column: str, path_column: str, known: set) -> dict:
        table = io.read_parquet(self.source, columns=[id_column, path_column])
        pairs = zip(table[id_column].to_pylist(), table[path_column].to_pylist(), strict=True)
        return {i: p for i, p in pairs if i in known}

    def _tar_members(self, known: set) -> dict:
        """id -> (tar, offset, size) for plain tars (a read is one ranged read), or (tar, member
        name, None) for compressed ones, which index_corpus also reads: no offsets there, so a
        read streams the tar up to the member (slower; keep served corpora uncompressed)."""
        locations = {}
        for path in self._files(".tar"):
            fs, p = io.filesystem(path)
            try:
                with fs.open_input_file(p) as fh, tarfile.open(fileobj=fh, mode="r:") as tar:
                    for member in tar:
                        key = self._image_key(member, known)
                        if key is not None:
                            locations[key] = (path, member.offset_data, member.size)
            except tarfile.ReadError:  # not a plain tar: gzip, bzip2 or xz inside
                with (
                    fs.open_input_stream(p) as stream,
                    tarfile.open(fileobj=stream, mode="r|*") as tar,
                ):
                    for member in tar:
                        key = self._image_key(member, known)
                        if key is not None:
                            locations[key] = (path, member.name, None)
        return locations

    @staticmethod
    def _image_key(member: tarfile.TarInfo, known: set) -> str | None:
        key, _, ext = member.name.rpartition(".")
        if member.isfile() and f".{ext.lower()}" in IMAGE_EXTENSIONS and key in known:
            return key
        return None

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
        if image_id not in self.locations:
            return None
        where = self.locations[image_id]
        if self.format == "folder":
            if io.is_uri(self.root):
                return io.read_bytes(f"{self.root.rstrip('/')}/{image_id}")
            path = os.path.realpath(os.path.join(self.root, image_id))
            if os.path.commonpath([path, self.root]) != self.root:  # a symlink out of the corpus
                return None
            return io.read_bytes(path)
        if self.format == "webdataset":
            path, offset, size = where
            fs, p = io.filesystem(path)
            if size is None:  # a compressed tar: `offset` is the member's name
                with (
                    fs.open_input_stream(p) as stream,
                    tarfile.open(fileobj=stream, mode="r|*") as tar,
                ):
                    for member in tar:
                        if member.name == offset:
                            return tar.extractfile(member).read()
                return None
            with fs.open_input_file(p) as fh:
                fh.seek(offset)
                return fh.read(size)
        if isinstance(where, str):
            return io.read_bytes(where)
        f, g, r = where
        image = self._row_group_images(f, g)[r].as_py()
        # Hugging Face's image struct {bytes, path}, which index_corpus reads too.
        return image.get("bytes") if isinstance(image, dict) else image
