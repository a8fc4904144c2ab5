"""index_corpus end to end: real Ray Data actor pools, real open_clip, real FAISS, real Parquet."""

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from align.config import load_config
from align.data.contracts import ERRORS, SCORED, SCORER_COLUMN_PREFIX
from align.models.clip import image_tower_digest
from align.search.corpus import load_corpus, load_index
from pipelines.index_corpus import check_inputs, index_corpus, unit_pipeline
from pipelines.make_world import make_world
from tests.helpers import metric_total, scraped_metrics, wait_for_metrics

from ..conftest import SHARED_ASSETS

JOB_ROWS = "ray_aesthetic_align_job_rows_total"
JOB_ERROR_ROWS = "ray_aesthetic_align_job_error_rows_total"

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration
SMALL = ["model.name=micro-clip", "index_corpus.index.recall_queries=50"]


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def good_image(seed, mode="RGB", size=(48, 40)):
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr).convert(mode)


GOOD = {
    "plain.jpg": encode(good_image(0), "JPEG"),
    "cmyk.jpg": encode(good_image(1, "CMYK"), "JPEG"),
    "grey.png": encode(good_image(2, "L"), "PNG"),
    "palette.png": encode(good_image(3).convert("P"), "PNG", transparency=0),
    "alpha.png": encode(good_image(4, "RGBA"), "PNG"),
    "sixteen.png": encode(
        Image.fromarray(np.arange(1600, dtype=np.uint16).reshape(40, 40) * 40), "PNG"
    ),
    "nested/deeper/photo.webp": encode(good_image(5), "WEBP"),
}
BAD = {
    "empty.jpg": (b"", "empty file"),
    "text.jpg": (b"this is not a picture", "not an image"),
    "truncated.jpg": (encode(good_image(6, size=(200, 200)), "JPEG")[:300], "corrupt"),
    "huge.png": (encode(Image.new("RGB", (3000, 3000)), "PNG"), "too large"),
}


@pytest.fixture(scope="module")
def bad_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for name, data in {**GOOD, **{k: v[0] for k, v in BAD.items()}}.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    (root / "notes.txt").write_text("not an image extension: not an input row")
    return root


def read_out(out):
    scored = pq.read_table(out / "index_corpus" / "scored")
    errors = pq.read_table(out / "index_corpus" / "errors")
    manifest = json.loads((out / "index_corpus" / "_manifest.json").read_text())
    return scored, errors, manifest


def test_folder_with_bad_files_accounts_for_every_row(ray_session, bad_corpus, tmp_path):
    config = load_config(
        REPO / "configs/demo.yaml",
        [
            f"output_dir={tmp_path}",
            f"index_corpus.input={bad_corpus}",
            "index_corpus.input_format=folder",
            "index_corpus.images_per_unit=4",
            "max_image_pixels=4000000",
            "index_corpus.index.type=hnsw",
            *SMALL,
        ],
    )
    job, rows, error_rows = {"job": "index_corpus"}, JOB_ROWS, JOB_ERROR_ROWS
    before = scraped_metrics()
    index_corpus(config)
    # Its progress as metrics: every row finished, the error rows among them.
    wait_for_metrics(
        lambda now: metric_total(now, rows, **job) - metric_total(before, rows, **job) == 11
        and metric_total(now, error_rows, **job) - metric_total(before, error_rows, **job) == 4
    )
    scored, errors, manifest = read_out(tmp_path)
    assert scored.schema.names == SCORED.names + [SCORER_COLUMN_PREFIX + "lowlevel"]
    assert errors.schema == ERRORS.schema
    rows = {r["image_id"]: r for r in scored.to_pylist()}
    assert set(rows) == set(GOOD) | set(BAD)  # every input row, once
    for name, data in GOOD.items():
        assert rows[name]["status"] == "ok" and len(rows[name]["embedding"]) == 32
        assert np.isfinite(rows[name]["aesthetic"])
        # Our own hash of the bytes read (a folder has no sidecar), and no caption or url.
        assert rows[name]["sha256"] == hashlib.sha256(data).hexdigest()
        assert rows[name]["caption"] is None and rows[name]["url"] is None
    reasons = {r["row_id"]: r["error"] for r in errors.to_pylist()}
    assert set(reasons) == set(BAD)
    for name, (_, reason) in BAD.items():
        assert reason in reasons[name] and rows[name]["status"] == "error"
        assert rows[name]["embedding"] is None and rows[name]["aesthetic"] is None
    assert manifest["counts"] == {"rows_in": 11, "rows_out": 7, "rows_error": 4}
    assert manifest["units"] == 3
    assert "z-scored" in manifest["aesthetic"]["combined"]
    index, id_map, index_manifest = load_index(str(tmp_path / "index_corpus" / "index"))
    assert index.ntotal == 7 and index_manifest["spec"]["type"] == "hnsw"
    assert sorted(id_map["image_id"].to_pylist()) == sorted(GOOD)
    assert 0.0 <= index_manifest["recall_at_10"] <= 1.0
    # What a model must share to search it without embedding the corpus again.
    assert index_manifest["image_tower"] == image_tower_digest(config.model)


