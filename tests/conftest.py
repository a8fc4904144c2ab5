"""Shared fixtures: one small real Ray session for the whole test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_ASSETS = REPO.parent / "shared" / "assets"


@pytest.fixture(scope="session")
def ray_session():
    """A real local Ray with 2 CPUs, shared by every test that needs one."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        # Metrics reach the node's Prometheus endpoint every 2 s (Ray's default: 10 s), so the
        # metrics test finds a search's metrics without a long wait.
        ray.init(
            address="local",  # never a cluster another test or `ray start` left on the machine
            num_cpus=2,
            include_dashboard=False,
            log_to_driver=False,
            _system_config={"metrics_report_interval_ms": 2000},
        )
    yield ray
    ray.shutdown()
