"""Aesthetic scorers behind one interface, and their combination.

A scorer maps a batch to one float32 score per image, from pixels or from CLIP image embeddings:

- `lowlevel`: classical pixel measures, no weights (see `lowlevel_measures`).
- `laion_mlp`: the LAION improved-aesthetic-predictor head on L2-normalised CLIP image embeddings
  (OpenAI ViT-L/14, 768 wide for the released checkpoints).
- `rated_cnn`: a small CNN on pixels trained on people's ratings by the train_scorer job (the
  synthetic world's `ratings.parquet`, or AVA-style ratings of your own): a learned aesthetic
  model that sees composition and colour, which the pixel measures do not.

The combined score is `sum_i w_i * z_i / sum_i w_i`, each scorer z-scored with its mean and
standard deviation over the whole corpus (`combine`).
"""

from __future__ import annotations

import io as _io
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from align.errors import UserError
from align.storage import io

# torch is imported inside the functions that use it (1.8 s here): the pixel measures and score
# statistics run where no network does (index_corpus's driver, evaluate).

SCORERS = ("lowlevel", "laion_mlp", "rated_cnn")
# Heads on CLIP embeddings read one model's embedding space, not any of the same width: the model
# each was trained on ('name:pretrained', as align.models.clip.model_id writes it). LAION's improved
# aesthetic predictor was trained on OpenAI's ViT-L/14 (its own script loads clip "ViT-L/14").
TRAINED_ON = {"laion_mlp": "ViT-L-14:openai"}


class ScorerError(UserError, ValueError):
    """A scorer that cannot be built: unknown name, bad checkpoint, wrong embedding width."""


# ---------------------------------------------------------------------------------------------
# Classical low-level measures, vectorised over a batch (N, H, W, 3) uint8.

LOWLEVEL_MEASURES = ("sharpness", "exposure", "colourfulness", "noise", "contrast")


def _conv3(lum: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """'valid' 3x3 convolution of (N, H, W) by shifted sums (no per-image Python loop)."""
    h, w = lum.shape[1] - 2, lum.shape[2] - 2
    out = np.zeros((lum.shape[0], h, w), dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            if kernel[dy, dx]:
                out += kernel[dy, dx] * lum[:, dy : dy + h, dx : dx + w]
    return out


_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float32)
_IMMERKAER = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)


def _flat_region_noise(lum: np.ndarray, share: float = 0.2) -> np.ndarray:
    """Immerkaer's (1996) noise sigma, measured only where the image is flat: the `share` of
    pixels with the least local gradient. Over the whole image fine texture (hair, fur, foliage)
    passes for noise, so blurring a photo looked like denoising it."""
    n, h, w = lum.shape
    residual = np.abs(_conv3(lum, _IMMERKAER)).reshape(n, -1)
    gx = lum[:, 1:-1, 2:] - lum[:, 1:-1, :-2]
    gy = lum[:, 2:, 1:-1] - lum[:, :-2, 1:-1]
    gradient = (gx * gx + gy * gy).reshape(n, -1)
    keep = max(1, int(share * gradient.shape[1]))
    flat = np.argpartition(gradient, keep - 1, axis=1)[:, :keep]
    return np.sqrt(np.pi / 2) / 6.0 * np.take_along_axis(residual, flat, axis=1).mean(axis=1)


