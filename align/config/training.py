"""The training jobs' settings: finetune (retrieval DPO + InfoNCE), pretrain (its defaults here) and
train_scorer."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from align.config.sections import PoolConfig, Section
from align.storage import paths


class DpoConfig(Section):
    """Retrieval DPO (docs/method.md, Retrieval DPO; align.method.losses.retrieval_dpo_loss)."""

    beta: float = Field(0.1, gt=0)
    temperature: Literal["logit_scale"] | float = Field(
        "logit_scale",
        description="tau of pi(x|q) ~ exp(s/tau): 'logit_scale' uses 1 / the model's learned "
        "logit scale (detached), a number fixes it.",
    )
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="eps of conservative DPO.")
    ipo: bool = Field(False, description="IPO instead of sigmoid DPO.")
    reference: Literal["precomputed", "recompute"] = Field(
        "precomputed",
        description="precomputed: the pairs' stored reference similarities (no reference "
        "forward pass); recompute: a frozen copy of the initial model on every worker.",
    )

    @field_validator("temperature")
    @classmethod
    def _positive_temperature(cls, v):
        if not isinstance(v, str) and v <= 0:
            raise ValueError("must be > 0 or 'logit_scale'")
        return v


class OptimConfig(Section):
    """AdamW with linear warm-up then cosine (or constant) learning rate."""

    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = Field(1e-6, gt=0)
    warmup_steps: int = Field(10, ge=0)
    schedule: Literal["cosine", "constant"] = "cosine"
    grad_clip: float = Field(1.0, ge=0, description="Max gradient norm (0: no clipping).")
    fused: bool = Field(
        True,
        description="torch's fused AdamW kernel, one pass over every parameter. On CPU torch "
        "otherwise loops over the tensors: 26 ms against 3.5 ms a step for micro-rn-clip on one "
        "thread, most of it the 3.2M-row token embedding.",
    )


class DeepSpeedConfig(Section):
    zero_stage: int = Field(2, ge=0, le=3)
    bf16: Literal["auto", "on", "off"] = Field(
        "auto", description="auto: bf16 on GPU, fp32 on CPU (DeepSpeed's CPU accelerator)."
    )


class TrainScalingConfig(Section):
    """Ray Train's ScalingConfig: one training worker per GPU, or CPU workers."""

    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(
        1.0,
        gt=0,
        description="Reserved per worker; leave room for the Ray Data ingest tasks beside them.",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="Ray Train's placement of the workers: PACK fills a node first (fast "
        "collectives); SPREAD puts them on different nodes where it can (a lost node costs "
        "fewer workers).",
    )
    threads: int | None = Field(None, ge=1, description="torch threads per worker (None: Ray's).")
    threads_follow_load: bool = Field(
        True,
        description="Each worker uses no more torch threads than the cores other processes "
        "leave free, re-checked as it trains (a thread beside a busy process stalls every op). "
        "false: always `threads`, so two runs repeat bit for bit (a float sum rounds differently "
        "split over another number of threads), however busy the machine.",
    )


class JoinConfig(Section):
    """Ray Data's hash join that attaches image bytes to the pairs."""

    num_partitions: int = Field(2, ge=1)
    num_cpus: float = Field(0.1, gt=0, description="Per join aggregator actor.")


