"""Build index_corpus's sharded index from the scored shards, with no process holding the corpus.

sample (one Ray task per scored file: a random share of its vectors and aesthetic scores; for
  IVF-PQ index.train_sample grown to 39 vectors per list, and the recall queries held back)
  -> choose the index type (align.search.index.choose_index) and, for IVF-PQ, train the coarse
     quantizer and PQ codebook ONCE on the sample (every shard shares them)
  -> one Ray task per index shard: read only its own scored files, add them, write the shard
     (align.search.corpus: .faiss, .rows.arrow, .embeddings.npy)
  -> with index.merge_ondisk, every shard's lists merged into one on-disk index (merged.faiss +
     merged.ivfdata) for single-node serving
  -> `_index.json` with offsets, recall@10 of the search users get (align.search.corpus.Corpus)
     against exact search streamed over the shards' embeddings on the held-back queries (for
     IVF-PQ at the nprobe chosen there to reach index.target_recall), how the index was sized
     (spec.sizing), and `id_map.parquet` written shard by shard.
"""

from __future__ import annotations

import io as _io
import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.data

from align.config import IndexConfig
from align.data.contracts import INDEX_ID_MAP, conform
from align.errors import UserError
from align.log import get_logger
from align.method.ranking import rating_edges, rating_level_sums
from align.runtime.stages import first_of_each, gather_by_key
from align.search.corpus import Corpus, shard_embeddings
from align.search.index import (
    IndexSpec,
    build_index,
    choose_index,
    choose_nprobe,
    exact_top_k,
    search_recall,
    train_index,
)
from align.search.stored import (
    EMBEDDINGS_SUFFIX,
    INDEX_MANIFEST,
    ROWS_SUFFIX,
    SHARD_FILE,
    shard_file,
    write_index_manifest,
)
from align.storage import io

# The files of one shard's manifest entry.
SHARD_KEYS = ("file", "rows_file", "embeddings_file")
MERGED_FILE, MERGED_DATA = "merged.faiss", "merged.ivfdata"
log = get_logger("index_build")
# index_corpus's exact duplicates: each later copy, the first image with its bytes, the hash.
DUPLICATES_SCHEMA = pa.schema([(n, pa.string()) for n in ("image_id", "duplicate_of", "sha256")])


def scored_rows(files: list[str]) -> list[int]:
    """Rows per scored file, from the Parquet footers (ok and error rows)."""

    counts = []
    for f in files:
        fs, path = io.filesystem(f)
        with fs.open_input_file(path) as fh:
            counts.append(pq.ParquetFile(fh).metadata.num_rows)
    return counts


def hashed_rows(batch: dict):
    """Ray Data: rows naming scored files (path, number) -> each file's ok rows that carry a
    sha256 (a file without that column has none): image_id, sha256 and `order` (the file's
    number, then the row), read by the worker."""

    for path, number in zip(batch["path"], batch["number"], strict=True):
        if "sha256" not in io.parquet_schema(str(path)).names:
            continue
        table = io.read_parquet(str(path), columns=["image_id", "sha256", "status"])
        order = (int(number) << 32) + np.arange(table.num_rows, dtype=np.int64)
        table = table.append_column("order", pa.array(order))
        ok = pc.and_(pc.equal(table["status"], "ok"), pc.is_valid(table["sha256"]))
        yield table.filter(ok).select(["image_id", "sha256", "order"])


def later_copies(table):
    """Ray Data: the rows whose sha256 an earlier row (by order) has, as (image_id, duplicate_of:
    the first image with those bytes, sha256). Needs every copy of a hash in `table`."""

    if table.num_rows == 0:
        return DUPLICATES_SCHEMA.empty_table()
    by, first, head = first_of_each(
        table["sha256"].to_numpy(zero_copy_only=False), table["order"].to_numpy()
    )
    t = table.take(pa.array(by))
    later = np.flatnonzero(~first)
    return pa.table(
        [t["image_id"].take(later), t["image_id"].take(head[later]), t["sha256"].take(later)],
        schema=DUPLICATES_SCHEMA,
    )


