"""The index_corpus job's settings: sources, stages, scorers, units and the index."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from align.config.sections import IndexConfig, PoolConfig, ScorerConfig, Section
from align.storage import paths


class IndexCorpusConfig(Section):
    """The index_corpus job: decode, embed, score, write shards, build the index."""

    input: str = Field(paths.WORLD_IMAGES, description="Path or URI; {output_dir} expands.")
    input_format: Literal["parquet", "folder", "webdataset"] = "parquet"
    output: str = Field(
        paths.INDEX_CORPUS,
        description="Scored shards, index, errors, manifest; one folder per model indexed.",
    )
    id_column: str = "image_id"
    image_column: str | None = Field("image", description="Parquet column of image bytes.")
    path_column: str | None = Field(None, description="Parquet column of image paths (instead).")
    files_per_unit: int = Field(
        1,
        ge=1,
        description="Input files per unit of work (parquet, webdataset); a unit is what "
        "a resumed run skips when done.",
    )
    images_per_unit: int = Field(20_000, ge=1, description="Images per unit for folder input.")
    unit_retries: int = Field(
        2,
        ge=0,
        description="Times a unit is run again, from an empty folder, when its pipeline failed "
        "inside Ray rather than in this project's code or on the data (a node lost while the unit "
        "listed its files, a worker gone); bad images are error rows and never a failure.",
    )
    max_member_bytes: int = Field(
        64 * 2**20,
        ge=1,
        description="WebDataset: a tar member larger than this (after decompression) is an error "
        "row, never read into memory (tar bombs).",
    )
    tar_timeout_s: float = Field(
        600.0,
        gt=0,
        description="WebDataset: seconds a tar's reader (a child process) may be waited on; past "
        "it the reader is killed, the rest of the tar is an error row naming it and the job goes "
        "on. Bounds tars crafted to make the interpreter's tar parser loop or backtrack, and "
        "reads that stall.",
    )
    decode: PoolConfig = PoolConfig(batch_size=128, concurrency=2)
    block_images: int = Field(
        1024,
        ge=1,
        description="Decoded images per Ray Data block, at most (Ray's 128 MiB bound still holds): "
        "small images would otherwise fill a block with a whole unit (10,000 at 64 px), and one "
        "embed actor would wait for all of it to decode while the others had none. A unit's embed "
        "and score pools start no more actors than it has blocks.",
    )
    embed: PoolConfig = PoolConfig()
    score: PoolConfig = PoolConfig()
    scorers: dict[str, ScorerConfig] = Field(
        default_factory=lambda: {"lowlevel": ScorerConfig()},
        description="Scorer name (lowlevel, laion_mlp) -> weight and checkpoint.",
    )
    index: IndexConfig = IndexConfig()
    steps: list[Literal["embed", "index"]] = Field(
        default_factory=lambda: ["embed", "index"],
        description="embed: decode, embed and score into scored/; index: build the index from "
        "the scored shards there. [index] rebuilds it with other index settings, embedding "
        "nothing.",
    )
