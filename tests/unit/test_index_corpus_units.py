"""A resumed index_corpus skips a unit only when nothing it depends on changed."""

import pyarrow as pa
import pyarrow.parquet as pq

from align.config import load_config
from align.runtime.resume import DONE_MARKER, unit_done, unit_inputs
from align.storage import io


def test_unit_is_redone_when_the_weights_or_the_input_change(tmp_path):
    shard = tmp_path / "part-0.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "image": [b"x"]}), shard)
    ckpt = tmp_path / "base.pt"
    ckpt.write_bytes(b"v1")
    config = load_config(None, [f"output_dir={tmp_path}", f"model.pretrained={ckpt}"])
    files = [str(shard)]
    unit = str(tmp_path / "unit")
    io.write_json(f"{unit}/{DONE_MARKER}", {"files": files, "inputs": unit_inputs(config, files)})
    assert unit_done(unit, files, config) is not None
    other = load_config(None, [f"output_dir={tmp_path}", "model.pretrained=null"])
    assert unit_done(unit, files, other) is None  # another model
    ckpt.write_bytes(b"v2: retrained at the same path")
    assert unit_done(unit, files, config) is None
    io.write_json(f"{unit}/{DONE_MARKER}", {"files": files, "inputs": unit_inputs(config, files)})
    pq.write_table(pa.table({"image_id": ["a", "b"], "image": [b"x", b"y"]}), shard)
    assert unit_done(unit, files, config) is None  # the shard was rewritten


def test_parquet_image_columns_are_read_or_refused_before_work(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import pytest

    from align.config import IndexCorpusConfig
    from align.data.contracts import ContractError
    from align.data.sources import parquet_image_layout, struct_bytes

    ic = IndexCorpusConfig()
    binary = tmp_path / "binary.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "image": pa.array([b"x"], pa.binary())}), binary)
    assert parquet_image_layout(ic, [str(binary)]) == "bytes"

    # Hugging Face datasets write images as a struct {bytes, path}: its bytes are read.
    hf = pa.table(
        {
            "image_id": ["a"],
            "image": pa.array(
                [{"bytes": b"\xff\xd8", "path": "a.jpg"}],
                pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
            ),
        }
    )
    pq.write_table(hf, tmp_path / "hf.parquet")
    assert parquet_image_layout(ic, [str(tmp_path / "hf.parquet")]) == "struct"
    assert struct_bytes(hf, "image")["image"].to_pylist() == [b"\xff\xd8"]

    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"image_id": ["a"], "image": [7]}), ints)
    with pytest.raises(ContractError, match=r"ints.parquet: column 'image' holds int64"):
        parquet_image_layout(ic, [str(binary), str(ints)])
    with pytest.raises(ContractError, match="no column 'image_id'"):
        parquet_image_layout(ic, [str(_no_id(tmp_path))])


def _no_id(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "noid.parquet"
    pq.write_table(pa.table({"key": ["a"], "image": pa.array([b"x"], pa.binary())}), path)
    return path


def _tar(path, members: dict, mode="w"):
    import io as _io
    import tarfile

    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, _io.BytesIO(data))
    return path


def _samples(path, max_member_bytes):
    from align.data.sources import tar_samples

    return [
        (r["image_id"], r["image"], r["read_error"])
        for r in tar_samples(str(path), max_member_bytes)
    ]


def test_webdataset_tars_stream_with_bombs_and_cuts_as_error_rows(tmp_path):
    members = {
        "000000001.jpg": b"\xff\xd8one",
        "000000001.txt": b"a caption",
        "000000002.txt": b"a failed download: no image",
        "000000003.jpg": b"\xff\xd8three",
    }
    plain = _tar(tmp_path / "plain.tar", members)
    assert _samples(plain, 1000) == [
        ("000000001", b"\xff\xd8one", ""),
        ("000000002", None, "empty file (no image member)"),
        ("000000003", b"\xff\xd8three", ""),
    ]

    # A gzip-compressed tar whose member inflates to 8 MiB of zeros: refused, never read.
    bomb = _tar(tmp_path / "bomb.tar", {"000000004.jpg": bytes(8 * 2**20), **members}, mode="w:gz")
    assert bomb.stat().st_size < 100_000
    rows = _samples(bomb, 2**20)
    assert rows[0][0] == "000000004" and rows[0][1] is None
    assert "over index_corpus.max_member_bytes=1048576" in rows[0][2]
    assert [r[0] for r in rows[1:]] == ["000000001", "000000002", "000000003"]

    # Cut short inside the third sample's data: the first two are kept, the rest is an error row.
    data = plain.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: data.index(b"\xff\xd8three") + 3])
    rows = _samples(cut, 1000)
    assert rows[:2] == [("000000001", b"\xff\xd8one", ""), ("000000002", None, rows[1][2])]
    assert rows[2][0] == "000000003" and "unreadable" in rows[2][2]
    assert rows[-1][0] == f"{cut}#unread" and "cut short" in rows[-1][2]


def test_img2dataset_parquet_output_failed_downloads_become_error_rows(tmp_path):
    """img2dataset's `output_format: parquet` ({shard}.parquet with a jpg column, failed
    downloads as rows without one): index_corpus reads caption, url, sha256 and status, and a
    failed download is an error row naming img2dataset's reason; our hash fills a missing one."""
    import hashlib
    import io as _io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from actors.decode import decode_batch
    from align.data.sources import NOT_DOWNLOADED, not_downloaded_rows, source_columns

    buf = _io.BytesIO()
    Image.new("RGB", (20, 20), "red").save(buf, format="PNG")
    png = buf.getvalue()
    table = pa.table(
        {
            "url": ["https://a/1.png", "https://a/2.png", "https://a/3.png"],
            "caption": ["red", "lost", None],
            "key": ["000000000", "000000001", "000000002"],
            "status": ["success", "failed_to_download", "success"],
            "error_message": [None, "timeout", None],
            "width": pa.array([20, None, 20], pa.int32()),
            "height": pa.array([20, None, 20], pa.int32()),
            "original_width": pa.array([20, None, 20], pa.int32()),
            "original_height": pa.array([20, None, 20], pa.int32()),
            "sha256": [hashlib.sha256(png).hexdigest(), None, None],
            "jpg": pa.array([png, None, png], pa.binary()),
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet")
    columns = source_columns([str(tmp_path / "00000.parquet")])
    assert columns == ["caption", "url", "sha256", "status", "error_message"]
    rows = not_downloaded_rows(table.select(["key", "jpg", *columns]))
    assert rows["read_error"].to_pylist() == [
        "",
        f"{NOT_DOWNLOADED} (failed_to_download): timeout",
        "",
    ]
    batch = {n: np.array(rows[n].to_pylist(), dtype=object) for n in rows.column_names}
    batch["image_id"] = batch.pop("key")
    out = decode_batch(batch, image_size=8, max_pixels=10**6, image_column="jpg")
    assert out["status"].tolist() == ["ok", "error", "ok"]
    assert out["error"][1].startswith(NOT_DOWNLOADED)
    assert out["caption"].tolist() == ["red", "lost", ""]
    assert out["sha256"].tolist() == [
        hashlib.sha256(png).hexdigest(),
        "",
        hashlib.sha256(png).hexdigest(),
    ]