def exact_duplicates(files: list[str]):
    """The ok rows of scored shards whose sha256 equals an earlier row's (file order), as a table
    (image_id, duplicate_of, sha256). Ray Data: each file's hashes read by a worker, every copy of
    a hash brought into one block (align.runtime.stages.gather_by_key); only the duplicates reach here."""

    listing = ray.data.from_items(
        [{"path": f, "number": i} for i, f in enumerate(files)], override_num_blocks=len(files)
    )
    hashes = listing.map_batches(hashed_rows, batch_size=1, batch_format="numpy")
    # About 100 bytes a row (a 64-character hash, an id, an order) sizes the partitions.
    grouped = gather_by_key(hashes, "sha256", 100 * sum(scored_rows(files)))
    found = grouped.map_batches(later_copies, batch_size=None, batch_format="pyarrow")
    tables = list(found.iter_batches(batch_format="pyarrow", batch_size=None))
    return pa.concat_tables([DUPLICATES_SCHEMA.empty_table(), *tables]).combine_chunks()


def sample_scored_file(path: str, rate: float, seed: int, exclude=None) -> dict:
    """Ray task: a Bernoulli(rate) sample of one scored file's ok vectors (float32) and their
    aesthetic scores, and how many ok rows it holds."""
    vectors, table = read_scored_embeddings([path], exclude)
    keep = np.random.default_rng(seed).random(len(vectors)) < rate
    aesthetic = table["aesthetic"].to_numpy(zero_copy_only=False).astype(np.float64)
    return {"vectors": vectors[keep], "aesthetic": aesthetic[keep], "count": len(vectors)}


def build_index_shard(
    files: list[str],
    index_dir: str,
    shard: int,
    spec: IndexSpec,
    trained: bytes | None,
    seed: int = 0,
    rating_edges=None,
    exclude=None,
) -> dict:
    """Ray task: the index over some scored files (less the image ids in `exclude`), added to the
    shared trained index where there is one, written with its rows and embeddings files. Returns
    its manifest entry (no offset yet) and, given the corpus's rating edges, its sums of
    embeddings per rating level (align.method.ranking)."""

    vectors, rows = read_scored_embeddings(files, exclude)
    level_sums = None
    if rating_edges is not None:
        aesthetic = rows["aesthetic"].to_numpy(zero_copy_only=False).astype(np.float64)
        level_sums = rating_level_sums(vectors, aesthetic, np.asarray(rating_edges))
    t0 = time.perf_counter()
    index = build_index(vectors, spec, seed=seed, trained=trained)
    build_s = time.perf_counter() - t0
    name = SHARD_FILE.format(shard)
    stem = name.removesuffix(".faiss")
    # Each file's content hash goes into `_index.json`: a reader's local cache keys on it, so a
    # rebuild at the same path (same names, often the same sizes) is never read from old copies.
    digests = {"file": _write(f"{index_dir}/{name}", faiss.serialize_index(index).tobytes())}
    buffer = _io.BytesIO()
    np.save(buffer, vectors.astype(np.float16))
    del vectors
    digests["embeddings_file"] = _write(f"{index_dir}/{stem}{EMBEDDINGS_SUFFIX}", buffer.getvalue())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, rows.schema) as writer:
        writer.write_table(rows)
    digests["rows_file"] = _write(f"{index_dir}/{stem}{ROWS_SUFFIX}", sink.getvalue().to_pybytes())
    return {
        "file": name,
        "rows_file": f"{stem}{ROWS_SUFFIX}",
        "embeddings_file": f"{stem}{EMBEDDINGS_SUFFIX}",
        "sha256": digests,
        "count": rows.num_rows,
        "build_s": round(build_s, 3),
        "rating_level_sums": level_sums,
    }


def _write(uri: str, data: bytes) -> str:
    """Write one shard file; returns its content hash (sha256, hex)."""
    io.write_bytes(uri, data)
    return io.sha256_hex(data)


def corpus_recall(
    index_dir: str, queries: np.ndarray, k: int, refine_factor: int, target: float | None = None
) -> dict:
    """Ray task: recall@k of the corpus search (all shards, merged, as retrieval runs it) against
    exact search streamed over the stored embeddings; and the rate of each. Given `target`, the
    IVF index's nprobe is chosen first (align.search.index.choose_nprobe: powers of two up to nlist, the
    smallest reaching it), the recall is that nprobe's, and `nprobe` and `nprobe_recall` (every
    nprobe tried -> its recall) are added."""

    corpus = Corpus(index_dir, refine_factor=refine_factor)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(k, corpus.ntotal)
    t0 = time.perf_counter()
    _, truth = exact_top_k(shard_embeddings(index_dir, corpus.manifest), q, k)
    exact_s = time.perf_counter() - t0
    if target is None:
        return search_recall(corpus, q, truth, exact_s)

    def search(nprobe: int) -> np.ndarray:
        corpus.set_nprobe(nprobe)
        return corpus.search(q, k)[1]

    nlist = corpus.spec["params"]["nlist"]
    nprobe, tried = choose_nprobe(search, truth, nlist, target)
    corpus.set_nprobe(nprobe)
    return {**search_recall(corpus, q, truth, exact_s), "nprobe": nprobe, "nprobe_recall": tried}