class FinetuneConfig(Section):
    """The finetune job: Ray Train + DeepSpeed (or DDP), retrieval DPO + contrastive."""

    objective: Literal["dpo", "contrastive"] = Field(
        "dpo",
        description="dpo: L_dpo + contrastive_weight * L_contrastive (alignment); contrastive: "
        "CLIP InfoNCE on image-caption pairs alone (pretraining the demo's base model).",
    )
    pairs: str = Field(paths.PAIRS, description="Pairs shards.")
    images: str = Field(
        paths.WORLD_IMAGES, description="Image shards holding the pairs' image bytes."
    )
    captions: str = Field(
        paths.WORLD_IMAGES, description="Image-caption shards for the contrastive term."
    )
    output: str = Field(paths.FINETUNE, description="Run storage, export, metrics.")
    contrastive_weight: float = Field(
        0.5, ge=0, description="lambda of L_dpo + lambda * L_contrastive (0: no caption stream)."
    )
    pairs_per_batch: int = Field(64, ge=1, description="Per worker and step.")
    captions_per_batch: int = Field(64, ge=2, description="Per worker and step.")
    max_steps: int = Field(100, ge=1, description="Optimiser steps; the streams repeat as needed.")
    backend: Literal["deepspeed", "ddp"] = "deepspeed"
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    scaling: TrainScalingConfig = TrainScalingConfig()
    dpo: DpoConfig = DpoConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint_every: int = Field(50, ge=1, description="Steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(
        2, ge=-1, description="Worker-group restarts from the last checkpoint (-1: no limit)."
    )
    max_bad_steps: int = Field(
        3, ge=1, description="Consecutive non-finite-loss steps (skipped) before the run stops."
    )
    decode: PoolConfig = PoolConfig(batch_size=128, concurrency=2, num_cpus=0.25)

    @property
    def uses_pairs(self) -> bool:
        """The pairs stream feeds the DPO term."""
        return self.objective == "dpo"

    @property
    def uses_captions(self) -> bool:
        """The caption stream feeds InfoNCE: the whole loss, or DPO's regulariser when lambda > 0."""
        return self.objective == "contrastive" or self.contrastive_weight > 0

    pair_images: Literal["auto", "broadcast", "join"] = Field(
        "auto",
        description="How pairs get their image bytes: broadcast (every decode actor holds the "
        "pairs' images), join (Ray Data hash join), auto (broadcast up to broadcast_max_mb).",
    )
    broadcast_max_mb: int = Field(2048, ge=0)
    join: JoinConfig = JoinConfig()
    shuffle_buffer: int = Field(1024, ge=0, description="Local shuffle buffer, rows per worker.")
    cache_decoded_mb: int = Field(
        1024,
        ge=0,
        description="A training stream whose decoded images fit in this many MB is decoded once "
        "and kept in the object store (each epoch in a new block order); a larger one is read "
        "and decoded again every epoch. 0: never cache. Only on a one-node cluster: on several, "
        "a lost node would take cached blocks that cannot be rebuilt.",
    )
    seed: int = 0
    preserve_order: bool = Field(
        True,
        description="Ray Data hands the workers their blocks in a fixed order (Ray's "
        "execution_options.preserve_order), so every step's batches follow from `seed` (the "
        "weights too, where the thread count repeats: scaling.threads_follow_load). false: "
        "blocks in the order their tasks finish, which can feed a stream decoded every epoch "
        "faster when some tasks lag.",
    )
    batchnorm: Literal["auto", "train", "frozen"] = Field(
        "auto",
        description="BatchNorm layers (ResNet towers): frozen keeps the base model's running "
        "statistics and normalises with them (eval mode) while their gains and biases still "
        "train, as ResNet CLIPs are fine-tuned; train updates them from each batch; auto: frozen "
        "for dpo (a small shift on top of a trained model, whose reference log-probabilities "
        "were computed in eval mode), train for contrastive pretraining.",
    )

    lock_text: bool = Field(
        False,
        description="Freeze the text tower (open_clip's --lock-text): only the image tower, the "
        "temperature and what lock_text_unlocked_layers leaves open learn.",
    )
    lock_text_unlocked_layers: int = Field(
        0,
        ge=0,
        description="Text layer groups left trainable from the end (open_clip's "
        "--lock-text-unlocked-layers): the projection, then the last block with its LayerNorm.",
    )
    lock_image: bool = Field(
        False,
        description="Freeze the image tower (open_clip's --lock-image, as LiT trains), its "
        "BatchNorm statistics too.",
    )
    lock_image_unlocked_groups: int = Field(
        0,
        ge=0,
        description="Image layer groups left trainable from the end (open_clip's "
        "--lock-image-unlocked-groups; ViT towers only).",
    )

    @model_validator(mode="after")
    def _something_trains(self):
        if (
            self.lock_text
            and self.lock_image
            and not (self.lock_text_unlocked_layers or self.lock_image_unlocked_groups)
        ):
            raise ValueError(
                "lock_text and lock_image freeze both towers and leave nothing to train: "
                "unlock some layers (lock_text_unlocked_layers, lock_image_unlocked_groups)"
            )
        return self

    @property
    def batchnorm_frozen(self) -> bool:
        """Whether BatchNorm layers run in eval mode during training."""
        if self.batchnorm == "auto":
            return self.objective == "dpo"
        return self.batchnorm == "frozen"


class TrainScorerConfig(Section):
    """The train_scorer job: the rated_cnn aesthetic scorer, learned from people's ratings."""

    ratings: str = Field(paths.WORLD_RATINGS, description="The ratings contract.")
    images: str = Field(paths.WORLD_IMAGES, description="Images contract (bytes).")
    output: str = Field(paths.AESTHETIC_SCORER, description="model.pt, metrics.json.")
    image_size: int = Field(32, ge=16, description="Input side; a multiple of 16.")
    epochs: int = Field(40, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(2e-3, gt=0, description="Peak of a one-cycle schedule (AdamW).")
    weight_decay: float = Field(1e-4, ge=0)
    validation_share: float = Field(0.1, gt=0, lt=1, description="Ratings held out to score it.")
    num_cpus: float = Field(2, gt=0, description="CPUs of the training task (its torch threads).")
    num_gpus: float = Field(0, ge=0)
    decode: PoolConfig = PoolConfig(batch_size=256, concurrency=2, num_cpus=0.25)
    seed: int = 0


# Where the pretrain section differs from finetune's defaults (also under a `pretrain:` section
# of a file that leaves them out).
PRETRAIN_DEFAULTS = {
    "objective": "contrastive",
    "output": paths.PRETRAIN,
    "max_steps": 300,
    "captions_per_batch": 128,
    "optim": {"lr": 1e-3, "warmup_steps": 10},
}
