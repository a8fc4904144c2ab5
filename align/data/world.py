"""The synthetic aesthetic world: images whose content and aesthetics are known.

Every image shows one subject (shape x colour) on a background pattern. Six quality attributes,
each drawn uniformly in [0, 1] (1 = best), control how it is rendered:

- pixel-visible ("low level"): sharpness (Gaussian blur), exposure (too dark or too bright),
  noise (Gaussian pixel noise), saturation (washed-out colours);
- higher level, which a classical pixel scorer does not measure: composition (where the subject
  sits and how large it is: near a rule-of-thirds point at a pleasant scale, or cramped, tiny or
  cut off by the frame) and colour harmony (the background hue relative to the subject's:
  complementary or analogous is harmonious, a quarter turn apart clashes).

The hidden true aesthetic is `w * low_level + (1 - w) * high_level` (w = world.low_level_weight),
so it depends on both. Captions name the content; a share of them also carry truthful quality
words ("a blurry, dark photo of a red star"), as web alt text sometimes does. Queries name content
only and are split into train, held-out and unseen (below). Beside the corpus the world provides
what evaluation and a learned aesthetic scorer need: held-out image-caption pairs (recall@k), an
evaluation gallery, an HPIR file and people's ratings of a share of the corpus, all from the
ground truth (`make_hpir`, `make_ratings`).

What the alignment (the learned scorer, the preference pairs, the fine-tune) never sees: a share
of the content families (colour x shape, `unseen_families`) is held out whole. The corpus, and so
its ratings and the preference pairs built from it, holds none of their images, the fine-tune's
captions (`trained_family_rows` of the pretraining pairs) none of their captions, and their
queries are split 'unseen'. The evaluation gallery (`eval` part) holds
every family, and nothing trains on it. The pretraining pairs hold every family: they stand for
the web a real CLIP learned from, so the base knows the content, not what people prefer in it.

Everything is a pure function of (world.seed, shard index): the same seed gives the same bytes.
"""

from __future__ import annotations

import colorsys
import io as _io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image, ImageFilter

from align.config import WorldConfig
from align.data.contracts import GROUND_TRUTH, HPIR, HPIR_DIMENSIONS, IMAGES, QUERIES, RATINGS
from align.storage import paths

SHAPES = ("circle", "square", "triangle", "star", "ring", "cross")
# Hue in degrees for each colour name.
COLOURS = {
    "red": 0,
    "orange": 30,
    "yellow": 55,
    "green": 120,
    "teal": 175,
    "blue": 225,
    "purple": 275,
    "pink": 320,
}
BACKGROUNDS = ("plain", "gradient", "striped", "dotted")
# A content family: every image and query of one (colour, shape), with or without a background.
FAMILIES = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)
LOW_LEVEL = ("sharpness", "exposure", "noise", "saturation")
HIGH_LEVEL = ("composition", "harmony")
ATTRIBUTES = LOW_LEVEL + HIGH_LEVEL

# Truthful quality words, (good, bad) per attribute; used in captions when the attribute is
# clearly good (> 0.75) or clearly bad (< 0.25).
QUALITY_WORDS = {
    "sharpness": ("sharp", "blurry"),
    "exposure": ("well-lit", None),  # bad exposure is "dark" or "overexposed", chosen by direction
    "noise": ("clean", "grainy"),
    "saturation": ("vivid", "washed-out"),
    "composition": ("well-composed", "badly framed"),
    "harmony": ("harmonious colours", "clashing colours"),
}
OVERALL_WORDS = ("beautiful", "ugly")
_CAPTION_TEMPLATES = (
    "a photo of {content}",
    "a picture of {content}",
    "an image of {content}",
    "{content}",
)


def content_phrase(colour: str, shape: str, background: str | None = None) -> str:
    """'a red star' or 'an orange star on a striped background': the words queries and captions
    share."""
    article = "an" if colour[0] in "aeiou" else "a"
    phrase = f"{article} {colour} {shape}"
    return f"{phrase} on a {background} background" if background else phrase


