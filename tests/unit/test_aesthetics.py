import numpy as np
import pytest

from align.config import WorldConfig
from align.data import world
from align.data.images import decode_image
from align.models.aesthetics import (
    ScorerError,
    build_scorer,
    combine,
    lowlevel_measures,
    normalisation_stats,
)

from ..conftest import SHARED_ASSETS

LAION = SHARED_ASSETS / "laion-improved-aesthetic-predictor" / "sac+logos+ava1-l14-linearMSE.pth"


@pytest.fixture(scope="module")
def world_batch():
    images, gt = world.render_shard(WorldConfig(seed=2, num_images=1200, shard_size=1200), 0)
    pixels = np.stack([decode_image(b, 64, 10**7) for b in images["image"].to_pylist()])
    return pixels, gt


def corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def test_lowlevel_sees_pixel_attributes_and_not_composition_or_harmony(world_batch):
    pixels, gt = world_batch
    score = build_scorer("lowlevel", None, 64)(pixels, None)
    assert score.shape == (len(pixels),) and np.isfinite(score).all()
    assert corr(score, gt["low_level"].to_numpy()) > 0.5
    assert abs(corr(score, gt["high_level"].to_numpy())) < 0.15


@pytest.mark.parametrize(
    ("measure", "attribute"),
    [
        ("sharpness", "sharpness"),
        ("exposure", "exposure"),
        ("noise", "noise"),
        ("colourfulness", "saturation"),
    ],
)
def test_each_lowlevel_measure_tracks_its_attribute(world_batch, measure, attribute):
    pixels, gt = world_batch
    assert corr(lowlevel_measures(pixels)[measure], gt[attribute].to_numpy()) > 0.3


@pytest.fixture
def laion_checkpoint():
    if not LAION.exists():
        pytest.skip("shared assets not beside the repo")
    return str(LAION)


def test_real_laion_head_scores_768_wide_embeddings(laion_checkpoint):
    import torch

    scorer = build_scorer("laion_mlp", laion_checkpoint, 768)
    emb = np.random.default_rng(0).normal(size=(6, 768)).astype(np.float16)
    scores = scorer(None, emb)
    assert scores.shape == (6,) and np.isfinite(scores).all()
    # Same numbers as the head applied by hand to the L2-normalised inputs (scale invariance).
    state = torch.load(laion_checkpoint, map_location="cpu", weights_only=True)
    x = torch.nn.functional.normalize(torch.tensor(emb, dtype=torch.float32), dim=-1)
    for i in (0, 2, 4, 6, 7):
        x = x @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    np.testing.assert_allclose(scores, x.squeeze(-1).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(scorer(None, emb * 3), scores, rtol=1e-2)


def test_laion_head_refuses_a_mismatched_width_naming_both(laion_checkpoint):
    with pytest.raises(ScorerError, match=r"768-wide.*128-wide"):
        build_scorer("laion_mlp", laion_checkpoint, 128)


def test_unknown_scorer_and_bad_checkpoints(tmp_path):
    with pytest.raises(ScorerError, match="unknown aesthetic scorer 'clipiqa'"):
        build_scorer("clipiqa", None, 768)
    with pytest.raises(ScorerError, match="not found"):
        build_scorer("laion_mlp", str(tmp_path / "none.pth"), 768)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"junk")
    with pytest.raises(ScorerError, match="cannot be read"):
        build_scorer("laion_mlp", str(junk), 768)


def test_combine_is_the_weighted_mean_of_z_scores():
    cols = {"a": np.array([1.0, 2.0, 3.0]), "b": np.array([10.0, 10.0, 40.0])}
    stats = normalisation_stats(cols)
    assert stats["a"]["mean"] == pytest.approx(2.0)
    assert stats["a"]["std"] == pytest.approx(np.std([1, 2, 3]))
    out = combine(cols, {"a": 1.0, "b": 3.0}, stats)
    za = (cols["a"] - 2.0) / np.std([1, 2, 3])
    zb = (cols["b"] - 20.0) / np.std([10, 10, 40])
    np.testing.assert_allclose(out, (za + 3 * zb) / 4, rtol=1e-6)
    with pytest.raises(ScorerError, match="sum to zero"):
        combine(cols, {"a": 0.0, "b": 0.0}, stats)