# img2dataset's sidecar parquet and .json: the input columns (url, caption), then what its
# downloader appends, in its order.
IMG2DATASET_META = (
    "url", "caption", "key", "status", "error_message", "width", "height", "original_width",
    "original_height", "sha256",
)  # fmt: skip


def img2dataset_shard(folder: Path, shard: int, samples: list, sidecar_parquet=True):
    """One shard as img2dataset's WebDatasetSampleWriter writes it: `{shard:05d}.tar` holding
    `{key}.jpg`, `{key}.txt`, `{key}.json` for each downloaded sample (keys of 9 digits), the
    `{shard:05d}.parquet` of every sample's metadata (failed downloads too) and
    `{shard:05d}_stats.json`. samples: (image bytes or None for a failed download, caption)."""
    import pyarrow as pa

    metas = []
    with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
        for i, (image, caption) in enumerate(samples):
            key = f"{shard:05d}{i:04d}"
            ok = image is not None
            meta = {
                "url": f"https://example.com/{key}.jpg",
                "caption": caption,
                "key": key,
                "status": "success" if ok else "failed_to_download",
                "error_message": None if ok else "HTTP Error 404: Not Found",
                "width": 48 if ok else None,
                "height": 40 if ok else None,
                "original_width": 48 if ok else None,
                "original_height": 40 if ok else None,
                "sha256": hashlib.sha256(image).hexdigest() if ok else None,
            }
            metas.append(meta)
            if not ok:
                continue  # the writer puts only downloaded samples in the tar
            members = {
                f"{key}.jpg": image,
                f"{key}.txt": caption.encode(),
                f"{key}.json": json.dumps(meta, indent=4).encode(),
            }
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if sidecar_parquet:
        pq.write_table(pa.Table.from_pylist(metas).select(list(IMG2DATASET_META)),
                       folder / f"{shard:05d}.parquet")  # fmt: skip
    successes = sum(m["status"] == "success" for m in metas)
    stats = {"count": len(metas), "successes": successes, "failed_to_download":
             len(metas) - successes, "failed_to_resize": 0, "duration": 1.0}  # fmt: skip
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats, indent=4))
    return metas


