"""FAISS vector indexes over L2-normalised embeddings (inner product = cosine similarity).

`choose_index` picks the type from corpus size and a memory budget: exact (flat) for small corpora,
HNSW while one shard's graph fits the budget, IVF-PQ beyond, sized as autofaiss sizes it (nlist
from the corpus, an HNSW coarse quantizer at thousands of lists, the largest PQ code the budget
holds). `train_index` trains an IVF-PQ index once (on a sample drawn across the corpus, at least
39 vectors per centroid) for every shard to add to; `build_index` builds one shard;
`choose_nprobe` finds the nprobe that reaches a recall target. `exact_top_k` streams exact search
over chunks of vectors, never holding two copies.
index_corpus's sharded build is align.search.build; searching it is align.search.corpus.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import faiss
import numpy as np

from align.config import IndexConfig
from align.errors import UserError


@dataclass
class IndexSpec:
    """What to build: the FAISS type, its parameters, and (IVF-PQ) why each was chosen."""

    type: str  # flat | hnsw | ivfpq
    dim: int
    params: dict = field(default_factory=dict)
    sizing: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


# FAISS k-means warns below 39 training points per centroid (Clustering::min_points_per_centroid):
# the centroids are poorly placed. Held for the IVF lists and each PQ codebook (2^nbits) alike.
MIN_POINTS_PER_CENTROID = 39
# An HNSW graph over the centroids replaces the exact scan of them from this many lists. Measured
# on one core at d = 512 (clustered centroids): a single query's scan costs 71 us at 1,024 lists,
# 231 at 4,096 and 1,733 at 16,384, the graph's 89, 131 and 81, with 0.99 of the 32 nearest lists
# found; a batch of 2,000 (adding vectors, retrieval) still scans faster at 4,096 (62 against 127
# us a vector) and slower from 16,384 (229 against 83). Serving's single queries decide.
HNSW_QUANTIZER_MIN_NLIST = 4096
QUANTIZER_HNSW_M = 32
# The quantizer's graph is built and searched deeper than FAISS's defaults (40, 16) when vectors
# are added and trained: at 16,384 lists of d = 512 the defaults put 14% of vectors in a list
# other than their nearest, and a query probing the right lists then misses them (recall@10
# stalled at 0.87 however many lists it probed). 200 and 32 place 99.96% exactly, for 6 s more
# graph building and about 50 us more a vector added.
QUANTIZER_EF_CONSTRUCTION, QUANTIZER_ADD_EF = 200, 32
# From this many lists the coarse centroids are trained in two levels (`two_level_centroids`):
# one-level k-means costs nlist distances per training vector and iteration, 39 nlist vectors,
# so it grows with nlist^2 (16,384 lists at d = 512: about 100 s an iteration on this project's
# 2-core CI machine, 17 minutes to train); two levels cost about 2 sqrt(nlist) per vector.
TWO_LEVEL_MIN_NLIST = HNSW_QUANTIZER_MIN_NLIST
KMEANS_ITERATIONS = 10  # FAISS's own for IVF training (IndexIVF.cp.niter)
ID_BYTES = 8  # each IVF list entry: its code and an int64 id
NLIST_RULE = (
    "autofaiss: a power of two near 4 sqrt(n) below 1M, 16384 to 10M, 65536 to 300M, 131072 beyond"
)


def table_nlist(n: int) -> int:
    """IVF lists for n vectors by autofaiss' table (get_optimal_nb_clusters' first choice)."""
    if n < 1_000_000:
        return 2 ** round(math.log2(4 * math.sqrt(max(n, 1))))
    if n < 10_000_000:
        return 16_384
    if n < 300_000_000:
        return 65_536
    return 131_072


def quantizer_bytes(nlist: int, dim: int, quantizer: str) -> int:
    """Bytes of the coarse quantizer: the centroids, and an HNSW graph's level-0 links."""
    links = nlist * QUANTIZER_HNSW_M * 2 * 4 if quantizer == "hnsw" else 0
    return nlist * dim * 4 + links


