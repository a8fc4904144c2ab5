"""index_corpus: batch re-scoring of an image corpus, and the FAISS index over it.

    python -m pipelines.index_corpus --config configs/demo.yaml [key=value ...]

read (Parquet with bytes or paths | image folder | WebDataset tars)
  -> decode + resize (CPU tasks, uint8) -> CLIP image embedding (actor pool)
  -> aesthetic scoring (actor pool) -> staged Parquet, one folder per unit of input
then: z-score every scorer over the corpus and combine -> `scored/` and `errors/` shards
(the `scored` and `errors` contracts) -> FAISS index(es) + id map + `_index.json` -> manifest.

Input files are grouped into units. A unit's staged output is marked done only when complete, so a
re-run after a kill redoes only the unfinished units and duplicates nothing.
"""

from __future__ import annotations

import sys
import tarfile
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from align import aesthetics, io
from align.config import Config, IndexCorpusConfig
from align.contracts import ERRORS, SCORED, SCORER_COLUMN_PREFIX, ContractError, conform
from align.errors import InputNotFound
from align.images import IMAGE_EXTENSIONS
from align.index import (
    INDEX_MANIFEST,
    SHARD_FILE,
    build_index,
    choose_index,
    measure_recall,
    read_scored_embeddings,
)
from align.log import get_logger
from align.manifest import JobManifest
from align.models import ModelFacts, check_model, model_id
from align.runtime import init_ray
from pipelines.common import actor_pool, run_job, task_pool

log = get_logger("index_corpus")
DONE_MARKER = "_SUCCESS.json"


def output_dir(config: Config) -> str:
    return config.expand(config.index_corpus.output)


# ---------------------------------------------------------------------------------------------
# Input: units of work


def plan_units(ic: IndexCorpusConfig, source: str) -> list[list[str]]:
    """Split the input into units: lists of files, in a stable order."""
    if io.is_file(source):
        files, per_unit = [source], 1
    elif ic.input_format == "parquet":
        files, per_unit = io.list_files(source, ".parquet"), ic.files_per_unit
    elif ic.input_format == "webdataset":
        files, per_unit = io.list_files(source, ".tar"), ic.files_per_unit
    else:
        files = [f for f in io.list_files(source) if f.lower().endswith(IMAGE_EXTENSIONS)]
        per_unit = ic.images_per_unit
    if not files:
        raise InputNotFound(f"no {ic.input_format} input files under {source}")
    return [files[i : i + per_unit] for i in range(0, len(files), per_unit)]


