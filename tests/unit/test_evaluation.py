import numpy as np
import pytest

from align import evaluation
from align.config import WorldConfig
from align.data import world
from align.data.contracts import HPIR
from align.evaluation.report import format_table, table_sections


def test_recall_at_k_matches_a_full_sort():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(50, 80))
    target = rng.integers(80, size=50)
    got = evaluation.recall_at_k(sim, target, (1, 5, 10))
    order = np.argsort(-sim, axis=1)
    for k in (1, 5, 10):
        expected = np.mean([target[q] in order[q, :k] for q in range(50)])
        assert got[f"recall@{k}"] == pytest.approx(expected)


def test_recall_counts_the_target_itself():
    sim = np.array([[0.9, 0.1, 0.5], [0.2, 0.3, 0.8]])
    assert evaluation.recall_at_k(sim, np.array([0, 1]), (1, 2)) == {
        "recall@1": 0.5,
        "recall@2": 1.0,
    }


def test_mean_at_k_skips_missing_results_and_unscored_images():
    values = np.array([1.0, 2.0, np.nan, 4.0])
    top = np.array([[0, 1], [2, 3], [3, -1]])
    assert evaluation.mean_at_k(values, top) == pytest.approx((1 + 2 + 4 + 4) / 4)


def test_hpir_agreement_is_confidence_weighted_and_skips_undecided():
    prefers_a = np.array([1.0, 0.0, 0.5, 1.0])
    preferred = np.array(["a", "a", "b", None], dtype=object)
    confidence = np.array([0.9, 0.6, 0.8, np.nan])
    # agree 1 (w .9), disagree (w .6), half (w .8); the undecided item is left out.
    expected = (0.9 * 1 + 0.6 * 0 + 0.8 * 0.5) / (0.9 + 0.6 + 0.8)
    assert evaluation.hpir_agreement(prefers_a, preferred, confidence) == pytest.approx(expected)
    assert evaluation.hpir_agreement(prefers_a[3:], preferred[3:], confidence[3:]) is None


def test_order_consistency_needs_both_calls_to_agree():
    F, S, X = evaluation.FIRST, evaluation.SECOND, evaluation.SIMILAR
    assert evaluation.consistent_verdict(F, S) == "win"
    assert evaluation.consistent_verdict(S, F) == "loss"
    # Position bias (always the first row) and any "similar" are not a win or a loss.
    for a, b in ((F, F), (S, S), (X, S), (F, X), (X, X)):
        assert evaluation.consistent_verdict(a, b) == "similar"
    rates = evaluation.verdict_rates(["win", "win", "loss", "similar"])
    assert rates == {"win": 0.5, "similar": 0.25, "loss": 0.25, "win+similar": 0.75, "n": 4}


@pytest.mark.parametrize(
    "text,answer",
    [
        ("Row 1", "first"),
        ("row 2.", "second"),
        ("2", "second"),
        ("Similar", "similar"),
        ("row 1 and row 2 are alike", "similar"),
        ("", "similar"),
        (None, "similar"),
    ],
)
def test_parse_ranker_answer(text, answer):
    assert evaluation.parse_ranker_answer(text) == answer


def test_oracle_values_relevant_beauty_only():
    relevant = np.array([[True, True], [True, False]])
    aesthetic = np.array([[0.6, 0.6], [0.9, 0.9]])
    quality = evaluation.oracle_row_quality(relevant, aesthetic)
    assert quality == pytest.approx([0.6, 0.45])
    assert evaluation.oracle_answer(quality, quality[::-1], margin=0.02) == ["first", "second"]
    assert evaluation.oracle_answer([0.5], [0.51], margin=0.02) == ["similar"]


def test_relevance_matches_colour_shape_and_a_named_background():
    q = np.array([["red"], ["red"]], dtype=object), np.array([["star"], ["star"]], dtype=object)
    qb = np.array([[None], ["plain"]], dtype=object)
    ic = np.array([["red", "red", "blue"]], dtype=object)
    is_ = np.array([["star", "star", "star"]], dtype=object)
    ib = np.array([["plain", "dotted", "plain"]], dtype=object)
    assert world.relevant(*q, qb, ic, is_, ib).tolist() == [
        [True, True, False],
        [True, False, False],
    ]


