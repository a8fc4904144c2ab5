"""finetune end to end: real Ray Train (2 CPU workers), real DeepSpeed ZeRO-2 and DDP on gloo,
real Ray Data streams (hash join, decode), real open_clip models, real checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align.config import ModelConfig, load_config
from align.data.contracts import ContractError
from align.models.clip import ModelLoadError, build_clip, register_model_configs
from align.train.steps import NonFiniteLoss
from pipelines.build_preferences import build_preferences
from pipelines.finetune import finetune
from tests.helpers import indexed_world

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration

# Two CPU workers at 0.5 CPU each leave the other CPU to the Ray Data ingest beside them.
TRAIN = [
    "finetune.scaling.num_workers=2",
    "finetune.scaling.cpus_per_worker=0.5",
    "finetune.scaling.threads=1",
    "finetune.pairs_per_batch=16",
    "finetune.captions_per_batch=16",
    "finetune.optim.lr=1e-3",
    "finetune.optim.warmup_steps=0",
]


@pytest.fixture(scope="module")
def preferences(ray_session, tmp_path_factory):
    """A small world, indexed and paired with a fixed micro-clip checkpoint (the reference)."""
    root = tmp_path_factory.mktemp("ft")
    grid = ["build_preferences.grid.u=2", "build_preferences.grid.v=2"]
    overrides = indexed_world(root, 600, *grid, *TRAIN)
    build_preferences(load_config(REPO / "configs/demo.yaml", overrides))
    return root, overrides


def run(preferences, *extra):
    root, overrides = preferences
    config = load_config(REPO / "configs/demo.yaml", [*overrides, *extra])
    return config, finetune(config)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_deepspeed_trains_exports_and_a_second_run_resumes(preferences):
    root, _ = preferences
    out = root / "ft_ds"
    # Both towers train here (the demo locks the image tower; the DDP test below covers that).
    both = "finetune.lock_image=false"
    _, manifest = run(preferences, f"finetune.output={out}", "finetune.max_steps=4",
                      "finetune.checkpoint_every=2", both)  # fmt: skip
    pairs = pq.read_table(root / "build_preferences" / "pairs")
    # The caption rows: the 600 pretraining pairs less those of the unseen families.
    captions = pq.read_table(root / "world" / "finetune_captions").num_rows
    assert 0 < captions < 600
    assert manifest["counts"]["rows_in"] == pairs.num_rows + captions
    assert manifest["counts"]["rows_error"] == 0 and manifest["steps"] == 4
    assert manifest["subnormals_flushed"] is True  # a CPU worker (x86) flushes them
    first = records(out)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert all(r["pairs"] == 32 and r["captions"] == 32 and not r["skipped"] for r in first)
    assert {"dpo_loss", "contrastive_loss", "dpo_accuracy", "reward_margin", "lr"} <= set(first[0])
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"

    # The export is an ordinary open_clip checkpoint, and training moved the weights.
    import open_clip

    register_model_configs()
    exported = open_clip.create_model("micro-clip", pretrained=str(out / "model.pt"))
    initial = build_clip(ModelConfig(name="micro-clip", pretrained=str(root / "micro.pt"))).model
    initial_weights = initial.state_dict()
    moved = {
        k: (v - initial_weights[k]).abs().max().item() for k, v in exported.state_dict().items()
    }
    assert max(v for k, v in moved.items() if k.startswith("visual.")) > 1e-4
    assert max(v for k, v in moved.items() if not k.startswith("visual.")) > 1e-4

    # Same output, more steps: resumes at step 4 rather than starting over.
    _, manifest = run(preferences, f"finetune.output={out}", "finetune.max_steps=6",
                      "finetune.checkpoint_every=2", both)  # fmt: skip
    assert manifest["resumed_from"] == [4] and manifest["steps"] == 6
    assert manifest["started_over_for"] == []
    second = records(out)
    assert [r["step"] for r in second] == [1, 2, 3, 4, 5, 6]
    assert second[:4] == first

    # Same output, another loss weight: the checkpoints were trained with the old one, so the
    # run starts over and trains every step (never hands back the old model).
    before = (out / "model.pt").read_bytes()
    _, manifest = run(preferences, f"finetune.output={out}", "finetune.max_steps=6",
                      "finetune.checkpoint_every=2", "finetune.contrastive_weight=0.3",
                      both)  # fmt: skip
    assert manifest["started_over_for"] == ["finetune.contrastive_weight"]
    assert manifest["resumed_from"] == [] and manifest["steps"] == 6
    assert [r["step"] for r in records(out)] == [1, 2, 3, 4, 5, 6]
    assert (out / "model.pt").read_bytes() != before


def test_ddp_recomputed_reference_matches_the_stored_one_and_bad_images_are_error_rows(
    preferences, monkeypatch
):
    root, _ = preferences
    # A relative output path, as `make demo` gives: Ray Train runs each worker in a working
    # directory of its own, and the export must still land where the driver looks.
    monkeypatch.chdir(root)
    # A copy of the images table with one image the pairs use broken.
    pairs = pq.read_table(root / "build_preferences" / "pairs")
    broken_id = pairs["chosen_id"][0].as_py()
    images = root / "images_broken"
    images.mkdir()
    for shard in sorted((root / "world" / "images").glob("*.parquet")):
        table = pq.read_table(shard)
        data = [b"not an image" if i == broken_id else d
                for i, d in zip(table["image_id"].to_pylist(), table["image"].to_pylist(), strict=True)]  # fmt: skip
        table = table.set_column(
            table.schema.get_field_index("image"), "image", pa.array(data, pa.binary())
        )
        pq.write_table(table, images / shard.name)
    affected = sum(
        1 for c, r in zip(pairs["chosen_id"].to_pylist(), pairs["rejected_id"].to_pylist(), strict=True)
        if broken_id in (c, r)
    )  # fmt: skip

    out = root / "ft_ddp"
    _, manifest = run(preferences, "finetune.output=ft_ddp", "finetune.backend=ddp",
                      "finetune.dpo.reference=recompute", f"finetune.images={images}",
                      "finetune.pair_images=join", "finetune.contrastive_weight=0",
                      "finetune.cache_decoded_mb=0", "finetune.max_steps=2",
                      "finetune.lock_image=true")  # fmt: skip
    assert manifest["export"] == str(out / "model.pt") and (out / "model.pt").is_file()
    # A locked image tower comes back bit for bit (the base's index stays valid); the text moved.
    import torch

    base = torch.load(root / "micro.pt", map_location="cpu")  # a bare state dict (helpers)
    aligned = torch.load(out / "model.pt", map_location="cpu")["state_dict"]
    visual = [k for k in aligned if k.startswith("visual.")]
    assert visual and all(torch.equal(aligned[k], base[k]) for k in visual)
    assert not torch.equal(aligned["text_projection"], base["text_projection"])
    counts = manifest["counts"]
    assert counts["rows_error"] == affected and counts["rows_out"] == counts["rows_in"] - affected
    errors = pq.read_table(out / "errors").to_pylist()
    assert {e["stage"] for e in errors} == {"check_pairs"}
    assert all(e["error"].startswith(f"image {broken_id}: ") for e in errors)

    step0 = records(out)[0]
    # The policy starts as the reference: recomputed similarities give DPO loss log 2, and the
    # stored ones (float16 index embeddings) differ from them by about 1e-3 at most.
    assert step0["dpo_loss"] == pytest.approx(np.log(2), abs=1e-6)
    assert step0["ref_sim_gap"] < 5e-3
    stored = records(root / "ft_ds")[0] if (root / "ft_ds").exists() else None
    if stored:  # the precomputed-reference run of the test above, same model, same step
        assert stored["dpo_loss"] == pytest.approx(step0["dpo_loss"], abs=1e-3)


def test_a_small_stream_is_decoded_once_and_each_epoch_reads_it_in_a_new_order(
    ray_session, tmp_path
):
    """Under the cap the stream is decoded once and every execution, a training epoch, yields
    the same rows in another block order; over it, each epoch decodes again."""
    import uuid

    import ray.data

    from align.runtime.stages import decoded_once_if_small

    def decode(batch):  # stands in for the image decode: leaves a file per batch it decodes
        (tmp_path / uuid.uuid4().hex).touch()
        return batch

    dataset = ray.data.range(400, override_num_blocks=20).map_batches(decode, batch_size=20)
    cached = decoded_once_if_small(dataset, decoded_mb=0.02, cap_mb=1024, seed=3, name="test")
    epochs = [cached.to_pandas()["id"].tolist() for _ in range(3)]
    assert all(sorted(e) == list(range(400)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3  # a new block order every epoch
    assert len(list(tmp_path.iterdir())) == 20  # 20 batches decoded once, not once per epoch
    assert decoded_once_if_small(dataset, 0.02, cap_mb=0, seed=3, name="test") is dataset


def test_the_training_order_does_not_depend_on_which_task_finishes_first(preferences):
    """Ray Data hands out blocks in the order their tasks finish unless told to keep them in
    order. The job keeps them in order, so a run repeats batch for batch from its seed, however
    many tasks run at once (one at a time here, eight at once there). Checked on the caption
    stream alone (the contrastive objective, as pretrain trains): the pair stream is read and
    ordered by the same code."""
    import torch

    root, _ = preferences
    # The captions in 12 files, the first holding half the rows: decoded eight at once its block
    # finishes after the others, decoded one at a time it finishes first.
    captions = root / "captions_in_12"
    captions.mkdir()
    table = pa.concat_tables(
        pq.read_table(f) for f in sorted((root / "world" / "pretrain_images").glob("*.parquet"))
    )
    half, rest = table.num_rows // 2, -(-table.num_rows // 22)
    pq.write_table(table.slice(0, half), captions / "00.parquet")
    for i, start in enumerate(range(half, table.num_rows, rest), start=1):
        pq.write_table(table.slice(start, rest), captions / f"{i:02d}.parquet")
    assert len(list(captions.iterdir())) == 12

    def train(name: str, cpus_per_decode: float) -> tuple[list[dict], dict]:
        out = root / name
        run(preferences, f"finetune.output={out}", f"finetune.captions={captions}",
            f"finetune.decode.num_cpus={cpus_per_decode}", "finetune.max_steps=8",
            "finetune.checkpoint_every=100", "finetune.objective=contrastive")  # fmt: skip
        steps = [{k: v for k, v in r.items() if k != "time_s"} for r in records(out)]
        return steps, torch.load(out / "model.pt", map_location="cpu")["state_dict"]

    steps_a, weights_a = train("one_at_a_time", 2)
    steps_b, weights_b = train("eight_at_once", 0.25)
    assert len(steps_a) == 8 and steps_a == steps_b
    assert weights_a.keys() == weights_b.keys()
    assert all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def test_non_finite_loss_skips_steps_then_stops_with_a_clear_message(preferences):
    root, _ = preferences
    out = root / "ft_nan"
    with pytest.raises(NonFiniteLoss, match=r"NaN or inf for 2 consecutive steps"):
        run(preferences, f"finetune.output={out}", "finetune.optim.lr=1e30",
            "finetune.optim.grad_clip=0", "finetune.max_bad_steps=2", "finetune.max_steps=20",
            "finetune.contrastive_weight=0")  # fmt: skip
    steps = records(out)
    assert [r["skipped"] for r in steps][-2:] == [True, True]
    assert len(steps) < 20 and (out / "metrics.png").exists()


def test_pairs_missing_a_column_or_from_another_model_fail_before_training(preferences, tmp_path):
    root, _ = preferences
    pairs = pq.read_table(root / "build_preferences" / "pairs")
    (tmp_path / "no_ref").mkdir()
    pq.write_table(pairs.drop_columns(["chosen_ref_sim"]), tmp_path / "no_ref" / "p.parquet")
    with pytest.raises(ContractError, match="'chosen_ref_sim'.*build_preferences"):
        run(preferences, f"finetune.pairs={tmp_path / 'no_ref'}", f"finetune.output={tmp_path}/o")
    with pytest.raises(ModelLoadError, match="pairs .* made with reference model"):
        run(preferences, "model.pretrained=null", f"finetune.output={tmp_path}/o")
    assert not (tmp_path / "o" / "ray").exists()


def test_cli_missing_pairs_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines.finetune", "--config", "configs/demo.yaml",
         f"output_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"finetune: error: pairs (run build_preferences first) not found: "
        f"{tmp_path}/build_preferences/pairs"
    ]
