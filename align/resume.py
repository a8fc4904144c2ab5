"""The resume rules of the jobs that resume after a kill: what a finished piece of work depended
on, written beside it, and compared when a run starts again. index_corpus redoes a unit whose
inputs changed; finetune starts its run over when its inputs changed (other pairs, another base
model) instead of resuming a checkpoint trained on something else."""

from __future__ import annotations

from align import io
from align.config import Config
from align.errors import InputNotFound
from align.log import get_logger
from align.models import weights_fingerprint

log = get_logger("resume")


DONE_MARKER = "_SUCCESS.json"


def unit_inputs(config: Config, files: list[str]) -> dict:
    """What a unit's output depends on besides its file names: the weights, the scorers and the
    input files' sizes. A resumed run redoes a unit when any of them changed (a re-rendered
    world, a retrained base model at the same path)."""
    sizes = None  # a folder unit lists thousands of images: not worth a stat each
    if config.index_corpus.input_format != "folder":
        sizes = [io.filesystem(f)[0].get_file_info(io.filesystem(f)[1]).size for f in files]
    return {
        "weights": weights_fingerprint(config.model),
        "scorers": {n: s.model_dump() for n, s in config.index_corpus.scorers.items()},
        "sizes": sizes,
    }


def unit_done(unit_dir: str, files: list[str], config: Config) -> dict | None:
    """The unit's done marker when it is done with these same files and inputs; else None."""
    marker = f"{unit_dir}/{DONE_MARKER}"
    if not io.exists(marker):
        return None
    done = io.read_json(marker)
    same = done["files"] == files and done.get("inputs") == unit_inputs(config, files)
    return done if same else None


def finished_units(config: Config, out: str):
    """steps [index]: the markers of the units whose scored shards are in `out`, which must have
    been embedded with this config's weights (the index records this model)."""
    parts = io.list_files(f"{out}/scored", ".parquet")
    unit_dirs = [f"{out}/_staging/unit-{i:05d}" for i in range(len(parts))]
    markers = [
        io.read_json(f"{d}/{DONE_MARKER}") for d in unit_dirs if io.exists(f"{d}/{DONE_MARKER}")
    ]
    weights = weights_fingerprint(config.model)
    if (
        not parts
        or len(markers) < len(parts)
        or any(m["inputs"]["weights"] != weights for m in markers)
    ):
        raise InputNotFound(
            f"index_corpus.steps=[index] rebuilds the index from the scored shards of a finished "
            f"run with this model; {out} has {len(parts)} scored shard(s), {len(markers)} finished "
            f"unit(s), not all with these weights: run steps [embed, index]"
        )
    return unit_dirs, markers


RUN_INPUTS = "_run_inputs.json"


def run_inputs(config: Config) -> dict:
    """What a run's checkpoints depend on. A second run with the same output resumes only when
    these are unchanged; max_steps and the schedule may change (train longer)."""
    cfg = config.finetune

    def sizes(uri: str) -> list:
        if not io.exists(uri):
            return []
        files = [uri] if io.is_file(uri) else io.list_files(uri, ".parquet")
        return [[f, io.filesystem(f)[0].get_file_info(io.filesystem(f)[1]).size] for f in files]

    return {
        "weights": weights_fingerprint(config.model),
        "objective": cfg.objective,
        "backend": cfg.backend,
        "zero_stage": cfg.deepspeed.zero_stage,
        "num_workers": cfg.scaling.num_workers,
        "pairs": sizes(config.expand(cfg.pairs)) if cfg.uses_pairs else [],
        "captions": sizes(config.expand(cfg.captions)),
    }


def start_over_if_inputs_changed(config: Config, out: str) -> None:
    """Empty the run's Ray storage (its checkpoints) when `run_inputs` changed since the last run
    in `out`, and record the current ones."""
    current = run_inputs(config)
    path = f"{out}/{RUN_INPUTS}"
    if io.exists(path) and io.read_json(path) != current and io.exists(f"{out}/ray"):
        log.warning("inputs or model changed since the run in %s: starting over", out)
        io.empty_dir(f"{out}/ray")  # ours: our own _run_inputs.json sits beside it
    io.write_json(path, current)
