"""Torch threads that follow the CPUs a task actually gets, and subnormal floats on CPU."""

from __future__ import annotations

import os
import time

import ray

from align.log import get_logger

# torch is imported inside the functions that use it (1.8 s here): every Ray stage imports this
# module, decode and read tasks included.

log = get_logger(__name__)

# A torch op splits its work over its intra-op threads and waits for the last one (OpenMP
# threads spin while they wait). Ray runs workers at nice 15: beside one busy process at normal
# priority the thread that shares its core gets a few percent of it, every op waits for that
# thread, and the spinning siblings burn what is left. Measured here (2 cores, train_scorer):
# 87 s idle, over 390 s beside one busy core with 2 threads. So a task uses no more threads than
# the CPUs Ray assigned it and no more than the cores other processes leave free, re-checked as
# it runs (load comes and goes).


def assigned_cpus() -> float | None:
    """CPUs Ray assigned to the calling task or actor; None outside a Ray worker."""
    try:
        if not ray.is_initialized():
            return None
        return ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # no runtime context here: not a Ray worker
        return None


def _cpu_sample() -> tuple[float, float, float] | None:
    """(wall clock, idle CPU-seconds of the machine, CPU-seconds of this process) or None where
    /proc/stat is not available (not Linux)."""

    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    idle = (int(fields[3]) + int(fields[4])) / ticks  # idle + iowait
    own = sum(os.times()[:2])  # this process's user + system time, all its threads
    return time.monotonic(), idle, own


def cpus_free_of_other_work(before, after) -> float | None:
    """Logical CPUs that processes other than this one left free between two `_cpu_sample`s:
    the machine's idle CPUs plus what this process itself used."""
    if before is None or after is None or after[0] - before[0] <= 0:
        return None
    wall = after[0] - before[0]
    return (after[1] - before[1] + after[2] - before[2]) / wall


def threads_for_free_cpus(free: float | None, limit: int) -> int:
    """One thread per core at least half free of other work, between 1 and `limit`.

    Ray's own daemons (GCS, raylet, log monitor, Train's actors) take about a quarter CPU on an
    idle machine. With a quarter CPU of slack, `make demo`'s 2-thread pretraining worker flipped
    to 1 thread every few seconds (free 1.71-1.78) and ran at 0.44 s a step, not 0.19-0.25 s.
    """
    return limit if free is None else max(1, min(limit, int(free + 0.5)))


class TorchThreads:
    """Sets torch's intra-op threads to min(limit, CPUs free of other work), at least 1, and
    re-checks when `refresh()` is called, at most every `every_s` seconds.

    `limit`: the configured thread count, else the CPUs Ray assigned (rounded down), else the
    machine's cores. Call `refresh()` once per batch or step; it costs one read of /proc/stat.
    `follow_load=False` keeps `limit` threads whatever the load: torch's float sums round by how
    the work is split, so only a fixed count lets a run repeat bit for bit.
    """

    def __init__(
        self,
        limit: int | None = None,
        every_s: float = 5.0,
        first_sample_s: float = 0.2,
        follow_load: bool = True,
    ):
        cpus = assigned_cpus()
        self.limit = max(1, int(limit or (cpus if cpus else 0) or os.cpu_count() or 1))
        self.every_s = every_s
        self.threads = self.limit
        if not follow_load:
            self._last = None  # refresh() keeps the limit
            self._apply(None)
            return
        self._last = _cpu_sample()
        time.sleep(first_sample_s if self._last is not None else 0.0)
        self._apply(cpus_free_of_other_work(self._last, _cpu_sample()))
        self._last = _cpu_sample()

    def refresh(self) -> int:
        """Re-check the free CPUs when `every_s` has passed; returns the thread count in use."""
        if self._last is None:
            return self.threads
        now = _cpu_sample()
        if now is not None and now[0] - self._last[0] >= self.every_s:
            self._apply(cpus_free_of_other_work(self._last, now))
            self._last = now
        return self.threads

    def _apply(self, free: float | None) -> None:
        import torch

        threads = threads_for_free_cpus(free, self.limit)
        if threads != torch.get_num_threads():
            if threads != self.threads and free is not None:
                log.info("torch threads: %d (limit %d, free CPUs %.2f)", threads, self.limit, free)
            torch.set_num_threads(threads)
        self.threads = threads


# ---------------------------------------------------------------------------------------------
# Subnormal floats.
#
# As CPU training goes on, activations and gradients fill with subnormal floats (below 1.2e-38),
# and x86 handles each one in microcode, many times slower than a normal float. Measured here (a
# plain loop of the pretraining step, micro-rn-clip, 256 images, 2 threads): the step time grows
# from 0.153 s to 0.175 s by step 1000, and in `make demo` from 0.171 s to 0.23 s by step 1200.
# Flushed to zero, it stays at 0.150-0.154 s. Values that small move no weight: Adam divides a
# gradient's running mean by at least its eps (1e-8), so they would change a weight by ~1e-31.


def flush_subnormals() -> bool:
    """Make this process's CPU math treat subnormal floats as zero (torch.set_flush_denormal).

    Returns whether it now does, checked by arithmetic: False on a CPU without the flag (not x86
    with SSE3), where training runs as before, only slower as it goes.
    """
    import torch

    torch.set_flush_denormal(True)
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # subnormal: the smallest normal is 1.2e-38
    return bool((tiny * 1.0).item() == 0.0)
