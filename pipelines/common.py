"""What every job entry point shares: the command line and the error contract.

`python -m pipelines.<job> --config PATH [key=value ...]`. A bad config, a missing input, a table
from the wrong job or a model that cannot load ends the job with exit code 2 and one line on
stderr naming what is wrong; other failures keep their traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from align.aesthetics import ScorerError
from align.config import Config, ConfigError, PoolConfig, load_config
from align.contracts import ContractError
from align.models import ModelLoadError
from align.training import NonFiniteLoss

# Errors that mean "your input is wrong", reported in one line.
USER_ERRORS = (
    ConfigError,
    ContractError,
    ModelLoadError,
    ScorerError,
    NonFiniteLoss,
    FileNotFoundError,
)


def parse_args(job: str, argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog=f"python -m pipelines.{job}",
        description=f"Run the {job} job.",
        epilog="Overrides are dotted keys, e.g. world.seed=3 output_dir=/tmp/run.",
    )
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied after the file")
    args = parser.parse_args(argv)
    return load_config(args.config, args.overrides)


def run_job(job: str, body: Callable[[Config], object], argv: list[str] | None = None) -> int:
    """Parse the command line, run `body(config)`, map user errors to one line and exit code 2."""
    try:
        config = parse_args(job, argv)
        body(config)
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, FileNotFoundError) and e.args else e
        print(f"{job}: error: {message}", file=sys.stderr)
        return 2
    return 0


def actor_pool(stage: PoolConfig) -> dict:
    """map_batches arguments for an actor-pool stage, from its config."""
    import ray.data

    return {
        "batch_size": stage.batch_size,
        "compute": ray.data.ActorPoolStrategy(size=stage.concurrency),
        "num_cpus": stage.num_cpus,
        "num_gpus": stage.num_gpus,
    }


def task_pool(stage: PoolConfig) -> dict:
    """map_batches arguments for a task stage (CPU only), from its config."""
    import ray.data

    return {
        "batch_size": stage.batch_size,
        "compute": ray.data.TaskPoolStrategy(size=stage.concurrency),
        "num_cpus": stage.num_cpus,
    }


def collect_ok_rows(ds, keep: list[str], stage: str) -> tuple[dict, list[dict]]:
    """Bring a Dataset with `image_id`, `status` and `error` to the driver: the `keep` columns of
    its ok rows, concatenated (None when there are none), and an error row for every other row."""
    import numpy as np

    parts: dict[str, list] = {c: [] for c in keep}
    errors: list[dict] = []
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        ok = batch["status"] == "ok"
        for c in keep:
            parts[c].append(batch[c][ok])
        errors += [
            {"row_id": str(i), "stage": stage, "error": str(e)}
            for i, e in zip(batch["image_id"][~ok], batch["error"][~ok], strict=True)
        ]
    empty = not any(len(x) for x in parts[keep[0]])
    return {c: None if empty else np.concatenate(v) for c, v in parts.items()}, errors
