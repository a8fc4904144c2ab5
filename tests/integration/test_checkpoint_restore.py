"""The DDP trainer's checkpoint restore reads tensors and plain values only: a checkpoint folder
lives on storage other nodes write, and a pickle there must never run code on restore."""

import json
import os

import pytest
import ray.train
import torch

from align.train.trainer import DDP_FILE, STATE_FILE, Trainer

pytestmark = pytest.mark.integration

MARK = "restore-ran-code"


class _RunsCode:
    def __reduce__(self):
        return (os.mkdir, (MARK,))


def _trainer() -> Trainer:
    trainer = object.__new__(Trainer)  # the restore alone: no Ray Train worker group
    trainer.engine, trainer.device = None, torch.device("cpu")
    trainer.module = torch.nn.Linear(2, 2)
    trainer.optimizer = torch.optim.SGD(trainer.module.parameters(), lr=0.1)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)
    return trainer


def _checkpoint(folder, ddp_state, monkeypatch):
    folder.mkdir()
    state = {"step": 4, "skipped_steps": 0, "bad_in_a_row": 0, "resumed_from": []}
    (folder / STATE_FILE).write_text(json.dumps({"state": state, "records": []}))
    torch.save(ddp_state, folder / DDP_FILE)
    checkpoint = ray.train.Checkpoint.from_directory(str(folder))
    monkeypatch.setattr(ray.train, "get_checkpoint", lambda: checkpoint)


def test_a_ddp_checkpoint_restores_its_weights(tmp_path, monkeypatch):
    saved = _trainer()
    torch.nn.init.constant_(saved.module.weight, 0.5)
    ddp_state = {
        "model": saved.module.state_dict(),
        "optimizer": saved.optimizer.state_dict(),
        "scheduler": saved.scheduler.state_dict(),
    }
    _checkpoint(tmp_path / "ckpt", ddp_state, monkeypatch)
    trainer = _trainer()
    trainer.restore()
    assert torch.equal(trainer.module.weight, saved.module.weight)
    assert trainer.state["resumed_from"] == [4]


def test_a_ddp_checkpoint_holding_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _checkpoint(tmp_path / "ckpt", {"model": _RunsCode()}, monkeypatch)
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        _trainer().restore()
    assert not (tmp_path / MARK).exists()
