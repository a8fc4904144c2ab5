"""Training pairs/s of the finetune job: precomputed reference similarities against recomputing
them with a frozen reference model, and DeepSpeed against DDP, at the same run settings.

    python benchmarks/finetune_throughput.py [--steps 60] [--model micro-clip] [--gpu]

Runs on the demo's outputs (the world, its index and pairs, made first if missing; the pairs come
from the random-init model so no pretraining is needed). Each variant is a fresh run of the job;
pairs/s is the median over steps after the first two (stream start-up), as the job's manifest
reports it. With --gpu: one GPU worker, bf16, and peak GPU memory per variant.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

VARIANTS = {
    "deepspeed ZeRO-2, precomputed reference": ["finetune.backend=deepspeed"],
    "deepspeed ZeRO-2, recomputed reference": [
        "finetune.backend=deepspeed",
        "finetune.dpo.reference=recompute",
    ],
    "ddp, precomputed reference": ["finetune.backend=ddp"],
    "ddp, recomputed reference": ["finetune.backend=ddp", "finetune.dpo.reference=recompute"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--model", default="micro-clip")
    parser.add_argument("--pairs-per-batch", type=int, default=64)
    parser.add_argument("--gpu", action="store_true", help="one GPU worker, bf16")
    parser.add_argument("--output-dir", default="outputs/bench-finetune")
    args = parser.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")

    from align.config import load_config
    from align.storage import io
    from pipelines.build_preferences import build_preferences
    from pipelines.finetune import finetune
    from pipelines.index_corpus import index_corpus
    from pipelines.make_world import make_world

    out = Path(args.output_dir).resolve()
    base = [
        f"output_dir={out}",
        f"model.name={args.model}",
        f"finetune.max_steps={args.steps}",
        f"finetune.checkpoint_every={args.steps}",
        f"finetune.pairs_per_batch={args.pairs_per_batch}",
        "finetune.contrastive_weight=0",  # pairs only: the figure is about the DPO term
        "world.pretrain_images=0",  # so no captions to pretrain on or to read
    ]
    if args.gpu:
        base += [
            "finetune.scaling.num_workers=1",
            "finetune.scaling.use_gpu=true",
            "finetune.scaling.cpus_per_worker=4",
            "finetune.decode.concurrency=4",
            "finetune.decode.num_cpus=1",
        ]
    config = load_config(REPO / "configs/demo.yaml", base)
    if not io.exists(f"{config.job_output('build_preferences')}/_manifest.json"):
        make_world(config)
        index_corpus(config)
        build_preferences(config)

    rows = []
    for name, extra in VARIANTS.items():
        run_out = out / "runs" / name.replace(" ", "_").replace(",", "")
        shutil.rmtree(run_out, ignore_errors=True)
        manifest = finetune(load_config(REPO / "configs/demo.yaml", [*base, *extra,
                                                                      f"finetune.output={run_out}"]))  # fmt: skip
        speed = manifest["throughput"]
        rows.append((name, speed["pairs_per_s"], speed["step_s"], manifest["final"]))
    cfg = config.finetune
    workers = 1 if args.gpu else cfg.scaling.num_workers
    print(
        f"machine: {os.cpu_count()} CPUs{', 1 GPU' if args.gpu else ''}; model {args.model}; "
        f"{workers} worker(s) x {args.pairs_per_batch} pairs per step; {args.steps} steps"
    )
    for name, pairs_per_s, step_s, final in rows:
        peak = (
            f", peak GPU memory {final['peak_gpu_mb']:.0f} MB" if final.get("peak_gpu_mb") else ""
        )
        print(f"  {name:42s} {pairs_per_s:8.1f} pairs/s  ({step_s * 1000:.0f} ms/step{peak})")


if __name__ == "__main__":
    main()
