"""The resume rules: which changes let a training run resume its checkpoints, which make it start
over, and what makes index_corpus redo a unit."""

import os
import time

import pytest

from align.config import Config
from align.runtime.resume import (
    RUN_INPUTS,
    changed_run_inputs,
    run_inputs,
    start_over_if_inputs_changed,
    unit_inputs,
)


def _config(tmp_path, **finetune) -> Config:
    return Config(output_dir=str(tmp_path), finetune={"output": str(tmp_path / "ft"), **finetune})


@pytest.mark.parametrize(
    "change, key",
    [
        ({"contrastive_weight": 0.3}, "contrastive_weight"),
        ({"dpo": {"beta": 0.2}}, "dpo.beta"),
        ({"optim": {"lr": 5e-4}}, "optim.lr"),
        ({"pairs_per_batch": 32}, "pairs_per_batch"),
        ({"seed": 1}, "seed"),
        ({"shuffle_buffer": 0}, "shuffle_buffer"),
        ({"max_steps": 50}, "max_steps"),  # shorter: a checkpoint past the end is no resume
    ],
)
def test_a_setting_that_changes_the_weights_starts_over(tmp_path, change, key):
    before = run_inputs(_config(tmp_path))
    assert changed_run_inputs(before, run_inputs(_config(tmp_path, **change))) == [key]


@pytest.mark.parametrize(
    "change",
    [
        {"max_steps": 500},  # longer: resumes and trains on
        {"checkpoint_every": 5, "keep_checkpoints": 4},
        {"max_failures": -1, "max_bad_steps": 9},
        {"scaling": {"cpus_per_worker": 0.5, "threads": 2, "threads_follow_load": False}},
    ],
)
def test_cadence_length_and_resources_resume(tmp_path, change):
    before = run_inputs(_config(tmp_path))
    assert changed_run_inputs(before, run_inputs(_config(tmp_path, **change))) == []


def test_start_over_empties_the_checkpoints_and_names_the_key(tmp_path):
    out = tmp_path / "ft"
    (out / "ray" / "run").mkdir(parents=True)
    assert start_over_if_inputs_changed(_config(tmp_path), str(out)) == []
    (out / "ray" / "run" / "checkpoint").write_bytes(b"x")
    changed = start_over_if_inputs_changed(
        _config(tmp_path, dpo={"label_smoothing": 0.2}), str(out), "pretrain"
    )
    assert changed == ["pretrain.dpo.label_smoothing"]
    assert not (out / "ray" / "run").exists() and (out / RUN_INPUTS).exists()
    # Resuming with the recorded settings keeps what is there.
    (out / "ray" / "x").write_bytes(b"x")
    config = _config(tmp_path, dpo={"label_smoothing": 0.2}, max_steps=200)
    assert start_over_if_inputs_changed(config, str(out)) == []
    assert (out / "ray" / "x").exists()


def test_a_training_input_rewritten_in_place_starts_over(tmp_path):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    (pairs / "part-0.parquet").write_bytes(b"a" * 100)
    config = _config(tmp_path, pairs=str(pairs))
    before = run_inputs(config)
    time.sleep(0.01)
    (pairs / "part-0.parquet").write_bytes(b"b" * 100)  # same name, same size, new content
    os.utime(pairs / "part-0.parquet", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert changed_run_inputs(before, run_inputs(config)) == ["files.pairs"]


@pytest.mark.parametrize(
    "change",
    [
        {"index_corpus": {"id_column": "key"}},
        {"index_corpus": {"image_column": "jpg"}},
        {"index_corpus": {"image_column": None, "path_column": "path"}},
        {"index_corpus": {"max_member_bytes": 1000}},
        {"index_corpus": {"tar_timeout_s": 5}},
        {"max_image_pixels": 1000},
    ],
)
def test_a_unit_read_another_way_is_redone(tmp_path, change):
    files = [str(tmp_path / "a.jpg")]
    (tmp_path / "a.jpg").write_bytes(b"x")
    assert unit_inputs(Config(), files) != unit_inputs(Config(**change), files)


def test_a_folder_image_replaced_in_place_redoes_its_unit(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(b"x" * 10)
    config = Config(index_corpus={"input": str(folder), "input_format": "folder"})
    files = [str(folder / "a.jpg"), str(folder / "b.jpg")]
    before = unit_inputs(config, files)
    assert unit_inputs(config, files) == before
    (folder / "b.jpg").write_bytes(b"y" * 10)
    os.utime(folder / "b.jpg", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert unit_inputs(config, files) != before
