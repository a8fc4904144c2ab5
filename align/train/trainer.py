"""The trainer each Ray Train worker runs (the finetune and pretrain jobs start them).

Per step: the next pair batch and caption batch from this worker's Ray Data shards, one forward
(align.train.steps.step_losses), a check that the loss is finite on every worker (one all-reduce that
also averages the metrics), then backward and step through DeepSpeed or DDP. Every
`checkpoint_every` steps the engine state, the optimiser and the metrics so far go into a Ray Train
checkpoint; a restarted worker group, or a second run with the same output, resumes from the
latest one. Rank 0 writes the metrics JSONL and the exported open_clip checkpoint at the end.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from contextlib import nullcontext

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from tqdm import tqdm

from align.config import Config
from align.data.images import pixels_to_tensor
from align.models.clip import build_clip, export_checkpoint
from align.runtime.threads import TorchThreads, flush_subnormals
from align.storage import io, paths
from align.train.steps import (
    STEP_METRICS,
    StepInputs,
    adamw,
    deepspeed_config,
    endless_batches,
    freeze_batchnorm_statistics,
    lock_towers,
    lr_multiplier,
    metrics_jsonl,
    skip_shared_memory_all_reduce_op,
    step_losses,
)

# deepspeed is imported inside the functions that use it (5.5 s here): only its backend needs it,
# and it picks its accelerator when imported, after DS_ACCELERATOR is set for a CPU run.

STATE_FILE = "trainer_state.json"
DDP_FILE = "ddp_state.pt"
ENGINE_TAG = "engine"
SUMMARY_FILE = "train_summary.json"


class Trainer:
    """One worker's model, optimiser, streams and state; `run()` trains to max_steps."""

    def __init__(self, config: Config, output: str):
        self.config, self.cfg = config, config.finetune
        self.output = output.rstrip("/")  # absolute: this process runs in Ray Train's folder
        cfg, scaling = self.cfg, self.cfg.scaling
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.threads = TorchThreads(scaling.threads, follow_load=scaling.threads_follow_load)
        self.use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
        if not self.use_gpu:
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported
        self.device = ray.train.torch.get_device() if self.use_gpu else torch.device("cpu")
        self.bf16 = cfg.deepspeed.bf16 == "on" or (cfg.deepspeed.bf16 == "auto" and self.use_gpu)
        self.dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.subnormals_flushed = not self.use_gpu and flush_subnormals()  # else CPU steps slow
        torch.manual_seed(cfg.seed)
        self._build_model()
        self.state = {"step": 0, "skipped_steps": 0, "bad_in_a_row": 0, "resumed_from": []}
        self.records: list[dict] = []

    def _build_model(self) -> None:
        cfg = self.cfg
        self.clip = build_clip(self.config.model, device=str(self.device))
        model = self.clip.model.float().train()
        if cfg.batchnorm_frozen:
            freeze_batchnorm_statistics(model)
        lock_towers(model, cfg)
        if not cfg.uses_captions:
            # Only InfoNCE trains the temperature (DPO uses it detached): with no contrastive
            # term it gets no gradient, and DDP refuses parameters that never get one.
            model.logit_scale.requires_grad_(False)
        if getattr(model, "logit_bias", None) is not None:
            model.logit_bias.requires_grad_(False)  # SigLIP's bias: no loss here uses it
        # The frozen reference is the model before fine-tuning: the same initial weights.
        self.reference = None
        if cfg.uses_pairs and cfg.dpo.reference == "recompute":
            self.reference = build_clip(self.config.model, device=str(self.device)).model
            self.reference.to(self.dtype).eval().requires_grad_(False)
        optimizer = adamw(model, cfg.optim)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_multiplier(s, cfg.optim, cfg.max_steps)
        )
        if cfg.backend == "deepspeed":
            # Imported here: DeepSpeed picks its accelerator at import, after DS_ACCELERATOR is set.
            import deepspeed

            if not self.use_gpu:
                skip_shared_memory_all_reduce_op(deepspeed)

            micro = cfg.pairs_per_batch if cfg.uses_pairs else cfg.captions_per_batch
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model,
                optimizer=optimizer,
                lr_scheduler=scheduler,
                config=deepspeed_config(cfg, micro, self.bf16),
            )
            self.model, self.module = self.engine, self.engine.module
        else:
            self.engine, self.optimizer, self.scheduler = None, optimizer, scheduler
            self.model = ray.train.torch.prepare_model(model)
            self.module = model

    # -- data -----------------------------------------------------------------------------------

    def _streams(self):
        cfg = self.cfg
        pairs = captions = None
        if cfg.uses_pairs:
            pairs = endless_batches(
                ray.train.get_dataset_shard("pairs"),
                cfg.pairs_per_batch,
                cfg.shuffle_buffer,
                cfg.seed + self.rank,
            )
        if cfg.uses_captions:
            captions = endless_batches(
                ray.train.get_dataset_shard("captions"),
                cfg.captions_per_batch,
                cfg.shuffle_buffer,
                cfg.seed + 1000 + self.rank,
            )
        return pairs, captions

    def _inputs(self, pair_batch: dict | None, caption_batch: dict | None) -> StepInputs:
        clip, device, dtype = self.clip, self.device, self.dtype

        def images(pixels: np.ndarray) -> torch.Tensor:
            return pixels_to_tensor(pixels, clip.mean, clip.std, device, dtype)

        def tokens(ids: np.ndarray) -> torch.Tensor:  # tokenized in the data pipeline
            return torch.from_numpy(np.asarray(ids, dtype=np.int64)).to(device)

        inputs = StepInputs()
        if pair_batch is not None:
            inputs.queries = tokens(pair_batch["query_tokens"])
            inputs.chosen_images = images(pair_batch["chosen_pixels"])
            inputs.rejected_images = images(pair_batch["rejected_pixels"])
            inputs.chosen_ref = torch.tensor(pair_batch["chosen_ref_sim"], device=device)
            inputs.rejected_ref = torch.tensor(pair_batch["rejected_ref_sim"], device=device)
        if caption_batch is not None:
            inputs.captions = tokens(caption_batch["caption_tokens"])
            inputs.caption_images = images(caption_batch["pixels"])
        return inputs

    # -- checkpoints ----------------------------------------------------------------------------

    def restore(self) -> None:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as d:
            with open(os.path.join(d, STATE_FILE)) as f:
                saved = json.load(f)
            if self.engine is not None:
                self.engine.load_checkpoint(d, tag=ENGINE_TAG)
            else:
                # Tensors and plain values only: a checkpoint folder is storage other nodes write.
                state = torch.load(
                    os.path.join(d, DDP_FILE), map_location=self.device, weights_only=True
                )
                self.module.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
                self.scheduler.load_state_dict(state["scheduler"])
        self.state = saved["state"]
        self.records = saved["records"]
        self.state["resumed_from"].append(self.state["step"])

    def save(self, report: dict) -> None:
        with tempfile.TemporaryDirectory() as d:
            if self.engine is not None:
                self.engine.save_checkpoint(d, tag=ENGINE_TAG)  # each rank writes its ZeRO shard
            elif self.rank == 0:
                torch.save(
                    {
                        "model": self.module.state_dict(),
                        "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(),
                    },
                    os.path.join(d, DDP_FILE),
                )
            if self.rank == 0:
                with open(os.path.join(d, STATE_FILE), "w") as f:
                    json.dump({"state": self.state, "records": self.records}, f)
            # Ray Train merges the ranks' files into one checkpoint directory.
            has_files = self.engine is not None or self.rank == 0
            ray.train.report(
                report, checkpoint=ray.train.Checkpoint.from_directory(d) if has_files else None
            )

    def finish(self, stopped: str | None = None) -> None:
        """Rank 0 writes the open_clip export (unless stopped), the metrics and the run's
        summary, which the driver reads (Ray Train keeps only checkpointed reports). ZeRO-3
        gathers the partitioned weights on every rank first."""

        out = self.output
        if stopped is None:
            gather = nullcontext()
            if self.engine is not None and self.cfg.deepspeed.zero_stage == 3:
                import deepspeed  # after DS_ACCELERATOR is set (see _build_model)

                gather = deepspeed.zero.GatheredParameters(list(self.module.parameters()))
            with gather:
                if self.rank == 0:
                    export_checkpoint(self.module, f"{out}/{paths.MODEL_FILE}")
        if self.rank == 0:
            io.write_bytes(f"{out}/metrics.jsonl", metrics_jsonl(self.records))
            io.write_json(f"{out}/{SUMMARY_FILE}", {**self._summary(), "stopped": stopped})

    # -- the loop -------------------------------------------------------------------------------

    def _all_reduce_metrics(self, metrics: dict, finite: bool) -> tuple[dict, bool]:
        """Average the metrics over workers and learn whether any worker's loss was not
        finite, in one all-reduce; every worker then takes the same branch."""
        values = [float(metrics[k]) if k in metrics else float("nan") for k in STEP_METRICS]
        vector = torch.tensor([*values, 0.0 if finite else 1.0], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            vector = vector.to(self.device)
            dist.all_reduce(vector)
            vector = vector.cpu()
        mean = (vector[:-1] / self.world).tolist()
        averaged = {k: (None if v != v else v) for k, v in zip(STEP_METRICS, mean, strict=True)}
        return averaged, bool(vector[-1] == 0)

    def run(self) -> None:
        cfg = self.cfg
        self.restore()
        pairs, captions = self._streams()
        progress = tqdm(
            total=cfg.max_steps, initial=self.state["step"], disable=self.rank != 0, desc="train"
        )
        while self.state["step"] < cfg.max_steps:
            step = self.state["step"]
            started = time.perf_counter()
            self.threads.refresh()
            inputs = self._inputs(
                next(pairs) if pairs else None, next(captions) if captions else None
            )
            loss, metrics = self._forward(inputs)
            averaged, all_finite = self._all_reduce_metrics(metrics, bool(torch.isfinite(loss)))
            if all_finite:
                self.state["bad_in_a_row"] = 0
                self._update(loss)
            else:
                # Skip the step on every worker: no backward, no update.
                self.state["skipped_steps"] += 1
                self.state["bad_in_a_row"] += 1
            self.state["step"] = step + 1
            self._record(averaged, all_finite, inputs, started)
            progress.update(1)
            if self.state["bad_in_a_row"] >= cfg.max_bad_steps:
                self.finish(
                    stopped=f"loss was NaN or inf for {cfg.max_bad_steps} consecutive steps "
                    f"(steps {step + 2 - cfg.max_bad_steps}..{step + 1}); "
                    f"lower finetune.optim.lr or check the inputs"
                )
                return
            if (
                self.state["step"] % cfg.checkpoint_every == 0
                or self.state["step"] == cfg.max_steps
            ):
                self.save(self._summary())
        progress.close()
        self.finish()

    def _update(self, loss) -> None:
        """Backward and optimiser step: DeepSpeed's engine, or DDP with optional clipping."""
        if self.engine is not None:
            self.engine.backward(loss)
            with torch.no_grad():  # DeepSpeed's gloo all-gather fails under autograd
                self.engine.step()
            return
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()

    def _record(self, averaged: dict, finite: bool, inputs: StepInputs, started: float) -> None:
        peak = torch.cuda.max_memory_allocated() / 2**20 if self.use_gpu else None
        self.records.append(
            {
                "step": self.state["step"],
                **averaged,
                "lr": self.scheduler.get_last_lr()[0],
                "skipped": not finite,
                "pairs": inputs.num_pairs * self.world,
                "captions": inputs.num_captions * self.world,
                "time_s": time.perf_counter() - started,
                "peak_gpu_mb": peak,
            }
        )

    def _forward(self, inputs: StepInputs):
        autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.engine is None and self.bf16
            else nullcontext()
        )
        with autocast:
            return step_losses(self.model, inputs, self.cfg, self.reference)

    def _summary(self) -> dict:
        return {
            "step": self.state["step"],
            "skipped_steps": self.state["skipped_steps"],
            "resumed_from": list(self.state["resumed_from"]),
            "loss": self.records[-1]["loss"] if self.records else None,
            "subnormals_flushed": self.subnormals_flushed,
        }


def train_loop_per_worker(payload: dict) -> None:
    """Ray Train entry point: payload = {"config": the job's config as a dict, "output": the
    run's output folder, resolved by the driver}."""
    Trainer(Config.model_validate(payload["config"]), payload["output"]).run()
