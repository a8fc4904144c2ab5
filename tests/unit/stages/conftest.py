"""What the stage tests share: small real JPEGs and tiny real CLIP models (no weights needed)."""

from __future__ import annotations

import io

import numpy as np
import pytest


def jpeg(seed: int, size: int = 48) -> bytes:
    """A small real JPEG of smooth random colour."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((size, size), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="session")
def tiny_clip():
    """The tiny-clip model as a stage gets it (a model config dict), and the built model."""
    from align.config import ModelConfig
    from align.models.clip import build_clip

    model = ModelConfig(name="tiny-clip").model_dump()
    return model, build_clip(ModelConfig(name="tiny-clip"))
