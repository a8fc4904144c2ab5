"""The fine-tune's step on a real (micro) open_clip model, the schedule, the plot, and the row
checks that decide which pairs are trained on."""

import math
import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from align.config import ConfigError, FinetuneConfig, ModelConfig, OptimConfig, load_config
from align.data.images import pixels_to_tensor
from align.errors import UserError
from align.method.losses import clip_contrastive_loss
from align.models.clip import build_clip
from align.train.pair_checks import pair_errors, usable_pairs
from align.train.steps import (
    StepInputs,
    clip_forward,
    freeze_batchnorm_statistics,
    lock_towers,
    lr_multiplier,
    metrics_jsonl,
    plot_metrics,
    read_metrics_jsonl,
    step_losses,
)


@pytest.fixture(scope="module")
def clip():
    return build_clip(ModelConfig(name="micro-clip"))


def _inputs(clip, pairs=6, captions=5, seed=0):
    rng = np.random.default_rng(seed)
    pixels = lambda n: rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)  # noqa: E731
    image = lambda n: pixels_to_tensor(pixels(n), clip.mean, clip.std, "cpu")  # noqa: E731
    words = ["red circle", "blue square", "green star", "yellow heart", "pink moon", "grey cross"]
    return StepInputs(
        queries=clip.tokenizer(words[:pairs]),
        chosen_images=image(pairs),
        rejected_images=image(pairs),
        caption_images=image(captions),
        captions=clip.tokenizer([f"a photo of a {w}" for w in words[:captions]]),
    )


def _reference_sims(clip, inputs):
    with torch.no_grad():
        img, txt, _ = clip_forward(
            clip.model, torch.cat([inputs.chosen_images, inputs.rejected_images]), inputs.queries
        )
    p = inputs.num_pairs
    return (txt * img[:p]).sum(-1), (txt * img[p:]).sum(-1)


def test_step_zero_precomputed_and_recomputed_references_give_log_two(clip):
    inputs = _inputs(clip)
    inputs.chosen_ref, inputs.rejected_ref = _reference_sims(clip, inputs)
    cfg = FinetuneConfig(contrastive_weight=0.0)
    pre, pre_metrics = step_losses(clip.model, inputs, cfg)
    re, re_metrics = step_losses(clip.model, inputs, cfg, reference_model=clip.model)
    # The policy is the reference at step 0: every log-ratio is 0, the loss is log 2.
    assert pre.item() == pytest.approx(math.log(2), abs=1e-6)
    assert re.item() == pytest.approx(pre.item(), abs=1e-6)
    assert re_metrics["ref_sim_gap"].item() < 1e-6 and "ref_sim_gap" not in pre_metrics


def test_total_is_dpo_plus_lambda_contrastive(clip):
    inputs = _inputs(clip)
    chosen, rejected = _reference_sims(clip, inputs)
    # A reference that liked the rejected images more: the policy's log-ratio favours chosen.
    inputs.chosen_ref, inputs.rejected_ref = chosen - 0.05, rejected + 0.05
    cfg = FinetuneConfig(contrastive_weight=0.3, dpo={"beta": 0.5, "temperature": 0.1})
    total, metrics = step_losses(clip.model, inputs, cfg)
    p = inputs.num_pairs
    img, txt, scale = clip_forward(
        clip.model,
        torch.cat([inputs.chosen_images, inputs.rejected_images, inputs.caption_images]),
        torch.cat([inputs.queries, inputs.captions]),
    )
    contrastive = clip_contrastive_loss(img[2 * p :], txt[p:], scale)
    delta = 0.5 / 0.1 * 0.1  # beta / tau * [(+0.05) - (-0.05)]
    dpo = -torch.nn.functional.logsigmoid(torch.tensor(delta))
    assert metrics["dpo_loss"].item() == pytest.approx(dpo.item(), abs=1e-5)
    assert metrics["contrastive_loss"].item() == pytest.approx(contrastive.item(), abs=1e-5)
    assert total.item() == pytest.approx(dpo.item() + 0.3 * contrastive.item(), abs=1e-5)
    assert metrics["dpo_accuracy"].item() == 1.0 and metrics["reward_margin"].item() > 0


def test_contrastive_objective_ignores_pairs_and_learns(clip):
    model = build_clip(ModelConfig(name="micro-clip")).model.train()
    inputs = _inputs(clip, pairs=0, captions=5)
    inputs.queries = inputs.chosen_images = inputs.rejected_images = None
    cfg = FinetuneConfig(objective="contrastive")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        loss, metrics = step_losses(model, inputs, cfg)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert "dpo_loss" not in metrics
    assert losses[-1] < losses[0] - 0.5  # five captions memorised: InfoNCE falls


