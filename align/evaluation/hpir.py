"""The HPIR protocol (docs/method.md, Evaluation): for each query, two rows of images and the
people's preference per dimension; a retrieval model prefers the row its mean similarity ranks
higher."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from align.data import tables
from align.data.contracts import HPIR, HPIR_DIMENSIONS, ContractError, require_columns
from align.evaluation import metrics
from align.evaluation.gallery import Gallery, mean_row_similarity
from align.storage import io


def read_hpir(path: str) -> pa.Table:
    """The HPIR file (the hpir contract), checked: every row holds the same number of images."""
    io.require_exists(path, "HPIR file (evaluate.hpir)")
    table = io.read_parquet(path)
    require_columns(HPIR, table.column_names, "evaluate.hpir")
    lengths = pc.unique(
        pa.chunked_array(
            [pc.list_value_length(table["row_a"]), pc.list_value_length(table["row_b"])]
        )
    )
    if len(lengths) > 1:  # none: a file without items (a gallery too small to draw rows from)
        raise ContractError(
            f"HPIR file {path}: every row A and row B must hold the same number of images "
            f"(found {sorted(lengths.to_pylist())})"
        )
    return table


def hpir_rows(hpir: pa.Table, gallery: Gallery) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gallery rows of every item's row A and row B ((M, k) each, -1 if missing), and which
    items have all their images in the gallery."""
    lookup = pa.table({"image_id": pa.array(gallery.ids, pa.string())})
    rows = []
    for column in ("row_a", "row_b"):
        flat = pc.list_flatten(hpir[column]).to_numpy(zero_copy_only=False)
        rows.append(tables.align_rows(flat, lookup).reshape(hpir.num_rows, -1))
    complete = (rows[0] >= 0).all(axis=1) & (rows[1] >= 0).all(axis=1)
    return rows[0], rows[1], complete


def hpir_model_metrics(
    hpir: pa.Table, text_emb: np.ndarray, all_texts: list[str], gallery: Gallery
) -> dict:
    """hpir_{dimension}: confidence-weighted agreement of the model's mean-similarity preference
    with the people's, over the HPIR items whose images are all in the gallery."""
    row_a, row_b, complete = hpir_rows(hpir, gallery)
    position = {t: i for i, t in enumerate(all_texts)}
    q = text_emb[[position[t] for t in hpir["query"].to_pylist()]]
    prefers_a = metrics.similarity_preference(
        mean_row_similarity(q, gallery, row_a), mean_row_similarity(q, gallery, row_b)
    )
    out = {}
    for dim in HPIR_DIMENSIONS:
        preferred = np.asarray(hpir[f"{dim}_preferred"].to_pylist(), dtype=object)[complete]
        confidence = hpir[f"{dim}_confidence"].to_numpy(zero_copy_only=False)[complete]
        out[f"hpir_{dim}"] = metrics.hpir_agreement(prefers_a[complete], preferred, confidence)
    return out
