"""Checks of what a fine-tune reads, beside the pairing that made it (align/method/pairing.py): every
pair and caption row is trained on or becomes an error row with its reason. A pair is usable
when both images are present and decode, both reference similarities are finite and its query
is not empty; the driver's accounting and the training stream's filter use the same masks."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from align.config import ConfigError, ModelConfig
from align.data.contracts import PAIRS, require_columns
from align.errors import InputNotFound
from align.models.clip import ModelLoadError, model_id
from align.storage import io


@dataclass
class Stream:
    """One training stream after its checks: the Ray dataset, its row accounting, and how many
    decoded images each of its rows carries (a pair two, an image-caption row one)."""

    dataset: object
    rows_in: int
    rows_out: int
    errors: list[dict]
    images_per_row: int = 1


PAIR_COLUMNS = [
    "query_id",
    "query",
    "chosen_id",
    "rejected_id",
    "chosen_ref_sim",
    "rejected_ref_sim",
]


def parquet_dataset(uri: str, what: str) -> pads.Dataset:
    """The Parquet files at `uri` (a file or a folder) as one dataset; a clear error when none."""
    io.require_exists(uri, what)
    fs, _ = io.filesystem(uri)
    files = io.list_files(uri, ".parquet") if not io.is_file(uri) else [uri]
    if not files:
        raise InputNotFound(f"no Parquet files in {uri} ({what})")
    return pads.dataset([io.filesystem(f)[1] for f in files], filesystem=fs, format="parquet")


def read_pairs(uri: str, model: ModelConfig) -> pa.Table:
    """The pairs' ids, texts and reference similarities (not the images), checked against the
    contract and the model being trained.

    Raises:
        ContractError: a column is missing.
        ModelLoadError: the pairs' reference similarities come from another model.
    """
    dataset = parquet_dataset(uri, "pairs (run build_preferences first)")
    require_columns(
        PAIRS, dataset.schema.names, "finetune.read_pairs", [*PAIR_COLUMNS, "reference_model"]
    )
    table = dataset.to_table(columns=[*PAIR_COLUMNS, "reference_model"])
    expected = model_id(model)
    found = sorted(set(pc.unique(table["reference_model"]).to_pylist()) - {expected})
    if found:
        raise ModelLoadError(
            f"pairs at {uri} were made with reference model(s) {found} but finetune trains "
            f"{expected!r} (model.name / model.pretrained): the stored reference similarities "
            f"would be another model's; rebuild the pairs with this model"
        )
    return table.drop_columns(["reference_model"])


def pair_row_ids(pairs: pa.Table) -> list[str]:
    """The error table's row id of each pair: query_id:chosen>rejected."""
    return [
        f"{q}:{c}>{r}"
        for q, c, r in zip(
            pairs["query_id"].to_pylist(),
            pairs["chosen_id"].to_pylist(),
            pairs["rejected_id"].to_pylist(),
            strict=True,
        )
    ]


def has_text(texts) -> pa.Array:
    """Boolean per row: a string with more than whitespace (null is False). The one rule for
    empty queries and captions, in the checks and in the streams."""
    trimmed = pc.utf8_length(pc.utf8_trim_whitespace(texts))
    return pc.fill_null(pc.greater(trimmed, 0), False)


def usable_pairs(pairs: pa.Table, bad_images: pa.Array) -> pa.Array:
    """Boolean mask of the pairs that can be trained on: both images good, both reference
    similarities finite, a non-empty query. The driver's accounting and the training stream's
    filter both use it, so they agree."""
    finite = pc.and_(pc.is_finite(pairs["chosen_ref_sim"]), pc.is_finite(pairs["rejected_ref_sim"]))
    images_ok = pc.invert(
        pc.or_(pc.is_in(pairs["chosen_id"], bad_images), pc.is_in(pairs["rejected_id"], bad_images))
    )
    return pc.fill_null(pc.and_(pc.and_(finite, images_ok), has_text(pairs["query"])), False)


def pair_errors(pairs: pa.Table, keep: pa.Array, image_errors: dict[str, str]) -> list[dict]:
    """An error row, with its reason, for every pair not kept by `usable_pairs`."""
    bad = pairs.filter(pc.invert(keep))
    errors = []
    for row_id, c, r, cs, rs, q in zip(
        pair_row_ids(bad),
        bad["chosen_id"].to_pylist(),
        bad["rejected_id"].to_pylist(),
        bad["chosen_ref_sim"].to_pylist(),
        bad["rejected_ref_sim"].to_pylist(),
        bad["query"].to_pylist(),
        strict=True,
    ):  # error rows only: usually few
        if c in image_errors or r in image_errors:
            which = c if c in image_errors else r
            reason = f"image {which}: {image_errors[which]}"
        elif not q or not str(q).strip():
            reason = "empty query"
        else:
            reason = f"non-finite reference similarity (chosen {_num(cs)}, rejected {_num(rs)})"
        errors.append({"row_id": row_id, "stage": "check_pairs", "error": reason})
    return errors


def _num(x: float | None) -> str:
    return "missing" if x is None else f"{x:.4g}"


def image_problems(checked: pa.Table, wanted: pa.Array | None) -> dict[str, str]:
    """image_id -> reason, for wanted images that are missing or do not decode."""
    bad = checked.filter(pc.not_equal(checked["status"], "ok"))
    problems = dict(zip(bad["image_id"].to_pylist(), bad["error"].to_pylist(), strict=True))
    if wanted is not None:
        missing = pc.filter(wanted, pc.invert(pc.is_in(wanted, checked["image_id"])))
        problems.update({i: "missing from the images table" for i in missing.to_pylist()})
    return problems


def require_rows(rows: int, per_batch: int, key: str, workers: int, what: str) -> None:
    """A config error when the usable rows cannot fill one step of every worker."""
    if rows < per_batch * workers:
        raise ConfigError(
            f"{rows} usable {what} cannot fill one step: finetune.{key}={per_batch} x "
            f"finetune.scaling.num_workers={workers} needs at least {per_batch * workers}"
        )