def parquet_image_layout(ic: IndexCorpusConfig, files: list[str]) -> str:
    """How the Parquet inputs hold their images, checked on every file's schema before work:
    "bytes" (a binary column), "struct" (Hugging Face's {bytes, path} struct: its bytes are read)
    or "path" (a string column of paths).

    Raises:
        ContractError: naming the file, the column and its type, when a file lacks the column or
            holds it as another type.
    """
    column = ic.image_column or ic.path_column
    wanted = "image bytes" if ic.image_column else "image paths"
    layouts = set()
    for f in files:
        fs, path = io.filesystem(f)
        with fs.open_input_file(path) as fh:
            schema = pq.read_schema(fh)
        names = schema.names
        for needed in (ic.id_column, column):
            if needed not in names:
                raise ContractError(
                    f"{f} has no column {needed!r} (index_corpus.id_column / image_column / "
                    f"path_column); it has {names}"
                )
        kind = schema.field(column).type
        if ic.image_column and (pa.types.is_binary(kind) or pa.types.is_large_binary(kind)):
            layouts.add("bytes")
        elif (
            ic.image_column
            and pa.types.is_struct(kind)
            and kind.get_field_index("bytes") >= 0
            and pa.types.is_binary(kind.field("bytes").type)
        ):
            layouts.add("struct")
        elif not ic.image_column and (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            layouts.add("path")
        else:
            raise ContractError(
                f"{f}: column {column!r} holds {kind}, not {wanted} (binary, or a struct with a "
                f"binary 'bytes' field as Hugging Face writes it; paths are strings)"
            )
    if len(layouts) > 1:
        raise ContractError(f"the Parquet inputs mix image layouts {sorted(layouts)}: use one")
    return layouts.pop()


def _struct_bytes(table: pa.Table, column: str) -> pa.Table:
    """Hugging Face's image struct {bytes, path} -> its bytes, in place of the struct."""
    index = table.schema.get_field_index(column)
    return table.set_column(index, column, pc.struct_field(table[column], "bytes"))


TAR_BATCH = 256  # samples per block a tar reader emits: memory is this many images, not a tar


def tar_samples(path: str, max_member_bytes: int):
    """Stream a WebDataset tar (as img2dataset writes it, plain or compressed) member by member:
    yields (image_id, image bytes or None, error or ""), one per sample key. Captions and
    metadata are not read. A member over `max_member_bytes` (a tar bomb), a sample with no image
    and a tar cut short become errors; what was read before the cut is kept."""
    fs, inner = io.filesystem(path)
    current: dict = {}  # samples of the current key: img2dataset writes a key's members together

    def flush():
        for key, (data, error) in current.items():
            yield key, data, error or ("" if data is not None else "empty file (no image member)")
        current.clear()

    with fs.open_input_stream(inner) as stream:
        try:
            with tarfile.open(fileobj=stream, mode="r|*") as tar:  # "|": a stream, no seeking
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _, ext = member.name.rpartition(".")
                    if key not in current:
                        yield from flush()
                        current[key] = (None, "")
                    if f".{ext.lower()}" not in IMAGE_EXTENSIONS:
                        continue
                    if member.size > max_member_bytes:
                        current[key] = (None, f"tar member {member.name} is {member.size} bytes, "
                                        f"over index_corpus.max_member_bytes={max_member_bytes}")  # fmt: skip
                        continue
                    try:
                        current[key] = (tar.extractfile(member).read(), "")
                    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
                        current[key] = (None, f"tar member {member.name} unreadable: {e}")
                        raise
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            yield from flush()
            yield f"{path}#unread", None, f"tar cut short or corrupt after the samples above: {e}"
            return
    yield from flush()


def read_tars(batch: dict, max_member_bytes: int):
    """map_batches generator: tar paths -> blocks of (image_id, image, read_error)."""
    rows: dict[str, list] = {"image_id": [], "image": [], "read_error": []}
    for path in batch["path"]:
        for key, data, error in tar_samples(str(path), max_member_bytes):
            rows["image_id"].append(key)
            rows["image"].append(data or b"")
            rows["read_error"].append(error)
            if len(rows["image_id"]) >= TAR_BATCH:
                yield _tar_block(rows)
                rows = {"image_id": [], "image": [], "read_error": []}
    if rows["image_id"]:
        yield _tar_block(rows)


def _tar_block(rows: dict) -> pa.Table:
    return pa.table(
        {
            "image_id": pa.array(rows["image_id"], pa.string()),
            "image": pa.array(rows["image"], pa.binary()),
            "read_error": pa.array(rows["read_error"], pa.string()),
        }
    )


def read_unit(ic: IndexCorpusConfig, files: list[str], source: str, layout: str | None = None):
    """A Ray Dataset of (image_id, image bytes or path) for one unit."""
    import ray.data

    if ic.input_format == "parquet":
        column = ic.image_column if ic.image_column else ic.path_column
        ds = ray.data.read_parquet(files, num_cpus=ic.decode.num_cpus).select_columns(
            [ic.id_column, column]
        )
        if layout == "struct":  # parquet_image_layout, checked once for every file before work
            ds = ds.map_batches(_struct_bytes, fn_kwargs={"column": column}, batch_format="pyarrow")
        if ic.id_column != "image_id":
            ds = ds.rename_columns({ic.id_column: "image_id"})
        return ds
    if ic.input_format == "webdataset":
        return ray.data.from_items([{"path": f} for f in files]).map_batches(
            read_tars,
            fn_kwargs={"max_member_bytes": ic.max_member_bytes},
            batch_size=1,
            batch_format="numpy",
            num_cpus=ic.decode.num_cpus,
        )
    root = source.rstrip("/") + "/"
    return ray.data.from_items([{"image_id": f.removeprefix(root), "path": f} for f in files])


def count_input_rows(ic: IndexCorpusConfig, files: list[str]) -> int | None:
    """Rows in a unit, from metadata where the format has it (None: count what was read)."""
    if ic.input_format == "parquet":
        total = 0
        for f in files:
            fs, path = io.filesystem(f)
            with fs.open_input_file(path) as fh:
                total += pq.ParquetFile(fh).metadata.num_rows
        return total
    if ic.input_format == "folder":
        return len(files)
    return None


# ---------------------------------------------------------------------------------------------
# The per-unit pipeline


def to_arrow(batch: dict[str, np.ndarray]) -> pa.Table:
    """Scored numpy batch -> Arrow with the embedding as list<float16> (null on error rows)."""
    emb = np.asarray(batch["embedding"], dtype=np.float16)
    dim = emb.shape[1]
    ok = batch["status"] == "ok"
    # Error rows are null lists, which must take no values: offsets advance on ok rows only.
    offsets = np.concatenate([[0], np.cumsum(ok * dim)]).astype(np.int32)
    embedding = pa.ListArray.from_arrays(
        pa.array(offsets), pa.array(emb[ok].reshape(-1), type=pa.float16()), mask=pa.array(~ok)
    )
    columns = {
        "image_id": pa.array(batch["image_id"], pa.string()),
        "embedding": embedding,
        "status": pa.array(batch["status"], pa.string()),
        "error": pc.if_else(
            pa.array(ok), pa.scalar(None, pa.string()), pa.array(batch["error"].astype(str))
        ),
    }
    for name, values in batch.items():
        if name.startswith(SCORER_COLUMN_PREFIX):
            columns[name] = pa.array(values, pa.float32())
    return pa.table(columns)


def run_unit(
    config: Config,
    files: list[str],
    source: str,
    unit_dir: str,
    model: ModelFacts,
    layout: str | None = None,
):
    """Decode, embed and score one unit into `unit_dir`, then mark it done."""
    from actors.decode import decode_batch
    from actors.embed import ClipImageEmbedder
    from actors.score import AestheticScorer

    ic = config.index_corpus
    scorers = {name: s.checkpoint for name, s in ic.scorers.items()}
    t0 = time.perf_counter()
    ds = (
        read_unit(ic, files, source, layout)
        .map_batches(
            decode_batch,
            fn_kwargs={
                "image_size": model.image_size,
                "max_pixels": ic.max_image_pixels,
                "image_column": ic.image_column if ic.input_format == "parquet" else "image",
                "path_column": ic.path_column if ic.input_format == "parquet" else "path",
            },
            **task_pool(ic.decode),
        )
        .map_batches(
            ClipImageEmbedder,
            fn_constructor_kwargs={"model": config.model.model_dump(), "threads": ic.embed.threads},
            batch_format="numpy",
            **actor_pool(ic.embed),
        )
        .map_batches(
            AestheticScorer,
            fn_constructor_kwargs={"scorers": scorers, "embed_dim": model.embed_dim},
            batch_format="numpy",
            **actor_pool(ic.score),
        )
        .map_batches(to_arrow, batch_format="numpy", batch_size=None, num_cpus=ic.decode.num_cpus)
    )
    # A unit folder without its marker is a leftover of a killed run: start it over.
    io.empty_dir(unit_dir)
    ds.write_parquet(unit_dir)
    score_columns = [SCORER_COLUMN_PREFIX + n for n in scorers]
    staged = io.read_parquet(unit_dir, columns=["status", *score_columns])
    ok = int(pc.sum(pc.equal(staged["status"], "ok")).as_py() or 0)
    expected = count_input_rows(ic, files)
    marker = {
        "files": files,
        "inputs": unit_inputs(config, files),
        "rows_in": expected if expected is not None else staged.num_rows,
        "rows_ok": ok,
        "rows_error": staged.num_rows - ok,
        "score_moments": aesthetics.score_moments(
            {n: staged[SCORER_COLUMN_PREFIX + n].to_numpy(zero_copy_only=False) for n in scorers}
        ),
        "seconds": round(time.perf_counter() - t0, 3),
    }
    io.write_json(f"{unit_dir}/{DONE_MARKER}", marker)
    return marker


def unit_inputs(config: Config, files: list[str]) -> dict:
    """What a unit's output depends on besides its file names: the weights, the scorers and the
    input files' sizes. A resumed run redoes a unit when any of them changed (a re-rendered
    world, a retrained base model at the same path)."""
    from align.models import weights_fingerprint

    sizes = None  # a folder unit lists thousands of images: not worth a stat each
    if config.index_corpus.input_format != "folder":
        sizes = [io.filesystem(f)[0].get_file_info(io.filesystem(f)[1]).size for f in files]
    return {
        "weights": weights_fingerprint(config.model),
        "scorers": {n: s.model_dump() for n, s in config.index_corpus.scorers.items()},
        "sizes": sizes,
    }


def unit_done(unit_dir: str, files: list[str], config: Config) -> dict | None:
    marker = f"{unit_dir}/{DONE_MARKER}"
    if not io.exists(marker):
        return None
    done = io.read_json(marker)
    same = done["files"] == files and done.get("inputs") == unit_inputs(config, files)
    return done if same else None


# ---------------------------------------------------------------------------------------------
# Finalise: combined aesthetic across the corpus, contract shards, error table


def finalise_unit(unit_dir: str, out: str, part: int, weights: dict, stats: dict) -> None:
    """Ray task: staged unit -> scored/part-N.parquet and errors/part-N.parquet."""
    table = io.read_parquet(unit_dir)
    names = [c for c in table.column_names if c.startswith(SCORER_COLUMN_PREFIX)]
    columns = {
        n.removeprefix(SCORER_COLUMN_PREFIX): table[n].to_numpy(zero_copy_only=False) for n in names
    }
    combined = aesthetics.combine(columns, weights, stats)
    ok = table["status"].to_numpy(zero_copy_only=False) == "ok"
    combined = pa.array(combined, pa.float32(), mask=~ok)
    table = table.append_column("aesthetic", combined)
    io.write_parquet(
        conform(table, SCORED, extra_prefix=SCORER_COLUMN_PREFIX),
        f"{out}/scored/part-{part:05d}.parquet",
    )
    errors = table.filter(pc.equal(table["status"], "error"))
    errors = pa.table(
        {
            "row_id": errors["image_id"],
            "stage": pa.array(["decode"] * errors.num_rows, pa.string()),
            "error": errors["error"],
        }
    )
    io.write_parquet(conform(errors, ERRORS), f"{out}/errors/part-{part:05d}.parquet")


# ---------------------------------------------------------------------------------------------
# Index


def build_index_shard(files: list[str], index_dir: str, shard: int, config: Config) -> dict:
    """Ray task: build and save the index over some scored shards; measure its recall@10."""
    import faiss

    vectors, ids = read_scored_embeddings(files)
    cfg = config.index_corpus.index
    spec = choose_index(len(vectors), vectors.shape[1], cfg)
    t0 = time.perf_counter()
    index = build_index(vectors, spec, seed=cfg.seed)
    build_s = time.perf_counter() - t0
    recall = measure_recall(index, vectors, cfg.recall_queries, k=10, seed=cfg.seed)
    name = SHARD_FILE.format(shard)
    io.write_bytes(f"{index_dir}/{name}", faiss.serialize_index(index).tobytes())
    return {
        "file": name,
        "count": len(vectors),
        "spec": spec.to_dict(),
        "build_s": round(build_s, 3),
        "recall": recall,
        "ids": ids,
    }


def build_indexes(config: Config, out: str) -> dict:
    """Build index.num_shards indexes in parallel Ray tasks, each over a group of scored files
    (a scored file, one per unit, is the smallest shard), plus the global id map."""
    import ray

    cfg = config.index_corpus.index
    files = io.list_files(f"{out}/scored", ".parquet")
    groups = [g for g in np.array_split(np.array(files, dtype=object), cfg.num_shards) if len(g)]
    index_dir = f"{out}/index"
    task = ray.remote(num_cpus=1)(build_index_shard)
    shards = ray.get([task.remote(list(g), index_dir, i, config) for i, g in enumerate(groups)])
    offset, id_tables = 0, []
    for shard in shards:
        shard["offset"] = offset
        ids = shard.pop("ids")
        id_tables.append(
            pa.table(
                {
                    "row": pa.array(np.arange(offset, offset + ids.num_rows), pa.int64()),
                    "image_id": ids["image_id"],
                    "aesthetic": ids["aesthetic"],
                }
            )
        )
        offset += ids.num_rows
    io.write_parquet(pa.concat_tables(id_tables), f"{index_dir}/id_map.parquet")
    recall = float(np.mean([s["recall"]["recall_at_k"] for s in shards]))
    from align.models import weights_fingerprint

    index_manifest = {
        "model": config.model.model_dump(),
        # The weights themselves (a checkpoint rewritten at the same path is another model).
        "weights": weights_fingerprint(config.model),
        "dim": shards[0]["spec"]["dim"],
        "count": offset,
        "spec": shards[0]["spec"],
        "shards": shards,
        "recall_at_10": recall,
        "metric": "inner product on L2-normalised embeddings (cosine)",
    }
    io.write_json(f"{index_dir}/{INDEX_MANIFEST}", index_manifest)
    return index_manifest


# ---------------------------------------------------------------------------------------------
# The job


def index_corpus(config: Config) -> dict:
    import ray

    ic = config.index_corpus
    source = config.expand(ic.input)
    out = output_dir(config)
    manifest = JobManifest("index_corpus", config, output=out)  # removes a stale manifest

    # Fail fast, before any data is read: the model, the scorers, the input.
    model = check_model(config.model)
    for name, scorer in ic.scorers.items():
        aesthetics.check_scorer_model(name, scorer.trained_on, model_id(config.model))
        aesthetics.build_scorer(name, scorer.checkpoint, model.embed_dim)
    io.require_exists(source, "index_corpus input")
    units = plan_units(ic, source)
    if ic.input_format == "parquet":
        layout = parquet_image_layout(ic, [f for unit in units for f in unit])
    else:
        layout = None

    init_ray(config.ray)
    unit_dirs, markers = [], []
    with manifest.stage("embed_and_score"):
        for i, files in enumerate(units):
            unit_dir = f"{out}/_staging/unit-{i:05d}"
            marker = unit_done(unit_dir, files, config)
            if marker is None:
                log.info("unit %d/%d: %d file(s)", i + 1, len(units), len(files))
                marker = run_unit(config, files, source, unit_dir, model, layout)
            else:
                log.info("unit %d/%d already done, skipped", i + 1, len(units))
            unit_dirs.append(unit_dir)
            markers.append(marker)

    with manifest.stage("combine"):
        stats = aesthetics.stats_from_moments([m["score_moments"] for m in markers])
        weights = {n: s.weight for n, s in ic.scorers.items()}
        parts = {f"part-{i:05d}.parquet" for i in range(len(units))}
        for sub in ("scored", "errors"):
            io.delete_files_except(f"{out}/{sub}", ".parquet", parts)
        task = ray.remote(num_cpus=1)(finalise_unit)
        ray.get([task.remote(d, out, i, weights, stats) for i, d in enumerate(unit_dirs)])

    with manifest.stage("index"):
        index_manifest = build_indexes(config, out)

    rows_in = sum(m["rows_in"] for m in markers)
    rows_ok = sum(m["rows_ok"] for m in markers)
    rows_error = sum(m["rows_error"] for m in markers)
    manifest.extra.update(
        {
            "input": source,
            "units": len(units),
            "embed_dim": model.embed_dim,
            "aesthetic": {
                "combined": "sum_i w_i * z_i / sum_i w_i, each scorer z-scored over the corpus",
                "weights": weights,
                "normalisation": stats,
            },
            "index": {k: v for k, v in index_manifest.items() if k != "shards"},
            "images_per_second": round(rows_in / max(manifest.timings["embed_and_score"], 1e-9), 1),
        }
    )
    result = manifest.write(out, rows_in=rows_in, rows_out=rows_ok, rows_error=rows_error)
    log.info(
        "%d images in: %d scored, %d errors; index %s over %d vectors, recall@10 %.3f",
        rows_in,
        rows_ok,
        rows_error,
        index_manifest["spec"]["type"],
        index_manifest["count"],
        index_manifest["recall_at_10"],
    )
    return result


def main(argv: list[str] | None = None) -> int:
    return run_job("index_corpus", index_corpus, argv)


if __name__ == "__main__":
    sys.exit(main())