def lowlevel_measures(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Five classical measures, each mapped to [0, 1] with 1 = better.

    - sharpness: energy e of the Laplacian of the 2x-downsampled luminance, less the energy the
      estimated noise puts there (so noise does not pass for detail); e / (e + 0.02). (A scale
      of 0.002 saturates on photos: a blurred photo keeps 0.7 against a sharp one's 0.97.)
    - exposure: 1 - 2 |mean luminance - 0.5|, minus the share of clipped (near 0 or 1) pixels.
    - colourfulness: Hasler & Suesstrunk (2003) on the opponent channels rg, yb;
      c / (c + 0.15).
    - noise: Immerkaer's (1996) noise sigma on the flattest fifth of the luminance
      (`_flat_region_noise`; over the whole image, texture counted as noise); exp(-sigma / 0.02).
    - contrast: RMS contrast (std of the 2x-downsampled luminance), min(std / 0.2, 1).
    """
    x = pixels.astype(np.float32) / 255.0
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    lum = 0.299 * r + 0.587 * g + 0.114 * b
    n, h, w = lum.shape

    sigma = _flat_region_noise(lum)
    noise = np.exp(-sigma / 0.02)

    # White noise of std s leaves std s/2 after 2x2 averaging, and the Laplacian (kernel energy
    # 20) turns that into 20 (s/2)^2 of energy: subtract it so noise does not pass for detail.
    half = lum[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2).mean(axis=(2, 4))
    energy = (_conv3(half, _LAPLACIAN) ** 2).mean(axis=(1, 2))
    energy = np.maximum(energy - 20.0 * (sigma / 2) ** 2, 0.0)
    sharpness = energy / (energy + 0.02)

    mean = lum.mean(axis=(1, 2))
    clipped = ((lum < 0.02) | (lum > 0.98)).mean(axis=(1, 2))
    exposure = np.clip(1.0 - 2.0 * np.abs(mean - 0.5) - clipped, 0.0, 1.0)

    rg, yb = r - g, 0.5 * (r + g) - b
    c = np.sqrt(rg.std(axis=(1, 2)) ** 2 + yb.std(axis=(1, 2)) ** 2) + 0.3 * np.sqrt(
        rg.mean(axis=(1, 2)) ** 2 + yb.mean(axis=(1, 2)) ** 2
    )
    colourfulness = c / (c + 0.15)

    contrast = np.minimum(half.std(axis=(1, 2)) / 0.2, 1.0)
    return {
        "sharpness": sharpness.astype(np.float32),
        "exposure": exposure.astype(np.float32),
        "colourfulness": colourfulness.astype(np.float32),
        "noise": noise.astype(np.float32),
        "contrast": contrast.astype(np.float32),
    }


def lowlevel_score(pixels: np.ndarray) -> np.ndarray:
    """The `lowlevel` scorer: mean of the five measures, in [0, 1]."""
    measures = lowlevel_measures(pixels)
    return np.mean([measures[m] for m in LOWLEVEL_MEASURES], axis=0).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The LAION improved aesthetic predictor head.


def _load_weights(checkpoint: str, scorer: str, missing_hint: str = ""):
    """torch.load with weights_only (tensors and plain values only, never code).

    Raises:
        ScorerError: naming the scorer, for a missing file or one that is not a checkpoint.
    """
    import torch

    try:
        path = Path(io.local_copy(checkpoint))
    except FileNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ScorerError(f"{scorer} checkpoint not found: {checkpoint}{missing_hint}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for a file that is not a checkpoint
        raise ScorerError(f"{scorer} checkpoint {checkpoint} cannot be read: {e}") from None


def _laion_head(input_size: int):
    import torch.nn as nn

    class LaionAestheticHead(nn.Module):
        """christophschuhmann/improved-aesthetic-predictor's MLP ("linearMSE": no activations)."""

        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(input_size, 1024),
                nn.Dropout(0.2),
                nn.Linear(1024, 128),
                nn.Dropout(0.2),
                nn.Linear(128, 64),
                nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    return LaionAestheticHead()


def load_laion_head(checkpoint: str, embed_dim: int):
    """Load the LAION head with weights_only, checking it fits embeddings of `embed_dim`.

    Raises:
        ScorerError: missing file, not a state dict of this head, or a width mismatch.
    """
    state = _load_weights(checkpoint, "laion_mlp")
    if not isinstance(state, dict) or "layers.0.weight" not in state:
        raise ScorerError(f"laion_mlp checkpoint {checkpoint} is not a LAION aesthetic head")
    width = int(state["layers.0.weight"].shape[1])
    if width != embed_dim:
        raise ScorerError(
            f"laion_mlp checkpoint expects {width}-wide CLIP embeddings but the model "
            f"gives {embed_dim}-wide ones (the released heads need ViT-L-14, 768)"
        )
    head = _laion_head(width)
    head.load_state_dict(state)
    return head.eval()


# ---------------------------------------------------------------------------------------------
# rated_cnn: a small CNN trained on ratings (pipelines/train_scorer.py)

RATED_CNN_FORMAT = "aesthetic-align rated_cnn v1"


def rated_cnn(image_size: int, width: int = 64):
    """Four conv blocks (each halving the side) and an MLP to one score. Input: (N, 3, S, S)
    floats in [0, 1], S = image_size (a multiple of 16)."""
    import torch.nn as nn

    if image_size % 16:
        raise ScorerError(f"rated_cnn needs an image size divisible by 16, not {image_size}")

    def block(i, o):
        return nn.Sequential(
            nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)
        )

    return nn.Sequential(
        block(3, width // 2),
        block(width // 2, width),
        block(width, width),
        block(width, width),
        nn.Flatten(),
        nn.Linear(width * (image_size // 16) ** 2, 64),
        nn.ReLU(),
        nn.Linear(64, 1),
    )


def pixels_to_unit(pixels: np.ndarray, image_size: int):
    """uint8 (N, H, W, 3) -> float (N, 3, S, S) in [0, 1], resized (antialiased) when H != S."""
    import torch

    pixels = np.require(pixels, requirements=["C", "W"])  # torch wants writable memory
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = torch.nn.functional.interpolate(
            x, size=(image_size, image_size), mode="bilinear", antialias=True
        )
    return x


def save_rated_cnn(net, image_size: int, path: str) -> None:
    import torch

    buffer = _io.BytesIO()
    torch.save(
        {"format": RATED_CNN_FORMAT, "image_size": image_size, "state_dict": net.state_dict()},
        buffer,
    )
    io.write_bytes(path, buffer.getvalue())


def load_rated_cnn(checkpoint: str):
    """(network in eval mode, its image size), loaded with weights_only.

    Raises:
        ScorerError: missing file, or not a checkpoint written by train_scorer.
    """
    saved = _load_weights(checkpoint, "rated_cnn", missing_hint=" (run train_scorer)")
    if not isinstance(saved, dict) or saved.get("format") != RATED_CNN_FORMAT:
        raise ScorerError(f"{checkpoint} is not a rated_cnn checkpoint (written by train_scorer)")
    net = rated_cnn(int(saved["image_size"]))
    net.load_state_dict(saved["state_dict"])
    return net.eval(), int(saved["image_size"])


# ---------------------------------------------------------------------------------------------
# One interface


@dataclass
class Scorer:
    """A named scorer; `needs` says whether it reads pixels or embeddings."""

    name: str
    needs: Literal["pixels", "embedding"]
    fn: object  # callable(np.ndarray) -> np.ndarray float32

    def __call__(self, pixels: np.ndarray, embeddings: np.ndarray) -> np.ndarray:
        return self.fn(pixels if self.needs == "pixels" else embeddings)


def check_scorer_model(name: str, trained_on: str | None, model: str) -> None:
    """Refuse an embedding head on another model's embeddings (the width alone can match).

    Args:
        name: the scorer; trained_on: its config's `trained_on` (None: TRAINED_ON's default);
        model: the id of the model that embeds the corpus (align.models.clip.model_id).
    Raises:
        ScorerError: naming the scorer, both models and the keys to change.
    """
    expected = trained_on or TRAINED_ON.get(name)
    if expected is not None and expected != model:
        raise ScorerError(
            f"scorer {name} was trained on {expected} embeddings but the corpus is embedded with "
            f"{model}: its scores would be meaningless; set model.name/model.pretrained to "
            f"{expected}, or index_corpus.scorers.{name}.trained_on for a head of your own"
        )


def build_scorer(name: str, checkpoint: str | None, embed_dim: int) -> Scorer:
    """Build scorer `name`. Raises ScorerError for an unknown name or an unusable checkpoint."""
    if name == "lowlevel":
        return Scorer(name, "pixels", lowlevel_score)
    if name == "laion_mlp":
        if not checkpoint:
            raise ScorerError("scorer laion_mlp needs a checkpoint path")
        head = load_laion_head(checkpoint, embed_dim)

        def score(embeddings: np.ndarray) -> np.ndarray:
            import torch

            x = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
            x = torch.nn.functional.normalize(x, dim=-1)
            with torch.no_grad():
                return head(x).squeeze(-1).numpy().astype(np.float32)

        return Scorer(name, "embedding", score)
    if name == "rated_cnn":
        if not checkpoint:
            raise ScorerError("scorer rated_cnn needs a checkpoint path (train_scorer's model.pt)")
        net, size = load_rated_cnn(checkpoint)

        def score_pixels(pixels: np.ndarray) -> np.ndarray:
            import torch

            with torch.no_grad():
                return net(pixels_to_unit(pixels, size)).squeeze(-1).numpy().astype(np.float32)

        return Scorer(name, "pixels", score_pixels)
    raise ScorerError(f"unknown aesthetic scorer {name!r}; known: {', '.join(SCORERS)}")


def score_moments(columns: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Count, sum and sum of squares of each scorer's finite scores: per unit of work, so the
    corpus statistics merge exactly without reading the scores again."""
    moments = {}
    for name, values in columns.items():
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        moments[name] = {"n": int(v.size), "sum": float(v.sum()), "sumsq": float((v * v).sum())}
    return moments


def stats_from_moments(parts: list[Mapping[str, Mapping[str, float]]]) -> dict[str, dict]:
    """Mean and standard deviation per scorer over all parts (std 1 where it would be 0)."""
    stats = {}
    for name in parts[0] if parts else ():
        n = sum(p[name]["n"] for p in parts)
        mean = sum(p[name]["sum"] for p in parts) / n if n else 0.0
        var = max(sum(p[name]["sumsq"] for p in parts) / n - mean * mean, 0.0) if n else 0.0
        std = float(np.sqrt(var))
        stats[name] = {"mean": mean, "std": std if std > 1e-12 else 1.0, "n": n}
    return stats


def normalisation_stats(columns: Mapping[str, np.ndarray]) -> dict[str, dict]:
    """Mean and standard deviation of each scorer's raw scores over the given columns."""
    return stats_from_moments([score_moments(columns)])


def combine(
    columns: Mapping[str, np.ndarray],
    weights: Mapping[str, float],
    stats: Mapping[str, Mapping[str, float]],
) -> np.ndarray:
    """Weighted mean of z-scored scorer columns: sum_i w_i z_i / sum_i w_i."""
    total = sum(weights[n] for n in columns)
    if total <= 0:
        raise ScorerError("the aesthetic scorer weights sum to zero")
    acc = None
    for name, values in columns.items():
        z = (np.asarray(values, dtype=np.float64) - stats[name]["mean"]) / stats[name]["std"]
        acc = weights[name] * z if acc is None else acc + weights[name] * z
    return (acc / total).astype(np.float32)
