"""What every job entry point shares: the command line and the error contract.

`python -m pipelines.<job> --config PATH [key=value ...]`. A bad config, a missing input, a table
from the wrong job or a model that cannot load (the project's `align.errors.UserError` types) ends
the job with exit code 2 and one line on stderr naming the key or path; any other failure, a
library's FileNotFoundError included, keeps its traceback and exits 1.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from align.config import Config, load_config
from align.errors import UserError

# Storage every node of a cluster reaches (s3://..., a shared filesystem), named once where Ray
# starts (cluster.yaml): the jobs' output_dir, under which finetune keeps Ray Train's checkpoints.
# Before the command line's own overrides, after the config file.
OUTPUT_DIR_ENV = "AESTHETIC_ALIGN_OUTPUT_DIR"


def parse_args(job: str, argv: list[str] | None) -> Config:
    parser = argparse.ArgumentParser(
        prog=f"python -m pipelines.{job}",
        description=f"Run the {job} job.",
        epilog="Overrides are dotted keys, e.g. world.seed=3 output_dir=/tmp/run; "
        f"${OUTPUT_DIR_ENV}, when set, is the output_dir unless an override gives one.",
    )
    parser.add_argument("--config", required=True, help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied after the file")
    args = parser.parse_args(argv)
    storage = os.environ.get(OUTPUT_DIR_ENV)
    return load_config(
        args.config, [*([f"output_dir={storage}"] if storage else []), *args.overrides]
    )


def user_error_message(e: BaseException) -> str | None:
    """The one line for an error about the user's input (a project `UserError`, raised here or
    in a Ray worker and carried back); None for anything else, which keeps its traceback."""
    cause = getattr(e, "cause", None)  # ray.exceptions.RayTaskError carries the worker's error
    if isinstance(cause, UserError):
        e = cause
    if not isinstance(e, UserError):
        return None
    return " ".join(str(e).split()) or type(e).__name__


def run_job(job: str, body: Callable[[Config], object], argv: list[str] | None = None) -> int:
    """Parse the command line and run `body(config)`. An error about the user's input becomes one
    line on stderr and exit code 2; any other exception propagates with its traceback (exit 1)."""
    try:
        config = parse_args(job, argv)
        body(config)
    except Exception as e:
        message = user_error_message(e)
        if message is None:
            raise
        print(f"{job}: error: {message}", file=sys.stderr)
        return 2
    return 0
