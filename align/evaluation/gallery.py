"""The gallery an evaluation searches: its image ids, embeddings and index, the aesthetic scores
and (on the synthetic world) the ground truth of every image, row-aligned with it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from align.data import tables, world
from align.data.contracts import GROUND_TRUTH, SCORER_COLUMN_PREFIX, ContractError, require_columns
from align.storage import io


@dataclass
class Gallery:
    ids: np.ndarray
    embeddings: np.ndarray  # float16 (n, d), L2-normalised
    index: object  # FAISS (or ShardedIndex)


def take_or_nan(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.where(rows >= 0, values[np.maximum(rows, 0)], np.nan).astype(np.float64)


def corpus_scores(index_corpus_dir: str, gallery_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Per gallery image: the combined aesthetic and each scorer's raw score (NaN if unscored),
    from the scored shards of an index_corpus output (`evaluate.scores`)."""
    scored_dir = f"{index_corpus_dir}/scored"
    io.require_exists(scored_dir, "index_corpus scored shards (evaluate.scores)")
    table = pa.concat_tables(
        [io.read_parquet(f) for f in io.list_files(scored_dir, ".parquet")],
        promote_options="default",
    )
    table = table.filter(pc.equal(table["status"], "ok"))
    rows = tables.align_rows(gallery_ids, table)
    scores = {"aesthetic": take_or_nan(table["aesthetic"].to_numpy(zero_copy_only=False), rows)}
    for name in table.column_names:
        if name.startswith(SCORER_COLUMN_PREFIX):
            values = table[name].to_numpy(zero_copy_only=False)
            scores[name] = take_or_nan(values, rows)
    return scores


@dataclass
class GroundTruth:
    """The synthetic world's facts about each gallery image (row-aligned with the gallery)."""

    colour: np.ndarray
    shape: np.ndarray
    background: np.ndarray
    true_aesthetic: np.ndarray

    @classmethod
    def read(cls, path: str, gallery_ids: np.ndarray) -> GroundTruth:
        gt = io.read_parquet(path)
        require_columns(GROUND_TRUTH, gt.column_names, "evaluate.ground_truth")
        rows = tables.align_rows(gallery_ids, gt)
        if (rows < 0).any():
            raise ContractError(
                f"ground truth {path} lacks {int((rows < 0).sum())} gallery images, "
                f"e.g. {gallery_ids[rows < 0][0]!r}"
            )
        take = lambda c: gt[c].to_numpy(zero_copy_only=False)[rows]  # noqa: E731
        return cls(take("colour"), take("shape"), take("background"), take("true_aesthetic"))

    def relevance(self, query_facts: dict[str, np.ndarray], top: np.ndarray) -> np.ndarray:
        """(Q, k) bool: is each retrieved image what its query asks for."""
        q = {c: np.asarray(query_facts[c], dtype=object)[:, None] for c in query_facts}
        return world.relevant(
            q["colour"],
            q["shape"],
            q["background"],
            self.colour[top],
            self.shape[top],
            self.background[top],
        )


def mean_row_similarity(query_emb: np.ndarray, gallery: Gallery, rows_of: np.ndarray) -> np.ndarray:
    """(M,) mean similarity between each query and the images of its row (rows_of: (M, k)
    gallery rows, -1 where the image is not in the gallery)."""
    emb = gallery.embeddings.astype(np.float32)[np.maximum(rows_of, 0)]  # (M, k, d)
    sims = np.einsum("md,mkd->mk", query_emb, emb)
    sims = np.where(rows_of >= 0, sims, np.nan)
    return np.nanmean(sims, axis=1)


def remap_rows(top: np.ndarray, gallery: Gallery, reference: Gallery) -> np.ndarray:
    """Rows of `gallery` -> rows of the `reference` gallery (the first system's), which every
    metric indexes (the galleries hold the same images, maybe in another order)."""
    if gallery is reference:
        return top
    rows = tables.align_rows(
        gallery.ids[np.maximum(top, 0)].ravel(),
        pa.table({"image_id": pa.array(reference.ids, pa.string())}),
    )
    return np.where(top >= 0, rows.reshape(top.shape), -1)


def caption_texts(source: str, ids: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The captions of the held-out images `ids` that have one, and their rows in `ids`."""
    captions = tables.read_image_table(source, ids, ["image_id", "caption"])
    text = captions["caption"].to_numpy(zero_copy_only=False)[tables.align_rows(ids, captions)]
    usable = np.flatnonzero([bool(t and str(t).strip()) for t in text])
    return [str(t) for t in text[usable]], usable