@dataclass(frozen=True)
class Scene:
    """Everything needed to render one image; all qualities in [0, 1], 1 = best."""

    shape: str
    colour: str
    background: str
    sharpness: float
    exposure: float
    noise: float
    saturation: float
    composition: float
    harmony: float
    too_bright: bool  # direction of an exposure error
    complementary: bool  # harmonious target: complementary (else analogous) background hue
    hue_sign: float  # which way the background hue turns
    placement: tuple[float, float, float]  # (direction angle, corner choice, scale sign)
    noise_seed: int  # seeds the pixel noise, so rendering is a pure function of the scene


def sample_scenes(
    rng: np.random.Generator, n: int, families: list[tuple[str, str]] | None = None
) -> list[Scene]:
    """Draw n scenes: content uniform (over `families` when given, else every colour and
    shape), each quality uniform in [0, 1]."""
    colour_names = list(COLOURS)
    if families is None:
        shapes = rng.integers(len(SHAPES), size=n)
        colours = rng.integers(len(COLOURS), size=n)
    else:
        drawn = rng.integers(len(families), size=n)
        shapes = np.array([SHAPES.index(s) for _, s in families])[drawn]
        colours = np.array([colour_names.index(c) for c, _ in families])[drawn]
    backgrounds = rng.integers(len(BACKGROUNDS), size=n)
    q = rng.random((n, len(ATTRIBUTES)))
    flags = rng.random((n, 3)) < 0.5
    placement = rng.random((n, 3))
    noise_seeds = rng.integers(2**32, size=n)
    return [
        Scene(
            SHAPES[shapes[i]],
            colour_names[colours[i]],
            BACKGROUNDS[backgrounds[i]],
            *(float(v) for v in q[i]),
            too_bright=bool(flags[i, 0]),
            complementary=bool(flags[i, 1]),
            hue_sign=1.0 if flags[i, 2] else -1.0,
            placement=tuple(float(v) for v in placement[i]),
            noise_seed=int(noise_seeds[i]),
        )
        for i in range(n)
    ]


def aesthetic_parts(scene: Scene, low_level_weight: float) -> tuple[float, float, float]:
    """(low_level, high_level, true_aesthetic) of a scene."""
    low = float(np.mean([getattr(scene, a) for a in LOW_LEVEL]))
    high = float(np.mean([getattr(scene, a) for a in HIGH_LEVEL]))
    return low, high, low_level_weight * low + (1.0 - low_level_weight) * high


# ---------------------------------------------------------------------------------------------
# Rendering


def _hsv(h_deg: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((h_deg % 360) / 360.0, s, v), dtype=np.float32)


