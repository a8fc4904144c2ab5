"""Decode stage (CPU tasks): encoded bytes or paths -> uint8 pixels at the model's size.

Every row comes out: decodable images with status 'ok', the rest with status 'error' and the
reason, and zero pixels that later stages skip.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa

from actors import require_batch_columns
from align.config import PoolConfig
from align.data.contracts import SOURCE_METADATA
from align.data.images import ImageDecodeError, decode_image
from align.runtime.stages import task_pool
from align.storage import io
from align.train.pair_checks import has_text

REQUIRED = {"image_id": "id of the image"}


def _read(path: str) -> bytes:
    try:
        return io.read_bytes(path)
    except FileNotFoundError:
        raise ImageDecodeError(f"file not found: {path}") from None
    except OSError as e:
        raise ImageDecodeError(f"cannot read {path}: {e}") from None


def decode_batch(
    batch: dict[str, np.ndarray],
    *,
    image_size: int,
    max_pixels: int,
    image_column: str | None = "image",
    path_column: str | None = None,
    carry: tuple[str, ...] = (),
) -> dict[str, np.ndarray]:
    """Decode a batch. Reads `image_column` (bytes) or else `path_column` (paths). A reader that
    could not produce a row's bytes says why in an optional `read_error` column: such rows
    are error rows with that reason. The source's caption, url and sha256 pass through; the
    sha256 of the bytes read is computed where the source gave none (exact duplicates); the
    `carry` columns pass through as they are."""
    source = image_column if image_column and image_column in batch else path_column
    require_batch_columns(
        batch, {**REQUIRED, source or "image": "encoded image bytes or a path"}, "decode"
    )
    n = len(batch["image_id"])
    pixels = np.zeros((n, image_size, image_size, 3), dtype=np.uint8)
    status = np.full(n, "ok", dtype=object)
    error = np.full(n, "", dtype=object)  # "" not None: an all-None column loses its type
    read_errors = batch.get("read_error")
    # "" for none, not None: an all-None column loses its type between stages.
    metadata = {
        c: np.array(["" if v is None else str(v) for v in batch[c]], dtype=object)
        for c in SOURCE_METADATA
        if c in batch
    }
    sha256 = metadata.setdefault("sha256", np.full(n, "", dtype=object))
    for i, item in enumerate(batch[source]):  # PIL decodes one image at a time
        if read_errors is not None and read_errors[i]:
            status[i], error[i] = "error", str(read_errors[i])
            continue
        try:
            data = _read(item) if source == path_column else item
            if not sha256[i] and data:
                sha256[i] = hashlib.sha256(data).hexdigest()
            pixels[i] = decode_image(data, image_size, max_pixels)
        except ImageDecodeError as e:
            status[i], error[i] = "error", str(e)
    return {
        "image_id": batch["image_id"],
        "pixels": pixels,
        "status": status,
        "error": error,
        **metadata,
        **{c: batch[c] for c in carry},
    }


def decode_columns(
    batch: dict[str, np.ndarray], *, columns: dict[str, str], image_size: int, max_pixels: int
) -> dict[str, np.ndarray]:
    """Decode each bytes column in `columns` (bytes column -> pixels column) and drop the bytes.

    For streams whose images were checked before (the fine-tune's): a failure here means the
    data changed under the job, so it raises instead of marking the row.
    """
    require_batch_columns(batch, {c: "encoded image bytes" for c in columns}, "decode")
    out = {k: v for k, v in batch.items() if k not in columns}
    for source, target in columns.items():
        pixels = np.zeros((len(batch[source]), image_size, image_size, 3), dtype=np.uint8)
        for i, data in enumerate(batch[source]):  # PIL decodes one image at a time
            pixels[i] = decode_image(data, image_size, max_pixels)
        out[target] = pixels
    return out


def check_decode_batch(
    batch: dict[str, np.ndarray], *, image_size: int, max_pixels: int, keep_bytes: bool = False
) -> dict:
    """Check stage (CPU tasks) before a fine-tune: does each image decode, has it a caption (when
    the table has captions), and its encoded size. The pixels are dropped; with `keep_bytes`
    the bytes stay, for the pair stage's broadcast."""

    require_batch_columns(batch, {"image": "encoded image bytes"}, "check_decode")
    decoded = decode_batch(batch, image_size=image_size, max_pixels=max_pixels)
    captions = batch.get("caption")
    has_caption = (
        has_text(pa.array(captions, pa.string())).to_numpy(zero_copy_only=False)
        if captions is not None
        else np.zeros(len(batch["image_id"]), dtype=bool)
    )
    out = {
        "image_id": batch["image_id"],
        "status": decoded["status"],
        "error": decoded["error"],
        "has_caption": has_caption,
        "nbytes": np.array([len(b or b"") for b in batch["image"]], dtype=np.int64),
    }
    if keep_bytes:
        out["image"] = batch["image"]
    return out


def concat_checks(tables: list[pa.Table]) -> pa.Table:
    """The check stage's blocks as one table (its columns, empty, when no image was found)."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return pa.table(
            {
                "image_id": pa.array([], pa.string()),
                "status": pa.array([], pa.string()),
                "error": pa.array([], pa.string()),
                "has_caption": pa.array([], pa.bool_()),
                "nbytes": pa.array([], pa.int64()),
            }
        )
    return pa.concat_tables(tables, promote_options="permissive")


def decode_stage(ds, pool: PoolConfig, *, image_size: int, max_pixels: int, **columns):
    """`decode_batch` over `ds` in a task pool (`pool`); `columns`: image_column, path_column,
    carry, as decode_batch takes them."""
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"image_size": image_size, "max_pixels": max_pixels, **columns},
        **task_pool(pool),
    )


def decode_columns_stage(ds, pool: PoolConfig, columns: dict[str, str], sizes: dict):
    """`decode_columns` over `ds` in a task pool: each bytes column of `columns` decoded into its
    pixels column (`sizes`: image_size, max_pixels)."""
    return ds.map_batches(
        decode_columns,
        fn_kwargs={"columns": columns, **sizes},
        batch_format="numpy",
        **task_pool(pool),
    )


def check_decode_stage(ds, pool: PoolConfig, sizes: dict, keep_bytes: bool):
    """`check_decode_batch` over `ds` in a task pool (the fine-tune's image checks)."""
    return ds.map_batches(
        check_decode_batch,
        fn_kwargs={**sizes, "keep_bytes": keep_bytes},
        batch_format="numpy",
        **task_pool(pool),
    )
