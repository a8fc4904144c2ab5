"""Query rewriting: spell out the aesthetic expectations a person has but does not type.

The paper (docs/method.md, Query rewriting) compares prompt variants for an LLM rewriter:

- `original`: no rewrite (the baseline);
- `repeat`: the query repeated, a length control;
- `k_list` (<k list>): the query plus aesthetic keywords from a flat list;
- `k_phrase`: the keywords as adjectives of a description, "a beautiful, well-composed, well-lit
  photo of <query>" (the form captions and a <detail>-style LLM rewrite take);
- `kw_dict` (<kw dict>): the query plus keywords from a dictionary grouped by aspect;
- `detail` (<detail>): describe the ideal image in detail;
- `reorg` (<reorg>): reorganise the query.

The LLM prompts for each variant (backends vllm and http) are align.method.prompts. The `keywords`
backend needs no model: it implements `original`, `repeat`, `k_list`, `k_phrase` and `kw_dict`
directly from `ASPECT_KEYWORDS`, deterministically; `detail` and `reorg` need an LLM.
"""

from __future__ import annotations

VARIANTS = ("original", "repeat", "k_list", "k_phrase", "kw_dict", "detail", "reorg")
KEYWORD_VARIANTS = ("original", "repeat", "k_list", "k_phrase", "kw_dict")

# A curated dictionary of aesthetic keywords, grouped by aspect, most generally useful first.
# Drawn from the vocabulary photographers and image-generation prompts use for "a good picture".
ASPECT_KEYWORDS: dict[str, tuple[str, ...]] = {
    "style": ("professional photography", "award-winning", "fine art", "editorial"),
    "composition": ("well-composed", "rule of thirds", "balanced framing", "clear subject"),
    "lighting": ("well-lit", "soft natural light", "balanced exposure", "golden hour"),
    "colour": ("harmonious colours", "vivid colours", "rich tones", "complementary palette"),
    "quality": ("beautiful", "sharp focus", "clean", "high detail"),
}
# Aspects whose keywords read as adjectives of "photo", for k_phrase.
ADJECTIVE_ASPECTS = ("quality", "composition", "lighting")
# The flat list for <k list>: the first keyword of each aspect, then the second, ...
KEYWORD_LIST: tuple[str, ...] = tuple(
    kw
    for rank in range(max(len(v) for v in ASPECT_KEYWORDS.values()))
    for kws in ASPECT_KEYWORDS.values()
    if rank < len(kws)
    for kw in [kws[rank]]
)


def keyword_rewrite(query: str, variant: str, keywords: int = 5) -> str:
    """Rewrite without a model, deterministically.

    Args:
        query: the user's query.
        variant: one of KEYWORD_VARIANTS.
        keywords: for k_list, how many keywords from KEYWORD_LIST; for kw_dict, how many aspects;
            for k_phrase, how many adjectives (at most len(ADJECTIVE_ASPECTS)).
    Raises:
        ValueError: for a variant that needs an LLM (detail, reorg) or an unknown one.
    """
    if variant == "original":
        return query
    if variant == "repeat":
        return f"{query} {query}"
    if variant == "k_list":
        return ", ".join([query, *KEYWORD_LIST[:keywords]])
    if variant == "k_phrase":
        adjectives = [ASPECT_KEYWORDS[a][0] for a in ADJECTIVE_ASPECTS[:keywords]]
        return f"a {', '.join(adjectives)} photo of {query}"
    if variant == "kw_dict":
        aspects = list(ASPECT_KEYWORDS.items())[:keywords]
        return "; ".join([query, *(f"{aspect}: {kws[0]}" for aspect, kws in aspects)])
    if variant in VARIANTS:
        raise ValueError(f"rewrite variant {variant!r} needs an LLM backend (vllm or http)")
    raise ValueError(f"unknown rewrite variant {variant!r}; known: {', '.join(VARIANTS)}")
