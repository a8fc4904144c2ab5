"""The synthetic world's settings (make_world)."""

from __future__ import annotations

from pydantic import Field

from align.config.sections import Section
from align.storage import paths


class WorldConfig(Section):
    """The synthetic aesthetic world (align.data.world), made by the make_world job."""

    output: str = Field(
        paths.WORLD,
        description="make_world writes the world here (align/storage/paths.py: its files).",
    )
    seed: int = 0
    num_images: int = Field(6000, ge=1)
    image_size: int = Field(64, ge=16, le=512, description="Rendered side length in pixels.")
    shard_size: int = Field(1000, ge=1, description="Images per Parquet shard (one Ray task each).")
    caption_quality_share: float = Field(
        0.3, ge=0.0, le=1.0, description="Share of captions that carry truthful quality words."
    )
    heldout_query_share: float = Field(
        0.25,
        gt=0.0,
        lt=1.0,
        description="Share of the trained families' queries held out of training (split "
        "'heldout').",
    )
    unseen_family_share: float = Field(
        0.2,
        ge=0.0,
        le=0.9,
        description="Share of content families (colour x shape) the alignment never sees: their "
        "queries are split 'unseen', and the corpus, its ratings and the fine-tune's captions "
        "hold none of their images.",
    )
    eval_images: int | None = Field(
        None,
        ge=0,
        description="The evaluation gallery: images of every family apart from the corpus, with "
        "their own ground truth and no ratings, which evaluate searches (no training step reads "
        "them). None: as many as the corpus (num_images).",
    )
    heldout_images: int = Field(
        1000,
        ge=0,
        description="Image-caption pairs outside the corpus, never trained on: the gallery and "
        "captions of evaluate's recall@k.",
    )
    pretrain_images: int = Field(
        0,
        ge=0,
        description="Image-caption pairs apart from the corpus and the held-out pairs, for "
        "pretraining the base model (the web a real CLIP learned from; 0: none, and a base "
        "pretrains on the corpus's own captions).",
    )
    rated_share: float = Field(
        0.5, ge=0.0, le=1.0, description="Share of corpus images people rated (ratings.parquet)."
    )
    rating_noise: float = Field(0.05, ge=0.0, description="Std of a rating around the truth.")
    hpir_items_per_query: int = Field(
        8,
        ge=0,
        description="HPIR items (row A vs row B) per evaluated query (every split but train).",
    )
    low_level_weight: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="Weight of pixel-visible attributes in the true aesthetic; the rest is "
        "composition and colour harmony.",
    )
    jpeg_quality: int = Field(92, ge=50, le=100)