def pq_code_size(dim: int, shard_vectors: int, fixed_bytes: int, budget_bytes: int) -> int | None:
    """The largest PQ code (m bytes at 8 bits) with m dividing dim and at least four dimensions
    per sub-quantizer, whose codes and ids for shard_vectors fit the budget beside fixed_bytes
    (quantizer, codebook); None if none does. Four dimensions a byte (d/4 bytes, PQ128 at
    d=512) keeps a served image at about d/4 + 8 bytes: the search re-scores its candidates
    exactly from the stored float16 vectors, so a finer code buys little recall for its memory."""
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0 and shard_vectors * (m + ID_BYTES) + fixed_bytes <= budget_bytes:
            return m
    return None


def training_points(train_sample: int, nlist: int, nbits: int) -> int:
    """Training vectors an IVF-PQ index asks for: index.train_sample, grown to 39 per IVF list
    and per PQ centroid."""
    return max(train_sample, MIN_POINTS_PER_CENTROID * max(nlist, 2**nbits))


def choose_index(n: int, dim: int, cfg: IndexConfig, shard_vectors: int | None = None) -> IndexSpec:
    """Pick the index type and parameters for n vectors of width dim, the largest shard holding
    shard_vectors of them (default n).

    Bytes per vector held by a search: flat and HNSW 4 d (+ 8 m of HNSW links), IVF-PQ m codes
    + 8 of id; the float16 embeddings (2 d) stay on disk, read per candidate.

    Raises:
        UserError: IVF-PQ codes of the largest shard do not fit index.memory_budget_mb.
    """
    kind = cfg.type
    shard_vectors = n if shard_vectors is None else shard_vectors
    hnsw_bytes = shard_vectors * (dim * 4 + cfg.hnsw_m * 2 * 4)  # vectors + level-0 links
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
    return ivfpq_spec(n, dim, cfg, shard_vectors)


def ivfpq_spec(n: int, dim: int, cfg: IndexConfig, shard_vectors: int) -> IndexSpec:
    """IVF-PQ sized as autofaiss sizes it: nlist from the corpus (index.ivf_nlist overrides), an
    HNSW coarse quantizer from HNSW_QUANTIZER_MIN_NLIST lists, the largest PQ code the per-shard
    memory budget holds, and the training vectors that asks for (train_index fits it to the
    sample). nprobe is index.ivf_nprobe, or None until the build measures one."""
    nlist = cfg.ivf_nlist or table_nlist(n)
    quantizer = "hnsw" if nlist >= HNSW_QUANTIZER_MIN_NLIST else "flat"
    nbits = 8
    fixed = quantizer_bytes(nlist, dim, quantizer) + 2**nbits * dim * 4  # + the PQ codebook
    budget = cfg.memory_budget_mb * 2**20
    m = pq_code_size(dim, shard_vectors, fixed, budget)
    if m is None:
        need = shard_vectors * (1 + ID_BYTES) + fixed  # the smallest code: one byte
        raise UserError(
            f"index.memory_budget_mb={cfg.memory_budget_mb} cannot hold IVF-PQ codes and ids of "
            f"{shard_vectors} vectors in one shard (at least {math.ceil(need / 2**20)} MB): raise "
            f"it, or split the corpus into more index.num_shards"
        )
    params = {
        "nlist": nlist,
        "quantizer": quantizer,
        "m": m,
        "nbits": nbits,
        "nprobe": min(cfg.ivf_nprobe, nlist) if cfg.ivf_nprobe else None,
        "train": training_points(cfg.train_sample, nlist, nbits),
    }
    sizing = {
        "vectors": n,
        "nlist_rule": "index.ivf_nlist" if cfg.ivf_nlist else NLIST_RULE,
        "quantizer_rule": f"HNSW{QUANTIZER_HNSW_M} from {HNSW_QUANTIZER_MIN_NLIST} lists, else exact",
        "m_rule": f"largest m dividing {dim}, at most {dim // 4}, whose codes + ids fit "
        "index.memory_budget_mb",
        "shard_vectors": shard_vectors,
        "shard_bytes": shard_vectors * (m + ID_BYTES) + fixed,
        "budget_bytes": budget,
        "train_rule": f"index.train_sample ({cfg.train_sample}), at least "
        f"{MIN_POINTS_PER_CENTROID} per IVF list and per PQ centroid",
        "nprobe_rule": "index.ivf_nprobe" if cfg.ivf_nprobe else None,
    }
    return IndexSpec("ivfpq", dim, params, sizing)


