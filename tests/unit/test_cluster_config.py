"""cluster.yaml: valid for Ray's cluster launcher (its own JSON schema) and shaped as documented:
a CPU head, a GPU worker type, a CPU worker type, autoscaling bounds, the project's set-up."""

import json
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cluster():
    return yaml.safe_load((REPO / "cluster.yaml").read_text())


def test_cluster_yaml_follows_rays_schema(cluster):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())
    jsonschema.validate(cluster, schema)


def test_a_typo_is_caught_by_the_schema(cluster):
    schema = json.loads((Path(ray.__file__).parent / "autoscaler/ray-schema.json").read_text())
    broken = {**cluster, "available_node_types": {**cluster["available_node_types"]}}
    broken["available_node_types"]["gpu_worker"] = {
        **cluster["available_node_types"]["gpu_worker"],
        "max_worker": 8,  # misspelt
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_node_types_and_autoscaling_bounds(cluster):
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    workers = {n: t for n, t in types.items() if n != cluster["head_node_type"]}
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if not t["resources"].get("GPU") and t["resources"]["CPU"]]
    assert len(gpu) == 1 and len(cpu) == 1
    for t in workers.values():
        assert 0 <= t["min_workers"] <= t["max_workers"]
    assert sum(t["max_workers"] for t in workers.values()) <= cluster["max_workers"]


def test_setup_installs_the_project_with_its_own_command(cluster):
    setup = "\n".join(cluster["setup_commands"])
    assert "make env" in setup  # the README's set-up, CUDA torch first
    makefile = (REPO / "Makefile").read_text()
    assert "\nenv: $(STAMP)" in makefile
    gpu = next(t for t in cluster["available_node_types"].values() if t["resources"].get("GPU"))
    assert any(".[gpu]" in c for c in gpu["worker_setup_commands"])
    assert any("ray start --head" in c for c in cluster["head_start_ray_commands"])


def test_the_jobs_api_is_not_open_to_the_network(cluster):
    """The dashboard serves the Jobs API, which runs whatever code it is sent."""
    head = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    assert "ray dashboard cluster.yaml" in (REPO / "cluster.yaml").read_text()


def test_every_node_names_the_shared_storage_the_jobs_write_to(cluster):
    """One storage URI, exported on every node in the variable the jobs read for output_dir (so
    Ray Train's checkpoints under it survive a lost node), and not a node's local disk."""
    import re

    from align.runtime.cli import OUTPUT_DIR_ENV

    exports = [
        m.group(1)
        for c in cluster["setup_commands"]
        for m in re.finditer(rf"export {OUTPUT_DIR_ENV}=(\S+?)'", c)
    ]
    assert len(exports) == 1 and exports[0].startswith(("s3://", "gs://", "/mnt/"))
