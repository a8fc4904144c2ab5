import pytest

from align.method.prompts import PROMPT_TEMPLATES
from align.method.rewrite import (
    ASPECT_KEYWORDS,
    KEYWORD_LIST,
    KEYWORD_VARIANTS,
    VARIANTS,
    keyword_rewrite,
)


def test_keyword_variants_are_deterministic_and_keep_the_query():
    for variant in KEYWORD_VARIANTS:
        out = keyword_rewrite("a red star", variant)
        assert out == keyword_rewrite("a red star", variant)
        assert "a red star" in out
    assert keyword_rewrite("a red star", "original") == "a red star"
    assert keyword_rewrite("a red star", "repeat") == "a red star a red star"


def test_k_list_adds_keywords_in_list_order():
    out = keyword_rewrite("a cat", "k_list", keywords=3)
    assert out == "a cat, " + ", ".join(KEYWORD_LIST[:3])


def test_k_phrase_writes_the_keywords_as_adjectives_of_a_photo():
    assert keyword_rewrite("a red star", "k_phrase") == (
        "a beautiful, well-composed, well-lit photo of a red star"
    )
    assert keyword_rewrite("a cat", "k_phrase", keywords=1) == "a beautiful photo of a cat"


def test_kw_dict_adds_one_keyword_per_aspect():
    out = keyword_rewrite("a cat", "kw_dict")
    for aspect, kws in ASPECT_KEYWORDS.items():
        assert f"{aspect}: {kws[0]}" in out


def test_keyword_list_covers_every_keyword_once():
    flat = [kw for kws in ASPECT_KEYWORDS.values() for kw in kws]
    assert sorted(KEYWORD_LIST) == sorted(flat)
    assert set(KEYWORD_LIST[: len(ASPECT_KEYWORDS)]) == {k[0] for k in ASPECT_KEYWORDS.values()}


def test_llm_only_and_unknown_variants_are_refused():
    with pytest.raises(ValueError, match="'detail' needs an LLM"):
        keyword_rewrite("a cat", "detail")
    with pytest.raises(ValueError, match="unknown rewrite variant 'fancy'"):
        keyword_rewrite("a cat", "fancy")


def test_every_llm_variant_has_a_prompt_with_the_query_slot():
    assert set(PROMPT_TEMPLATES) == set(VARIANTS) - {"original"}
    assert all("{query}" in t for t in PROMPT_TEMPLATES.values())