def test_rated_cnn_round_trip_and_resize(tmp_path):
    import torch

    from align.models.aesthetics import pixels_to_unit, rated_cnn, save_rated_cnn

    torch.manual_seed(0)
    net = rated_cnn(32).eval()
    path = tmp_path / "cnn.pt"
    save_rated_cnn(net, 32, str(path))
    scorer = build_scorer("rated_cnn", str(path), 64)
    pixels = np.random.default_rng(0).integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    scores = scorer(pixels, None)
    assert scores.shape == (6,) and scores.dtype == np.float32
    # Pixels at another size are resized to the network's input, as pixels_to_unit does.
    with torch.no_grad():
        expected = net(pixels_to_unit(pixels, 32)).squeeze(1).numpy()
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-6)
    assert len(set(scores.round(6).tolist())) > 1


def test_rated_cnn_refuses_other_checkpoints(tmp_path, laion_checkpoint):
    with pytest.raises(ScorerError, match="needs a checkpoint"):
        build_scorer("rated_cnn", None, 64)
    with pytest.raises(ScorerError, match="run train_scorer"):
        build_scorer("rated_cnn", str(tmp_path / "none.pt"), 64)
    with pytest.raises(ScorerError, match="not a rated_cnn checkpoint"):
        build_scorer("rated_cnn", laion_checkpoint, 64)


def test_world_ratings_are_noisy_truth_for_a_share_of_images():
    cfg = WorldConfig(seed=2, num_images=2000, shard_size=2000, rated_share=0.3)
    _, gt = world.render_shard(cfg, 0)
    ratings = world.make_ratings(cfg, gt)
    assert ratings.equals(world.make_ratings(cfg, gt))
    assert 0.25 < ratings.num_rows / 2000 < 0.35
    true = dict(zip(gt["image_id"].to_pylist(), gt["true_aesthetic"].to_pylist(), strict=True))
    t = np.array([true[i] for i in ratings["image_id"].to_pylist()])
    r = ratings["rating"].to_numpy()
    assert 0.02 < np.std(r - t) < 0.08 and np.corrcoef(r, t)[0, 1] > 0.9


def test_an_embedding_head_refuses_another_models_embeddings_of_the_same_width():
    from align.models.aesthetics import ScorerError, check_scorer_model

    check_scorer_model("laion_mlp", None, "ViT-L-14:openai")
    with pytest.raises(ScorerError, match="trained on ViT-L-14:openai.*ViT-L-14:laion2b_s32b_b82k"):
        check_scorer_model("laion_mlp", None, "ViT-L-14:laion2b_s32b_b82k")
    check_scorer_model("laion_mlp", "my-clip:/heads/mine.pt", "my-clip:/heads/mine.pt")
    check_scorer_model("lowlevel", None, "anything")  # pixels: no embedding space


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "hubble_deep_field")


def _degraded_copies(name: str) -> dict[str, bytes]:
    """A real photo from scikit-image's wheel and four worse copies, each encoded as PNG."""
    import io
    import os

    import skimage.data
    from PIL import Image, ImageEnhance, ImageFilter

    root = os.path.dirname(skimage.data.__file__)
    file = next(f for f in os.listdir(root) if f.startswith(name + "."))
    photo = Image.open(os.path.join(root, file)).convert("RGB")
    pixels = np.asarray(photo, dtype=np.float32)
    noisy = pixels + np.random.default_rng(0).normal(0, 20, pixels.shape)
    copies = {
        "original": photo,
        "blurred": photo.filter(ImageFilter.GaussianBlur(4)),
        "darkened": ImageEnhance.Brightness(photo).enhance(0.4),
        "noised": Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)),
        "desaturated": ImageEnhance.Color(photo).enhance(0.2),
    }
    out = {}
    for kind, image in copies.items():
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        out[kind] = buf.getvalue()
    return out


@pytest.mark.parametrize("name", PHOTOS)
def test_lowlevel_ranks_every_degraded_copy_of_a_real_photo_below_it(name):
    """At 224 pixels, the size real models read (CLIP's resize and centre crop, as index_corpus
    decodes): a sharp photo's fine texture must not pass for noise, nor its detail saturate."""
    copies = _degraded_copies(name)
    pixels = np.stack([decode_image(b, 224, 10**8) for b in copies.values()])
    scores = dict(zip(copies, build_scorer("lowlevel", None, 64)(pixels, None), strict=True))
    worse = [k for k in copies if k != "original" and scores[k] >= scores["original"]]
    assert not worse, {k: round(float(v), 3) for k, v in scores.items()}
