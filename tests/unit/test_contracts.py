import pyarrow as pa
import pytest

from align.data.contracts import (
    ALL_CONTRACTS,
    PAIRS,
    SCORED,
    SCORER_COLUMN_PREFIX,
    ContractError,
    conform,
    require_columns,
)


def test_every_contract_has_unique_described_columns():
    for contract in ALL_CONTRACTS:
        assert len(set(contract.names)) == len(contract.names), contract.table
        assert all(c.description for c in contract.columns), contract.table
        assert contract.schema.names == contract.names


def test_missing_column_names_the_column_the_stage_and_the_writing_job():
    with pytest.raises(ContractError) as e:
        require_columns(PAIRS, ["query_id", "query"], stage="finetune.read_pairs")
    msg = str(e.value)
    assert "chosen_ref_sim" in msg and "finetune.read_pairs" in msg and "build_preferences" in msg


def test_require_only_what_the_stage_needs():
    require_columns(
        SCORED, ["image_id", "embedding"], stage="index", needed=["image_id", "embedding"]
    )


def test_conform_orders_and_casts_and_keeps_scorer_columns():
    table = pa.table(
        {
            "error": pa.array([None], pa.string()),
            "aesthetic_lowlevel": pa.array([0.5], pa.float64()),
            "image_id": ["a"],
            "embedding": pa.array([[0.1, 0.2]], pa.list_(pa.float32())),
            "aesthetic": pa.array([1.0], pa.float64()),
            "status": ["ok"],
            "stray": [1],
        }
    )
    out = conform(table, SCORED, extra_prefix=SCORER_COLUMN_PREFIX)
    assert out.column_names == SCORED.names + ["aesthetic_lowlevel"]
    assert out.schema.field("embedding").type == pa.list_(pa.float16())
    assert out.schema.field("aesthetic").type == pa.float32()
