"""Ray Data stages, one file each: heavy set-up in `__init__`, a pure `__call__(batch) -> batch`.

Each stage module also offers its builder, `<name>_stage(ds, ...)`, that applies the stage to a
dataset from its config section: the function or class, its constructor arguments and its pool
arguments (batch size, pool size, CPUs, GPUs from config, never hard-coded), so a job chains
stages rather than assembling `map_batches` arguments.
"""

from __future__ import annotations

from align.config import ModelConfig
from align.models.clip import build_clip
from align.runtime.threads import TorchThreads

# torch is imported inside the functions that use it (1.8 s here): the driver that builds a
# pipeline and the decode tasks import the stages' modules and never run a model.


def require_batch_columns(batch: dict, required: dict[str, str], stage: str) -> None:
    """Raise ValueError naming the stage and each missing column with what it should hold."""
    missing = [f"'{name}' ({what})" for name, what in required.items() if name not in batch]
    if missing:
        raise ValueError(
            f"stage {stage} needs column(s) {', '.join(missing)}; batch has {sorted(batch)}"
        )


def load_clip_for_actor(model: dict, threads: int | None, fp16_on_gpu: bool = False):
    """Build the configured CLIP model inside an actor: torch threads up to `threads` (else the
    CPUs Ray assigned) and never more than the CPUs other work leaves free, the GPU when the
    actor was given one. Returns (Clip, device, TorchThreads: call its refresh() per batch)."""
    import torch

    torch_threads = TorchThreads(threads)
    cfg = ModelConfig.model_validate(model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if fp16_on_gpu and device == "cuda" and cfg.precision == "fp32":
        cfg = cfg.model_copy(update={"precision": "fp16"})
    return build_clip(cfg, device=device), device, torch_threads
