"""A job's progress as Ray metrics, beside its logs and manifest: rows done, error rows, rows per
second, tagged with the job's name. A long index_corpus run reports after every unit of input;
every job reports its final counts when it writes its manifest.

Ray exports the metrics from the node the driver runs on, named `ray_aesthetic_align_job_...`
(Ray's prefix first); docs/serving.md lists them with the serving app's.
"""

from __future__ import annotations

import functools
import threading
import time

import ray
from ray.util import metrics

PREFIX = "aesthetic_align_job_"
REFRESH_S = 5.0
# name (without PREFIX): (kind, description); every one is tagged with `job`.
METRICS = {
    "rows": ("counter", "Input rows a job has finished (written out or to its error table)"),
    "error_rows": ("counter", "Input rows a job wrote to its error table"),
    "rows_per_second": ("gauge", "A job's rows finished per second since it started"),
}


@functools.cache
def _metric(name: str):
    kind, description = METRICS[name]
    cls = metrics.Counter if kind == "counter" else metrics.Gauge
    return cls(PREFIX + name, description=description, tag_keys=("job",))


class JobProgress:
    """Rows a job has finished, reported as they finish: `add` after a unit of work, `total` with
    the job's final counts (adds what no `add` reported). Outside Ray (a job that never started
    it) nothing is recorded."""

    def __init__(self, job: str):
        self.job = job
        self.started = time.perf_counter()
        self.rows = 0
        self.error_rows = 0
        self.finished = threading.Event()
        self.refresher: threading.Thread | None = None

    def add(self, rows: int, error_rows: int) -> None:
        """`rows` more rows finished, `error_rows` of them errors."""

        self.rows += rows
        self.error_rows += error_rows
        if not ray.is_initialized():
            return
        tags = {"job": self.job}
        for name, value in (("rows", rows), ("error_rows", error_rows)):
            if value > 0:  # Ray's counters take only positive increments
                _metric(name).inc(value, tags=tags)
        self._set_rate()
        if self.refresher is None:
            # Ray exports a gauge's value once after it is set: set it again while the job runs.
            self.refresher = threading.Thread(target=self._refresh, daemon=True)
            self.refresher.start()

    def total(self, rows: int, error_rows: int) -> None:
        """The job's final counts; the rate is no longer refreshed after them."""
        self.add(max(rows - self.rows, 0), max(error_rows - self.error_rows, 0))
        self.finished.set()

    def _set_rate(self) -> None:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        _metric("rows_per_second").set(self.rows / elapsed, tags={"job": self.job})

    def _refresh(self) -> None:
        while not self.finished.wait(REFRESH_S):
            self._set_rate()
