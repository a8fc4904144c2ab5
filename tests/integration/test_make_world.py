"""make_world end to end, as a user runs it: the command line, real Ray, real Parquet."""

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def run_job(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "pipelines.make_world", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "RAY_AUTH_MODE": "disabled"},
    )


def parquet_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def test_demo_world_twice_with_the_same_seed_is_byte_identical(tmp_path):
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        result = run_job(
            "--config", "configs/demo.yaml", f"output_dir={out}", "world.num_images=750",
            "world.shard_size=250", "world.heldout_images=100", "world.pretrain_images=200",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        runs.append(out / "world")
    files_a, files_b = parquet_files(runs[0]), parquet_files(runs[1])
    assert files_a == files_b
    assert len([f for f in files_a if f.startswith("images/")]) == 3  # 750 / shard_size 250
    images = pq.read_table(runs[0] / "images")
    assert images.num_rows == 750 and len(set(images["image_id"].to_pylist())) == 750
    pretraining = pq.read_table(runs[0] / "pretrain_images")
    assert pretraining.num_rows == 200
    assert not set(pretraining["image_id"].to_pylist()) & set(images["image_id"].to_pylist())
    manifest = json.loads((runs[0] / "_manifest.json").read_text())
    assert manifest["counts"] == {"rows_in": 750, "rows_out": 750, "rows_error": 0}
    assert sum(manifest["world"]["queries"].values()) == 240
    assert manifest["world"]["queries"]["unseen"] == 5 * len(manifest["world"]["unseen_families"])
    print("make_world 750 images, render stage (s):", manifest["timings_s"]["render"])


def test_rerun_with_fewer_images_leaves_no_stale_shards(tmp_path):
    for n in (600, 300):  # 3 shards of 200, then 2
        assert (
            run_job(
                "--config",
                "configs/demo.yaml",
                f"output_dir={tmp_path}",
                f"world.num_images={n}",
                "world.shard_size=200",
                "world.heldout_images=50",
                "world.pretrain_images=0",
            ).returncode
            == 0
        )
    assert pq.read_table(tmp_path / "world" / "images").num_rows == 300
    assert len(list((tmp_path / "world" / "images").glob("*.parquet"))) == 2


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--config", "configs/demo.yaml", "world.sed=1"], "unknown config key 'world.sed'"),
        (["--config", "configs/demo.yaml", "world.num_images=lots"], "world.num_images"),
        (["--config", "configs/missing.yaml"], "config file not found: configs/missing.yaml"),
    ],
)
def test_bad_config_exits_with_one_clear_line_before_any_work(tmp_path, args, expected):
    result = run_job(*args, f"output_dir={tmp_path}", timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not any(tmp_path.iterdir())  # nothing was written