def test_img2dataset_webdataset_shards_read_in_full(ray_session, tmp_path):
    """Captions, urls and hashes from the sidecars reach the scored shards and the id map;
    failed downloads are error rows (from the sidecar parquet) or counted (from _stats.json
    alone); an exact duplicate across shards is recorded and left out of the index."""
    shards = tmp_path / "wds"
    shards.mkdir()
    image = [encode(good_image(i), "JPEG") for i in range(8)]
    metas = [
        *img2dataset_shard(shards, 0, [(image[0], "a red star"), (None, "gone"),
                                       (image[1], "a blue moon"), (image[2], "a green tree")]),
        *img2dataset_shard(shards, 1, [(image[3], "a cat"), (image[0], "the red star again"),
                                       (None, "also gone"), (image[4], "a dog")]),
        *img2dataset_shard(shards, 2, [(image[5], "a hat"), (None, "only counted")],
                           sidecar_parquet=False),
    ]  # fmt: skip
    out = tmp_path / "out"
    config = load_config(
        REPO / "configs/demo.yaml",
        [
            f"output_dir={out}",
            f"index_corpus.input={shards}",
            "index_corpus.input_format=webdataset",
            "index_corpus.files_per_unit=2",
            "index_corpus.index.num_shards=2",
            "index_corpus.index.drop_exact_duplicates=true",
            *SMALL,
        ],
    )
    index_corpus(config)
    scored, errors, manifest = read_out(out)
    listed = {m["key"]: m for m in metas if m["key"] != "000020001"}  # in no sidecar parquet
    rows = {r["image_id"]: r for r in scored.to_pylist()}
    assert set(rows) == set(listed)  # every row a sidecar names, once
    for key, meta in listed.items():
        row = rows[key]
        assert row["status"] == ("ok" if meta["status"] == "success" else "error")
        assert (row["caption"], row["url"]) == (meta["caption"], meta["url"])
        assert row["sha256"] == meta["sha256"]
    download_errors = {r["row_id"]: r for r in errors.to_pylist()}
    assert set(download_errors) == {"000000001", "000010002"}
    assert all(r["stage"] == "download" and "HTTP Error 404" in r["error"]
               for r in download_errors.values())  # fmt: skip
    assert manifest["counts"] == {"rows_in": 9, "rows_out": 7, "rows_error": 2}
    assert manifest["failed_downloads"] == 3  # two listed, one only in shard 2's _stats.json

    index_dir = str(out / "index_corpus" / "index")
    index, id_map, index_manifest = load_index(index_dir)
    duplicates = pq.read_table(f"{index_dir}/duplicates.parquet").to_pylist()
    assert duplicates == [
        {"image_id": "000010001", "duplicate_of": "000000000", "sha256": metas[0]["sha256"]}
    ]
    assert index_manifest["exact_duplicates"]["found"] == 1
    assert len(index_manifest["shards"]) == 2 and index.ntotal == 6
    assert "000010001" not in id_map["image_id"].to_pylist()
    by_id = {r["image_id"]: r for r in id_map.to_pylist()}
    assert by_id["000000002"]["caption"] == "a blue moon"
    assert by_id["000000002"]["url"] == "https://example.com/000000002.jpg"
    # What evaluate loads (every shard's rows) leaves the same duplicate out.
    _, loaded_ids, _, _ = load_corpus(str(out / "index_corpus"))
    assert loaded_ids.tolist() == id_map["image_id"].to_pylist()
    # Fan-out search finds each indexed vector as its own best match.
    kept = [r for r in scored.to_pylist() if r["status"] == "ok" and r["image_id"] in by_id]
    _, found = index.search(np.array([r["embedding"] for r in kept], dtype=np.float32), 1)
    row_to_id = dict(zip(id_map["row"].to_pylist(), id_map["image_id"].to_pylist(), strict=True))
    assert [row_to_id[r] for r in found[:, 0]] == [r["image_id"] for r in kept]


def run_unit_of_40_images(tmp_path, *overrides):
    """unit_pipeline over one Parquet file of 40 small images: the materialised dataset and the
    warnings Ray Data gave while it ran."""
    import pyarrow as pa

    ids = [f"i{i:02d}" for i in range(40)]
    images = [encode(good_image(i), "PNG") for i in range(40)]
    pq.write_table(pa.table({"image_id": ids, "image": images}), tmp_path / "in.parquet")
    config = load_config(
        REPO / "configs/demo.yaml",
        [f"output_dir={tmp_path}", f"index_corpus.input={tmp_path / 'in.parquet'}", *overrides],
    )
    source = config.expand(config.index_corpus.input)
    model, units, layout = check_inputs(config, source)
    with warnings.catch_warnings(record=True) as given:
        warnings.simplefilter("always")
        ds = unit_pipeline(config, units[0], source, model, layout, len(ids)).materialize()
    assert sorted(ds.to_pandas()["image_id"]) == ids
    return ds, [str(w.message) for w in given]


def test_decoded_blocks_hold_at_most_block_images(ray_session, tmp_path):
    """Small images stream through the pools in blocks of block_images, not one block a unit
    (Ray's 128 MiB bound alone holds thousands of them), so every embed actor has work."""
    ds, _ = run_unit_of_40_images(tmp_path, "index_corpus.block_images=8", *SMALL)
    # Ray Data's own account of the decode stage: the blocks it produced and their rows.
    decode = re.search(
        r"MapBatches\(decode_batch\): \d+ tasks executed, (\d+) blocks produced.*?"
        r"Output num rows per block: (\d+) min, (\d+) max",
        ds.stats(),
        re.DOTALL,
    )
    assert decode is not None, ds.stats()
    blocks, most_rows = int(decode.group(1)), int(decode.group(3))
    assert blocks >= 5 and most_rows <= 8


def test_a_unit_of_one_block_starts_one_actor_a_pool(ray_session, tmp_path):
    """Two embedders and two scorers configured, one block in the unit: one actor each, and no
    warning from Ray Data that a pool had more actors than inputs."""
    overrides = ["index_corpus.embed.concurrency=2", "index_corpus.score.concurrency=2"]
    _, given = run_unit_of_40_images(tmp_path, *overrides, *SMALL)
    assert not [w for w in given if "concurrent actors" in w], given


