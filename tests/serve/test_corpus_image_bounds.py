"""The bounds of serve.images.CorpusImages: its row-group cache holds at most cache_bytes (least
recently used out first), a tar member larger than max_member_bytes is refused before it is
read, and listing a tar that takes longer than tar_timeout_s is an error naming the tar."""

import io as _io
import random
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align.data.tars import TarTimeout
from serve.images import CorpusImages

ROWS, GROUPS, IMAGE_BYTES = 8, 4, 1000


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AESTHETIC_ALIGN_CACHE", str(tmp_path / "cache"))


def _parquet_corpus(tmp_path):
    """One file of GROUPS row groups, each ROWS images of IMAGE_BYTES bytes."""
    rng = random.Random(0)
    ids = [f"img-{i:03d}" for i in range(ROWS * GROUPS)]
    images = [rng.randbytes(IMAGE_BYTES) for _ in ids]
    table = pa.table({"image_id": ids, "image": pa.array(images, pa.binary())})
    path = tmp_path / "part-0.parquet"
    pq.write_table(table, path, row_group_size=ROWS)
    group_bytes = [
        pq.ParquetFile(path).read_row_group(g, columns=["image"])["image"].nbytes
        for g in range(GROUPS)
    ]
    corpus = {
        "input": str(path),
        "input_format": "parquet",
        "id_column": "image_id",
        "image_column": "image",
        "path_column": None,
    }
    return corpus, ids, images, group_bytes


def _tars(folder) -> dict:
    """The served-corpus facts of a folder of WebDataset tars."""
    return {
        "input": str(folder),
        "input_format": "webdataset",
        "id_column": "image_id",
        "image_column": None,
        "path_column": None,
    }


def test_row_group_cache_is_bounded_by_bytes_least_recently_used_out_first(tmp_path):
    corpus, ids, images, group_bytes = _parquet_corpus(tmp_path)
    budget = 2 * max(group_bytes) + max(group_bytes) // 2  # two row groups fit, three do not
    store = CorpusImages(corpus, np.array(ids, dtype=object), cache_bytes=budget)

    def read_from(group: int, row: int = 3) -> None:
        i = group * ROWS + row
        assert store.read(ids[i]) == images[i]

    for group in (0, 1, 0, 2):  # 0 is used again after 1, so 1 is the least recently used
        read_from(group)
    assert list(store._cache) == [(0, 0), (0, 2)]
    assert store._cached_bytes == group_bytes[0] + group_bytes[2] <= budget
    read_from(1)
    assert list(store._cache) == [(0, 2), (0, 1)]
    assert sum(size for _, size in store._cache.values()) == store._cached_bytes <= budget


def test_a_row_group_larger_than_the_cache_is_read_but_not_kept(tmp_path):
    corpus, ids, images, group_bytes = _parquet_corpus(tmp_path)
    store = CorpusImages(corpus, np.array(ids, dtype=object), cache_bytes=min(group_bytes) - 1)
    assert [store.read(i) for i in ids] == images
    assert not store._cache and store._cached_bytes == 0


@pytest.mark.parametrize("mode", ["w", "w:gz"], ids=["plain", "gzip"])
def test_a_tar_member_over_the_size_limit_is_refused(tmp_path, mode):
    """The size comes from the tar header (the location table's size column for a plain tar,
    the member's header while streaming a compressed one), checked before any byte is read."""
    members = {"small": b"\xff\xd8" + bytes(998), "large": b"\xff\xd8" + bytes(4998)}
    with tarfile.open(tmp_path / "shard-0.tar", mode) as tar:
        for key, data in members.items():
            info = tarfile.TarInfo(f"{key}.jpg")
            info.size = len(data)
            tar.addfile(info, _io.BytesIO(data))
    corpus = _tars(tmp_path)
    store = CorpusImages(corpus, np.array(list(members), dtype=object), max_member_bytes=1000)
    assert store.read("small") == members["small"]
    assert "large" in store and store.read("large") is None


def test_listing_a_tar_past_its_time_bound_is_an_error_naming_the_tar(tmp_path):
    with tarfile.open(tmp_path / "shard-0.tar", "w") as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = 3
        tar.addfile(info, _io.BytesIO(b"abc"))
    corpus = _tars(tmp_path)
    ids = np.array(["a"], dtype=object)
    # No reader starts within a millisecond: the listing is stopped at its bound.
    with pytest.raises(TarTimeout, match=r"shard-0\.tar: not read within 0\.001 s"):
        CorpusImages(corpus, ids, tar_timeout_s=0.001)
    assert CorpusImages(corpus, ids).read("a") == b"abc"
