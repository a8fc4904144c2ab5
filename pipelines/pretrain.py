"""pretrain: CLIP InfoNCE on image-caption pairs, the demo's base model
(docs/method.md, The base model).

    python -m pipelines.pretrain --config configs/demo.yaml [key=value ...]

The finetune job run with the `pretrain` section in place of `finetune` (objective contrastive):
same Ray Train workers, DeepSpeed or DDP, checkpoints and resume, and an exported checkpoint at
{pretrain.output}/model.pt that later jobs load with model.pretrained.
"""

from __future__ import annotations

import sys

from align.config import Config
from align.runtime.cli import run_job
from pipelines.finetune import finetune


def pretrain(config: Config) -> dict:
    return finetune(config.model_copy(update={"finetune": config.pretrain}), section="pretrain")


def main(argv: list[str] | None = None) -> int:
    return run_job("pretrain", pretrain, argv)


if __name__ == "__main__":
    sys.exit(main())