def _shape_distance(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    """Approximate signed distance to the shape (negative inside), in normalised units."""
    if shape == "circle":
        return np.hypot(x, y) - r
    if shape == "square":
        return np.maximum(np.abs(x), np.abs(y)) - 0.85 * r
    if shape == "ring":
        return np.abs(np.hypot(x, y) - 0.75 * r) - 0.25 * r
    if shape == "cross":
        arm = 0.32 * r
        bar1 = np.maximum(np.abs(x) - r, np.abs(y) - arm)
        bar2 = np.maximum(np.abs(y) - r, np.abs(x) - arm)
        return np.minimum(bar1, bar2)
    if shape == "triangle":
        # Upward equilateral triangle as the intersection of three half-planes.
        k = np.sqrt(3.0)
        d1 = y - 0.5 * r
        d2 = (-k * x - y) / 2 - 0.5 * r
        d3 = (k * x - y) / 2 - 0.5 * r
        return np.maximum(np.maximum(d1, d2), d3)
    if shape == "star":
        theta = np.arctan2(y, x) + np.pi / 2
        spikes = (np.cos(5 * theta) + 1) / 2
        return np.hypot(x, y) - r * (0.45 + 0.55 * spikes**2)
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def _background_pattern(kind: str, x: np.ndarray, y: np.ndarray, size: int) -> np.ndarray:
    """Brightness multiplier field in [0.6, 1] for the background pattern."""
    if kind == "plain":
        return np.full_like(x, 0.9)
    if kind == "gradient":
        return 0.6 + 0.4 * (y + 1) / 2
    if kind == "striped":
        period = 2.0 * 8 / size  # stripes about 8 px wide at any image size
        return np.where(((x + y) / period) % 1.0 < 0.5, 0.95, 0.65)
    if kind == "dotted":
        period = 2.0 * 10 / size
        gx = (x / period) % 1.0 - 0.5
        gy = (y / period) % 1.0 - 0.5
        return np.where(np.hypot(gx, gy) < 0.22, 0.6, 0.95)
    raise ValueError(f"unknown background {kind!r}; known: {BACKGROUNDS}")


def _placement(scene: Scene) -> tuple[float, float, float]:
    """Subject centre (cx, cy) and radius in normalised [-1, 1] coordinates.

    Good composition: the subject near a rule-of-thirds point at radius 0.4. As composition drops,
    the centre drifts away (towards and past the frame edge) and the scale goes to tiny or huge.
    """
    angle, corner, scale_sign = scene.placement
    bad = 1.0 - scene.composition
    thirds = np.array([[-1 / 3, -1 / 3], [1 / 3, -1 / 3], [-1 / 3, 1 / 3], [1 / 3, 1 / 3]])
    cx, cy = thirds[int(corner * 4) % 4]
    drift = 0.6 * bad
    cx += drift * np.cos(2 * np.pi * angle)
    cy += drift * np.sin(2 * np.pi * angle)
    radius = 0.4 * (1 + 0.9 * bad) if scale_sign < 0.5 else 0.4 * (1 - 0.55 * bad)
    return float(cx), float(cy), float(radius)


def render(scene: Scene, size: int) -> np.ndarray:
    """Render a scene to an RGB uint8 array of shape (size, size, 3)."""
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size * 2 - 1
    x, y = np.meshgrid(coords, coords)

    hue = COLOURS[scene.colour]
    # Harmony: complementary (180 deg) or analogous (30 deg) offsets are harmonious; both drift
    # towards a clashing 100 deg offset as harmony drops.
    bad = 1.0 - scene.harmony
    offset = 180 - 80 * bad if scene.complementary else 30 + 70 * bad
    subject_rgb = _hsv(hue, 0.9, 0.95)
    background_rgb = _hsv(hue + scene.hue_sign * offset, 0.55, 0.85)

    cx, cy, radius = _placement(scene)
    dist = _shape_distance(scene.shape, x - cx, y - cy, radius)
    alpha = np.clip(0.5 - dist * size / 2, 0.0, 1.0)[..., None]  # about 1 px of anti-aliasing
    pattern = _background_pattern(scene.background, x, y, size)[..., None]
    img = alpha * subject_rgb + (1 - alpha) * pattern * background_rgb

    # Saturation: wash colours out towards grey.
    grey = img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    img = grey[..., None] + (img - grey[..., None]) * (0.25 + 0.75 * scene.saturation)

    # Sharpness: Gaussian blur, up to about 3.5% of the side.
    blur = (1.0 - scene.sharpness) ** 1.3 * size * 0.035
    pil = Image.fromarray(np.clip(img * 255, 0, 255).astype(np.uint8))
    if blur > 0.2:
        pil = pil.filter(ImageFilter.GaussianBlur(radius=blur))
    img = np.asarray(pil).astype(np.float32)

    # Exposure: too dark (scale down) or too bright (push towards white).
    err = (1.0 - scene.exposure) * 0.55
    img = img + (255.0 - img) * err if scene.too_bright else img * (1.0 - err)

    # Noise: per-pixel Gaussian noise.
    std = (1.0 - scene.noise) * 24.0
    if std > 0.5:
        img = img + np.random.default_rng(scene.noise_seed).normal(0.0, std, img.shape).astype(
            np.float32
        )
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = _io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def caption_for(scene: Scene, true_aesthetic: float, rng: np.random.Generator, with_quality: bool):
    """(caption, quality words used). Quality words are always true of the image."""
    content = content_phrase(scene.colour, scene.shape, scene.background)
    template = _CAPTION_TEMPLATES[int(rng.integers(len(_CAPTION_TEMPLATES)))]
    if not with_quality:
        return template.format(content=content), ""
    words = []
    for attr in ATTRIBUTES:
        value = getattr(scene, attr)
        good, bad = QUALITY_WORDS[attr]
        if attr == "exposure" and value < 0.25:
            bad = "overexposed" if scene.too_bright else "dark"
        if value > 0.75:
            words.append(good)
        elif value < 0.25:
            words.append(bad)
    if true_aesthetic > 0.68:
        words.append(OVERALL_WORDS[0])
    elif true_aesthetic < 0.32:
        words.append(OVERALL_WORDS[1])
    if not words:
        return template.format(content=content), ""
    rng.shuffle(words)
    chosen = ", ".join(words[:3])
    return f"a {chosen} photo of {content}", chosen


@dataclass(frozen=True)
class Part:
    """One of the world's sets of images."""

    size_field: str  # the WorldConfig field holding its number of images
    stream: tuple[int, ...]  # its own random stream (after the seed, before the shard)
    id_prefix: str  # after "w{seed}-"
    folder: str  # under world.output
    trained_families_only: bool = False  # no image of an unseen family


# The world's four sets of images. The corpus is what users index and search and what the
# fine-tune's pairs come from; the held-out image-caption pairs are evaluate's recall@k gallery;
# the pretraining pairs stand for the web a real CLIP learned from before it ever saw the user's
# corpus; the evaluation gallery is what evaluate searches, images no training step saw. Each set
# has its own random stream and id prefix, so no two coincide and the corpus does not change when
# another set's size does.
PARTS = {
    "corpus": Part("num_images", (), "", paths.IMAGES, trained_families_only=True),
    "heldout": Part("heldout_images", (2_000_003,), "h", paths.HELDOUT_IMAGES),
    "pretrain": Part("pretrain_images", (3_000_017,), "p", paths.PRETRAIN_IMAGES),
    "eval": Part("eval_images", (5_000_011,), "e", paths.EVAL_IMAGES),
}


def unseen_families(world: WorldConfig) -> frozenset[tuple[str, str]]:
    """The (colour, shape) families the alignment never sees: round(unseen_family_share x 48)
    of them, drawn by the seed."""
    n = round(world.unseen_family_share * len(FAMILIES))
    order = np.random.default_rng([world.seed, 6_000_011]).permutation(len(FAMILIES))
    return frozenset(FAMILIES[i] for i in order[:n])


def trained_family_rows(world: WorldConfig, images: pa.Table, ground_truth: pa.Table) -> pa.Table:
    """The rows of an images table whose ground truth (row-aligned) is of a trained family (the
    fine-tune's captions: the pretraining pairs less the unseen families)."""
    if not images["image_id"].equals(ground_truth["image_id"]):
        raise ValueError("images and ground truth are not row-aligned")
    return images.filter(pc.invert(unseen_family_mask(world, ground_truth)))


def unseen_family_mask(world: WorldConfig, ground_truth: pa.Table):
    """Per ground-truth row: whether its image is of an unseen family (an Arrow boolean array)."""
    family = pc.binary_join_element_wise(ground_truth["colour"], ground_truth["shape"], " ")
    unseen = pa.array([f"{c} {s}" for c, s in unseen_families(world)], pa.string())
    return pc.is_in(family, value_set=unseen)


def part_size(world: WorldConfig, part: str) -> int:
    """Images in one of the world's sets (PARTS); the gallery is as large as the corpus unless
    world.eval_images says otherwise."""
    size = getattr(world, PARTS[part].size_field)
    return world.num_images if size is None else size


def render_shard(world: WorldConfig, shard: int, part: str = "corpus") -> tuple[pa.Table, pa.Table]:
    """Render shard `shard` of one of the world's sets (PARTS): (images table, ground truth).

    A pure function of (world config, shard, part): same inputs, same bytes.
    """
    total = part_size(world, part)
    start = shard * world.shard_size
    n = min(world.shard_size, total - start)
    if n <= 0:
        raise ValueError(f"shard {shard} is past the end of a set of {total} images")
    rng = np.random.default_rng([world.seed, *PARTS[part].stream, shard])
    prefix = f"w{world.seed}-{PARTS[part].id_prefix}"
    unseen = unseen_families(world) if PARTS[part].trained_families_only else frozenset()
    scenes = sample_scenes(rng, n, [f for f in FAMILIES if f not in unseen] if unseen else None)
    with_quality = rng.random(n) < world.caption_quality_share
    ids, images, captions, gt_rows = [], [], [], []
    for i, scene in enumerate(scenes):
        image_id = f"{prefix}{start + i:07d}"
        low, high, true = aesthetic_parts(scene, world.low_level_weight)
        caption, words = caption_for(scene, true, rng, bool(with_quality[i]))
        ids.append(image_id)
        images.append(encode_jpeg(render(scene, world.image_size), world.jpeg_quality))
        captions.append(caption)
        gt_rows.append(
            {
                "image_id": image_id,
                "shape": scene.shape,
                "colour": scene.colour,
                "background": scene.background,
                **{a: getattr(scene, a) for a in ATTRIBUTES},
                "low_level": low,
                "high_level": high,
                "true_aesthetic": true,
                "quality_words": words,
            }
        )
    images_table = pa.table(
        {"image_id": ids, "image": images, "caption": captions}, schema=IMAGES.schema
    )
    gt_table = pa.Table.from_pylist(gt_rows, schema=GROUND_TRUTH.schema)
    return images_table, gt_table


def num_shards(world: WorldConfig, part: str = "corpus") -> int:
    return -(-part_size(world, part) // world.shard_size)


def make_queries(world: WorldConfig) -> pa.Table:
    """Content-only queries ('a red star', 'a red star on a striped background'): those of the
    unseen families split 'unseen', the others split into train and held-out by a seeded
    shuffle."""
    rows = []
    for colour, shape in FAMILIES:
        rows.append((colour, shape, None))
        rows.extend((colour, shape, bg) for bg in BACKGROUNDS)
    unseen = unseen_families(world)
    split = np.array(["unseen" if (c, s) in unseen else "train" for c, s, _ in rows], dtype=object)
    trained = np.flatnonzero(split == "train")
    rng = np.random.default_rng([world.seed, 1_000_003])
    order = rng.permutation(len(trained))
    n_heldout = max(1, round(world.heldout_query_share * len(trained)))
    split[trained[order[:n_heldout]]] = "heldout"
    return pa.table(
        {
            "query_id": [f"q{i:04d}" for i in range(len(rows))],
            "query": [content_phrase(c, s, b) for c, s, b in rows],
            "split": split.tolist(),
            "shape": [s for _, s, _ in rows],
            "colour": [c for c, _, _ in rows],
            "background": [b for _, _, b in rows],
        },
        schema=QUERIES.schema,
    )


# ---------------------------------------------------------------------------------------------
# Ground-truth relevance and the HPIR file


def relevant(
    query_colour: np.ndarray,
    query_shape: np.ndarray,
    query_background: np.ndarray,
    image_colour: np.ndarray,
    image_shape: np.ndarray,
    image_background: np.ndarray,
) -> np.ndarray:
    """Does each image show what its query asks for: colour and shape, and the background when
    the query names one (None matches any)? Object arrays, broadcast against each other: (Q, 1)
    query facts with (1, N) images give (Q, N); with (Q, k) retrieved images, (Q, k)."""
    no_background = np.vectorize(lambda b: b is None, otypes=[bool])(query_background)
    return (
        (query_colour == image_colour)
        & (query_shape == image_shape)
        & (no_background | (query_background == image_background))
    )


# Simulated raters: the share preferring the better row is a logistic function of the difference
# (in the attribute's own unit); below HPIR_MIN_SHARE people are split and there is no preference.
_HPIR_SCALE = {"accuracy": 0.1, "aesthetic": 0.03, "diversity": 0.5}
HPIR_MIN_SHARE = 0.6


def _row_facts(gt: dict[str, np.ndarray], rows: np.ndarray, rel: np.ndarray) -> dict[str, float]:
    """Ground-truth accuracy (share relevant), aesthetic (mean true aesthetic) and diversity
    (distinct contents) of one row of images (`rows` of the ground truth)."""
    contents = {(gt["shape"][r], gt["colour"][r], gt["background"][r]) for r in rows}
    return {
        "accuracy": float(rel[rows].mean()),
        "aesthetic": float(gt["true_aesthetic"][rows].mean()),
        "diversity": float(len(contents)),
    }


def make_hpir(
    world: WorldConfig, ground_truth: pa.Table, queries: pa.Table, row_size: int = 5
) -> pa.Table:
    """An HPIR file (the `hpir` contract) for the evaluated queries (every split but train),
    from the ground truth of the images it draws rows from (the evaluation gallery's).

    Per query, half the items contrast aesthetics (both rows relevant, drawn at random) and half
    contrast accuracy (rows with different numbers of relevant images). Every item carries all
    three dimensions; simulated raters prefer the better row with a share that grows with the
    difference, and have no preference when it is small.
    """
    gt = {
        c: ground_truth[c].to_numpy(zero_copy_only=False)
        for c in ("image_id", "shape", "colour", "background", "true_aesthetic")
    }
    held = queries.filter(pc.not_equal(queries["split"], "train"))
    asked = [
        held[c].to_numpy(zero_copy_only=False)[:, None] for c in ("colour", "shape", "background")
    ]
    rel = relevant(*asked, *(gt[c][None, :] for c in ("colour", "shape", "background")))
    rng = np.random.default_rng([world.seed, 3_000_017])
    rows = {c.name: [] for c in HPIR.columns}
    for q, (query_id, query) in enumerate(
        zip(held["query_id"].to_pylist(), held["query"].to_pylist(), strict=True)
    ):
        good, bad = np.flatnonzero(rel[q]), np.flatnonzero(~rel[q])
        if len(good) < 2 * row_size:
            continue
        for item in range(world.hpir_items_per_query):
            if item % 2 == 0:  # aesthetic contrast: two rows of relevant images
                pick = rng.choice(good, 2 * row_size, replace=False)
                row_a, row_b = pick[:row_size], pick[row_size:]
            else:  # accuracy contrast: m and n relevant images, the rest irrelevant
                m, n = rng.choice(row_size + 1, 2, replace=False)
                row_a = np.concatenate(
                    [
                        rng.choice(good, m, replace=False),
                        rng.choice(bad, row_size - m, replace=False),
                    ]
                )
                row_b = np.concatenate(
                    [
                        rng.choice(good, n, replace=False),
                        rng.choice(bad, row_size - n, replace=False),
                    ]
                )
                row_a, row_b = rng.permutation(row_a), rng.permutation(row_b)
            fa, fb = _row_facts(gt, row_a, rel[q]), _row_facts(gt, row_b, rel[q])
            rows["item_id"].append(f"{query_id}-{item}")
            rows["query"].append(query)
            rows["row_a"].append(gt["image_id"][row_a].tolist())
            rows["row_b"].append(gt["image_id"][row_b].tolist())
            for dim in HPIR_DIMENSIONS:
                diff = fa[dim] - fb[dim]
                share = 1.0 / (1.0 + np.exp(-abs(diff) / _HPIR_SCALE[dim]))
                decided = share >= HPIR_MIN_SHARE
                rows[f"{dim}_preferred"].append(("a" if diff > 0 else "b") if decided else None)
                rows[f"{dim}_confidence"].append(float(share) if decided else None)
    return pa.table(rows, schema=HPIR.schema)


def make_ratings(world: WorldConfig, ground_truth: pa.Table) -> pa.Table:
    """People's ratings of a random share of the corpus (the `ratings` contract), as an AVA-style
    dataset would hold them: the true aesthetic plus rater noise, clipped to [0, 1]. A learned
    aesthetic scorer trains on these (pipelines/train_scorer.py); nothing else reads them."""
    rng = np.random.default_rng([world.seed, 4_000_037])
    n = ground_truth.num_rows
    rated = np.flatnonzero(rng.random(n) < world.rated_share)
    true = ground_truth["true_aesthetic"].to_numpy()[rated]
    rating = np.clip(true + rng.normal(0.0, world.rating_noise, len(rated)), 0.0, 1.0)
    return pa.table(
        {"image_id": ground_truth["image_id"].take(pa.array(rated)), "rating": rating},
        schema=RATINGS.schema,
    )
