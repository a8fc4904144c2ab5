import json

import pytest

from align.config import Config
from align.runtime.manifest import MANIFEST_NAME, CountsDoNotClose, JobManifest, read_manifest


def test_manifest_records_config_counts_timings_versions(tmp_path):
    m = JobManifest("unit", Config())
    with m.stage("work"):
        pass
    m.write(str(tmp_path), rows_in=5, rows_out=4, rows_error=1)
    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert data["counts"] == {"rows_in": 5, "rows_out": 4, "rows_error": 1}
    assert "work" in data["timings_s"] and "total" in data["timings_s"]
    assert data["versions"]["ray"] != "not installed"
    assert data["config"]["world"]["seed"] == 0
    assert read_manifest(str(tmp_path))["job"] == "unit"


def test_counts_that_do_not_close_are_refused(tmp_path):
    with pytest.raises(CountsDoNotClose, match="5 rows in"):
        JobManifest("unit", Config()).write(str(tmp_path), rows_in=5, rows_out=3, rows_error=1)
    assert not (tmp_path / MANIFEST_NAME).exists()


def test_reading_a_missing_manifest_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        read_manifest(str(tmp_path))
