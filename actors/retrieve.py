"""Candidate retrieval and pairing stage (actor pool).

For each query: top-K from the corpus (align.search.corpus: every index shard searched as one) for the
REWRITTEN query (or, by `retrieve_with`, the renormalised sum of the original and rewritten
embeddings, or the original); the semantic score of each candidate is the reference model's
cosine similarity to the ORIGINAL query, exact, computed from the candidate's stored
embedding; the aesthetic score is index_corpus's combined score. The u x v grid then
gives the preference pairs (align.method.pairing), emitted as list columns, one row per query.

The shards are loaded in this actor for a small corpus, or searched through search actors
(`shard_actors`, started by the job: one per node, each holding a share of the shards) for a
large one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from actors import require_batch_columns
from align.config import RETRIEVE_WITH, BuildPreferencesConfig
from align.method.pairing import NotEnoughCandidates, grid_pairs
from align.runtime.stages import actor_pool
from align.search.corpus import Corpus

REQUIRED = {
    "query_id": "id of the query",
    "query_embedding": "embedding of the original query (text_embed stage)",
    "rewritten_embedding": "embedding of the rewritten query (text_embed stage)",
}
LIST_COLUMNS = (
    "candidate_ids",
    "candidate_semantic",
    "candidate_aesthetic",
    "chosen_id",
    "rejected_id",
    "chosen_ref_sim",
    "rejected_ref_sim",
    "chosen_aesthetic",
    "rejected_aesthetic",
    "chosen_cell",
    "rejected_cell",
)


def retrieval_query(original: np.ndarray, rewritten: np.ndarray, retrieve_with: str) -> np.ndarray:
    """The embeddings that retrieve the candidates (float32, C-contiguous for FAISS)."""
    if retrieve_with == "original":
        q = original
    elif retrieve_with == "rewritten":
        q = rewritten
    else:  # both: the content of the original, the rewrite's pull towards beauty
        q = original + rewritten
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
    return np.ascontiguousarray(q, dtype=np.float32)


class CandidateRetriever:
    def __init__(
        self,
        index_corpus_dir: str,
        top_k: int,
        u: int,
        v: int,
        stride: int,
        retrieve_with: str = "rewritten",
        refine_factor: int | None = None,
        shard_actors: list[str] | None = None,
    ):
        if retrieve_with not in RETRIEVE_WITH:
            raise ValueError(
                f"retrieve_with must be one of {RETRIEVE_WITH} (got {retrieve_with!r})"
            )
        self.corpus = Corpus(f"{index_corpus_dir}/index", refine_factor, shard_actors)
        self.top_k = min(top_k, self.corpus.ntotal)
        self.u, self.v, self.stride = u, v, stride
        self.retrieve_with = retrieve_with

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        require_batch_columns(batch, REQUIRED, "retrieve")
        q_orig = np.asarray(batch["query_embedding"], dtype=np.float32)
        q_rew = np.asarray(batch["rewritten_embedding"], dtype=np.float32)
        query = retrieval_query(q_orig, q_rew, self.retrieve_with)
        # Reference similarity to the ORIGINAL query, computed where the candidates are stored.
        found_all = self.corpus.candidates(query, self.top_k, reference=q_orig)
        rows = found_all.rows
        n = len(rows)
        out: dict[str, list] = {name: [] for name in LIST_COLUMNS}
        status = np.full(n, "ok", dtype=object)
        error = np.full(n, "", dtype=object)
        semantic, aesthetic = found_all.reference, found_all.aesthetic
        for i in range(n):  # one grid per query; each grid is vectorised
            found = rows[i] >= 0
            ids, sem, aes = found_all.ids[i][found], semantic[i][found], aesthetic[i][found]
            try:
                chosen, rejected, c_cells, r_cells = grid_pairs(
                    sem, aes, self.u, self.v, self.stride
                )
            except NotEnoughCandidates as e:
                status[i], error[i] = "error", f"skipped: {e}"
                chosen = rejected = np.zeros(0, dtype=int)
                c_cells = r_cells = np.zeros((0, 2), dtype=int)
            for name, values in (
                ("candidate_ids", ids),
                ("candidate_semantic", sem),
                ("candidate_aesthetic", aes),
                ("chosen_id", ids[chosen]),
                ("rejected_id", ids[rejected]),
                ("chosen_ref_sim", sem[chosen]),
                ("rejected_ref_sim", sem[rejected]),
                ("chosen_aesthetic", aes[chosen]),
                ("rejected_aesthetic", aes[rejected]),
                ("chosen_cell", c_cells),
                ("rejected_cell", r_cells),
            ):
                out[name].append(values)
        columns = {
            k: pa.array(v) if v.dtype != object else pa.array(v.tolist(), pa.string())
            for k, v in batch.items()
            if not k.endswith("_embedding")
        }
        for name, parts in out.items():
            columns[name] = _list_array(parts, LIST_TYPES.get(name, pa.float32()))
        columns["status"] = pa.array(status.tolist(), pa.string())
        columns["error"] = pa.array(error.tolist(), pa.string())
        return pa.table(columns)


LIST_TYPES = {
    "candidate_ids": pa.string(),
    "chosen_id": pa.string(),
    "rejected_id": pa.string(),
    "chosen_cell": pa.list_(pa.int16()),
    "rejected_cell": pa.list_(pa.int16()),
}


def _list_array(parts: list[np.ndarray], value_type: pa.DataType) -> pa.Array:
    """Build a list column from one numpy array per row (rows of 2-vectors for the cells)."""
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int32)
    flat = np.concatenate(parts) if parts else np.zeros(0)
    if value_type == pa.list_(pa.int16()):
        inner = pa.FixedSizeListArray.from_arrays(pa.array(flat.reshape(-1).astype(np.int16)), 2)
        values = inner.cast(value_type)
    elif value_type == pa.string():
        values = pa.array(flat.tolist(), pa.string())
    else:
        values = pa.array(flat.astype(np.float32), value_type)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def retrieve_stage(ds, bp: BuildPreferencesConfig, index_corpus_dir: str, search: dict):
    """`CandidateRetriever` over embedded queries, in an actor pool (`bp.retrieve`): retrieve,
    re-rank and pair with the build_preferences settings (`search`: refine_factor and the search
    actors' names, see build_preferences.corpus_search)."""
    return ds.map_batches(
        CandidateRetriever,
        fn_constructor_kwargs={
            "index_corpus_dir": index_corpus_dir,
            "top_k": bp.top_k,
            "retrieve_with": bp.retrieve_with,
            "u": bp.grid.u,
            "v": bp.grid.v,
            "stride": bp.grid.stride,
            **search,
        },
        batch_format="numpy",
        **actor_pool(bp.retrieve),
    )
