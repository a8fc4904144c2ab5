"""Every job config builds its object graph without downloading anything: the CLIP architecture
(on PyTorch's meta device) and its pretrained tag, the aesthetic heads' input width, the vLLM
rewriter and judge processor configs (validated by ray.data.llm), DeepSpeed's ZeRO section,
Ray Train's scaling and every Ray Data pool. A typo in a real-model config fails here, not on a
cluster."""

from pathlib import Path

import pytest
import torch

from align.config import load_config
from align.models.aesthetics import check_scorer_model
from align.models.clip import check_model, model_id

REPO = Path(__file__).resolve().parents[2]
JOB_CONFIGS = [
    p for p in sorted((REPO / "configs").glob("*.yaml")) if "\napplications:" not in p.read_text()
]
# The real-model config with each documented pretrained tag.
CASES = [(p, []) for p in JOB_CONFIGS] + [
    (
        REPO / "configs/vit-l-14.yaml",
        ["model.pretrained=laion2b_s32b_b82k", "index_corpus.scorers={lowlevel: {weight: 1}}"],
    )
]
LAION_HEAD_WIDTH = 768  # the released improved-aesthetic-predictor heads read ViT-L-14 embeddings


@pytest.mark.parametrize(
    ("path", "overrides"), CASES, ids=[f"{p.stem}{'+' + o[0] if o else ''}" for p, o in CASES]
)
def test_config_builds_its_object_graph_without_downloads(path, overrides):
    import open_clip
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from ray.train import ScalingConfig

    from actors.llm import vllm_processor_config
    from align.runtime.stages import actor_pool, task_pool
    from align.train.steps import deepspeed_config

    config = load_config(path, overrides)
    if config.model.pretrained and "{output_dir}" in config.model.pretrained:
        pytest.skip("model is a checkpoint an earlier job writes")
    facts = check_model(config.model)  # name and pretrained tag known to open_clip
    with torch.device("meta"):
        model = open_clip.create_model(config.model.name, pretrained=None, device="meta")
    assert model.text_projection.shape[-1] == facts.embed_dim

    for name, scorer in config.index_corpus.scorers.items():
        assert name in ("lowlevel", "laion_mlp", "rated_cnn"), name
        if name == "laion_mlp":
            assert scorer.checkpoint, "laion_mlp needs its weights file"
            assert facts.embed_dim == LAION_HEAD_WIDTH, "the LAION head reads 768-wide embeddings"
        # The embedding heads read the model they were trained on, not just one of its width.
        check_scorer_model(name, scorer.trained_on, model_id(config.model))

    for rewrite in (config.build_preferences.rewrite, config.evaluate.rewrite):
        if rewrite.backend == "vllm":
            assert vllm_processor_config(rewrite.vllm).model_source == rewrite.vllm.model
            assert rewrite.variant in rewrite.prompt_templates
    judge = config.evaluate.judge
    if judge.backend == "vllm":
        processor = vllm_processor_config(judge.vllm, multimodal=True)
        assert processor.prepare_multimodal_stage["enabled"]
    for systems in judge.compare:
        assert set(systems) <= set(config.evaluate.systems), systems

    for train in (config.pretrain, config.finetune):
        micro = train.pairs_per_batch if train.uses_pairs else train.captions_per_batch
        ds = deepspeed_config(train, micro, bf16=train.scaling.use_gpu)
        assert DeepSpeedZeroConfig(**ds["zero_optimization"]).stage == train.deepspeed.zero_stage
        resources = {
            "CPU": train.scaling.cpus_per_worker,
            **({"GPU": 1} if train.scaling.use_gpu else {}),
        }
        ScalingConfig(
            num_workers=train.scaling.num_workers,
            use_gpu=train.scaling.use_gpu,
            resources_per_worker=resources,
        )
    for pool in (config.index_corpus.embed, config.index_corpus.score, config.build_preferences.embed,
                 config.build_preferences.retrieve, config.evaluate.embed):  # fmt: skip
        assert actor_pool(pool)["compute"].min_size == pool.concurrency
    for pool in (config.index_corpus.decode, config.finetune.decode, config.evaluate.decode):
        task_pool(pool)
