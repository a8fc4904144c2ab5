"""`aesthetic-align JOB --config PATH [key=value ...]`: the console entry point for every job."""

from __future__ import annotations

import importlib
import sys

JOBS = (
    "make_world",
    "train_scorer",
    "pretrain",
    "index_corpus",
    "build_preferences",
    "finetune",
    "evaluate",
    "demo",
)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in JOBS:
        print(f"usage: aesthetic-align {{{','.join(JOBS)}}} --config PATH [key=value ...]")
        return 2
    return importlib.import_module(f"pipelines.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