def test_parquet_with_paths_and_a_missing_file(ray_session, bad_corpus, tmp_path):
    import pyarrow as pa

    table = pa.table(
        {"key": ["a", "b"], "url": [str(bad_corpus / "plain.jpg"), str(bad_corpus / "gone.jpg")]}
    )
    pq.write_table(table, tmp_path / "paths.parquet")
    out = tmp_path / "out"
    config = load_config(
        REPO / "configs/demo.yaml",
        [
            f"output_dir={out}",
            f"index_corpus.input={tmp_path / 'paths.parquet'}",
            "index_corpus.id_column=key",
            "index_corpus.image_column=null",
            "index_corpus.path_column=url",
            *SMALL,
        ],
    )
    index_corpus(config)
    scored, errors, manifest = read_out(out)
    assert manifest["counts"] == {"rows_in": 2, "rows_out": 1, "rows_error": 1}
    assert errors.to_pylist() == [
        {"row_id": "b", "stage": "decode", "error": f"file not found: {bad_corpus / 'gone.jpg'}"}
    ]


def run_cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.index_corpus", "--config", "configs/demo.yaml", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        start_new_session=True,
        **kw,
    )


def test_kill_and_rerun_finishes_missing_units_without_duplicates(ray_session, tmp_path):
    make_world(
        load_config(
            REPO / "configs/demo.yaml",
            [
                f"output_dir={tmp_path}",
                "world.num_images=600",
                "world.shard_size=100",
                "world.pretrain_images=0",
            ],
        )
    )
    args = [f"output_dir={tmp_path}", "index_corpus.files_per_unit=2", *SMALL]
    staging = tmp_path / "index_corpus" / "_staging"
    proc = run_cli(*args)
    deadline = time.time() + 240
    while not (staging / "unit-00000" / "_SUCCESS.json").exists():
        assert proc.poll() is None and time.time() < deadline, (
            proc.stdout.read() if proc.poll() is not None else "timeout"
        )
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its embedded Ray, mid-run
    proc.wait()
    assert not (tmp_path / "index_corpus" / "_manifest.json").exists()
    first = json.loads((staging / "unit-00000" / "_SUCCESS.json").read_text())

    rerun = run_cli(*args)
    log, _ = rerun.communicate(timeout=400)
    assert rerun.returncode == 0, log
    assert "unit 1/3 already done, skipped" in log
    assert json.loads((staging / "unit-00000" / "_SUCCESS.json").read_text()) == first
    scored, _, manifest = read_out(tmp_path)
    ids = scored["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 600
    assert manifest["counts"] == {"rows_in": 600, "rows_out": 600, "rows_error": 0}

    # steps [index]: the index again from these scored shards, other settings, nothing embedded.
    scored_files = sorted((tmp_path / "index_corpus" / "scored").glob("*.parquet"))
    before = {f: f.stat().st_mtime_ns for f in [*scored_files, *staging.glob("*/_SUCCESS.json")]}
    config = load_config(REPO / "configs/demo.yaml", [
        *args, "index_corpus.steps=[index]", "index_corpus.index.type=ivfpq",
        "index_corpus.index.num_shards=3", "index_corpus.index.ivf_nlist=8",
    ])  # fmt: skip
    rebuilt = index_corpus(config)
    assert "embed_and_score" not in rebuilt["timings_s"]
    assert rebuilt["counts"] == manifest["counts"]
    assert {f: f.stat().st_mtime_ns for f in before} == before  # nothing re-embedded
    index, id_map, index_manifest = load_index(str(tmp_path / "index_corpus" / "index"))
    assert index_manifest["spec"]["type"] == "ivfpq" and len(index_manifest["shards"]) == 3
    assert index.ntotal == 600 and sorted(id_map["image_id"].to_pylist()) == sorted(ids)
    assert len(list((tmp_path / "index_corpus" / "index").glob("shard-*.faiss"))) == 3


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["model.name=ViT-Nope"], "unknown model name 'ViT-Nope'"),
        (["model.name=ViT-B-32", "model.pretrained=not-a-tag"], "no pretrained tag 'not-a-tag'"),
        (["model.pretrained=/nowhere/ckpt.pt"], "checkpoint not found"),
        (
            ["index_corpus.scorers.laion_mlp.checkpoint=/nowhere/head.pth"],
            "scorer laion_mlp was trained on ViT-L-14:openai embeddings but the corpus is",
        ),
        (
            [
                "index_corpus.scorers.laion_mlp.checkpoint=/nowhere/head.pth",
                "index_corpus.scorers.laion_mlp.trained_on=micro-rn-clip",  # the demo model
            ],
            "laion_mlp checkpoint not found",
        ),
        (["index_corpus.input=/nowhere/images"], "index_corpus input not found: /nowhere/images"),
    ],
)
def test_bad_model_scorer_or_input_fails_fast_in_one_line(tmp_path, args, expected):
    proc = run_cli(f"output_dir={tmp_path}", *args)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2, out
    lines = [
        line for line in out.strip().splitlines() if "Warning" not in line and "warn" not in line
    ]
    assert expected in lines[-1] and lines[-1].startswith("index_corpus: error:")
    assert not (tmp_path / "index_corpus").exists()  # nothing was read or written