def write_id_map(index_dir: str, manifest: dict) -> None:
    """id_map.parquet (the INDEX_ID_MAP contract), written one shard's rows file at a time."""

    with io.atomic_target(f"{index_dir}/id_map.parquet") as (fs, tmp):
        writer = None
        for entry in manifest["shards"]:
            with pa.memory_map(shard_file(index_dir, entry, "rows_file")) as source:
                rows = pa.ipc.open_file(source).read_all()
            row = np.arange(entry["offset"], entry["offset"] + rows.num_rows, dtype=np.int64)
            table = conform(rows.append_column("row", pa.array(row)), INDEX_ID_MAP)
            if writer is None:
                writer = pq.ParquetWriter(tmp, table.schema, filesystem=fs, compression="zstd")
            writer.write_table(table)
        if writer is not None:
            writer.close()


def _run(fn, calls: list[tuple], remote: bool) -> list:
    """fn over the calls: one Ray task each (1 CPU), or in this process (small corpora, tests)."""
    if not remote:
        return [fn(*args) for args in calls]

    task = ray.remote(num_cpus=1)(fn)
    return ray.get([task.remote(*args) for args in calls])


def embedding_dim(files: list[str]) -> int:
    """The embedding width of scored shards: the first ok row's, read from the first row group
    that holds one."""

    for f in files:
        fs, path = io.filesystem(f)
        with fs.open_input_file(path) as fh:
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=4096, columns=["embedding"]):
                lengths = batch.column(0).value_lengths().drop_null()
                if len(lengths):
                    return int(lengths[0].as_py())
    return 0


def sample_size(files: list[str], rows: list[int], groups: list[list], cfg: IndexConfig) -> int:
    """Vectors to sample: the recall queries, and index.train_sample grown to what an IVF-PQ
    index over these files asks for (39 per list), planned from the files' row counts."""

    per_file = dict(zip(files, rows, strict=True))
    largest = max(sum(per_file[f] for f in g) for g in groups)
    plan = choose_index(sum(rows), embedding_dim(files), cfg, shard_vectors=largest)
    train = plan.params["train"] if plan.type == "ivfpq" else cfg.train_sample
    return min(sum(rows), train + cfg.recall_queries)


def draw_sample(files: list[str], total: int, need: int, cfg: IndexConfig, exclude, remote):
    """Every scored file's ok vectors sampled at one rate (Ray tasks, `sample_scored_file`), at
    least `need` of them where the corpus holds that many: the rate, sized from the `total` rows,
    is raised and the sample drawn again when error rows or left-out duplicates cut it short."""
    rate = min(1.0, (1.1 * need + 100) / max(1, total))
    while True:
        calls = [(f, rate, cfg.seed + i, exclude) for i, f in enumerate(files)]
        samples = _run(sample_scored_file, calls, remote)
        drawn, ok = (sum(len(s["vectors"]) for s in samples), sum(s["count"] for s in samples))
        if drawn >= need or rate >= 1.0:
            return samples
        log.info("sample of %d vectors, %d wanted: drawing again at a higher rate", drawn, need)
        rate = min(1.0, max(2 * rate, (1.1 * need + 100) / max(1, ok)))


