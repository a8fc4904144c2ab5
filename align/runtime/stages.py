"""Ray Data plumbing every job shares: map_batches arguments from a stage's config, the ok rows
and error rows of a stage brought back to the driver, and the pieces of a duplicate check over a
whole dataset (every copy of a key brought into one block, then the first of each found)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray.data
from ray.data import RandomSeedConfig

from align.config import PoolConfig
from align.log import get_logger
from align.storage import io

log = get_logger("stages")
# Bytes per block after a repartition on a key: under Ray Data's block bound (128 MiB), so a block
# is never split and every copy of a key stays in one.
KEY_BLOCK_BYTES = 64 << 20


def gather_by_key(ds, key: str, size_bytes: int):
    """Ray Data: `ds` repartitioned so that every row with the same `key` is in one block: a hash
    repartition, one block per KEY_BLOCK_BYTES of input; below that, one block (no shuffle)."""
    blocks = -(-size_bytes // KEY_BLOCK_BYTES)
    return ds.repartition(blocks, keys=[key]) if blocks > 1 else ds.repartition(1)


def first_of_each(keys: np.ndarray, order: np.ndarray):
    """For a duplicate check: (permutation sorting rows by key then order, whether each sorted row
    is its key's first, the sorted position of its key's first row)."""
    by = np.lexsort((order, keys))
    k = keys[by]
    first = np.ones(len(k), dtype=bool)
    first[1:] = k[1:] != k[:-1]
    head = np.maximum.accumulate(np.where(first, np.arange(len(k)), 0))
    return by, first, head


def table_blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    """`table` cut into blocks of `rows` rows (zero-copy slices; one empty block for an empty
    table), for `ray.data.from_arrow`: one block is one batch of the first stage."""
    blocks = [table.slice(i, rows) for i in range(0, table.num_rows, rows)]
    return blocks or [table]


def actor_pool(stage: PoolConfig) -> dict:
    """map_batches arguments for an actor-pool stage, from its config."""

    return {
        "batch_size": stage.batch_size,
        "compute": ray.data.ActorPoolStrategy(size=stage.concurrency),
        "num_cpus": stage.num_cpus,
        "num_gpus": stage.num_gpus,
    }


def pool_for_blocks(stage: PoolConfig, blocks: int | None) -> PoolConfig:
    """`stage` with no more actors than `blocks` (None: not known, `stage` as it is): an actor
    that gets no block costs only its start (a Ray worker, the model loaded, on a GPU too)."""
    if blocks is None or stage.concurrency <= blocks:
        return stage
    return stage.model_copy(update={"concurrency": max(1, blocks)})


def task_pool(stage: PoolConfig) -> dict:
    """map_batches arguments for a task stage (CPU only), from its config."""

    return {
        "batch_size": stage.batch_size,
        "compute": ray.data.TaskPoolStrategy(size=stage.concurrency),
        "num_cpus": stage.num_cpus,
    }


def collect_ok_rows(ds, keep: list[str], stage: str) -> tuple[dict, list[dict]]:
    """Bring a Dataset with `image_id`, `status` and `error` to the driver: the `keep` columns of
    its ok rows, concatenated (None when there are none), and an error row for every other row."""

    parts: dict[str, list] = {c: [] for c in keep}
    errors: list[dict] = []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        ok = batch["status"] == "ok"
        for c in keep:
            parts[c].append(batch[c][ok])
        errors += [
            {"row_id": str(i), "stage": stage, "error": str(e)}
            for i, e in zip(batch["image_id"][~ok], batch["error"][~ok], strict=True)
        ]
    empty = not any(len(x) for x in parts[keep[0]])
    return {c: None if empty else np.concatenate(v) for c, v in parts.items()}, errors


def parquet_files_stream(
    files: list[str], columns: list[str], num_cpus: float, sources: list[int] | None = None
):
    """Read Parquet files in Ray tasks of `num_cpus` each, one file per block. `sources`, one
    number per file, adds a `source` column telling the rows of several inputs apart.

    The training streams read this way rather than with ray.data.read_parquet, whose file-listing
    task reserves a whole CPU: beside CPU training workers on a small machine it never gets one.
    """

    def read(batch: dict) -> pa.Table:
        tables = [io.read_parquet(f, columns=columns) for f in batch["path"]]
        if "source" in batch:
            tables = [
                t.append_column("source", pa.array(np.full(len(t), n)))
                for t, n in zip(tables, batch["source"], strict=True)
            ]
        return pa.concat_tables(tables)

    items = [{"path": f} for f in files]
    if sources is not None:
        items = [{**item, "source": n} for item, n in zip(items, sources, strict=True)]
    paths = ray.data.from_items(items, override_num_blocks=len(files))
    return paths.map_batches(read, batch_size=1, batch_format="numpy", num_cpus=num_cpus)


def decoded_once_if_small(dataset, decoded_mb: float, cap_mb: float, seed: int, name: str):
    """A training stream that fits `cap_mb` decoded, decoded once and kept in the object store:
    every epoch (each execution) then reads it in a new block order, reproducibly from `seed`.
    A larger one is returned as it is: every epoch reads and decodes it again (a corpus of any
    size), with the local shuffle buffer as its only shuffle.

    On the demo's world (6,000 images of 32 px: 18 MB decoded) the re-read and re-decode at
    each epoch's start stalled training for 3-10 s every 23-47 steps, about 40% of the run.
    """

    if decoded_mb > cap_mb:
        log.info("%s: %.0f MB decoded > %.0f MB: decoded per epoch", name, decoded_mb, cap_mb)
        return dataset
    log.info("%s: decoded once (%.1f MB in the object store)", name, decoded_mb)
    reseeded = RandomSeedConfig(seed=seed, reseed_after_execution=True)
    return dataset.materialize().randomize_block_order(seed=reseeded)
