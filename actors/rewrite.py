"""Query rewrite stage: keyword rewriting (batch function) or an LLM via ray.data.llm.

Every query comes out with a `rewritten` text. A failed, empty or over-long completion keeps the
original query and says why in `fallback`; it is never fatal.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray.data

from actors import require_batch_columns
from actors.llm import build_chat_processor, completion
from align.config import RewriteConfig
from align.method.rewrite import keyword_rewrite

REQUIRED = {"query_id": "id of the query", "query": "the original query"}


def checked_completion(query: str, completion: str | None, error: str | None, max_chars: int):
    """(rewritten, fallback reason or None): the completion, or the query when it is unusable."""
    text = (completion or "").strip().strip('"').strip()
    if error:
        return query, f"llm error: {str(error).splitlines()[0][:200]}"
    if not text:
        return query, "empty completion"
    if len(text) > max_chars:
        return query, f"completion over {max_chars} characters ({len(text)})"
    return text, None


def keyword_rewrite_batch(batch: dict[str, np.ndarray], *, variant: str, keywords: int) -> dict:
    """The `keywords` backend as a batch function (CPU tasks): no model, deterministic."""
    require_batch_columns(batch, REQUIRED, "rewrite")
    rewritten = np.array(
        [keyword_rewrite(q, variant, keywords) for q in batch["query"]], dtype=object
    )
    return {
        **batch,
        "rewritten": rewritten,
        "fallback": np.full(len(rewritten), "", dtype=object),
    }


def rewrite_messages(query: str, cfg: RewriteConfig) -> list[dict]:
    return [
        {"role": "system", "content": cfg.system_prompt},
        {"role": "user", "content": cfg.prompt_templates[cfg.variant].format(query=query)},
    ]


def build_llm_rewriter(cfg: RewriteConfig):
    """A ray.data.llm processor (Dataset -> Dataset) for the http or vllm backend."""
    if cfg.variant not in cfg.prompt_templates:
        raise ValueError(
            f"rewrite variant {cfg.variant!r} has no prompt template; "
            f"templates: {', '.join(cfg.prompt_templates)}"
        )

    def postprocess(row: dict) -> dict:
        text, error = completion(row, cfg.backend)
        rewritten, fallback = checked_completion(row["query"], text, error, cfg.max_chars)
        return {
            "query_id": row["query_id"],
            "query": row["query"],
            "rewritten": rewritten,
            "fallback": fallback or "",
        }

    return build_chat_processor(
        cfg.backend,
        cfg.http,
        cfg.vllm,
        messages=lambda row: rewrite_messages(row["query"], cfg),
        carry=("query_id", "query"),
        postprocess=postprocess,
    )


def rewrite_texts(rw: RewriteConfig, texts: list[str]) -> tuple[list[str], int]:
    """Each text rewritten by the rewrite stage, in input order, and how many rewrites fell back
    to the original (evaluate's rewritten systems)."""

    table = pa.table({"query_id": [str(i) for i in range(len(texts))], "query": texts})
    out = dict.fromkeys(range(len(texts)), "")
    fallbacks = 0
    ds = rewrite_stage(ray.data.from_arrow(table), rw)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for qid, text, fallback in zip(
            batch["query_id"], batch["rewritten"], batch["fallback"], strict=True
        ):
            out[int(qid)] = str(text)
            fallbacks += bool(fallback)
    return [out[i] for i in range(len(texts))], fallbacks


def rewrite_stage(ds, rw: RewriteConfig):
    """The rewrite stage for a Dataset of (query_id, query): adds `rewritten` and `fallback`."""
    if rw.backend == "keywords":
        return ds.map_batches(
            keyword_rewrite_batch,
            fn_kwargs={"variant": rw.variant, "keywords": rw.keywords},
            batch_format="numpy",
            num_cpus=rw.num_cpus,
        )
    return build_llm_rewriter(rw)(ds)