def fit_training(spec: IndexSpec, available: int) -> None:
    """Fit an IVF-PQ spec to `available` training vectors at 39 per centroid: it trains on
    params["train"] of them at most; nlist is lowered to the largest power of two they train
    (unless index.ivf_nlist fixed it), and the PQ bits to what they train.

    Raises:
        UserError: index.ivf_nlist, or IVF-PQ at all, asks for more vectors than there are.
    """
    p = spec.params
    used = min(available, spec.sizing.setdefault("train_target", p["train"]))
    enough = used // MIN_POINTS_PER_CENTROID  # centroids the training vectors can place
    if enough < p["nlist"] and spec.sizing.get("nlist_rule") == "index.ivf_nlist":
        raise UserError(
            f"index.ivf_nlist={p['nlist']} needs {MIN_POINTS_PER_CENTROID * p['nlist']} training "
            f"vectors ({MIN_POINTS_PER_CENTROID} a list) but the corpus supplies {used} (its "
            f"sample, less the recall queries; index.train_sample grows to 39 per list where the "
            f"corpus has the vectors): set index.ivf_nlist to at most {max(1, enough)} or unset it"
        )
    if enough < 2:
        raise UserError(
            f"index.type ivfpq needs at least {2 * MIN_POINTS_PER_CENTROID} training vectors, the "
            f"corpus supplies {used}: use index.type flat for a corpus this small"
        )
    if enough < p["nlist"]:
        wanted, p["nlist"] = p["nlist"], 2 ** int(math.log2(enough))
        p["quantizer"] = "hnsw" if p["nlist"] >= HNSW_QUANTIZER_MIN_NLIST else "flat"
        spec.sizing["nlist_rule"] = (
            f"{spec.sizing.get('nlist_rule')}: {wanted}, lowered to the {used} training "
            f"vectors at {MIN_POINTS_PER_CENTROID} a list"
        )
    p["nbits"] = min(p["nbits"], int(math.log2(enough)))
    if p["nprobe"]:
        p["nprobe"] = min(p["nprobe"], p["nlist"])
    p["train"] = used
    graph = f"_HNSW{QUANTIZER_HNSW_M}" if p["quantizer"] == "hnsw" else ""
    spec.sizing["factory"] = f"IVF{p['nlist']}{graph},PQ{p['m']}x{p['nbits']}"


