"""Losses for the fine-tune: retrieval DPO and the CLIP contrastive loss
(docs/method.md, Retrieval DPO).

The model is treated as a policy over images given the query, pi(x|q) proportional to
exp(s(q, x) / tau) with s the cosine similarity. The normaliser is shared by the chosen and the
rejected image, so it cancels in the log-ratio, and with a frozen reference model:

    delta = beta / tau * [(s(q, x_w) - s_ref(q, x_w)) - (s(q, x_l) - s_ref(q, x_l))]

This is TRL's sigmoid DPO with log pi = s / tau. The total is L_dpo + lambda * L_contrastive.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def retrieval_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    *,
    beta: float,
    temperature: float | torch.Tensor,
    label_smoothing: float = 0.0,
    ipo: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO on cosine similarities (one value per pair in each tensor).

    Args:
        policy_chosen, policy_rejected: s_theta(q, x_w), s_theta(q, x_l).
        ref_chosen, ref_rejected: the frozen reference model's similarities (precomputed).
        beta: DPO strength.
        temperature: tau (a float, or 1 / the model's logit scale).
        label_smoothing: eps of conservative DPO (sigmoid only).
        ipo: use the IPO objective instead of sigmoid DPO.
    Returns:
        (mean loss, metrics: reward margin, accuracy = share of pairs with a positive margin,
        chosen and rejected rewards).
    """
    # Log-ratio of policy to reference for each image; log pi = s / tau (normaliser cancels).
    chosen_logratio = (policy_chosen - ref_chosen) / temperature
    rejected_logratio = (policy_rejected - ref_rejected) / temperature
    logits = chosen_logratio - rejected_logratio
    if ipo:
        # IPO (Azar et al. 2023), as TRL states it: (logits - 1 / (2 beta))^2.
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    else:
        # delta = beta / tau * [...]; L = -(1 - eps) log sig(delta) - eps log sig(-delta).
        delta = beta * logits
        losses = -(1.0 - label_smoothing) * F.logsigmoid(delta) - label_smoothing * F.logsigmoid(
            -delta
        )
    chosen_reward = beta * chosen_logratio.detach()
    rejected_reward = beta * rejected_logratio.detach()
    margin = chosen_reward - rejected_reward
    return losses.mean(), {
        "reward_margin": margin.mean(),
        "dpo_accuracy": (margin > 0).float().mean(),
        "chosen_reward": chosen_reward.mean(),
        "rejected_reward": rejected_reward.mean(),
    }


def gather_across_workers(features: torch.Tensor) -> torch.Tensor:
    """Every training worker's rows, in rank order, where this worker's keep their gradient.

    CLIP's negatives are the whole global batch (open_clip's `gather_features` without
    gather_with_grad): the other workers' rows are copies, and since every worker computes the
    same global loss, the gradient DDP or DeepSpeed averages is the single-process gradient of
    the global batch (divided by the number of workers, which Adam does not see). Without it,
    two workers of 128 captions train on 128 negatives each, not 256. Every worker must call it
    with the same number of rows (the training streams give full batches). Outside a
    distributed run it returns `features` unchanged."""

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    with torch.no_grad():  # all_gather has no autograd on gloo; the local rows carry it
        parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, features.detach().contiguous())
    parts[dist.get_rank()] = features
    return torch.cat(parts)


def clip_contrastive_loss(
    image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE of CLIP (Radford et al. 2021) over a batch of matching pairs.

    Embeddings are L2-normalised here; row i of each is a matching image-caption pair.
    """
    image = F.normalize(image_embeddings, dim=-1)
    text = F.normalize(text_embeddings, dim=-1)
    logits = logit_scale * image @ text.T
    labels = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
