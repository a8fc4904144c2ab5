import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from align.config import WorldConfig
from align.data import world
from align.data.contracts import GROUND_TRUTH, IMAGES, QUERIES


@pytest.fixture(scope="module")
def shard():
    cfg = WorldConfig(seed=11, num_images=1500, shard_size=1500)
    return cfg, *world.render_shard(cfg, 0)


def test_shards_follow_the_contracts(shard):
    cfg, images, gt = shard
    assert images.schema == IMAGES.schema and gt.schema == GROUND_TRUTH.schema
    assert images.num_rows == gt.num_rows == 1500
    assert images["image_id"].to_pylist() == gt["image_id"].to_pylist()
    img = Image.open(io.BytesIO(images["image"][0].as_py()))
    assert img.format == "JPEG" and img.size == (cfg.image_size, cfg.image_size)


def test_same_seed_same_bytes_other_seed_other_bytes():
    cfg = WorldConfig(seed=5, num_images=40, shard_size=20)
    a, _ = world.render_shard(cfg, 1)
    b, _ = world.render_shard(cfg, 1)
    c, _ = world.render_shard(cfg.model_copy(update={"seed": 6}), 1)
    assert a.equals(b)
    assert a["image"].to_pylist() != c["image"].to_pylist()
    assert a["image_id"][0].as_py() == "w5-0000020"


def test_true_aesthetic_depends_on_low_and_high_level_parts(shard):
    _, _, gt = shard
    true = gt["true_aesthetic"].to_numpy()
    corr_low = np.corrcoef(true, gt["low_level"].to_numpy())[0, 1]
    corr_high = np.corrcoef(true, gt["high_level"].to_numpy())[0, 1]
    # Both parts matter: clearly above zero, clearly below one.
    assert 0.3 < corr_low < 0.85
    assert 0.3 < corr_high < 0.9


def _render(scene, **changes):
    return world.render(dataclasses.replace(scene, **changes), 64).astype(np.float32)


@pytest.fixture
def good_scene():
    rng = np.random.default_rng(0)
    scene = world.sample_scenes(rng, 1)[0]
    best = {a: 1.0 for a in world.ATTRIBUTES}
    return dataclasses.replace(scene, shape="square", background="plain", **best)


def _laplacian_energy(img):
    g = img.mean(axis=2)
    lap = 4 * g[1:-1, 1:-1] - g[:-2, 1:-1] - g[2:, 1:-1] - g[1:-1, :-2] - g[1:-1, 2:]
    return float(np.mean(lap**2))


def test_low_level_attributes_are_visible_in_pixels(good_scene):
    base = _render(good_scene)
    assert _laplacian_energy(_render(good_scene, sharpness=0.0)) < 0.5 * _laplacian_energy(base)
    dark = _render(good_scene, exposure=0.0, too_bright=False)
    bright = _render(good_scene, exposure=0.0, too_bright=True)
    assert dark.mean() < base.mean() - 30 and bright.mean() > base.mean() + 30
    noisy = _render(good_scene, noise=0.0)
    assert np.abs(noisy - base).mean() > 10
    washed = _render(good_scene, saturation=0.0)
    assert washed.std(axis=2).mean() < 0.5 * base.std(axis=2).mean()


def test_composition_moves_and_scales_the_subject(good_scene):
    subject = np.array(world._hsv(world.COLOURS[good_scene.colour], 0.9, 0.95)) * 255

    def subject_mask(img):
        return np.abs(img - subject).sum(axis=2) < 30

    good = subject_mask(_render(good_scene))
    bad = subject_mask(_render(good_scene, composition=0.0))
    assert good.sum() > 0 and not np.array_equal(good, bad)


def test_quality_words_are_truthful(shard):
    _, images, gt = shard
    rows = gt.to_pylist()
    captions = images["caption"].to_pylist()
    with_words = [r for r in rows if r["quality_words"]]
    share = len(with_words) / len(rows)
    # caption_quality_share is 0.3; a few of those images have no clearly good or bad attribute.
    assert 0.22 < share < 0.36
    for r, caption in zip(rows, captions, strict=True):
        words = r["quality_words"]
        assert (
            (words in caption)
            if words
            else (world.content_phrase(r["colour"], r["shape"]) in caption)
        )
        if "blurry" in words:
            assert r["sharpness"] < 0.25
        if "sharp" in words.split(", "):
            assert r["sharpness"] > 0.75
        if "well-composed" in words:
            assert r["composition"] > 0.75
        if "clashing colours" in words:
            assert r["harmony"] < 0.25
        if "beautiful" in words:
            assert r["true_aesthetic"] > 0.6


