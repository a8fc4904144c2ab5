"""train_scorer: a learned aesthetic scorer (`rated_cnn`) from people's ratings.

    python -m pipelines.train_scorer --config configs/demo.yaml [key=value ...]

The paper re-ranks with public aesthetic models trained on human ratings (the LAION predictor,
MANIQA, ...). This job trains such a model for a corpus that has ratings: a small CNN on pixels
(align/aesthetics.py: rated_cnn) regressing the mean rating, on the synthetic world's
`ratings.parquet` (or any table of the ratings contract with an images table). The rated images
are decoded in Ray Data tasks; the network trains in one Ray task (CPUs or a GPU from config).
index_corpus then uses it as the scorer `rated_cnn` with `checkpoint: {output}/model.pt`.

Output under `train_scorer.output`: `model.pt`, `metrics.json` (validation Pearson and Spearman
correlation with the held-out ratings, MSE, per-epoch loss), `errors/` (rated images that are
missing or do not decode) and `_manifest.json`.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pyarrow as pa

from align import aesthetics, io, paths
from align.cli import run_job
from align.config import Config, TrainScorerConfig
from align.contracts import ERRORS, RATINGS, conform, require_columns
from align.errors import InputNotFound
from align.log import get_logger
from align.manifest import JobManifest, empty_output_dir
from align.runtime import init_ray
from align.stages import collect_ok_rows, task_pool

log = get_logger("train_scorer")


def output_dir(config: Config) -> str:
    return config.expand(config.train_scorer.output)


def decode_rated(config: Config, ratings: pa.Table) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """(pixels (N, S, S, 3) uint8, ratings (N,), error rows): the rated images, decoded in Ray
    Data tasks; rated ids with no image, or an image that does not decode, become error rows."""
    import ray.data

    from actors.decode import decode_batch

    ts = config.train_scorer
    ids = ratings["image_id"].to_numpy(zero_copy_only=False)
    images = io.read_image_table(config.expand(ts.images), ids, ["image_id", "image"])
    rows = io.align_rows(ids, images)
    errors = [
        {"row_id": str(i), "stage": "read", "error": "rated image not in train_scorer.images"}
        for i in ids[rows < 0]
    ]
    step = ts.decode.batch_size
    blocks = [images.slice(i, step) for i in range(0, images.num_rows, step)] or [images]
    ds = ray.data.from_arrow(blocks).map_batches(
        decode_batch,
        fn_kwargs={"image_size": ts.image_size, "max_pixels": config.max_image_pixels},
        **task_pool(ts.decode),
    )
    decoded, decode_errors = collect_ok_rows(ds, ["image_id", "pixels"], "decode")
    errors += decode_errors
    if decoded["image_id"] is None:
        raise InputNotFound(
            f"none of the {len(ids)} rated images of {ts.ratings} could be read or decoded"
        )
    got_ids = decoded["image_id"].astype(object)
    rating = ratings["rating"].to_numpy()[io.align_rows(got_ids, ratings)]
    return decoded["pixels"], rating.astype(np.float32), errors


def fit(pixels: np.ndarray, rating: np.ndarray, ts: TrainScorerConfig) -> dict:
    """Train rated_cnn (one-cycle AdamW, MSE, horizontal flips); score it on held-out ratings.
    Runs as a Ray task: returns the state dict and the metrics."""
    import torch

    from align.runtime import TorchThreads

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
    truth = rating[val]
    rank = lambda v: np.argsort(np.argsort(v))  # noqa: E731
    metrics = {
        "train_ratings": int(len(train)),
        "validation_ratings": int(n_val),
        "validation_pearson": float(np.corrcoef(predicted, truth)[0, 1]),
        "validation_spearman": float(np.corrcoef(rank(predicted), rank(truth))[0, 1]),
        "validation_mse": float(np.mean((predicted - truth) ** 2)),
        "epoch_loss": epoch_loss,
    }
    return {"state_dict": {k: v.cpu() for k, v in net.state_dict().items()}, "metrics": metrics}


def train_scorer(config: Config) -> dict:
    import ray

    ts = config.train_scorer
    out = output_dir(config)
    manifest = JobManifest("train_scorer", config, output=out)  # removes a stale manifest
    ratings_path = config.expand(ts.ratings)
    io.require_exists(ratings_path, "ratings (train_scorer.ratings)")
    aesthetics.rated_cnn(ts.image_size)  # fails fast on a bad image size
    ratings = io.read_parquet(ratings_path)
    require_columns(RATINGS, ratings.column_names, "train_scorer.read")
    init_ray(config.ray)
    with manifest.stage("decode"):
        pixels, rating, errors = decode_rated(config, ratings)
    log.info("%d rated images decoded, %d error rows; training", len(rating), len(errors))
    t0 = time.perf_counter()
    with manifest.stage("train"):
        task = ray.remote(num_cpus=ts.num_cpus, num_gpus=ts.num_gpus)(fit)
        result = ray.get(task.remote(pixels, rating, ts))
    net = aesthetics.rated_cnn(ts.image_size)
    net.load_state_dict(result["state_dict"])
    aesthetics.save_rated_cnn(net, ts.image_size, f"{out}/{paths.MODEL_FILE}")
    metrics = {**result["metrics"], "seconds": time.perf_counter() - t0}
    io.write_json(f"{out}/metrics.json", metrics)
    empty_output_dir(f"{out}/errors", "train_scorer")
    if errors:
        io.write_parquet(
            conform(pa.Table.from_pylist(errors), ERRORS), f"{out}/errors/part-0.parquet"
        )
    manifest.extra.update({"export": f"{out}/{paths.MODEL_FILE}", "metrics": metrics})
    log.info(
        "rated_cnn: validation Pearson %.3f, Spearman %.3f on %d held-out ratings",
        metrics["validation_pearson"],
        metrics["validation_spearman"],
        metrics["validation_ratings"],
    )
    return manifest.write(
        out, rows_in=ratings.num_rows, rows_out=len(rating), rows_error=len(errors)
    )


def main(argv: list[str] | None = None) -> int:
    return run_job("train_scorer", train_scorer, argv)


if __name__ == "__main__":
    sys.exit(main())
