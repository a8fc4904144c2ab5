"""The resume rules of the jobs that resume after a kill: what a finished piece of work depended
on, written beside it, and compared when a run starts again. index_corpus redoes a unit whose
inputs changed; finetune starts its run over when its inputs or any setting that
changes the trained weights changed (other pairs, another base model, another loss weight)
instead of resuming a checkpoint trained on something else."""

from __future__ import annotations

import hashlib
import json

from align.config import Config
from align.errors import InputNotFound
from align.log import get_logger
from align.models.clip import weights_fingerprint
from align.storage import io

log = get_logger("resume")


DONE_MARKER = "_SUCCESS.json"


def unit_inputs(config: Config, files: list[str]) -> dict:
    """What a unit's output depends on besides its file names: the weights, the scorers, how the
    input is read (columns, decoder limits) and each input file's size and modification time. A
    resumed run redoes a unit when any of them changed (a re-rendered world, a retrained base
    model at the same path, an image replaced in place in a folder corpus)."""
    ic = config.index_corpus
    versions = io.file_versions(files)  # one listing per folder, not one request per file
    return {
        "weights": weights_fingerprint(config.model),
        "scorers": {n: s.model_dump() for n, s in ic.scorers.items()},
        "read": {
            "input_format": ic.input_format,
            "id_column": ic.id_column,
            "image_column": ic.image_column,
            "path_column": ic.path_column,
            "max_image_pixels": config.max_image_pixels,
            "max_member_bytes": ic.max_member_bytes,
            "tar_timeout_s": ic.tar_timeout_s,
        },
        "files": hashlib.sha256(json.dumps(versions).encode()).hexdigest(),
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
# Training-section keys a run may change and still resume its checkpoints: how long it trains
# (max_steps, longer only), checkpoint cadence and failure handling, and resources that do not
# change what is computed. Every other key changes the trained weights: a run whose value
# differs starts over.
RESUMABLE_KEYS = (
    "max_steps",
    "checkpoint_every",
    "keep_checkpoints",
    "max_failures",
    "max_bad_steps",
    "output",
    "decode",
    "join",
    "scaling.cpus_per_worker",
    "scaling.placement_strategy",
    "scaling.threads",
    "scaling.threads_follow_load",
)


def _flat(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{name}."))
        else:
            out[name] = value
    return out


def run_inputs(config: Config) -> dict:
    """What a run's checkpoints depend on, flat (dotted keys): the weights it starts from, the
    training section's every key but RESUMABLE_KEYS, the decoder limit, and the input files'
    sizes and modification times."""
    cfg = config.finetune

    def versions(uri: str) -> list:
        if not io.exists(uri):
            return []
        files = [uri] if io.is_file(uri) else io.list_files(uri, ".parquet")
        return [[f, *v] for f, v in zip(files, io.file_versions(files), strict=True)]

    settings = _flat(cfg.model_dump(mode="json"))
    for key in RESUMABLE_KEYS:
        for name in [n for n in settings if n == key or n.startswith(f"{key}.")]:
            del settings[name]
    return {
        "weights": weights_fingerprint(config.model),
        "max_image_pixels": config.max_image_pixels,
        **settings,
        "max_steps": cfg.max_steps,
        "files.pairs": versions(config.expand(cfg.pairs)) if cfg.uses_pairs else [],
        "files.images": versions(config.expand(cfg.images)) if cfg.uses_pairs else [],
        "files.captions": versions(config.expand(cfg.captions)) if cfg.uses_captions else [],
    }


def changed_run_inputs(before: dict, now: dict) -> list[str]:
    """The keys whose change makes a run start over: any key that differs, except max_steps
    when it grew (training longer resumes)."""
    keys = sorted(set(before) | set(now))
    changed = [k for k in keys if before.get(k) != now.get(k)]
    grew = isinstance(before.get("max_steps"), int) and now["max_steps"] > before["max_steps"]
    return [k for k in changed if not (k == "max_steps" and grew)]


def start_over_if_inputs_changed(config: Config, out: str, section: str = "finetune") -> list:
    """Empty the run's Ray storage (its checkpoints) when a setting or input that changes the
    trained weights differs from the last run's in `out`, and record the current ones. Returns
    the changed keys (named `section.key`, the config section the job reads), [] when the run
    resumes or starts fresh."""
    current = run_inputs(config)
    path = f"{out}/{RUN_INPUTS}"
    changed = []
    if io.exists(path) and io.exists(f"{out}/ray"):
        changed = changed_run_inputs(io.read_json(path), current)
        section_keys = set(_flat(config.finetune.model_dump(mode="json")))
        changed = [f"{section}.{k}" if k in section_keys else k for k in changed]
        if changed:
            log.warning(
                "%s changed since the run in %s: starting over (its checkpoints were trained "
                "with other settings)",
                ", ".join(changed),
                out,
            )
            io.empty_dir(f"{out}/ray")  # ours: our own _run_inputs.json sits beside it
    io.write_json(path, current)
    return changed
