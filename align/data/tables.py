"""Contract tables read by image id: the rows of an images-contract table for some ids, and each
id's row in a table (a join by image_id without a loop)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from align.data.contracts import IMAGES, require_columns
from align.storage import io


def read_image_table(source: str, ids, columns: list[str]):
    """Rows of an images-contract table, all or those whose image_id is in `ids`."""
    files = io.parquet_files(source)
    fs, _ = io.filesystem(files[0])
    paths = [io.filesystem(f)[1] for f in files]
    dataset = pads.dataset(paths, format="parquet", filesystem=fs)
    require_columns(IMAGES, dataset.schema.names, f"read {source}", needed=columns)
    where = pc.field("image_id").isin(pa.array(list(ids), pa.string())) if ids is not None else None
    return dataset.to_table(columns=columns, filter=where)


def align_rows(ids, table):
    """Row of `table` for each id (-1 where it has none): joins by image_id without a loop."""
    rows = pc.index_in(pa.array(ids, pa.string()), value_set=table["image_id"].combine_chunks())
    return rows.fill_null(-1).to_numpy(zero_copy_only=False)