def test_queries_name_content_only_and_split_by_seed():
    cfg = WorldConfig(seed=3)
    q = world.make_queries(cfg)
    assert q.schema == QUERIES.schema
    texts = q["query"].to_pylist()
    assert len(set(texts)) == len(texts) == len(world.COLOURS) * len(world.SHAPES) * 5
    banned = {w for pair in world.QUALITY_WORDS.values() for w in pair if w} | set(
        world.OVERALL_WORDS
    )
    assert not any(b in t for t in texts for b in banned)
    splits = q["split"].to_pylist()
    trained = len(texts) - splits.count("unseen")
    assert splits.count("heldout") == round(cfg.heldout_query_share * trained)
    assert world.make_queries(cfg).equals(q)
    assert world.make_queries(WorldConfig(seed=4))["split"].to_pylist() != splits


def families_of(gt) -> set[tuple[str, str]]:
    return set(zip(gt["colour"].to_pylist(), gt["shape"].to_pylist(), strict=True))


def test_unseen_families_are_in_no_training_input_and_in_the_gallery():
    """The corpus (so its ratings and every pair built from it) and the fine-tune's captions
    hold no image of an unseen family; their queries are split 'unseen'; the gallery holds
    every family and shares no image with any training input."""
    cfg = WorldConfig(seed=7, num_images=1200, shard_size=1200, pretrain_images=1200)
    cfg = cfg.model_copy(update={"eval_images": 1200, "unseen_family_share": 0.25})
    unseen = world.unseen_families(cfg)
    assert len(unseen) == 12 and unseen == world.unseen_families(cfg)
    assert world.unseen_families(cfg.model_copy(update={"seed": 8})) != unseen
    corpus, corpus_gt = world.render_shard(cfg, 0)
    assert not families_of(corpus_gt) & unseen
    assert len(families_of(corpus_gt)) == len(world.FAMILIES) - len(unseen)
    ratings = world.make_ratings(cfg, corpus_gt)
    assert set(ratings["image_id"].to_pylist()) <= set(corpus["image_id"].to_pylist())

    pretrain, pretrain_gt = world.render_shard(cfg, 0, "pretrain")
    assert families_of(pretrain_gt) == set(world.FAMILIES)  # the base's web knows every family
    captions = world.trained_family_rows(cfg, pretrain, pretrain_gt)
    kept = set(captions["image_id"].to_pylist())
    truth = pretrain_gt.to_pylist()
    assert kept == {r["image_id"] for r in truth if (r["colour"], r["shape"]) not in unseen}
    assert not any(f"{c} {s}" in t for c, s in unseen for t in captions["caption"].to_pylist())

    gallery, gallery_gt = world.render_shard(cfg, 0, "eval")
    assert families_of(gallery_gt) == set(world.FAMILIES)
    for images in (corpus, pretrain):
        assert not set(gallery["image_id"].to_pylist()) & set(images["image_id"].to_pylist())
        assert not set(gallery["image"].to_pylist()) & set(images["image"].to_pylist())

    q = world.make_queries(cfg).to_pylist()
    of_unseen = [r for r in q if (r["colour"], r["shape"]) in unseen]
    assert {r["split"] for r in of_unseen} == {"unseen"} and len(of_unseen) == 12 * 5
    trained = [r for r in q if (r["colour"], r["shape"]) not in unseen]
    assert {r["split"] for r in trained} == {"train", "heldout"}


def test_without_unseen_families_content_is_drawn_over_every_colour_and_shape():
    """unseen_family_share 0: the corpus's content drawn over every colour and shape
    (sample_scenes without families), and only train and held-out queries."""
    cfg = WorldConfig(seed=5, num_images=40, shard_size=40, unseen_family_share=0.0)
    _, gt = world.render_shard(cfg, 0)
    scenes = world.sample_scenes(np.random.default_rng([5, 0]), 40)
    assert gt["shape"].to_pylist() == [s.shape for s in scenes]
    assert gt["colour"].to_pylist() == [s.colour for s in scenes]
    q = world.make_queries(cfg)
    assert set(q["split"].to_pylist()) == {"train", "heldout"}