@pytest.fixture(scope="module")
def small_world():
    cfg = WorldConfig(seed=4, num_images=3000, shard_size=3000, heldout_images=20)
    _, gt = world.render_shard(cfg, 0)
    return cfg, gt, world.make_queries(cfg)


def test_hpir_file_follows_the_ground_truth(small_world):
    cfg, _, queries = small_world
    cfg = cfg.model_copy(update={"eval_images": 3000})
    _, gt = world.render_shard(cfg, 0, "eval")  # HPIR rows are drawn from the gallery
    hpir = world.make_hpir(cfg, gt, queries)
    assert hpir.schema == HPIR.schema and hpir.num_rows > 0
    assert hpir.equals(world.make_hpir(cfg, gt, queries))  # deterministic
    true = dict(zip(gt["image_id"].to_pylist(), gt["true_aesthetic"].to_pylist(), strict=True))
    decided = 0
    for item in hpir.to_pylist():
        assert len(item["row_a"]) == len(item["row_b"]) == 5
        if item["aesthetic_preferred"] is None:
            continue
        decided += 1
        mean_a = np.mean([true[i] for i in item["row_a"]])
        mean_b = np.mean([true[i] for i in item["row_b"]])
        assert item["aesthetic_preferred"] == ("a" if mean_a > mean_b else "b")
        assert 0.6 <= item["aesthetic_confidence"] <= 1.0
    assert decided > hpir.num_rows // 2
    # The evaluated queries, of trained families and of unseen ones; no training query.
    split = dict(zip(queries["query"].to_pylist(), queries["split"].to_pylist(), strict=True))
    assert {split[q] for q in hpir["query"].to_pylist()} == {"heldout", "unseen"}


def test_heldout_and_pretraining_images_are_new_images(small_world):
    cfg, gt, _ = small_world
    cfg = cfg.model_copy(update={"pretrain_images": 30})
    corpus, _ = world.render_shard(cfg, 0)
    assert corpus["image_id"].to_pylist() == gt["image_id"].to_pylist()  # untouched by the others
    parts = {part: world.render_shard(cfg, 0, part)[0] for part in ("heldout", "pretrain")}
    assert parts["heldout"].num_rows == 20 and parts["pretrain"].num_rows == 30
    assert parts["pretrain"]["image_id"][0].as_py() == "w4-p0000000"
    seen_ids, seen_bytes = set(gt["image_id"].to_pylist()), set(corpus["image"].to_pylist())
    for images in parts.values():
        assert not set(images["image_id"].to_pylist()) & seen_ids
        assert not set(images["image"].to_pylist()) & seen_bytes
        seen_ids |= set(images["image_id"].to_pylist())
        seen_bytes |= set(images["image"].to_pylist())
    with pytest.raises(ValueError, match="past the end of a set of 30 images"):
        world.render_shard(cfg, 1, "pretrain")


def _metrics_with_judge(backend: str) -> dict:
    return {
        "systems": {"base": {"true_aesthetic@5": 0.5}, "aligned": {"true_aesthetic@5": 0.6}},
        "judge": {"aligned_vs_base": {"win": 0.7, "similar": 0.2, "loss": 0.1, "n": 10}},
        "judge_hpir": {"aesthetic": 0.9, "accuracy": None},
        "judge_backend": backend,
    }


@pytest.mark.parametrize("place", ["terminal", "report"])
def test_the_oracle_judge_is_named_as_the_ground_truth_wherever_it_appears(place):
    def shown(backend: str) -> str:
        metrics = _metrics_with_judge(backend)
        if place == "terminal":
            return format_table(metrics)
        return "".join(table_sections(metrics))

    oracle, model = shown("oracle").lower(), shown("http").lower()
    assert "oracle judge (reads the ground truth)" in oracle
    assert "two views of one ground truth" in oracle and "independent evidence" in oracle
    assert "people" not in oracle  # its HPIR agreement is not agreement with people
    assert "judge (http)" in model and "people on the hpir file" in model
    assert "oracle" not in model and "ground truth" not in model
