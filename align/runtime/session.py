"""Joining Ray (an existing cluster when there is one, an embedded one when not), and telling
Ray's own failures (a node, actor or worker lost) from a stage's."""

from __future__ import annotations

import os

import ray
from ray import exceptions as rex
from ray.data.exceptions import SystemException

from align.config import RayConfig
from align.log import get_logger

log = get_logger(__name__)


def init_ray(cfg: RayConfig) -> None:
    """Join `cfg.address` or $RAY_ADDRESS (as `ray job submit` sets it); otherwise start an
    embedded Ray on this machine. A no-op when Ray is already initialised (tests, the demo)."""

    if ray.is_initialized():
        return
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        log.info("joining the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=True)
    else:
        log.info("starting an embedded Ray (num_cpus=%s)", cfg.num_cpus or "all")
        # "local": a Ray of its own, even where `ray start` left a cluster on this machine (a bare
        # ray.init() would join that one; joining is what an address is for).
        ray.init(
            address="local", num_cpus=cfg.num_cpus, include_dashboard=False, log_to_driver=True
        )


def failed_inside_ray(error: BaseException | None) -> bool:
    """Whether a Ray Data run failed in Ray itself: a node, actor or worker lost (Ray Data raises
    its internal failures `from SystemException()`; Ray Core names dead actors and nodes), not the
    code the stages ran (UserCodeException) nor the driver. Such a run can be started over."""

    lost = (
        rex.NodeDiedError,
        rex.ActorDiedError,
        rex.ActorUnavailableError,
        rex.WorkerCrashedError,
        rex.ObjectLostError,
    )
    while error is not None:
        if isinstance(error, rex.UserCodeException):
            return False
        if isinstance(error, (SystemException, *lost)):
            return True
        error = error.__cause__
    return False


def again_if_failed_inside_ray(run, retries: int, what: str):
    """`run()`, called again (up to `retries` times) while it fails inside Ray; `run` must start
    over cleanly (its output written afresh)."""
    for attempt in range(retries + 1):
        try:
            return run()
        except Exception as e:
            if attempt == retries or not failed_inside_ray(e):
                raise
            first_line = str(e).splitlines()[0][:300] if str(e) else ""
            log.warning(
                "%s failed inside Ray (%s: %s); running it again (%d of %d)",
                what,
                type(e).__name__,
                first_line,
                attempt + 1,
                retries,
            )


# ---------------------------------------------------------------------------------------------
# Torch threads that follow the CPUs a task actually gets.
#
