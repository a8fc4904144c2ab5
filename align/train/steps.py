"""The fine-tune's step, without Ray: inputs to tensors, one forward, the loss terms, the
learning-rate schedule, the DeepSpeed config, and the metrics plot.

One step is one forward of the model over every image and text of the step: the chosen and the
rejected images and the queries of the pair batch (retrieval DPO), and the images and captions of
the caption batch (CLIP InfoNCE). total = L_dpo + lambda * L_contrastive
(docs/method.md, Retrieval DPO).
align/train/trainer.py runs it inside Ray Train workers; tests run it directly.
"""

from __future__ import annotations

import io
import json
import math
import statistics
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from align.config import FinetuneConfig, OptimConfig
from align.errors import UserError
from align.method.losses import clip_contrastive_loss, gather_across_workers, retrieval_dpo_loss

# matplotlib is imported inside the plotting function (0.5 s here): only the end of a run draws.

# Metrics every step reports (averaged over workers); the JSONL rows and the plot use them.
STEP_METRICS = (
    "loss",
    "dpo_loss",
    "contrastive_loss",
    "dpo_accuracy",
    "reward_margin",
    "chosen_reward",
    "rejected_reward",
    "ref_sim_gap",
    "logit_scale",
)


class NonFiniteLoss(UserError, RuntimeError):
    """The loss was NaN or inf for `max_bad_steps` consecutive steps: the run cannot go on."""


@dataclass
class StepInputs:
    """Tensors of one step on one worker; either part may be absent (None).

    queries/captions are token ids; *_images are normalised float images (N, 3, S, S);
    chosen_ref/rejected_ref are the stored reference similarities of the pairs.
    """

    queries: torch.Tensor | None = None
    chosen_images: torch.Tensor | None = None
    rejected_images: torch.Tensor | None = None
    chosen_ref: torch.Tensor | None = None
    rejected_ref: torch.Tensor | None = None
    caption_images: torch.Tensor | None = None
    captions: torch.Tensor | None = None

    @property
    def num_pairs(self) -> int:
        return 0 if self.queries is None else len(self.queries)

    @property
    def num_captions(self) -> int:
        return 0 if self.captions is None else len(self.captions)


def clip_forward(model, images: torch.Tensor | None, texts: torch.Tensor | None):
    """(image features, text features, logit scale) from open_clip's forward. Called on the
    wrapped model (DeepSpeed engine, DDP) so that their forward hooks run; features come out
    L2-normalised and the logit scale exponentiated."""
    out = model(image=images, text=texts)
    if isinstance(out, dict):
        return out["image_features"], out["text_features"], out["logit_scale"]
    return out[0], out[1], out[2]


def step_losses(
    model,
    inputs: StepInputs,
    cfg: FinetuneConfig,
    reference_model=None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step's total loss and its metrics (detached scalars).

    Args:
        model: the policy (possibly wrapped), called once on every image and text of the step.
        inputs: the step's pairs and/or captions.
        cfg: the finetune config (objective, lambda, DPO settings).
        reference_model: the frozen reference model when cfg.dpo.reference == 'recompute'.
    Returns:
        (total loss, metrics): total = L_dpo + lambda * L_contrastive for objective 'dpo',
        L_contrastive for 'contrastive'.
    """
    p, c = inputs.num_pairs, inputs.num_captions
    images = [t for t in (inputs.chosen_images, inputs.rejected_images) if p] + (
        [inputs.caption_images] if c else []
    )
    texts = ([inputs.queries] if p else []) + ([inputs.captions] if c else [])
    image_features, text_features, logit_scale = clip_forward(
        model, torch.cat(images), torch.cat(texts)
    )
    zero = image_features.new_zeros(())
    metrics = {"logit_scale": logit_scale.detach().float()}
    total = zero
    if c:
        contrastive = clip_contrastive_loss(
            gather_across_workers(image_features[2 * p :]),  # the global batch's negatives
            gather_across_workers(text_features[p:]),
            logit_scale,
        )
        metrics["contrastive_loss"] = contrastive.detach()
        weight = 1.0 if cfg.objective == "contrastive" else cfg.contrastive_weight
        total = total + weight * contrastive
    if p:
        dpo, dpo_metrics = _dpo_term(
            inputs, cfg, image_features, text_features, logit_scale, reference_model
        )
        metrics.update(dpo_metrics)
        total = total + dpo
    metrics["loss"] = total.detach()
    return total, metrics


def _dpo_term(
    inputs: StepInputs,
    cfg: FinetuneConfig,
    image_features,
    text_features,
    logit_scale,
    reference_model,
):
    """Retrieval DPO over the step's pairs: policy similarities from this forward, reference
    similarities stored with the pairs or recomputed by the frozen reference model."""
    p = inputs.num_pairs
    metrics = {}
    query = text_features[:p].float()
    policy_chosen = (query * image_features[:p].float()).sum(-1)
    policy_rejected = (query * image_features[p : 2 * p].float()).sum(-1)
    ref_chosen, ref_rejected = inputs.chosen_ref, inputs.rejected_ref
    if reference_model is not None:
        with torch.no_grad():
            r_img, r_txt, _ = clip_forward(
                reference_model,
                torch.cat([inputs.chosen_images, inputs.rejected_images]),
                inputs.queries,
            )
        ref_chosen = (r_txt.float() * r_img[:p].float()).sum(-1)
        ref_rejected = (r_txt.float() * r_img[p:].float()).sum(-1)
        if inputs.chosen_ref is not None:
            # How far the stored similarities are from the reference model's own: ~1e-3
            # (float16 index embeddings) when the pairs were made by this model.
            gap = torch.cat([ref_chosen - inputs.chosen_ref, ref_rejected - inputs.rejected_ref])
            metrics["ref_sim_gap"] = gap.abs().mean().detach()
    temperature = (
        1.0 / logit_scale.detach().float()
        if cfg.dpo.temperature == "logit_scale"
        else cfg.dpo.temperature
    )
    dpo, dpo_metrics = retrieval_dpo_loss(
        policy_chosen,
        policy_rejected,
        ref_chosen.float(),
        ref_rejected.float(),
        beta=cfg.dpo.beta,
        temperature=temperature,
        label_smoothing=cfg.dpo.label_smoothing,
        ipo=cfg.dpo.ipo,
    )
    metrics["dpo_loss"] = dpo.detach()
    metrics.update(dpo_metrics)
    return dpo, metrics


def freeze_batchnorm_statistics(model: torch.nn.Module) -> int:
    """Put every BatchNorm layer in eval mode: it normalises with the running statistics it has
    and stops updating them, while its gain and bias stay trainable. Returns how many layers.

    A fine-tune on preference pairs sees a narrow slice of the corpus (the top candidates of the
    training queries); in train mode each batch's statistics would replace the base model's, and
    move every embedding, relevant or not. Nothing calls ``model.train()`` after this.
    """
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for layer in layers:
        layer.eval()
    return len(layers)


def lock_towers(model: torch.nn.Module, cfg: FinetuneConfig) -> int:
    """Freeze the towers `cfg.lock_text` / `cfg.lock_image` name, through open_clip's own
    lock_text_tower / lock_image_tower (the layers its --lock-* flags leave open stay open).
    A locked image tower's BatchNorm layers stop updating their statistics too, so the tower does
    not change at all. Returns how many parameter tensors are frozen."""
    if cfg.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.lock_text_unlocked_layers)
    if cfg.lock_image:
        try:
            model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups)
        except AssertionError as e:  # open_clip's ResNet towers lock only whole
            raise UserError(f"finetune.lock_image_unlocked_groups: {e}") from None
        if not cfg.lock_image_unlocked_groups:
            freeze_batchnorm_statistics(model.visual)
    return sum(not p.requires_grad for p in model.parameters())


def adamw(model: torch.nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the model's trained parameters, weight decay as CLIP trains (none on gains,
    biases, embeddings and the logit scale), torch's fused kernel unless `optim.fused` is off."""
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embedding" not in name else rest).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": optim.weight_decay},
            {"params": rest, "weight_decay": 0.0},
        ],
        lr=optim.lr,
        betas=optim.betas,
        eps=optim.eps,
        fused=optim.fused or None,  # None: torch's default (a loop over the tensors on CPU)
    )