def hold_back(vectors: np.ndarray, queries: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(recall queries, training vectors): up to `queries` rows of the sample (half of it at
    most) held back from training; they are still indexed, as every corpus vector is."""
    picked = np.zeros(len(vectors), bool)
    count = min(queries, len(vectors) // 2 if len(vectors) > 1 else len(vectors))
    picked[np.random.default_rng(seed).choice(len(vectors), size=count, replace=False)] = True
    return vectors[picked], vectors[~picked]


def build_sharded_index(files, index_dir: str, cfg: IndexConfig, exclude=None, remote=True) -> dict:
    """Sample, choose, train once, add per shard; returns the shards' entries with offsets, the
    spec, the rating edges and the recall queries (held back from the sample's training)."""

    groups = [list(g) for g in np.array_split(np.array(files, dtype=object), cfg.num_shards)]
    groups = [g for g in groups if g]
    rows = scored_rows(files)
    need = sample_size(files, rows, groups, cfg)
    samples = draw_sample(files, sum(rows), need, cfg, exclude, remote)
    vectors = np.concatenate([s["vectors"] for s in samples])
    edges = rating_edges(np.concatenate([s["aesthetic"] for s in samples]))
    counts = dict(zip(files, (s["count"] for s in samples), strict=True))
    largest = max(sum(counts[f] for f in g) for g in groups)
    spec = choose_index(sum(counts.values()), vectors.shape[1], cfg, shard_vectors=largest)
    queries, training = hold_back(vectors, cfg.recall_queries, cfg.seed)
    del vectors
    t0 = time.perf_counter()
    trained = shared = train_index(training, spec, seed=cfg.seed)
    if trained is not None:
        spec.sizing["train_s"] = round(time.perf_counter() - t0, 3)
    del training
    if remote:  # one copy in the object store, not one per task
        shared = ray.put(trained)
    calls = [
        (g, index_dir, i, spec, shared, cfg.seed, edges, exclude) for i, g in enumerate(groups)
    ]
    shards = _run(build_index_shard, calls, remote)
    offset = 0
    for shard in shards:
        shard["offset"], offset = offset, offset + shard["count"]
    return {
        "spec": spec,
        "shards": shards,
        "queries": queries,
        "edges": edges,
        "trained": trained,
    }


def merge_ondisk(index_dir: str, shards: list[dict], trained: bytes) -> dict:
    """Ray task (index.merge_ondisk): every IVF shard's lists merged into one index whose lists
    live in one file, as clip-retrieval serves LAION-5B (autofaiss' merge_ondisk):
    `merged.faiss` (quantizer and codebook) and `merged.ivfdata` (FAISS OnDiskInvertedLists,
    memory-mapped when searched). Row ids are global: each shard's are shifted by the rows before
    it, in manifest order. Returns the manifest's `merged` entry."""

    if io.is_uri(index_dir):
        raise UserError(
            f"index.merge_ondisk needs a local index folder (its lists are memory-mapped from a "
            f"local file), not {index_dir}: build there, or serve the shards as they are"
        )
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    data = f"{index_dir}/{MERGED_DATA}"
    io.delete_file(data)  # an earlier merge's lists: OnDiskInvertedLists would append to them
    paths = [shard_file(index_dir, s, "file") for s in shards]
    t0 = time.perf_counter()
    _merge_lists(index, paths, [int(s["offset"]) for s in shards], data)
    faiss.write_index(index, f"{index_dir}/{MERGED_FILE}")
    return {
        "file": MERGED_FILE,
        "data": MERGED_DATA,
        "count": int(index.ntotal),
        "merge_s": round(time.perf_counter() - t0, 3),
    }


def _merge_lists(index, paths: list[str], offsets: list[int], data: str) -> None:
    """Every shard's inverted lists (memory-mapped) appended list by list into one
    OnDiskInvertedLists at `data`, each shard's ids shifted by its offset (FAISS's own
    merge_from_multiple shifts by the previous shard's size alone, not by all before it), and
    put into `index` (empty, trained)."""

    shards = [faiss.read_index(p, faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY) for p in paths]
    lists = [faiss.extract_index_ivf(s).invlists for s in shards]
    target = faiss.extract_index_ivf(index)
    size = target.code_size
    merged = faiss.OnDiskInvertedLists(target.nlist, size, data)
    total = 0
    for number in range(target.nlist):
        counts = [il.list_size(number) for il in lists]
        merged.resize(number, sum(counts))
        at = 0
        for il, n, offset in zip(lists, counts, offsets, strict=True):
            if n:
                ids = faiss.rev_swig_ptr(il.get_ids(number), n).astype(np.int64) + offset
                codes = faiss.rev_swig_ptr(il.get_codes(number), n * size)
                merged.update_entries(number, at, n, faiss.swig_ptr(ids), faiss.swig_ptr(codes))
                at += n
        total += at
    index.ntotal = target.ntotal = total
    target.replace_invlists(merged, True)
    merged.this.disown()  # the index owns the lists now


def write_index(
    files: list[str], index_dir: str, cfg: IndexConfig, model, duplicates=None, remote=True
) -> dict:
    """The whole index step over scored files: the sharded index (less `duplicates`' image ids
    when cfg.drop_exact_duplicates), `_index.json` with its recall@10, the id map, and no shard
    file of an earlier build left behind. Returns the index manifest."""

    exclude = (
        duplicates["image_id"] if duplicates is not None and cfg.drop_exact_duplicates else None
    )
    built = build_sharded_index(files, index_dir, cfg, exclude, remote)
    found = {
        "found": 0 if duplicates is None else duplicates.num_rows,
        "dropped": cfg.drop_exact_duplicates,
    }
    manifest = write_index_manifest(index_dir, built, {}, model, found)
    for name in (MERGED_FILE, MERGED_DATA):  # a merge left from another build would not match
        io.delete_file(f"{index_dir}/{name}")
    if cfg.merge_ondisk and manifest["spec"]["type"] == "ivfpq":
        calls = [(index_dir, manifest["shards"], built["trained"])]
        (manifest["merged"],) = _run(merge_ondisk, calls, remote)
        io.write_json(f"{index_dir}/{INDEX_MANIFEST}", manifest)  # searched below: recall
    elif cfg.merge_ondisk:
        log.warning(
            "index.merge_ondisk: a %s index has no lists to merge", manifest["spec"]["type"]
        )
    manifest["recall"] = measure_search(index_dir, manifest, built["queries"], cfg, remote)
    manifest["recall_at_10"] = manifest["recall"]["recall_at_k"]
    io.write_json(f"{index_dir}/{INDEX_MANIFEST}", manifest)
    write_id_map(index_dir, manifest)
    keep = {s[key] for s in manifest["shards"] for key in SHARD_KEYS} | {MERGED_FILE}
    for suffix in (".faiss", ROWS_SUFFIX, EMBEDDINGS_SUFFIX):  # shards of an earlier build
        io.delete_files_except(index_dir, suffix, keep)
    return manifest


def measure_search(index_dir: str, manifest: dict, queries, cfg: IndexConfig, remote: bool) -> dict:
    """recall@10 of the corpus search on the held-back queries (`corpus_recall`, a Ray task); for
    an IVF-PQ index without index.ivf_nprobe, the nprobe reaching index.target_recall, chosen
    there and written into the manifest's spec (params.nprobe, and sizing.nprobe_recall: each
    nprobe tried -> its recall) for every searcher to use."""
    spec = manifest["spec"]
    choose = spec["type"] == "ivfpq" and not cfg.ivf_nprobe
    target = cfg.target_recall if choose else None
    args = (index_dir, queries, 10, cfg.refine_factor, target)
    t0 = time.perf_counter()
    (recall,) = _run(corpus_recall, [args], remote)
    if choose:
        spec["params"]["nprobe"] = recall.pop("nprobe")
        spec["sizing"].update(
            nprobe_rule=f"smallest power of two reaching index.target_recall ({target}) "
            f"recall@10 after exact re-scoring, on {len(queries)} held-back sample vectors",
            nprobe_recall=recall.pop("nprobe_recall"),
            # Exact search for the queries, then one corpus search per nprobe tried.
            nprobe_s=round(time.perf_counter() - t0, 3),
        )
        if recall["recall_at_k"] < target:  # the PQ codes bound it: more are re-scored exactly
            log.warning(
                "recall@10 %.3f at the best nprobe (%d) is under index.target_recall %.3g: a "
                "higher index.refine_factor re-scores more candidates exactly",
                recall["recall_at_k"],
                spec["params"]["nprobe"],
                target,
            )
    return recall


def read_scored_embeddings(files: list[str], exclude=None):
    """Embeddings (float32, n x d) and the (image_id, aesthetic, caption, url) table of the ok
    rows of scored shards, in file order, less the image ids in `exclude` (dropped exact
    duplicates): the order index_corpus adds them to the index, so row i of the result is row i
    of the index. caption and url are null for shards without those columns."""

    tables = []
    for f in files:
        names = io.parquet_schema(f).names
        metadata = [c for c in ("caption", "url") if c in names]
        table = io.read_parquet(
            f, columns=["image_id", "embedding", "aesthetic", "status", *metadata]
        )
        for c in ("caption", "url"):
            if c not in metadata:
                table = table.append_column(c, pa.nulls(table.num_rows, pa.string()))
        tables.append(
            table.select(["image_id", "embedding", "aesthetic", "status", "caption", "url"])
        )
    table = pa.concat_tables(tables)
    keep = pc.equal(table["status"], "ok")
    if exclude is not None and len(exclude):
        values = (
            exclude.combine_chunks()
            if isinstance(exclude, pa.ChunkedArray)
            else pa.array(exclude, pa.string())
        )
        keep = pc.and_(keep, pc.invert(pc.is_in(table["image_id"], value_set=values)))
    table = table.filter(keep)
    emb = table["embedding"].combine_chunks()
    dim = len(emb[0]) if len(emb) else 0
    vectors = emb.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32)
    return vectors, table.select(["image_id", "aesthetic", "caption", "url"])
