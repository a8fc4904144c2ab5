"""`_manifest.json`: what every job writes beside its output.

A manifest records the config, the row counts (in, out, errors), per-stage timings and the versions
of the packages that produced the output. Counts must close: rows in = rows out + error rows.
"""

from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from align import io
from align.config import Config, config_to_dict

MANIFEST_NAME = "_manifest.json"
_VERSIONED = (
    "aesthetic-align",
    "ray",
    "torch",
    "open_clip_torch",
    "faiss-cpu",
    "pyarrow",
    "deepspeed",
    "numpy",
    "pillow",
)


class CountsDoNotClose(RuntimeError):
    """A job's rows in differ from rows out plus error rows: something was dropped silently."""


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class JobManifest:
    """Collects counts and timings while a job runs, then writes `_manifest.json`.

    Usage:
        manifest = JobManifest("make_world", config)
        with manifest.stage("render"):
            ...
        manifest.write(out_dir, rows_in=n, rows_out=n, rows_error=0)
    """

    job: str
    config: Config
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = round(self.timings.get(name, 0.0) + time.perf_counter() - t0, 3)

    def write(self, output_uri: str, *, rows_in: int, rows_out: int, rows_error: int) -> dict:
        """Write the manifest into `output_uri` and return it.

        Raises:
            CountsDoNotClose: when rows_in != rows_out + rows_error.
        """
        if rows_in != rows_out + rows_error:
            raise CountsDoNotClose(
                f"{self.job}: {rows_in} rows in but {rows_out} out + {rows_error} errors"
            )
        manifest = {
            "job": self.job,
            "output": output_uri,
            "counts": {"rows_in": rows_in, "rows_out": rows_out, "rows_error": rows_error},
            "timings_s": {**self.timings, "total": round(time.time() - self.started, 3)},
            "started_unix": round(self.started, 3),
            "versions": package_versions(),
            "config": config_to_dict(self.config),
            **self.extra,
        }
        io.write_json(f"{output_uri.rstrip('/')}/{MANIFEST_NAME}", manifest)
        return manifest


def read_manifest(output_uri: str) -> dict:
    """Read the manifest a job wrote into `output_uri`.

    Raises:
        FileNotFoundError: naming the path, when the job has not finished there.
    """
    path = f"{output_uri.rstrip('/')}/{MANIFEST_NAME}"
    io.require_exists(path, "job manifest (has the job that writes it finished?)")
    return io.read_json(path)
