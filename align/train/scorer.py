"""The learned aesthetic scorer's training (the train_scorer job runs `fit` as one Ray task):
`rated_cnn` regressing the mean rating on pixels, scored by its correlation with held-out ratings."""

from __future__ import annotations

import numpy as np
import torch

from align.config import TrainScorerConfig
from align.models import aesthetics
from align.runtime.threads import TorchThreads


def fit(pixels: np.ndarray, rating: np.ndarray, ts: TrainScorerConfig) -> dict:
    """Train rated_cnn (one-cycle AdamW, MSE, horizontal flips); score it on held-out ratings.
    Runs as a Ray task: returns the state dict and the metrics."""
    threads = TorchThreads(max(1, int(ts.num_cpus)))  # Ray starts tasks with one thread
    torch.manual_seed(ts.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rng = np.random.default_rng(ts.seed)
    order = rng.permutation(len(rating))
    n_val = max(1, int(round(ts.validation_share * len(rating))))
    val, train = order[:n_val], order[n_val:]
    if len(train) < ts.batch_size:
        raise ValueError(
            f"train_scorer: {len(train)} usable training ratings, fewer than one batch "
            f"({ts.batch_size}); rate more images or lower train_scorer.batch_size"
        )
    x = aesthetics.pixels_to_unit(pixels, ts.image_size).to(device)
    y = torch.as_tensor(rating).to(device)
    net = aesthetics.rated_cnn(ts.image_size).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=ts.lr, weight_decay=ts.weight_decay)
    steps_per_epoch = len(train) // ts.batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        opt, ts.lr, total_steps=ts.epochs * steps_per_epoch
    )
    epoch_loss = []
    for _ in range(ts.epochs):
        net.train()
        shuffled = torch.as_tensor(rng.permutation(train), device=device)
        total = 0.0
        for s in range(steps_per_epoch):
            threads.refresh()
            batch = shuffled[s * ts.batch_size : (s + 1) * ts.batch_size]
            xb = x[batch]
            xb = torch.where(torch.rand(len(xb), 1, 1, 1, device=device) < 0.5, xb.flip(3), xb)
            loss = torch.nn.functional.mse_loss(net(xb).squeeze(1), y[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            total += loss.item()
        epoch_loss.append(total / steps_per_epoch)
    net.eval()
    with torch.no_grad():
        predicted = net(x[val]).squeeze(1).cpu().numpy()
    metrics = {
        "train_ratings": int(len(train)),
        **held_out_metrics(predicted, rating[val]),
        "epoch_loss": epoch_loss,
    }
    return {"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "metrics": metrics}


def held_out_metrics(predicted: np.ndarray, truth: np.ndarray) -> dict:
    """Pearson and Spearman correlation and MSE of predictions against held-out ratings."""

    def rank(v: np.ndarray) -> np.ndarray:
        return np.argsort(np.argsort(v))

    return {
        "validation_ratings": int(len(truth)),
        "validation_pearson": float(np.corrcoef(predicted, truth)[0, 1]),
        "validation_spearman": float(np.corrcoef(rank(predicted), rank(truth))[0, 1]),
        "validation_mse": float(np.mean((predicted - truth) ** 2)),
    }
