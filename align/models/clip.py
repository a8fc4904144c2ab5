"""CLIP models: the project's tiny open_clip configs and one builder for every place that needs a
model (jobs, Ray actors, Serve replicas).

The configs in `model_configs/` are registered with open_clip by `register_model_configs()`, which
`build_clip` calls first, so a model builds the same way in the driver and in every Ray worker
without touching a model hub. Real models keep open_clip's own names, pretrained tags
('openai', 'laion2b_s32b_b82k', ...) and local checkpoint paths.
"""

from __future__ import annotations

import hashlib
import io as _io
import pickle
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from align.config import ModelConfig
from align.errors import UserError
from align.storage import io

# open_clip and torch are imported inside the functions that use them (4.7 s and 1.8 s here): a
# process that only checks a model config (a job's driver, Serve's ingress) does not pay for them.

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
PROJECT_MODELS = tuple(sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json")))


class ModelLoadError(UserError, ValueError):
    """An unknown model name, or a pretrained tag / checkpoint that cannot be loaded."""


def register_model_configs() -> None:
    """Register the project's model configs with open_clip (idempotent, cheap)."""
    import open_clip

    known = set(open_clip.list_models())
    if not set(PROJECT_MODELS) <= known:
        open_clip.add_model_config(MODEL_CONFIG_DIR)


@lru_cache(maxsize=8)
def text_tokenizer(name: str):
    """open_clip's tokenizer for model `name`, built once per process (SimpleTokenizer reads its
    BPE vocabulary from disk): shared by every model built here and by the tokenize stage."""
    import open_clip

    register_model_configs()
    return open_clip.get_tokenizer(name)


@dataclass(frozen=True)
class ModelFacts:
    """What downstream stages need to know of a model without building it."""

    embed_dim: int
    image_size: int
    context_length: int


def check_model(cfg: ModelConfig) -> ModelFacts:
    """Check, without building the model, that it can be built: a known name, and a pretrained
    tag open_clip knows for it or a readable checkpoint file. Cheap (the checkpoint is
    memory-mapped, not read).

    Raises:
        ModelLoadError: naming what is wrong.
    """
    import open_clip
    import torch

    register_model_configs()
    if cfg.name not in open_clip.list_models():
        raise ModelLoadError(
            f"unknown model name {cfg.name!r}; project models: {', '.join(PROJECT_MODELS)}; "
            f"open_clip knows {len(open_clip.list_models())} more (open_clip.list_models())"
        )
    pretrained = cfg.pretrained
    if pretrained and _is_path(pretrained):
        try:
            pretrained = io.local_copy(pretrained)  # s3://, gs://: a cached local copy
        except FileNotFoundError:
            pass
        if not Path(pretrained).is_file():
            raise ModelLoadError(f"checkpoint not found for model {cfg.name!r}: {cfg.pretrained}")
        try:
            torch.load(pretrained, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises several types for a file that is not a checkpoint
            raise ModelLoadError(f"cannot read checkpoint {pretrained}: {e}") from None
    elif pretrained and not open_clip.get_pretrained_cfg(cfg.name, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(cfg.name)
        raise ModelLoadError(
            f"model {cfg.name!r} has no pretrained tag {pretrained!r}; known: {tags or 'none'}"
        )
    model_cfg = open_clip.get_model_config(cfg.name)
    size = model_cfg["vision_cfg"]["image_size"]
    return ModelFacts(
        embed_dim=int(model_cfg["embed_dim"]),
        image_size=int(size[0] if isinstance(size, (list, tuple)) else size),
        context_length=int(model_cfg["text_cfg"].get("context_length", 77)),
    )


def _is_path(pretrained: str) -> bool:
    return "/" in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))


@dataclass
class Clip:
    """A CLIP model with its tokenizer and the facts downstream code needs."""

    model: Any  # open_clip.CLIP
    tokenizer: Any
    name: str
    embed_dim: int
    image_size: int
    context_length: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def build_clip(cfg: ModelConfig, device: str = "cpu") -> Clip:
    """Build (and load) a CLIP model from config.

    Args:
        cfg: model name (open_clip's or the project's), pretrained tag or checkpoint path.
        device: torch device.
    Returns:
        Clip with the model in eval mode.
    Raises:
        ModelLoadError: unknown name, missing checkpoint path, or a checkpoint that does not fit.
    """
    import open_clip
    import torch

    facts = check_model(cfg)
    pretrained = cfg.pretrained
    if pretrained and io.is_uri(pretrained):
        pretrained = io.local_copy(pretrained)  # fetched by check_model, reused here
    try:
        # Without weights, initialise from a fixed seed: every process (driver, each Ray actor)
        # then builds the same model, so embeddings from different stages agree.
        with torch.random.fork_rng(devices=[]):
            if not pretrained:
                torch.manual_seed(0)
            model = open_clip.create_model(
                cfg.name, pretrained=pretrained, precision=cfg.precision, device=device
            )
    except (RuntimeError, KeyError, ValueError, OSError, pickle.UnpicklingError) as e:
        raise ModelLoadError(
            f"cannot load model {cfg.name!r} with pretrained={pretrained!r}: {e}"
        ) from e
    model.eval()
    vision = model.visual
    return Clip(
        model=model,
        tokenizer=text_tokenizer(cfg.name),
        name=cfg.name,
        embed_dim=facts.embed_dim,
        image_size=facts.image_size,
        context_length=facts.context_length,
        mean=tuple(getattr(vision, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
        std=tuple(getattr(vision, "image_std", None) or open_clip.OPENAI_DATASET_STD),
    )


def model_id(cfg: ModelConfig) -> str:
    """The identity recorded with every similarity a model produced (e.g. in the pairs shards),
    so a later job can refuse data made by another model: 'name' for the project's seeded random
    init, else 'name:pretrained' (a tag or a checkpoint path)."""
    return f"{cfg.name}:{cfg.pretrained}" if cfg.pretrained else cfg.name


def weights_fingerprint(cfg: ModelConfig) -> dict:
    """What identifies the weights a job used: the model id and, for a checkpoint file (local or
    remote), its size and modification time, so that a checkpoint rewritten at the same path (a
    base model retrained in place, a model.pt re-exported to the same bucket) is not mistaken
    for the old one."""
    fingerprint = {"model": model_id(cfg)}
    if cfg.pretrained and _is_path(cfg.pretrained):
        version = io.file_version(cfg.pretrained)
        if version is not None:
            fingerprint["checkpoint"] = version
    return fingerprint


IMAGE_TOWER_PREFIX = "visual."


def image_tower_digest(cfg: ModelConfig) -> str:
    """sha256 of the image tower's weights and buffers (every state-dict entry under `visual.`,
    floats as float32). Two models of one digest embed every image alike: a model fine-tuned with
    its image tower locked (finetune.lock_image) searches the index its base built, and nothing
    re-embeds the corpus. A checkpoint file is read memory-mapped; a pretrained tag, the seeded
    init or a checkpoint in another key layout is built.

    Raises:
        ModelLoadError: as check_model, for a model that cannot be built.
    """
    import torch

    check_model(cfg)
    state = {}
    if cfg.pretrained and _is_path(cfg.pretrained):
        local = io.local_copy(cfg.pretrained)  # fetched by check_model, reused here
        state = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else {}
        state = {k.removeprefix("module."): v for k, v in state.items()}
    if not any(k.startswith(IMAGE_TOWER_PREFIX) for k in state):
        state = build_clip(cfg).model.state_dict()
    digest = hashlib.sha256()
    for key in sorted(k for k in state if k.startswith(IMAGE_TOWER_PREFIX)):
        tensor = state[key].detach().cpu().contiguous()
        tensor = tensor.float() if tensor.is_floating_point() else tensor
        digest.update(f"{key}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def export_checkpoint(model, path: str) -> None:
    """Write a checkpoint that `open_clip.create_model(name, pretrained=path)` loads: the plain
    state dict (no DeepSpeed/DDP wrapper prefixes), written atomically to a local path or URI."""

    import torch

    state = {k.removeprefix("module."): v.detach().cpu() for k, v in model.state_dict().items()}
    buffer = _io.BytesIO()
    torch.save({"state_dict": state}, buffer)
    io.write_bytes(path, buffer.getvalue())
