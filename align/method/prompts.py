"""The LLM prompts of the method: the rewriter's system prompt and its template per variant
(backends vllm and http), and the judge's <ranker> prompt. The configs' defaults."""

from __future__ import annotations

from align.method.rewrite import ADJECTIVE_ASPECTS, ASPECT_KEYWORDS, KEYWORD_LIST

SYSTEM_PROMPT = (
    "You rewrite image-search queries so that a text-to-image retrieval model returns images "
    "people find beautiful. Keep the subject of the query. Answer with the rewritten query only."
)
PROMPT_TEMPLATES: dict[str, str] = {
    "repeat": "Repeat this query twice, separated by a space: {query}",
    "k_list": (
        "Add aesthetic keywords to this image-search query, chosen from this list: "
        + ", ".join(KEYWORD_LIST)
        + ".\nQuery: {query}"
    ),
    "k_phrase": (
        "Rewrite this image-search query as 'a <adjectives> photo of <query>', with up to three "
        "aesthetic adjectives from this list: "
        + ", ".join(ASPECT_KEYWORDS[a][0] for a in ADJECTIVE_ASPECTS)
        + ".\nQuery: {query}"
    ),
    "kw_dict": (
        "Add aesthetic keywords to this image-search query, at most one per aspect, from this "
        "dictionary: "
        + "; ".join(f"{aspect}: {', '.join(kws)}" for aspect, kws in ASPECT_KEYWORDS.items())
        + ".\nQuery: {query}"
    ),
    "detail": (
        "Describe in one sentence the ideal, most beautiful image for this search query: its "
        "style, composition, lighting and colours.\nQuery: {query}"
    ),
    "reorg": "Reorganise this image-search query into a clear, well-formed description: {query}",
}

# The paper's <ranker> prompt, in our words: two rows of results, relevance and aesthetics both.
RANKER_PROMPT = (
    'You are judging two rows of image search results for the query: "{query}". '
    "The first {k} images are row 1, the next {k} images are row 2. Which row is better: more "
    "relevant to the query and more beautiful (sharp, well exposed, clean, vivid, well composed, "
    "harmonious colours)? Answer with exactly one of: row 1, row 2, similar."
)
