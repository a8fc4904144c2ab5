"""LMM judge stage: a vision LLM compares two rows of results, through ray.data.llm.

Each request row holds the query and the 2k encoded images (the row shown first, then the row
shown second). The images go as data URLs in one user message (the OpenAI vision format, which
vLLM's multimodal stage reads too); the answer is parsed to first, second or similar. A failed
call answers similar for that request alone and says why in `error`; it is never fatal.
"""

from __future__ import annotations

import base64

import numpy as np
import pyarrow as pa
import ray.data

from actors import require_batch_columns
from actors.llm import build_chat_processor, completion
from align.config import JudgeConfig
from align.data import tables
from align.data.images import ImageDecodeError, jpeg_thumbnail
from align.evaluation import SIMILAR, parse_ranker_answer
from align.log import get_logger

log = get_logger("judge")

REQUIRED = {
    "request_id": "id of the judge request",
    "query": "the query both rows answer",
    "images": "encoded images: the row shown first, then the row shown second",
}


def attach_data_urls(batch: dict[str, np.ndarray], *, image_size: int, max_pixels: int) -> dict:
    """CPU stage before the LLM: each request's images -> JPEG thumbnail data URLs. An image that
    does not decode is left out of its row (the error column says which)."""
    require_batch_columns(batch, REQUIRED, "judge")
    urls, errors = [], []
    for images in batch["images"]:
        row, bad = [], []
        for i, data in enumerate(images):
            try:
                thumb = jpeg_thumbnail(data, image_size, max_pixels)
            except ImageDecodeError as e:
                bad.append(f"image {i}: {e}")
                continue
            row.append("data:image/jpeg;base64," + base64.b64encode(thumb).decode("ascii"))
        urls.append(row)
        errors.append("; ".join(bad))
    out = {k: v for k, v in batch.items() if k != "images"}
    return {
        **out,
        "image_urls": np.array(urls, dtype=object),
        "image_errors": np.array(errors, dtype=object),
    }


def ranker_messages(query: str, image_urls, k: int, prompt: str) -> list[dict]:
    content = [{"type": "text", "text": prompt.format(query=query, k=k)}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in image_urls]
    return [{"role": "user", "content": content}]


def build_llm_judge(cfg: JudgeConfig, k: int):
    """A ray.data.llm processor (Dataset -> Dataset) for the http or vllm backend. Its output rows
    are (request_id, answer: first|second|similar, raw answer, error)."""

    def postprocess(row: dict) -> dict:
        text, error = completion(row, cfg.backend)
        error = str(error).splitlines()[0][:200] if error else row.get("image_errors") or ""
        return {
            "request_id": row["request_id"],
            "answer": SIMILAR if row.get("__inference_error__") else parse_ranker_answer(text),
            "raw": (text or "")[:200],
            "error": error,
        }

    return build_chat_processor(
        cfg.backend,
        cfg.http,
        cfg.vllm,
        messages=lambda row: ranker_messages(row["query"], row["image_urls"], k, cfg.prompt),
        carry=("request_id", "image_errors"),
        postprocess=postprocess,
        multimodal=True,
        key_prefix="evaluate.judge",
    )


def llm_judge_answers(
    judge: JudgeConfig,
    k: int,
    groups: dict[str, tuple[list[dict], np.ndarray, str]],
    max_pixels: int,
    num_cpus: float,
) -> dict[str, dict[str, str]]:
    """Per group: request_id -> first|second|similar from a vision LLM (http or vllm), through
    one ray.data.llm pass over every group's requests. A group is (requests, image_ids, corpus):
    its requests' rows are positions in `image_ids`, whose images are read from `corpus` and sent
    as data URLs (prepared in CPU tasks of `num_cpus`)."""
    needed: dict[str, set] = {}
    for requests, image_ids, corpus in groups.values():
        rows = {r for req in requests for r in (*req["first"], *req["second"])}
        needed.setdefault(corpus, set()).update(image_ids[sorted(rows)].tolist())
    by_id = {}  # (corpus, image_id) -> encoded image
    for corpus, ids in needed.items():
        images = tables.read_image_table(corpus, np.array(sorted(ids)), ["image_id", "image"])
        by_id.update(
            zip(
                [(corpus, i) for i in images["image_id"].to_pylist()],
                images["image"].to_pylist(),
                strict=True,
            )
        )
    keys = list(groups)
    request_ids, texts, images = [], [], []
    for g, (requests, image_ids, corpus) in enumerate(groups.values()):
        for r in requests:
            request_ids.append(f"{g}/{r['request_id']}")  # unique across groups
            texts.append(r["query"])
            rows = (*r["first"], *r["second"])
            images.append([by_id.get((corpus, image_ids[i]), b"") for i in rows])
    table = pa.table({"request_id": request_ids, "query": texts, "images": images})
    ds = ray.data.from_arrow(table).map_batches(
        attach_data_urls,
        fn_kwargs={"image_size": judge.image_size, "max_pixels": max_pixels},
        batch_format="numpy",
        batch_size=judge.batch_size,
        num_cpus=num_cpus,
    )
    ds = build_llm_judge(judge, k)(ds)
    answers: dict[str, dict[str, str]] = {key: {} for key in keys}
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        for rid, answer, error in zip(
            batch["request_id"], batch["answer"], batch["error"], strict=True
        ):
            g, request_id = str(rid).split("/", 1)
            answers[keys[int(g)]][request_id] = str(answer)
            if error:
                log.warning("judge request %s (%s): %s", request_id, keys[int(g)], error)
    return answers
