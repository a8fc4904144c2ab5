"""Ray Data stages, one file each: heavy set-up in `__init__`, a pure `__call__(batch) -> batch`.

Stage resources (batch size, pool size, CPUs, GPUs) come from config and are passed to
`map_batches` by the job; nothing here hard-codes them.
"""

from __future__ import annotations


def require_batch_columns(batch: dict, required: dict[str, str], stage: str) -> None:
    """Raise ValueError naming the stage and each missing column with what it should hold."""
    missing = [f"'{name}' ({what})" for name, what in required.items() if name not in batch]
    if missing:
        raise ValueError(
            f"stage {stage} needs column(s) {', '.join(missing)}; batch has {sorted(batch)}"
        )
