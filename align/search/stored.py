"""What an index folder holds, written and checked in one place: the file names, `_index.json`
(the model and its weights, the spec, the shards with their content hashes, recall), the corpus's
rating embeddings, and the check that an index was built with the model a job or the server is
about to use it with (name, pretrained weights or the same image tower, dimension, layout).

index_corpus writes, per index shard s (align.search.build.build_index_shard):
  shard-s.faiss            the FAISS index (IVF types share one trained quantizer and codebook)
  shard-s.rows.arrow       Arrow IPC file, row-aligned: image_id, aesthetic, caption, url
  shard-s.embeddings.npy   float16 (n, d) embeddings, row-aligned: exact scores and references
"""

from __future__ import annotations

import io as _io

import numpy as np

from align.config import ModelConfig
from align.errors import InputNotFound, UserError
from align.method.ranking import rating_embeddings
from align.models.clip import (
    ModelLoadError,
    check_model,
    image_tower_digest,
    weights_fingerprint,
)
from align.storage import io

# The folder's file names (the docstring above says what each holds).
SHARD_FILE = "shard-{:03d}.faiss"
ROWS_SUFFIX = ".rows.arrow"
EMBEDDINGS_SUFFIX = ".embeddings.npy"
INDEX_MANIFEST = "_index.json"
DUPLICATES_FILE = "duplicates.parquet"


class OldIndexLayout(UserError, ValueError):
    """An index folder without per-shard rows and embeddings files (rebuild: steps [index])."""


def check_layout(index_dir: str, manifest: dict) -> None:
    """Raises OldIndexLayout for an index without align.search.corpus's per-shard files."""
    if any("rows_file" not in entry for entry in manifest.get("shards", [])):
        raise OldIndexLayout(
            f"index at {index_dir} predates per-shard rows and embeddings files: rebuild it "
            f"from its scored shards with index_corpus.steps=[index]"
        )


def shard_file(index_dir: str, entry: dict, key: str) -> str:
    """A local path to one of a shard's files (`key`: file, rows_file, embeddings_file): a remote
    index's files are cached by the content hash `_index.json` records for them, so a rebuilt
    index at the same path is read anew."""
    return io.local_copy(f"{index_dir}/{entry[key]}", entry.get("sha256", {}).get(key))


def read_index_manifest(index_dir: str) -> dict:
    """An index folder's `_index.json`; InputNotFound naming the path when it has none."""
    path = f"{index_dir}/{INDEX_MANIFEST}"
    if not io.exists(path):
        raise InputNotFound(f"index manifest not found: {path}")
    return io.read_json(path)


def check_index(model: ModelConfig, index_corpus_dir: str) -> dict:
    """The index manifest of an index_corpus output, checked before any work: a missing index,
    or one built with another model, other weights or another dimension, fails here. Another
    checkpoint of the same image tower passes (shares_image_tower)."""

    manifest_path = f"{index_corpus_dir}/index/{INDEX_MANIFEST}"
    io.require_exists(manifest_path, "index (run index_corpus first)")
    index_manifest = io.read_json(manifest_path)
    facts = check_model(model)
    built_with = index_manifest["model"]["name"]
    same_model = (built_with, index_manifest["model"].get("pretrained")) == (
        model.name,
        model.pretrained,
    )
    if not same_model and not shares_image_tower(model, index_manifest):
        raise ModelLoadError(
            f"index at {index_corpus_dir} was built with model {built_with!r} "
            f"(pretrained={index_manifest['model'].get('pretrained')!r}) but the config's model is "
            f"{model.name!r} (pretrained={model.pretrained!r}), whose image tower is not the one "
            f"that embedded the corpus"
        )
    # The path alone is not the model: a model.pt retrained in place has other weights than the
    # ones that embedded the corpus, and its queries would search the wrong space.
    built_weights = index_manifest.get("weights")
    if same_model and built_weights is not None and built_weights != weights_fingerprint(model):
        raise ModelLoadError(
            f"{model.pretrained} was rewritten after the index in {index_corpus_dir} was built "
            f"(weights {built_weights} then, {weights_fingerprint(model)} now); index the corpus "
            f"again with it"
        )
    if index_manifest["dim"] != facts.embed_dim:
        raise ModelLoadError(
            f"index dimension {index_manifest['dim']} does not match the model's {facts.embed_dim}"
        )
    check_layout(f"{index_corpus_dir}/index", index_manifest)
    return index_manifest


def shares_image_tower(model: ModelConfig, index_manifest: dict) -> bool:
    """Whether `model` embeds images exactly as the model that built the index did (the same
    architecture, an image tower of the same weights): then its queries search the index as it
    is, whatever its text tower learnt since (a fine-tune with finetune.lock_image)."""
    built = index_manifest.get("image_tower")
    return (
        built is not None
        and index_manifest["model"]["name"] == model.name
        and built == image_tower_digest(model)
    )


def write_index_manifest(
    index_dir: str, built: dict, recall: dict, model: ModelConfig, duplicates: dict | None = None
) -> dict:
    """`_index.json` for a built index (align.search.build.build_sharded_index: shards with
    offsets, spec), naming the model and its weights, its measured recall and what became of
    exact duplicates (`duplicates`: found, dropped); the corpus's rating embeddings beside it."""

    shards = built["shards"]
    level_sums = [s.pop("rating_level_sums", None) for s in shards]
    rating_file = None
    if level_sums and all(ls is not None for ls in level_sums):
        rating_file = write_rating_embeddings(index_dir, level_sums)
    index_manifest = {
        "model": model.model_dump(),
        # The weights themselves (a checkpoint rewritten at the same path is another model).
        "weights": weights_fingerprint(model),
        # What every image embedding depends on: a model with this image tower searches the
        # index as it is (shares_image_tower).
        "image_tower": image_tower_digest(model),
        "dim": built["spec"].dim,
        "count": sum(s["count"] for s in shards),
        "spec": built["spec"].to_dict(),
        "shards": shards,
        "recall": recall,
        "recall_at_10": recall.get("recall_at_k"),
        "metric": "inner product on L2-normalised embeddings (cosine)",
        # clip-back's aesthetic_score 0-9: mean embedding per rating level (align.method.ranking).
        "rating_embeddings": rating_file,
        "exact_duplicates": {**(duplicates or {}), "file": DUPLICATES_FILE},
    }
    io.write_json(f"{index_dir}/{INDEX_MANIFEST}", index_manifest)
    return index_manifest


RATING_EMBEDDINGS = "rating_embeddings.npy"


def write_rating_embeddings(index_dir: str, level_sums: list[tuple]) -> str:
    """The corpus's rating embeddings ((levels, d) float32, .npy) from every shard's sums."""

    sums = sum(s for s, _ in level_sums)
    counts = sum(c for _, c in level_sums)
    buffer = _io.BytesIO()
    np.save(buffer, rating_embeddings(sums, counts))
    io.write_bytes(f"{index_dir}/{RATING_EMBEDDINGS}", buffer.getvalue())
    return RATING_EMBEDDINGS


def read_rating_embeddings(index_dir: str, manifest: dict) -> np.ndarray | None:
    """The rating embeddings an index was built with, or None (an index without them)."""

    name = manifest.get("rating_embeddings")
    if not name:
        return None
    return np.load(_io.BytesIO(io.read_bytes(f"{index_dir}/{name}")))
