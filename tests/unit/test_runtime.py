"""Torch threads follow the CPUs a task actually gets: Ray's assignment and the cores that other
processes leave free (a thread that shares a core with a busy process stalls every op)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from align.runtime.threads import (
    TorchThreads,
    cpus_free_of_other_work,
    flush_subnormals,
    threads_for_free_cpus,
)


def test_free_cpus_count_idle_time_and_this_process_own_use():
    # 2 s of wall clock: the machine idled 1.5 CPU-seconds, this process used 1.0.
    assert cpus_free_of_other_work((0.0, 10.0, 3.0), (2.0, 11.5, 4.0)) == pytest.approx(1.25)
    assert cpus_free_of_other_work(None, (2.0, 11.5, 4.0)) is None


def test_a_core_half_free_earns_a_thread_so_rays_own_daemons_do_not_cost_one():
    assert threads_for_free_cpus(1.72, limit=2) == 2  # an idle machine beside Ray's daemons
    assert threads_for_free_cpus(1.3, limit=2) == 1  # one core mostly busy
    assert threads_for_free_cpus(0.0, limit=4) == 1 and threads_for_free_cpus(9.0, limit=4) == 4
    assert threads_for_free_cpus(None, limit=3) == 3  # no /proc/stat: the limit


@pytest.fixture
def every_core_busy():
    """One busy loop per logical CPU, at normal priority (a browser, a build, another job)."""
    hogs = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"])
        for _ in range(os.cpu_count() or 1)
    ]
    yield
    for hog in hogs:
        hog.kill()
        hog.wait()


def test_threads_drop_to_one_when_other_work_holds_every_core(every_core_busy):
    before = torch.get_num_threads()
    try:
        threads = TorchThreads(limit=4, first_sample_s=0.5)
        assert threads.threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_that_do_not_follow_the_load_keep_the_limit_on_busy_cores(every_core_busy):
    before = torch.get_num_threads()
    try:
        threads = TorchThreads(limit=2, first_sample_s=0.5, every_s=0.0, follow_load=False)
        assert threads.threads == 2 and torch.get_num_threads() == 2
        assert threads.refresh() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_threads_never_exceed_the_configured_limit():
    before = torch.get_num_threads()
    try:
        assert TorchThreads(limit=1).threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_in_a_ray_task_the_limit_is_the_cpus_ray_assigned(ray_session):
    @ray_session.remote(num_cpus=1)
    def limit() -> int:
        return TorchThreads().limit

    @ray_session.remote(num_cpus=0.25)
    def fractional() -> int:
        return TorchThreads().limit

    assert ray_session.get(limit.remote()) == 1
    assert ray_session.get(fractional.remote()) == 1


def test_flush_subnormals_makes_cpu_math_treat_them_as_zero():
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal
    try:
        torch.set_flush_denormal(False)
        assert (tiny * 1.0).item() != 0.0
        assert flush_subnormals() is True
        assert (tiny * 1.0).item() == 0.0
        assert (torch.tensor([1e-30]) * 1.0).item() == pytest.approx(1e-30)  # normal: kept
    finally:
        torch.set_flush_denormal(False)


def test_a_pool_has_no_more_actors_than_blocks():
    from align.config import PoolConfig
    from align.runtime.stages import pool_for_blocks

    pool = PoolConfig(concurrency=4, num_gpus=1.0, threads=2)
    assert pool_for_blocks(pool, 2).concurrency == 2
    assert pool_for_blocks(pool, 0).concurrency == 1  # an empty unit still has its pool
    assert pool_for_blocks(pool, 9) is pool and pool_for_blocks(pool, None) is pool
    capped = pool_for_blocks(pool, 3)
    assert (capped.num_gpus, capped.threads, capped.batch_size) == (1.0, 2, pool.batch_size)