def test_real_laion_head_on_a_768_wide_model_in_the_job(ray_session, tmp_path):
    head = SHARED_ASSETS / "laion-improved-aesthetic-predictor" / "sac+logos+ava1-l14-linearMSE.pth"
    photo = SHARED_ASSETS / "laion-improved-aesthetic-predictor" / "sample-photo.jpeg"
    if not head.exists():
        pytest.skip("shared assets not beside the repo")
    corpus = tmp_path / "photos"
    corpus.mkdir()
    (corpus / "sample.jpeg").write_bytes(photo.read_bytes())
    (corpus / "noise.png").write_bytes(encode(good_image(9, size=(120, 90)), "PNG"))
    # ViT-L-14 has 768-wide embeddings (random weights here: no download); tiny pools.
    config = load_config(
        REPO / "configs/demo.yaml",
        [
            f"output_dir={tmp_path / 'out'}",
            f"index_corpus.input={corpus}",
            "index_corpus.input_format=folder",
            "model.name=ViT-L-14",
            "index_corpus.embed.batch_size=2",
            # The head was trained on OpenAI's weights; these random ones stand in for them.
            f"index_corpus.scorers={{lowlevel: {{weight: 1}}, laion_mlp: {{weight: 1, checkpoint: '{head}', trained_on: ViT-L-14}}}}",
        ],
    )
    index_corpus(config)
    scored, _, manifest = read_out(tmp_path / "out")
    assert manifest["counts"]["rows_out"] == 2
    assert np.isfinite(scored["aesthetic_laion_mlp"].to_numpy()).all()
    assert set(manifest["aesthetic"]["weights"]) == {"lowlevel", "laion_mlp"}


def test_a_unit_that_failed_inside_ray_runs_again_and_one_that_failed_in_code_does_not(
    ray_session, tmp_path, monkeypatch
):
    """A unit whose pipeline lost its worker (a process gone, as on a lost node) is run again
    from an empty folder; an exception of the stages' code is raised at once."""
    import ray.data

    import pipelines.index_corpus as job

    crashed = tmp_path / "crashed_once"

    def crash_once(batch):
        if not crashed.exists():
            crashed.touch()
            os._exit(1)  # the worker process dies, as every process on a lost node does
        return batch

    def code_error(batch):
        raise ValueError("a bug in a stage")

    calls = []

    def pipeline(stage):
        def unit_pipeline(*args):
            calls.append(stage)
            # No task retries: the failure reaches the driver, as one Ray Data cannot retry does.
            return ray.data.range(20).map_batches(stage, max_retries=0)

        return unit_pipeline

    config = load_config(REPO / "configs/demo.yaml", [f"output_dir={tmp_path}"])
    unit_dir = tmp_path / "unit"
    unit_dir.mkdir()
    (unit_dir / "left-by-the-failed-attempt.parquet").write_bytes(b"partial")
    monkeypatch.setattr(job, "unit_pipeline", pipeline(crash_once))
    job.write_unit(config, [], "", str(unit_dir), None, None, None)
    assert len(calls) == 2  # the second attempt wrote the unit
    assert sorted(pq.read_table(unit_dir)["id"].to_pylist()) == list(range(20))

    calls.clear()
    monkeypatch.setattr(job, "unit_pipeline", pipeline(code_error))
    with pytest.raises(Exception, match="a bug in a stage"):
        job.write_unit(config, [], "", str(unit_dir), None, None, None)
    assert len(calls) == 1