def _empty_index(spec: IndexSpec):
    if spec.type == "flat":
        return faiss.IndexFlatIP(spec.dim)
    if spec.type == "hnsw":
        index = faiss.IndexHNSWFlat(spec.dim, spec.params["m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = spec.params["ef_construction"]
        index.hnsw.efSearch = spec.params["ef_search"]
        return index
    if spec.type == "ivfpq":
        p = spec.params
        if p.get("quantizer") == "hnsw":
            quantizer = faiss.IndexHNSWFlat(spec.dim, QUANTIZER_HNSW_M, faiss.METRIC_INNER_PRODUCT)
            quantizer.hnsw.efConstruction = QUANTIZER_EF_CONSTRUCTION
            quantizer.hnsw.efSearch = QUANTIZER_ADD_EF
        else:
            quantizer = faiss.IndexFlatIP(spec.dim)
        return faiss.IndexIVFPQ(
            quantizer, spec.dim, p["nlist"], p["m"], p["nbits"], faiss.METRIC_INNER_PRODUCT
        )
    raise ValueError(f"unknown index type {spec.type!r}")


def set_nprobe(index, nprobe: int) -> None:
    """The IVF lists `index` searches per query. An HNSW coarse quantizer searches twice as deep
    (efSearch) as the lists it returns, so that it finds the nprobe nearest."""

    faiss.extract_index_ivf(index).nprobe = nprobe
    graph = hnsw_quantizer(index)
    if graph is not None:
        graph.hnsw.efSearch = max(16, 2 * nprobe)


def hnsw_quantizer(index):
    """An IVF index's coarse quantizer where it is an HNSW graph, else None."""

    quantizer = faiss.downcast_index(faiss.extract_index_ivf(index).quantizer)
    return quantizer if isinstance(quantizer, faiss.IndexHNSW) else None


def train_index(sample: np.ndarray, spec: IndexSpec, seed: int = 0) -> bytes | None:
    """An IVF-PQ index's coarse quantizer and PQ codebook trained on a sample (rows of the
    corpus), serialised empty, for every shard to add its vectors to; None for types that need
    no training (flat, HNSW). The spec is fitted to the sample first (`fit_training`).

    Raises:
        UserError: the sample cannot train the spec (fit_training).
    """

    if spec.type != "ivfpq":
        return None
    x = np.ascontiguousarray(sample, dtype=np.float32)
    fit_training(spec, len(x))
    pick = np.random.default_rng(seed).choice(len(x), size=spec.params["train"], replace=False)
    x = x[np.sort(pick)]
    index = _empty_index(spec)
    if spec.params["nlist"] >= TWO_LEVEL_MIN_NLIST:
        # A quantizer already holding nlist centroids is kept: train() then fits the PQ alone.
        index.quantizer.add(two_level_centroids(x, spec.params["nlist"], seed))
        spec.sizing["coarse_training"] = (
            f"two-level k-means from {TWO_LEVEL_MIN_NLIST} lists: "
            f"{int(math.sqrt(spec.params['nlist']))} clusters, each split in proportion to its size"
        )
    index.train(x)
    return faiss.serialize_index(index).tobytes()


def two_level_centroids(x: np.ndarray, nlist: int, seed: int = 0) -> np.ndarray:
    """nlist spherical k-means centroids of x (n, d) in two levels, as FAISS's
    contrib.clustering trains large IVF quantizers: sqrt(nlist) coarse clusters, then each
    cluster's vectors clustered into a share of the nlist proportional to its size (largest
    remainder, never more than its vectors), so every centroid keeps about n / nlist of them."""

    d = x.shape[1]
    coarse = faiss.Kmeans(
        d,
        int(math.sqrt(nlist)),
        niter=KMEANS_ITERATIONS,
        seed=seed,
        spherical=True,
        max_points_per_centroid=2000,
    )
    coarse.train(x)
    _, assign = coarse.index.search(x, 1)
    assign = assign.ravel()
    sizes = np.bincount(assign, minlength=coarse.k)
    shares = proportional_shares(sizes, nlist)
    order = np.argsort(assign, kind="stable")
    ends = np.cumsum(sizes)
    centroids = []
    for c in np.flatnonzero(shares):  # one k-means per coarse cluster, each on its own vectors
        members = x[order[ends[c] - sizes[c] : ends[c]]]
        fine = faiss.Kmeans(
            d,
            int(shares[c]),
            niter=KMEANS_ITERATIONS,
            seed=seed + 1 + int(c),
            spherical=True,
            min_points_per_centroid=1,
        )
        fine.train(members)
        centroids.append(fine.centroids)
    return np.ascontiguousarray(np.concatenate(centroids), dtype=np.float32)


def proportional_shares(sizes: np.ndarray, total: int) -> np.ndarray:
    """`total` split over groups in proportion to `sizes` by largest remainder (total <=
    sizes.sum(), so no group gets more than its size: the fractional parts that earn the last
    units sum to what is left, so at least that many groups have one)."""
    exact = sizes * (total / sizes.sum())
    shares = np.floor(exact).astype(np.int64)
    left = total - int(shares.sum())
    shares[np.argsort(-(exact - shares), kind="stable")[:left]] += 1
    return shares


def build_index(vectors: np.ndarray, spec: IndexSpec, seed: int = 0, trained: bytes | None = None):
    """A FAISS index over float vectors (n, dim): added to `trained` (train_index's bytes) where
    given; an IVF-PQ index without it is trained on a sample of `vectors` first."""

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if spec.type == "ivfpq" and trained is None:
        trained = train_index(x, spec, seed)
    if trained is not None:
        index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    else:
        index = _empty_index(spec)
    graph = hnsw_quantizer(index) if spec.type == "ivfpq" else None
    if graph is not None:  # each vector into its nearest list
        graph.hnsw.efSearch = QUANTIZER_ADD_EF
    index.add(x)
    if spec.params.get("nprobe"):  # what searches of the written index start from
        set_nprobe(index, spec.params["nprobe"])
    return index


def exact_top_k(chunks, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k of queries over vectors given as chunks in row order (an
    iterable of (n_i, d) arrays): (scores, rows), -1 pads; holds one chunk at a time."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_r = np.full((len(q), 0), -1, np.int64)
    offset = 0
    for chunk in chunks:
        s = q @ np.asarray(chunk, dtype=np.float32).T
        r = np.broadcast_to(np.arange(offset, offset + s.shape[1]), s.shape)
        offset += s.shape[1]
        s, r = np.concatenate([best_s, s], axis=1), np.concatenate([best_r, r], axis=1)
        if s.shape[1] > k:  # the k best in any order, then only those sorted
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            s, r = np.take_along_axis(s, part, axis=1), np.take_along_axis(r, part, axis=1)
        top = np.argsort(-s, axis=1, kind="stable")
        best_s, best_r = np.take_along_axis(s, top, axis=1), np.take_along_axis(r, top, axis=1)
    return best_s, best_r


def measure_recall(index, vectors: np.ndarray, n_queries: int, k: int = 10, seed: int = 0) -> dict:
    """recall@k of `index` against exact inner-product search (streamed over `vectors` in
    chunks, no second copy), on sampled stored vectors used as queries; also both query rates."""
    x = np.asarray(vectors)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(x), size=min(n_queries, len(x)), replace=False)
    q = np.ascontiguousarray(x[pick], dtype=np.float32)
    chunks = (x[i : i + 65536] for i in range(0, len(x), 65536))
    return recall_against_exact(index, chunks, q, min(k, len(x)))


def recall_against_exact(index, chunks, queries: np.ndarray, k: int) -> dict:
    """recall@k of `index.search` against exact search streamed over `chunks` (the indexed
    vectors in row order), and the query rate of each."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    t0 = time.perf_counter()
    _, truth = exact_top_k(chunks, q, k)
    return search_recall(index, q, truth, time.perf_counter() - t0)


def search_recall(index, queries: np.ndarray, truth: np.ndarray, exact_s: float) -> dict:
    """recall@k of `index.search` against the exact top-k rows `truth` (Q, k), and the query rate
    of each (exact_s: the seconds exact search took)."""
    t0 = time.perf_counter()
    _, found = index.search(queries, truth.shape[1])
    t_index = time.perf_counter() - t0
    return {
        "recall_at_k": recall_at_k(found, truth),
        "k": truth.shape[1],
        "queries": len(queries),
        "qps": len(queries) / max(t_index, 1e-9),
        "exact_qps": len(queries) / max(exact_s, 1e-9),
    }


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the exact top-k rows (Q, k) that the search found (Q, k; -1 pads)."""
    hits = (found[:, :, None] == truth[:, None, :]).any(axis=2) & (found >= 0)
    return float(hits.sum() / max(1, truth.size))


# nprobe stops doubling once this many doublings in a row gained less than PLATEAU_GAIN recall:
# the codes, not the lists searched, bound it then (more lists would only cost time).
PLATEAU_STEPS, PLATEAU_GAIN = 2, 0.001


def choose_nprobe(search, truth: np.ndarray, nlist: int, target: float) -> tuple[int, dict]:
    """The smallest nprobe, of powers of two up to nlist tried in order, whose search reaches
    `target` recall@k against `truth` (exact top-k rows). Where none does, the smallest reaching
    the best recall tried; the doubling stops early once recall has stopped rising.

    Args:
        search: nprobe -> found rows (Q, k), the search users get at that nprobe.
    Returns:
        (nprobe, {str(nprobe): recall} of every nprobe tried).
    """
    tried = {}
    nprobe, flat = 1, 0
    while True:
        tried[nprobe] = recall_at_k(search(nprobe), truth)
        if len(tried) > 1:
            previous = list(tried.values())[-2]
            flat = flat + 1 if tried[nprobe] - previous < PLATEAU_GAIN else 0
        if tried[nprobe] >= target or nprobe >= nlist or flat >= PLATEAU_STEPS:
            break
        nprobe = min(2 * nprobe, nlist)
    best = max(tried.values())
    chosen = min(p for p, r in tried.items() if r >= min(target, best))
    return chosen, {str(p): round(r, 4) for p, r in tried.items()}
