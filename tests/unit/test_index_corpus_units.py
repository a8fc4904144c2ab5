"""A resumed index_corpus skips a unit only when nothing it depends on changed."""

import pyarrow as pa
import pyarrow.parquet as pq

from align import io
from align.config import load_config
from pipelines.index_corpus import DONE_MARKER, unit_done, unit_inputs


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
