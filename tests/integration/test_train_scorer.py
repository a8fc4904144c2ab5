"""train_scorer end to end: ratings -> Ray Data decode -> rated_cnn trained in a Ray task ->
index_corpus scoring with it."""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from align.config import ScorerConfig, load_config
from align.data.contracts import ERRORS
from pipelines.index_corpus import index_corpus
from pipelines.make_world import make_world
from pipelines.train_scorer import train_scorer

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.integration


def test_scorer_learns_the_ratings_and_index_corpus_uses_it(ray_session, tmp_path):
    config = load_config(
        REPO / "configs/demo.yaml",
        [
            f"output_dir={tmp_path}",
            "world.num_images=3000",
            "world.shard_size=1500",
            "world.heldout_images=0",
            "world.pretrain_images=0",
            "world.rated_share=0.7",
            "train_scorer.epochs=30",
            "model.name=micro-clip",
            "index_corpus.index.recall_queries=20",
        ],
    )
    make_world(config)
    # One rated image that does not decode, and one rated id with no image: error rows.
    ratings = pq.read_table(tmp_path / "world" / "ratings.parquet")
    shard = tmp_path / "world" / "images" / "shard-00000.parquet"
    images = pq.read_table(shard)
    rated = set(ratings["image_id"].to_pylist())
    broken = next(i for i, x in enumerate(images["image_id"].to_pylist()) if x in rated)
    data = images["image"].to_pylist()
    data[broken] = data[broken][:100]  # truncated JPEG
    pq.write_table(images.set_column(1, "image", pa.array(data, pa.binary())), shard)
    extra = pa.table({"image_id": ["no-such-image"], "rating": [0.5]}, schema=ratings.schema)
    pq.write_table(pa.concat_tables([ratings, extra]), tmp_path / "world" / "ratings.parquet")

    manifest = train_scorer(config)
    m = manifest["metrics"]
    assert manifest["counts"] == {
        "rows_in": ratings.num_rows + 1,
        "rows_out": ratings.num_rows - 1,
        "rows_error": 2,
    }
    errors = pq.read_table(tmp_path / "aesthetic_scorer" / "errors")
    assert errors.schema == ERRORS.schema
    assert set(errors["row_id"].to_pylist()) == {
        images["image_id"][broken].as_py(),
        "no-such-image",
    }
    assert m["epoch_loss"][-1] < m["epoch_loss"][0]
    # Learned something real: it ranks held-out ratings better than chance by a clear margin.
    assert m["validation_pearson"] > 0.3, m

    scorers = {"lowlevel": ScorerConfig(), "rated_cnn": ScorerConfig(checkpoint=manifest["export"])}
    config = config.model_copy(
        update={"index_corpus": config.index_corpus.model_copy(update={"scorers": scorers})}
    )
    index_corpus(config)
    scored = pq.read_table(tmp_path / "index_corpus" / "scored").to_pandas()
    gt = pq.read_table(tmp_path / "world" / "ground_truth.parquet").to_pandas()
    merged = scored[scored.status == "ok"].merge(gt, on="image_id")
    corr = np.corrcoef(merged["aesthetic_rated_cnn"], merged["true_aesthetic"])[0, 1]
    assert corr > 0.3
