"""Search an index_corpus index with memory bounded by one shard, not by the corpus.

index_corpus writes three files per index shard (align/search/stored.py lists them). The IVF lists are memory-mapped (faiss.IO_FLAG_MMAP) and so is the rows file, so a process holds
PQ codes and ids as it touches them, and processes on a node share the page cache. Embeddings are
read by row (`StoredRows`, pread): the candidates' exact vectors, never the corpus's.

`ShardGroup` searches some shards of one index as one: the query is assigned to IVF lists once
(the shards share one trained quantizer), each shard scans its part of those lists, and the
candidates (refine_factor x k a shard) are re-scored exactly from the stored embeddings, with each
candidate's similarity to a reference query (the ORIGINAL query in build_preferences) from the
same vectors. `Corpus` searches every shard: in this process as one group, or, for a corpus
larger than `index.in_process_max_vectors`, through search actors (`start_shard_actors`: one per
node by default, each holding a share of the shards) whose answers it merges by score.
build_preferences, evaluate and serving all search through it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from align.config import IndexConfig
from align.log import get_logger
from align.search.index import set_nprobe
from align.search.stored import check_layout, read_index_manifest, shard_file
from align.storage import io

log = get_logger("corpus")
# Candidate rows re-scored per chunk: bounds the float32 copy of their vectors.
GATHER_ROWS = 1024
ROW_COLUMNS = ("image_id", "aesthetic", "caption", "url")
DEFAULT_REFINE = IndexConfig.model_fields["refine_factor"].default


@dataclass
class Candidates:
    """Top-k per query, merged over shards; rows are global index rows (-1 pads, score -inf)."""

    scores: np.ndarray  # (Q, k) float32: exact cosine to the searched query
    rows: np.ndarray  # (Q, k) int64
    ids: np.ndarray  # (Q, k) object (None at pads)
    aesthetic: np.ndarray  # (Q, k) float32 (NaN at pads)
    reference: np.ndarray | None  # (Q, k) float32: exact cosine to the reference query


class ShardGroup:
    """Some shards of one index held by one process and searched as one (the body of a search
    actor when the corpus is served by actors: one per node). IVF-PQ shards share one trained
    quantizer, so a query is assigned to its lists once and each shard scans its part of them
    (FAISS search_preassigned, as IndexShardsIVF does); the process keeps one copy of the
    quantizer. Flat and HNSW shards are searched one by one. The best refine_factor x k
    candidates of them all by approximate score are re-scored exactly from the stored
    embeddings, and the top k kept: what one index over every shard would answer."""

    def __init__(
        self,
        index_dir: str,
        entries: list[dict],
        spec: dict,
        refine_factor: int = DEFAULT_REFINE,
        threads: int | None = None,
    ):
        """threads: FAISS's OpenMP threads, set in a search actor to the CPUs it reserved (the
        default, every core of the node, oversubscribes a node of several such actors)."""

        if threads:
            faiss.omp_set_num_threads(threads)
        check_layout(index_dir, {"shards": entries})
        self.ivf = spec["type"] == "ivfpq"
        flags = faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if self.ivf else 0
        self.indexes = []
        for entry in entries:  # one at a time: a second quantizer copy is freed as it is read
            self.indexes.append(faiss.read_index(shard_file(index_dir, entry, "file"), flags))
            if self.ivf and len(self.indexes) > 1:
                share_quantizer(self.indexes[0], self.indexes[-1])
        # The IVF index inside each (views: `indexes` owns them).
        self.ivfs = [faiss_ivf(index) for index in self.indexes] if self.ivf else []
        if spec["params"].get("nprobe"):
            self.set_nprobe(spec["params"]["nprobe"])
        # Scores of a PQ index are approximate: take more candidates, re-score them exactly.
        self.refine = refine_factor if self.ivf else 1
        self.offset = int(entries[0]["offset"])
        self.counts = np.array([e["count"] for e in entries], np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.counts)[:-1]]).astype(np.int64)
        self.count = int(self.counts.sum())
        self.embeddings = ShardedRows(
            [StoredRows(shard_file(index_dir, e, "embeddings_file")) for e in entries],
            self.starts,
        )
        self.rows = open_rows(index_dir, entries)

    def stats(self) -> dict:
        """This process's peak and current resident memory (for benchmarks)."""
        return process_memory()

    def set_nprobe(self, nprobe: int) -> None:
        """IVF lists searched per query (the build's choice is `_index.json`'s; the build tries
        others); a no-op for flat and HNSW shards."""

        if self.ivf:
            for index in self.indexes:
                set_nprobe(index, nprobe)

    def vectors(self, local_rows: np.ndarray) -> np.ndarray:
        """Stored embeddings of some rows of this group, float16 (n, d)."""
        return self.embeddings.read(local_rows)

    def search(self, queries: np.ndarray, k: int, reference: np.ndarray | None = None) -> dict:
        """Top-k of this group per query: exact scores, global rows, ids, aesthetic and (given
        reference, row-aligned with queries) each candidate's exact similarity to it."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        k = min(k, self.count)
        scores, rows = self._approximate(q, min(k * self.refine, self.count))
        ref = None
        if self.refine > 1 or reference is not None:
            scores, rows, ref = self._exact(q, rows, k, reference)
        elif len(self.indexes) > 1:  # flat or HNSW scores are exact: the top k in order
            order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
            scores, rows = np.take_along_axis(scores, order, 1), np.take_along_axis(rows, order, 1)
        found = rows >= 0
        safe = np.where(found, rows, 0)
        take = lambda c: self.rows.take(c, safe)  # noqa: E731
        return {
            "scores": np.where(found, scores, -np.inf).astype(np.float32),
            "rows": np.where(found, rows + self.offset, -1),
            "ids": np.where(found, take("image_id"), None),
            "aesthetic": np.where(found, take("aesthetic"), np.nan).astype(np.float32),
            "reference": ref,
        }

    def _approximate(self, q: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """The `depth` best candidates by approximate score over every shard, as one index over
        them all would find them (the shards' codes share one codebook, so their scores compare):
        (scores, rows of this group), in no order, -1 pads."""
        assigned = None
        if self.ivf:  # the lists of every shard's nearest centroids: one quantizer search
            first = self.ivfs[0]
            coarse, lists = first.quantizer.search(q, first.nprobe)
            assigned = (lists, coarse)
        parts = []
        for i, (start, count) in enumerate(zip(self.starts, self.counts, strict=True)):
            n = int(min(depth, count))
            if n == 0:
                continue
            if assigned is not None:
                scores, rows = self.ivfs[i].search_preassigned(q, n, *assigned)
            else:
                scores, rows = self.indexes[i].search(q, n)
            parts.append((scores, np.where(rows >= 0, rows + start, -1)))
        if not parts:
            return _empty(len(q), 0)
        scores = np.concatenate([p[0] for p in parts], 1)
        rows = np.concatenate([p[1] for p in parts], 1)
        if scores.shape[1] > depth:
            best = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
            scores, rows = np.take_along_axis(scores, best, 1), np.take_along_axis(rows, best, 1)
        return scores, rows

    def _exact(self, q: np.ndarray, rows: np.ndarray, k: int, reference: np.ndarray | None):
        """Re-score candidates from the stored embeddings, chunk by chunk of queries; keep the top
        k; similarity to the reference query from the same vectors."""
        step = max(1, GATHER_ROWS // max(1, rows.shape[1]))
        scores = np.full(rows.shape, -np.inf, np.float32)
        ref = None if reference is None else np.full(rows.shape, np.nan, np.float32)
        for start in range(0, len(q), step):  # chunks of queries, not rows
            part = slice(start, start + step)
            candidates = np.maximum(rows[part], 0)
            emb = self.embeddings.read(candidates).astype(np.float32)  # (queries, depth, d)
            # Batched mat-vec: no (q, depth, d) temporary beside the gathered vectors.
            scores[part] = np.matmul(emb, q[part, :, None])[..., 0]
            if reference is not None:
                r = np.asarray(reference[part], dtype=np.float32)
                ref[part] = np.matmul(emb, r[:, :, None])[..., 0]
            del emb
        scores = np.where(rows >= 0, scores, -np.inf)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        take = lambda a: None if a is None else np.take_along_axis(a, order, axis=1)  # noqa: E731
        return take(scores), take(rows), take(ref)

    def row_info(self, local_rows: np.ndarray) -> dict:
        """image_id, aesthetic, caption and url of some rows of this shard (Python lists)."""
        rows = np.asarray(local_rows, dtype=np.int64)
        return {c: self.rows.take(c, rows).tolist() for c in ROW_COLUMNS}


class MergedShards(ShardGroup):
    """index.merge_ondisk's one on-disk IVF index over every shard (single-node serving): one
    FAISS search over all the lists (memory-mapped from merged.ivfdata), global row ids; rows and
    exact embeddings read from each shard's own files by global row."""

    def __init__(self, index_dir: str, manifest: dict, refine_factor: int = DEFAULT_REFINE):
        check_layout(index_dir, manifest)
        merged = manifest["merged"]
        # The lists file is found beside the index file, wherever the folder has moved.
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR | faiss.IO_FLAG_READ_ONLY
        self.indexes = [faiss.read_index(f"{index_dir}/{merged['file']}", flags)]
        self.ivfs = [faiss_ivf(self.indexes[0])]
        self.ivf = True
        if manifest["spec"]["params"].get("nprobe"):  # unset while the build chooses it
            self.set_nprobe(manifest["spec"]["params"]["nprobe"])
        self.refine = refine_factor
        self.offset, self.count = 0, int(manifest["count"])
        self.counts, self.starts = np.array([self.count]), np.zeros(1, np.int64)
        shards = manifest["shards"]
        self.embeddings = ShardedRows(
            [StoredRows(shard_file(index_dir, s, "embeddings_file")) for s in shards],
            np.array([s["offset"] for s in shards], np.int64),
        )
        self.rows = open_rows(index_dir, shards)


def faiss_ivf(index):
    """The IVF index inside a FAISS index (as read from a shard file)."""

    return faiss.extract_index_ivf(index)


def share_quantizer(first, other) -> None:
    """Point `other`'s IVF index at `first`'s coarse quantizer and free its own copy: shards of
    one build are added to one trained index, so their quantizers are equal (at 16,384 lists of
    d = 512 with an HNSW graph, 36 MB a copy)."""

    keep, drop = faiss_ivf(first), faiss_ivf(other)
    own = drop.quantizer
    drop.quantizer = keep.quantizer
    if drop.own_fields:
        drop.own_fields = False
        # Freed in C++ by a container that owns it: handing ownership to the Python proxy
        # instead corrupted the heap when the shards were later freed (FAISS 1.15).
        holder = faiss.IndexShards(own.d)
        holder.add_shard(own)
        holder.own_indices = True
        del holder


def open_rows(index_dir: str, shards: list[dict]) -> RowColumns:
    """The row columns of some shards' rows files, in order, over their memory maps."""

    tables = [
        pa.ipc.open_file(pa.memory_map(shard_file(index_dir, s, "rows_file"))).read_all()
        for s in shards
    ]
    return RowColumns({c: [k for t in tables for k in t[c].chunks] for c in ROW_COLUMNS})


class RowColumns:
    """Columns as lists of Arrow chunks (memory-mapped record batches), read by row from the chunk
    that holds each, so a read costs its rows, not the column's (ChunkedArray.take combines the
    chunks first: a copy of the whole column per call). Numeric chunks are read through numpy
    views of the same memory; a few rows of text one by one, many with one take a chunk."""

    FEW_ROWS = 64

    def __init__(self, chunks: dict[str, list]):
        self.chunks = chunks
        self.starts = {
            c: np.cumsum([0, *[len(k) for k in parts]]).astype(np.int64)
            for c, parts in chunks.items()
        }
        self.numeric = {
            c: [k.to_numpy(zero_copy_only=False).astype(np.float32, copy=False) for k in parts]
            for c, parts in chunks.items()
            if parts and pa.types.is_floating(parts[0].type)
        }

    def take(self, column: str, rows: np.ndarray) -> np.ndarray:
        """The column's values at rows (int64, any shape): float32 for numbers, else objects."""

        rows = np.asarray(rows, dtype=np.int64)
        flat, starts = rows.ravel(), self.starts[column]
        chunk = np.searchsorted(starts, flat, side="right") - 1
        local = flat - starts[chunk]
        views = self.numeric.get(column)
        if views is None and len(flat) <= self.FEW_ROWS:
            parts = self.chunks[column]
            out = np.empty(len(flat), object)
            out[:] = [
                parts[c][i].as_py() for c, i in zip(chunk.tolist(), local.tolist(), strict=True)
            ]
            return out.reshape(rows.shape)
        out = np.empty(len(flat), object if views is None else np.float32)
        for c in np.unique(chunk):
            where = chunk == c
            if views is not None:
                out[where] = views[c][local[where]]
            else:
                taken = self.chunks[column][c].take(pa.array(local[where]))
                out[where] = taken.to_numpy(zero_copy_only=False)
        return out.reshape(rows.shape)


class ShardedRows:
    """Several shards' StoredRows read as one matrix by global row (MergedShards)."""

    def __init__(self, parts: list, offsets: np.ndarray):
        self.parts, self.offsets = parts, offsets

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows (any shape of global rows) -> rows.shape + row shape, in one pass whatever
        their shards."""
        return pread_rows(rows, self.parts, self.offsets)


def pread_rows(rows: np.ndarray, parts: list, starts: np.ndarray) -> np.ndarray:
    """Rows (any shape of row numbers over `parts`, StoredRows whose first rows are `starts`) ->
    rows.shape + row shape: one pread per distinct row (the OS has no scattered read of a file)."""
    rows = np.asarray(rows, dtype=np.int64)
    unique, inverse = np.unique(rows, return_inverse=True)
    part = np.searchsorted(starts, unique, side="right") - 1
    first = parts[0]
    fds = np.array([p.fd for p in parts])[part]
    at = np.array([p.offset for p in parts])[part] + (unique - starts[part]) * first.row_bytes
    size = first.row_bytes
    buffer = b"".join(
        [os.pread(fd, size, a) for fd, a in zip(fds.tolist(), at.tolist(), strict=True)]
    )
    out = np.frombuffer(buffer, first.dtype).reshape(len(unique), *first.shape[1:])
    return out[inverse.reshape(rows.shape)]


class StoredRows:
    """Rows of a .npy matrix on disk, read by row with pread: scattered candidates cost their own
    bytes. (A memory map would not: the kernel maps whole cached folios around each touched row,
    so a few hundred scattered rows map most of a shard's file into the process.)"""

    def __init__(self, path: str):
        header = np.load(path, mmap_mode="r")  # shape, dtype and data offset; nothing read
        self.shape, self.dtype, self.offset = header.shape, header.dtype, header.offset
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        del header
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def __len__(self) -> int:
        return self.shape[0]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The rows (any shape of indices) -> array of shape rows.shape + row shape."""
        return pread_rows(rows, [self], np.zeros(1, np.int64))

    def chunks(self, chunk_rows: int = 65536):
        """Every row in order, chunk by chunk (sequential reads)."""
        with open(self.path, "rb") as f:
            for start in range(0, self.shape[0], chunk_rows):
                n = min(chunk_rows, self.shape[0] - start)
                f.seek(self.offset + start * self.row_bytes)
                yield np.fromfile(f, self.dtype, n * self.row_bytes // self.dtype.itemsize).reshape(
                    n, *self.shape[1:]
                )

    def __reduce__(self):  # reopened where it is unpickled (a Ray actor)
        return (StoredRows, (self.path,))


def _empty(q: int, k: int):
    return np.zeros((q, k), np.float32), np.full((q, k), -1, np.int64)


def process_memory() -> dict:
    """This process's peak and current resident set in MB (VmHWM, VmRSS), and the current one by
    kind: anonymous (heap), file-backed (memory maps: IVF lists, rows files, libraries) and
    shared memory (Ray's object store pages this process has mapped). Linux."""
    fields = {
        "VmHWM": "peak_rss_mb",
        "VmRSS": "rss_mb",
        "RssAnon": "anon_mb",
        "RssFile": "file_mb",
        "RssShmem": "shmem_mb",
    }
    out = dict.fromkeys(fields.values(), 0.0)
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[fields[key]] = int(value.split()[0]) / 1024
    return out


def shard_groups(shards: int, groups: int) -> list[range]:
    """`shards` split into at most `groups` contiguous runs of near-equal length."""
    bounds = np.linspace(0, shards, min(groups, shards) + 1).round().astype(int)
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def actor_names(index_dir: str, manifest: dict, groups: int) -> list[str]:
    """Names of the search actors of one index split into `groups` (unique to the index folder,
    its build and the split: an index rebuilt in place gets new actors, never the old build's)."""
    key = hashlib.sha1(io.absolute(index_dir).encode())
    key.update(json.dumps(manifest["shards"], sort_keys=True, default=str).encode())
    key = key.hexdigest()[:12]
    return [f"index-search-{key}-{groups}-{i}" for i in range(groups)]


@dataclass
class ShardActors:
    """The search actors of one index: pass `names` to a `Corpus` in any process of the job; keep
    this object while they are needed (an actor is gone once no handle to it is left)."""

    names: list[str]
    handles: list


def cpu_nodes() -> list[str]:
    """Node ids of the cluster's live nodes that have CPUs."""

    return [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


def start_shard_actors(
    index_dir: str, num_cpus: float, refine_factor: int, actors: int | None = None
) -> ShardActors:
    """Search actors over the index's shards (`actors` of them, default one per node with CPUs),
    each holding a contiguous share of the shards as one `ShardGroup`, placed one per node where
    it can (an actor already running under a name is reused); loaded, or failed, before this
    returns."""

    manifest = read_index_manifest(index_dir)
    nodes = cpu_nodes()
    groups = shard_groups(len(manifest["shards"]), actors or max(1, len(nodes)))
    names = actor_names(index_dir, manifest, len(groups))
    needed, total = num_cpus * len(names), ray.cluster_resources().get("CPU", 0)
    if needed > total:  # an autoscaling cluster may still add nodes: say why it may wait
        log.warning(
            "%d search actors x index.shard_actor_cpus %.3g = %.3g CPUs, the cluster has %.3g "
            "now: they start as CPUs free up (lower index.shard_actor_cpus or index.search_actors)",
            len(names),
            num_cpus,
            needed,
            total,
        )
    actor = ray.remote(ShardGroup)
    threads = max(1, math.ceil(num_cpus))  # FAISS's threads: the CPUs each actor reserved
    handles = []
    for i, (name, group) in enumerate(zip(names, groups, strict=True)):
        # Soft: placed on another node when this one cannot take it.
        place = NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=True) if nodes else None
        options = {"name": name, "get_if_exists": True, "num_cpus": num_cpus}
        entries = [manifest["shards"][j] for j in group]
        handles.append(
            actor.options(**options, scheduling_strategy=place).remote(
                index_dir, entries, manifest["spec"], refine_factor, threads
            )
        )
    ray.get([h.stats.remote() for h in handles])
    return ShardActors(names, handles)


def use_shard_actors(manifest: dict, in_process_max_vectors: int) -> bool:
    """A corpus larger than the in-process bound is searched by search actors."""
    return manifest["count"] > in_process_max_vectors


class Corpus:
    """Every shard of an index, searched as one group in this process or by search actors that
    each hold a share of the shards (their answers merged); FAISS-like `search` too."""

    def __init__(
        self,
        index_dir: str,
        refine_factor: int | None = None,
        shard_actors: list[str] | None = None,
        merged: bool | None = None,
    ):
        """refine_factor: index.refine_factor (None: its default); shard_actors: names from
        `start_shard_actors` (None: load the shards here, or the on-disk merge of them when
        index.merge_ondisk built one and `merged` is not False)."""
        refine_factor = refine_factor or DEFAULT_REFINE
        self.index_dir = index_dir
        self.manifest = read_index_manifest(index_dir)
        self.spec = self.manifest["spec"]
        shards = self.manifest["shards"]
        self.remote = shard_actors is not None
        if self.remote:
            self.groups = [ray.get_actor(name) for name in shard_actors]
            split = shard_groups(len(shards), len(shard_actors))
            self.offsets = np.array([shards[g[0]]["offset"] for g in split], np.int64)
            return
        self.offsets = np.zeros(1, np.int64)
        if "merged" in self.manifest and merged is not False:
            self.groups = [MergedShards(index_dir, self.manifest, refine_factor)]
        else:
            self.groups = [ShardGroup(index_dir, shards, self.spec, refine_factor)]

    @property
    def ntotal(self) -> int:
        return int(self.manifest["count"])

    @property
    def d(self) -> int:
        return int(self.manifest["dim"])

    def _each(self, method: str, args: list[tuple]) -> list:
        """Call `method` on every group (args per group), in parallel when they are actors."""
        if self.remote:
            return ray.get(
                [getattr(s, method).remote(*a) for s, a in zip(self.groups, args, strict=True)]
            )
        return [getattr(s, method)(*a) for s, a in zip(self.groups, args, strict=True)]

    def candidates(self, queries: np.ndarray, k: int, reference: np.ndarray | None = None):
        """Top-k over the corpus per query (`Candidates`), merged from every group's top-k."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        args = (q, k, reference)
        if self.remote:  # one copy in the object store for every search actor
            args = (ray.put(q), k, None if reference is None else ray.put(reference))
        parts = self._each("search", [args] * len(self.groups))
        if len(parts) == 1:  # already the top k, in order
            return Candidates(**parts[0])
        join = lambda key: np.concatenate([p[key] for p in parts], axis=1)  # noqa: E731
        scores = join("scores")
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        take = lambda a: np.take_along_axis(a, order, axis=1)  # noqa: E731
        return Candidates(
            scores=take(scores),
            rows=take(join("rows")),
            ids=take(join("ids")),
            aesthetic=take(join("aesthetic")),
            reference=None if reference is None else take(join("reference")),
        )

    def set_nprobe(self, nprobe: int) -> None:
        """IVF lists searched per query (the build tries several to choose one)."""
        self._each("set_nprobe", [(nprobe,)] * len(self.groups))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, global rows) like a FAISS index's search."""
        found = self.candidates(queries, k)
        return found.scores, found.rows

    def _by_group(self, rows: np.ndarray) -> tuple[np.ndarray, list[tuple]]:
        group = np.searchsorted(self.offsets, rows, side="right") - 1
        return group, [(rows[group == g] - self.offsets[g],) for g in range(len(self.groups))]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """Stored (exact) embeddings of global rows, float16 (n, d)."""
        rows = np.asarray(rows, dtype=np.int64)
        shard, args = self._by_group(rows)
        out = np.zeros((len(rows), self.d), np.float16)
        for s, part in enumerate(self._each("vectors", args)):
            out[shard == s] = part
        return out

    def row_info(self, rows: np.ndarray) -> dict:
        """image_id, aesthetic, caption and url of global rows, in their order (lists)."""
        rows = np.asarray(rows, dtype=np.int64)
        shard, args = self._by_group(rows)
        out = {c: np.full(len(rows), None, dtype=object) for c in ROW_COLUMNS}
        for s, part in enumerate(self._each("row_info", args)):
            for c in ROW_COLUMNS:
                out[c][shard == s] = np.asarray(part[c], dtype=object)
        return {c: v.tolist() for c, v in out.items()}

    def memory(self) -> list[dict]:
        """Peak and current resident memory of each process holding shards."""
        if self.remote:
            return self._each("stats", [()] * len(self.groups))
        return [process_memory()]


def load_index(index_dir: str, refine_factor: int | None = None):
    """What index_corpus wrote, searchable in this process (align.search.corpus.Corpus: every shard,
    memory-mapped), with its id map table and `_index.json`.

    Raises:
        InputNotFound: naming the missing manifest or file.
    """

    corpus = Corpus(index_dir, refine_factor=refine_factor)
    io.require_exists(f"{index_dir}/id_map.parquet", "index id map")
    return corpus, io.read_parquet(f"{index_dir}/id_map.parquet"), corpus.manifest


def load_corpus(index_corpus_dir: str, refine_factor: int | None = None):
    """A labelled gallery for evaluate: the corpus search and, row-aligned with it, every image
    id, aesthetic and embedding (float16) in this process. Retrieval and serving never call this:
    they search through align.search.corpus, which holds one shard's worth at most.

    Returns:
        (Corpus, image ids (object array), aesthetic (float32), embeddings (float16, n x d)).
    """

    corpus, id_map, manifest = load_index(f"{index_corpus_dir}/index", refine_factor)
    embeddings = [c.astype(np.float16) for c in shard_embeddings(corpus.index_dir, manifest)]
    return (
        corpus,
        id_map["image_id"].to_numpy(zero_copy_only=False).astype(object),
        id_map["aesthetic"].to_numpy(zero_copy_only=False).astype(np.float32),
        np.concatenate(embeddings) if embeddings else np.zeros((0, manifest["dim"]), np.float16),
    )


def shard_embeddings(index_dir: str, manifest: dict, chunk_rows: int = 65536):
    """The stored embeddings of every shard in global row order, chunk by chunk (float32)."""
    for entry in manifest["shards"]:
        stored = StoredRows(shard_file(index_dir, entry, "embeddings_file"))
        for chunk in stored.chunks(chunk_rows):
            yield chunk.astype(np.float32)
