"""FAISS vector indexes over L2-normalised embeddings (inner product = cosine similarity).

`choose_index` picks the type from corpus size and a memory budget: exact (flat) for small corpora,
HNSW while its graph fits the budget, IVF-PQ beyond. `build_index` trains on a sample and adds
everything; `measure_recall` compares against exact search on sampled queries. A corpus beyond
one machine is split into shards, each its own index, searched by `ShardedIndex` (fan-out, merge).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from align.config import IndexConfig, ModelConfig
from align.errors import InputNotFound

INDEX_FILE = "index.faiss"
SHARD_FILE = "shard-{:03d}.faiss"
INDEX_MANIFEST = "_index.json"
DUPLICATES_FILE = "duplicates.parquet"


@dataclass
class IndexSpec:
    """What to build: the FAISS type and its parameters."""

    type: str  # flat | hnsw | ivfpq
    dim: int
    params: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def choose_index(n: int, dim: int, cfg: IndexConfig) -> IndexSpec:
    """Pick the index type and parameters for n vectors of width dim."""
    kind = cfg.type
    hnsw_bytes = n * (dim * 4 + cfg.hnsw_m * 2 * 4)  # vectors + level-0 links
    if kind == "auto":
        if n <= cfg.flat_max_vectors:
            kind = "flat"
        elif hnsw_bytes <= cfg.memory_budget_mb * 2**20:
            kind = "hnsw"
        else:
            kind = "ivfpq"
    if kind == "flat":
        return IndexSpec("flat", dim)
    if kind == "hnsw":
        return IndexSpec(
            "hnsw", dim, {"m": cfg.hnsw_m, "ef_construction": 80, "ef_search": cfg.hnsw_ef_search}
        )
    # IVF-PQ: ~4 sqrt(n) lists; PQ codes of dim/4 bytes (8 bits each, m divides dim).
    nlist = max(1, min(65536, int(4 * math.sqrt(n))))
    m = next(k for k in (dim // 4, dim // 8, dim // 2, dim) if k >= 1 and dim % k == 0)
    return IndexSpec(
        "ivfpq",
        dim,
        {"nlist": nlist, "m": m, "nbits": 8, "nprobe": min(cfg.ivf_nprobe, nlist), "train": 0},
    )


def build_index(vectors: np.ndarray, spec: IndexSpec, seed: int = 0):
    """Build a FAISS index from float vectors (n, dim); trains on a sample where needed."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if spec.type == "flat":
        index = faiss.IndexFlatIP(spec.dim)
    elif spec.type == "hnsw":
        index = faiss.IndexHNSWFlat(spec.dim, spec.params["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.params["ef_construction"]
        index.hnsw.efSearch = spec.params["ef_search"]
    elif spec.type == "ivfpq":
        p = spec.params
        quantizer = faiss.IndexFlatIP(spec.dim)
        index = faiss.IndexIVFPQ(
            quantizer, spec.dim, p["nlist"], p["m"], p["nbits"], faiss.METRIC_INNER_PRODUCT
        )
        n_train = min(len(x), max(p["nlist"] * 64, 10_000))
        sample = np.random.default_rng(seed).choice(len(x), size=n_train, replace=False)
        index.train(x[np.sort(sample)])
        index.nprobe = p["nprobe"]
        p["train"] = n_train
    else:
        raise ValueError(f"unknown index type {spec.type!r}")
    index.add(x)
    return index


def measure_recall(index, vectors: np.ndarray, n_queries: int, k: int = 10, seed: int = 0) -> dict:
    """recall@k of `index` against exact inner-product search, on sampled stored vectors used
    as queries; also both query rates."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    rng = np.random.default_rng(seed)
    q = x[rng.choice(len(x), size=min(n_queries, len(x)), replace=False)]
    k = min(k, len(x))
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(x)
    t0 = time.perf_counter()
    _, truth = exact.search(q, k)
    t_exact = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, found = index.search(q, k)
    t_index = time.perf_counter() - t0
    hits = sum(len(set(t) & set(f)) for t, f in zip(truth.tolist(), found.tolist(), strict=True))
    return {
        "recall_at_k": hits / (len(q) * k),
        "k": k,
        "queries": len(q),
        "qps": len(q) / max(t_index, 1e-9),
        "exact_qps": len(q) / max(t_exact, 1e-9),
    }


def read_scored_embeddings(files: list[str], exclude=None):
    """Embeddings (float32, n x d) and the (image_id, aesthetic, caption, url) table of the ok
    rows of scored shards, in file order, less the image ids in `exclude` (dropped exact
    duplicates): the order index_corpus adds them to the index, so row i of the result is row i
    of the index. caption and url are null for shards written before them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from align import io

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


def exact_duplicates(files: list[str]):
    """The ok rows of scored shards whose sha256 equals an earlier row's (file order): a table
    (image_id, duplicate_of: the first image with those bytes, sha256)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from align import io

    tables = []
    for f in files:
        if "sha256" not in io.parquet_schema(f).names:  # written before hashes were
            continue
        tables.append(io.read_parquet(f, columns=["image_id", "sha256", "status"]))
    empty = pa.table({n: pa.array([], pa.string()) for n in ("image_id", "duplicate_of", "sha256")})
    if not tables:
        return empty
    table = pa.concat_tables(tables)
    table = table.filter(pc.and_(pc.equal(table["status"], "ok"), pc.is_valid(table["sha256"])))
    hashes = table["sha256"].to_numpy(zero_copy_only=False).astype(str)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    original = first[inverse.reshape(-1)]
    duplicate = np.flatnonzero(original != np.arange(len(hashes)))
    if not len(duplicate):
        return empty
    return pa.table(
        {
            "image_id": table["image_id"].take(duplicate),
            "duplicate_of": table["image_id"].take(original[duplicate]),
            "sha256": table["sha256"].take(duplicate),
        }
    )


class ShardedIndex:
    """Several FAISS indexes over disjoint shards, searched by fan-out and merge.

    Row ids are global: shard s holds rows offsets[s] .. offsets[s] + ntotal - 1.
    """

    def __init__(self, indexes: list, offsets: list[int]):
        self.indexes = indexes
        self.offsets = offsets

    @property
    def ntotal(self) -> int:
        return sum(i.ntotal for i in self.indexes)

    @property
    def d(self) -> int:
        return self.indexes[0].d

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, global rows) per query, merged over all shards (-1 pads)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        scores, rows = [], []
        for index, offset in zip(self.indexes, self.offsets, strict=True):
            s, r = index.search(q, min(k, index.ntotal))
            scores.append(s)
            rows.append(np.where(r >= 0, r + offset, -1))
        s, r = np.concatenate(scores, axis=1), np.concatenate(rows, axis=1)
        s = np.where(r >= 0, s, -np.inf)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, order, axis=1), np.take_along_axis(r, order, axis=1)


def reconstruct_rows(index, rows: np.ndarray) -> np.ndarray:
    """The stored vectors of some rows ((n, d) float32; approximate for a PQ index), as
    clip-retrieval's search_and_reconstruct gives them for deduplication."""
    import faiss

    rows = np.asarray(rows, dtype=np.int64)
    if isinstance(index, ShardedIndex):
        out = np.zeros((len(rows), index.d), np.float32)
        for shard, offset in zip(index.indexes, index.offsets, strict=True):
            mine = (rows >= offset) & (rows < offset + shard.ntotal)
            if mine.any():
                out[mine] = reconstruct_rows(shard, rows[mine] - offset)
        return out
    try:
        return index.reconstruct_batch(rows)
    except RuntimeError:  # an IVF index reconstructs through a direct map, made once
        faiss.extract_index_ivf(index).make_direct_map()
        return index.reconstruct_batch(rows)


def load_index(index_dir: str):
    """Load what index_corpus wrote: one index, or a ShardedIndex over several.

    Returns:
        (index with .search(queries, k) and .ntotal, id map table, index manifest dict).
    Raises:
        FileNotFoundError: naming the missing file.
    """
    import faiss

    from align import io

    manifest = (
        io.read_json(f"{index_dir}/{INDEX_MANIFEST}")
        if io.exists(f"{index_dir}/{INDEX_MANIFEST}")
        else None
    )
    if manifest is None:
        raise InputNotFound(f"index manifest not found: {index_dir}/{INDEX_MANIFEST}")
    indexes = []
    for shard in manifest["shards"]:
        path = f"{index_dir}/{shard['file']}"
        io.require_exists(path, "index shard")
        indexes.append(faiss.deserialize_index(np.frombuffer(io.read_bytes(path), dtype=np.uint8)))
        if "nprobe" in manifest["spec"]["params"]:
            indexes[-1].nprobe = manifest["spec"]["params"]["nprobe"]
    id_map = io.read_parquet(f"{index_dir}/id_map.parquet")
    index = (
        indexes[0]
        if len(indexes) == 1
        else ShardedIndex(indexes, [s["offset"] for s in manifest["shards"]])
    )
    return index, id_map, manifest


def load_corpus(index_corpus_dir: str):
    """Everything retrieval needs from an index_corpus output, row-aligned with the index.

    Returns:
        (index, image ids (object array), aesthetic (float32), embeddings (float16, n x d)).
    Raises:
        FileNotFoundError: when index_corpus has not finished there.
    """
    from align import io

    index, id_map, manifest = load_index(f"{index_corpus_dir}/index")
    vectors, table = read_scored_embeddings(
        io.list_files(f"{index_corpus_dir}/scored", ".parquet"),
        exclude=dropped_duplicates(f"{index_corpus_dir}/index", manifest),
    )
    if not table["image_id"].combine_chunks().equals(id_map["image_id"].combine_chunks()):
        raise ValueError(f"scored shards in {index_corpus_dir} do not match its index id map")
    return (
        index,
        np.asarray(table["image_id"].to_pylist(), dtype=object),
        table["aesthetic"].to_numpy(zero_copy_only=False).astype(np.float32),
        vectors.astype(np.float16),
    )


def dropped_duplicates(index_dir: str, manifest: dict):
    """The image ids an index left out as exact duplicates (None: none were)."""
    from align import io

    if not manifest.get("exact_duplicates", {}).get("dropped"):
        return None
    return io.read_parquet(f"{index_dir}/{DUPLICATES_FILE}", columns=["image_id"])["image_id"]


def check_index(model: ModelConfig, index_corpus_dir: str) -> dict:
    """The index manifest of an index_corpus output, checked before any work: a missing index,
    or one built with another model, other weights or another dimension, fails here."""
    from align import io
    from align.models import ModelLoadError, check_model, weights_fingerprint

    manifest_path = f"{index_corpus_dir}/index/{INDEX_MANIFEST}"
    io.require_exists(manifest_path, "index (run index_corpus first)")
    index_manifest = io.read_json(manifest_path)
    facts = check_model(model)
    built_with = index_manifest["model"]["name"]
    if built_with != model.name or index_manifest["model"].get("pretrained") != model.pretrained:
        raise ModelLoadError(
            f"index at {index_corpus_dir} was built with model {built_with!r} "
            f"(pretrained={index_manifest['model'].get('pretrained')!r}) but the config's model is "
            f"{model.name!r} (pretrained={model.pretrained!r})"
        )
    built_weights = index_manifest.get("weights")
    if built_weights is not None and built_weights != weights_fingerprint(model):
        raise ModelLoadError(
            f"index at {index_corpus_dir} was built with other weights than "
            f"{model.pretrained} has now ({built_weights} then, "
            f"{weights_fingerprint(model)} now): the checkpoint was rewritten since; "
            f"index the corpus again"
        )
    if index_manifest["dim"] != facts.embed_dim:
        raise ModelLoadError(
            f"index dimension {index_manifest['dim']} does not match the model's {facts.embed_dim}"
        )
    return index_manifest


def build_index_shard(
    files: list[str], index_dir: str, shard: int, cfg: IndexConfig, rating_edges=None, exclude=None
) -> dict:
    """Build and save the index over some scored shards (less the image ids in `exclude`) and
    measure its recall@10 (the body of index_corpus's per-shard Ray task); returns its manifest
    entry, its ids and, given the corpus's rating edges, its sums of embeddings per rating level
    (align.ranking)."""
    import faiss

    from align import io
    from align.ranking import rating_level_sums

    vectors, ids = read_scored_embeddings(files, exclude)
    level_sums = None
    if rating_edges is not None:
        aesthetic = ids["aesthetic"].to_numpy(zero_copy_only=False).astype(np.float64)
        level_sums = rating_level_sums(vectors, aesthetic, np.asarray(rating_edges))
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
        "rating_level_sums": level_sums,
    }


def write_id_map_and_manifest(
    index_dir: str, shards: list[dict], model: ModelConfig, duplicates: dict | None = None
) -> dict:
    """After every shard is built (`build_index_shard`, in order): the global id map (row ->
    image id, aesthetic, caption, url) and `_index.json`, which names the model and its weights
    and what became of exact duplicates (`duplicates`: found, dropped)."""
    import pyarrow as pa

    from align import io
    from align.models import weights_fingerprint

    offset, id_tables = 0, []
    level_sums = [s.pop("rating_level_sums", None) for s in shards]
    rating_file = None
    if level_sums and all(ls is not None for ls in level_sums):
        rating_file = write_rating_embeddings(index_dir, level_sums)
    for shard in shards:
        shard["offset"] = offset
        ids = shard.pop("ids")
        rows = pa.array(np.arange(offset, offset + ids.num_rows), pa.int64())
        id_tables.append(pa.table({"row": rows, **{n: ids[n] for n in ids.column_names}}))
        offset += ids.num_rows
    io.write_parquet(pa.concat_tables(id_tables), f"{index_dir}/id_map.parquet")
    index_manifest = {
        "model": model.model_dump(),
        # The weights themselves (a checkpoint rewritten at the same path is another model).
        "weights": weights_fingerprint(model),
        "dim": shards[0]["spec"]["dim"],
        "count": offset,
        "spec": shards[0]["spec"],
        "shards": shards,
        "recall_at_10": float(np.mean([s["recall"]["recall_at_k"] for s in shards])),
        "metric": "inner product on L2-normalised embeddings (cosine)",
        # clip-back's aesthetic_score 0-9: mean embedding per rating level (align.ranking).
        "rating_embeddings": rating_file,
        "exact_duplicates": {**(duplicates or {}), "file": DUPLICATES_FILE},
    }
    io.write_json(f"{index_dir}/{INDEX_MANIFEST}", index_manifest)
    return index_manifest


RATING_EMBEDDINGS = "rating_embeddings.npy"


def write_rating_embeddings(index_dir: str, level_sums: list[tuple]) -> str:
    """The corpus's rating embeddings ((levels, d) float32, .npy) from every shard's sums."""
    import io as _io

    from align import io
    from align.ranking import rating_embeddings

    sums = sum(s for s, _ in level_sums)
    counts = sum(c for _, c in level_sums)
    buffer = _io.BytesIO()
    np.save(buffer, rating_embeddings(sums, counts))
    io.write_bytes(f"{index_dir}/{RATING_EMBEDDINGS}", buffer.getvalue())
    return RATING_EMBEDDINGS


def read_rating_embeddings(index_dir: str, manifest: dict) -> np.ndarray | None:
    """The rating embeddings an index was built with, or None (an index built before them)."""
    import io as _io

    from align import io

    name = manifest.get("rating_embeddings")
    if not name:
        return None
    return np.load(_io.BytesIO(io.read_bytes(f"{index_dir}/{name}")))