def test_logit_scale_temperature_is_detached_for_dpo(clip):
    model = build_clip(ModelConfig(name="micro-clip")).model
    inputs = _inputs(clip, captions=0)
    inputs.caption_images = inputs.captions = None
    chosen, rejected = _reference_sims(clip, inputs)
    inputs.chosen_ref, inputs.rejected_ref = chosen - 0.05, rejected
    loss, _ = step_losses(model, inputs, FinetuneConfig(contrastive_weight=0.0))
    loss.backward()
    # DPO must not learn to sharpen the temperature; only the contrastive loss trains it.
    assert model.logit_scale.grad is None or model.logit_scale.grad.abs().item() == 0


def test_learning_rate_warms_up_then_decays_to_zero():
    optim = OptimConfig(warmup_steps=4, schedule="cosine")
    values = [lr_multiplier(s, optim, 20) for s in range(21)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0) and values[12] == pytest.approx(0.5)
    assert values[20] == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(10, OptimConfig(warmup_steps=0, schedule="constant"), 20) == 1.0


def test_metrics_round_trip_and_plot_with_missing_terms():
    records = [
        {"step": s, "loss": 1.0 / s, "dpo_loss": None, "contrastive_loss": 1.0 / s, "lr": 1e-4}
        for s in range(1, 6)
    ]
    assert read_metrics_jsonl(metrics_jsonl(records)) == records
    png = plot_metrics(records, "contrastive")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_dpo_temperature_must_be_positive_or_the_logit_scale():
    with pytest.raises(ConfigError, match="finetune.dpo.temperature"):
        load_config(None, ["finetune.dpo.temperature=0"])
    assert load_config(None, ["finetune.dpo.temperature=0.07"]).finetune.dpo.temperature == 0.07


def test_usable_pairs_and_the_reason_for_each_rejected_one():
    pairs = pa.table(
        {
            "query_id": ["q1", "q1", "q2", "q3", "q4"],
            "query": ["red circle", "red circle", "blue star", "  ", "pink moon"],
            "chosen_id": ["a", "b", "c", "d", "e"],
            "rejected_id": ["x", "y", "bad", "z", "w"],
            "chosen_ref_sim": pa.array([0.3, float("nan"), 0.2, 0.1, 0.1], pa.float32()),
            "rejected_ref_sim": pa.array([0.2, 0.1, 0.1, 0.0, None], pa.float32()),
        }
    )
    keep = usable_pairs(pairs, pa.array(["bad"]))
    assert keep.to_pylist() == [True, False, False, False, False]
    errors = {e["row_id"]: e["error"] for e in pair_errors(pairs, keep, {"bad": "cannot decode"})}
    assert errors == {
        "q1:b>y": "non-finite reference similarity (chosen nan, rejected 0.1)",
        "q2:c>bad": "image bad: cannot decode",
        "q3:d>z": "empty query",
        "q4:e>w": "non-finite reference similarity (chosen 0.1, rejected missing)",
    }


def test_pretrain_section_must_stay_contrastive():
    with pytest.raises(ConfigError, match="pretrain.objective must be 'contrastive'"):
        load_config(None, ["pretrain.objective=dpo"])


def test_a_second_run_resumes_only_when_its_inputs_are_unchanged(tmp_path):
    from align.runtime.resume import start_over_if_inputs_changed

    ckpt = tmp_path / "base.pt"
    ckpt.write_bytes(b"weights v1")
    overrides = [
        f"output_dir={tmp_path}",
        f"model.pretrained={ckpt}",
        "finetune.objective=contrastive",
    ]
    out = str(tmp_path / "finetune")
    (tmp_path / "finetune" / "ray" / "run").mkdir(parents=True)
    marker = tmp_path / "finetune" / "ray" / "run" / "checkpoint_manager_snapshot.json"
    marker.write_text("{}")
    start_over_if_inputs_changed(load_config(None, overrides), out)
    start_over_if_inputs_changed(load_config(None, [*overrides, "finetune.max_steps=500"]), out)
    assert marker.exists()  # same inputs, more steps: resume
    ckpt.write_bytes(b"weights v2, retrained at the same path")
    start_over_if_inputs_changed(load_config(None, overrides), out)
    assert not marker.exists()  # another base model: the old checkpoints must not be resumed