def lr_multiplier(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warm-up over warmup_steps, then constant or cosine decay to 0 at max_steps."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    span = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def deepspeed_config(cfg: FinetuneConfig, micro_batch: int, bf16: bool) -> dict:
    """DeepSpeed's config from ours; the optimiser and schedule are passed in as objects."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        # torch's AdamW as the client optimiser: no compiled DeepSpeed optimiser op needed.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 1 << 30,
    }


def skip_shared_memory_all_reduce_op(deepspeed) -> None:
    """On CPU, DeepSpeed's communication backend compiles a shared-memory all-reduce op when it
    starts (about a minute, in every new environment) that only its inference tensor parallelism
    calls; training all-reduces through torch.distributed (gloo). Marked incompatible, it is not
    built."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def metrics_jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()


def read_metrics_jsonl(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def plot_metrics(records: list[dict], title: str) -> bytes:
    """PNG of the loss terms, DPO accuracy and reward margin, and learning rate against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (
        ("loss", ("loss", "dpo_loss", "contrastive_loss")),
        ("DPO", ("dpo_accuracy", "reward_margin")),
        ("learning rate", ("lr",)),
    )
    # Only panels with data (a contrastive run has no DPO terms).
    panels = [p for p in panels if any(r.get(k) is not None for r in records for k in p[1])]
    panels = panels or [("loss", ("loss",))]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels, strict=True):
        for key in keys:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, label=key)
        ax.set_title(name)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def throughput(records: list[dict], warmup: int = 2) -> dict:
    """Median pairs/s and captions/s over the steps after the first `warmup` (compilation,
    stream start-up)."""
    timed = [r for r in records[warmup:] if r.get("time_s")] or records
    if not timed:
        return {}
    step_s = statistics.median(r["time_s"] for r in timed)
    return {
        "step_s": round(step_s, 4),
        "pairs_per_s": round(timed[-1]["pairs"] / step_s, 2),
        "captions_per_s": round(timed[-1]["captions"] / step_s, 2),
    }


def endless_batches(shard, batch_size: int, shuffle_buffer: int, seed: int) -> Iterator[dict]:
    """Full batches from a Ray Data shard, epoch after epoch (each epoch re-runs the stream).
    Every worker's shard holds the same number of rows, so the workers step in lockstep."""
    epoch = 0
    while True:
        produced = 0
        for batch in shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            drop_last=True,
            local_shuffle_buffer_size=shuffle_buffer or None,
            local_shuffle_seed=seed + epoch if shuffle_buffer else None,
        ):
            produced += 1
            yield batch
        if not produced:
            raise RuntimeError(f"a data shard produced no full batch of {batch_size} rows")
        epoch += 1
