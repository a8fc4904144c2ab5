"""Connecting to Ray: an existing cluster when there is one, an embedded one when not."""

from __future__ import annotations

import os

from align.config import RayConfig
from align.log import get_logger

log = get_logger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Join `cfg.address` or $RAY_ADDRESS (as `ray job submit` sets it); otherwise start an
    embedded Ray on this machine. A no-op when Ray is already initialised (tests, the demo)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting an embedded Ray (num_cpus=%s)", cfg.num_cpus or "all")
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True)