def test_frozen_batchnorm_keeps_the_base_model_at_step_zero():
    """A ResNet tower fine-tuned in train mode normalises with each batch's statistics: at step 0
    the policy already differs from the reference (computed in eval mode) and the running
    statistics drift. Frozen, the policy is the reference and the statistics stay."""
    rn = build_clip(ModelConfig(name="micro-rn-clip"))
    inputs = _inputs(rn)
    inputs.chosen_ref, inputs.rejected_ref = _reference_sims(rn, inputs)  # eval mode (build_clip)
    base = {k: v.clone() for k, v in rn.model.state_dict().items()}
    model = rn.model.train()
    cfg = FinetuneConfig(contrastive_weight=0.0)
    assert cfg.batchnorm_frozen  # auto: frozen for dpo
    assert not FinetuneConfig(objective="contrastive").batchnorm_frozen
    assert not FinetuneConfig(batchnorm="train").batchnorm_frozen

    trained_mode, _ = step_losses(model, inputs, cfg)
    assert abs(trained_mode.item() - math.log(2)) > 1e-4  # batch statistics moved the policy

    model.load_state_dict(base)  # undo the drift of the train-mode step
    assert freeze_batchnorm_statistics(model) > 0
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    frozen, _ = step_losses(model, inputs, cfg)
    assert frozen.item() == pytest.approx(math.log(2), abs=1e-5)
    after = {k: v for k, v in model.state_dict().items() if "running" in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training  # the rest of the model still trains (dropout and friends)


def _trained_step(model, inputs, cfg):
    """One AdamW step of the step's loss; returns the state before and after."""
    from align.train.steps import adamw

    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = adamw(model, OptimConfig(lr=1e-2))
    loss, _ = step_losses(model, inputs, cfg)
    loss.backward()
    opt.step()
    return before, model.state_dict()


@pytest.mark.parametrize("tower", ["text", "image"])
def test_a_locked_tower_does_not_change_while_the_other_trains(tower):
    rn = build_clip(ModelConfig(name="micro-rn-clip"))
    inputs = _inputs(rn)
    inputs.chosen_ref, inputs.rejected_ref = _reference_sims(rn, inputs)
    model = rn.model.train()  # BatchNorm in train mode: a locked tower must still not drift
    cfg = FinetuneConfig(contrastive_weight=0.5, **{f"lock_{tower}": True})
    assert lock_towers(model, cfg) > 0
    before, after = _trained_step(model, inputs, cfg)

    def moved(keys):
        return {k for k in keys if not torch.equal(before[k], after[k])}

    visual = [k for k in before if k.startswith("visual.")]
    text = [k for k in before if not k.startswith("visual.") and k != "logit_scale"]
    locked, trained = (text, visual) if tower == "text" else (visual, text)
    assert moved(locked) == set()  # weights and BatchNorm statistics alike
    assert moved(trained)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any(n in locked for n in trainable)


def test_tower_locks_that_leave_nothing_to_train_or_that_the_tower_refuses_are_named():
    with pytest.raises(ValueError, match="leave nothing to train"):
        FinetuneConfig(lock_text=True, lock_image=True)
    FinetuneConfig(lock_text=True, lock_image=True, lock_text_unlocked_layers=1)
    model = build_clip(ModelConfig(name="micro-rn-clip")).model
    cfg = FinetuneConfig(lock_image=True, lock_image_unlocked_groups=1)
    with pytest.raises(UserError, match="lock_image_unlocked_groups"):
        lock_towers(model, cfg)  # open_clip locks a ResNet tower only whole
    text = build_clip(ModelConfig(name="micro-clip")).model
    lock_towers(text, FinetuneConfig(lock_text=True, lock_text_unlocked_layers=1))
    trainable = {n for n, p in text.named_parameters() if p.requires_grad}
    assert "text_projection" in trainable and "token_embedding.weight" not in trainable


def test_adamw_groups_weight_decay_as_clip_and_its_fused_step_matches_the_loop():
    from align.config import OptimConfig
    from align.train.steps import adamw

    torch.manual_seed(0)
    model = build_clip(ModelConfig(name="micro-clip")).model
    model.logit_scale.requires_grad_(False)
    optim = OptimConfig(lr=1e-2, weight_decay=0.1)
    fused = adamw(model, optim)
    decay, rest = (g["params"] for g in fused.param_groups)
    named = {id(p): n for n, p in model.named_parameters()}
    assert fused.defaults["fused"] and [g["weight_decay"] for g in fused.param_groups] == [0.1, 0]
    assert all(p.ndim >= 2 and "embedding" not in named[id(p)] for p in decay)
    assert any("token_embedding" in named[id(p)] for p in rest)
    assert len(decay) + len(rest) == sum(p.requires_grad for p in model.parameters())

    twin = build_clip(ModelConfig(name="micro-clip")).model
    twin.load_state_dict(model.state_dict())
    twin.logit_scale.requires_grad_(False)
    loop = adamw(twin, optim.model_copy(update={"fused": False}))
    assert not loop.defaults["fused"]
    for m, opt in ((model, fused), (twin, loop)):
        for p in m.parameters():
            p.grad = torch.ones_like(p) * 0.01 if p.requires_grad else None
        opt.step()
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_a_cpu_deepspeed_backend_builds_no_shared_memory_op(tmp_path):
    """DeepSpeed's CPU backend would compile its inference-only all-reduce op on start; after
    the skip its builder hands back nothing and nothing is compiled (a process of its own:
    DeepSpeed picks its accelerator once, at import)."""
    import subprocess
    import sys

    code = (
        "import deepspeed\n"
        "from deepspeed.comm.torch import build_shm_op\n"
        "from align.train.steps import skip_shared_memory_all_reduce_op\n"
        "assert deepspeed.ops.__compatible_ops__['deepspeed_shm_comm'], 'compatible before'\n"
        "skip_shared_memory_all_reduce_op(deepspeed)\n"
        "assert build_shm_op() is None\n"
    )
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not any(tmp_path.iterdir())  # no build folder: nothing compiled
