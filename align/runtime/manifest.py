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

from align.config import Config, config_to_dict
from align.errors import UserError
from align.runtime.progress import JobProgress
from align.storage import io

MANIFEST_NAME = "_manifest.json"
# Which job a folder belongs to; kept when a new run removes the manifest, so a failed run does
# not make its own output look foreign to the next one.
WRITTEN_BY = "_written_by.json"
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


class OutputNotOurs(UserError):
    """An output folder holds files the job did not write; the message names the folder."""


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
        manifest = JobManifest("make_world", config, output=out_dir)
        with manifest.stage("render"):
            ...
        manifest.write(out_dir, rows_in=n, rows_out=n, rows_error=0)

    Given `output`, it deletes the manifest an earlier run left there as the job starts: the
    manifest is written last, so a job that fails leaves none that a later job or the serving
    app could take for a finished output.
    """

    job: str
    config: Config
    output: str | None = None
    started: float = field(default_factory=time.time)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    progress: JobProgress = field(init=False)

    def __post_init__(self) -> None:
        self.progress = JobProgress(self.job)
        if self.output is not None:
            out = self.output.rstrip("/")
            if _names_job(f"{out}/{MANIFEST_NAME}", self.job):  # it stays ours without it
                io.write_json(f"{out}/{WRITTEN_BY}", {"job": self.job})
            io.delete_file(f"{out}/{MANIFEST_NAME}")

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
        self.progress.total(rows_out + rows_error, rows_error)
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
        io.write_json(f"{output_uri.rstrip('/')}/{WRITTEN_BY}", {"job": self.job})
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


def empty_output_dir(uri: str, job: str) -> None:
    """Create `uri` or empty it for `job` to write into, and mark it as that job's.

    A job's output is replaced, never appended to; but a folder holding files the job did not
    write (a user's data under a mistyped output path) is never emptied. The folder is the job's
    when it is missing or empty, or it or its parent (the job's output folder) carries this job's
    `_written_by.json`, or the parent's `_manifest.json` names the job (an output without the
    marker).

    Raises:
        OutputNotOurs: naming the folder, when it holds files of something else.
    """
    marker = f"{uri.rstrip('/')}/{WRITTEN_BY}"
    # Every file counts, dot and underscore names too: a folder of nothing but `.env` or
    # `_data.json` is someone's.
    if io.exists(uri) and io.list_files(uri, hidden=True) and not _written_by(marker, uri, job):
        raise OutputNotOurs(
            f"{uri} holds files that {job} did not write (no {WRITTEN_BY} of {job} there): "
            f"refusing to empty it; choose another output folder or remove them yourself"
        )
    io.empty_dir(uri)
    io.write_json(marker, {"job": job})


def _written_by(marker: str, uri: str, job: str) -> bool:
    parent = uri.rstrip("/").rsplit("/", 1)[0]
    return any(
        _names_job(path, job)
        for path in (marker, f"{parent}/{WRITTEN_BY}", f"{parent}/{MANIFEST_NAME}")
    )


def _names_job(path: str, job: str) -> bool:
    """Whether the JSON file at `path` exists and says {"job": job}."""
    try:
        return io.exists(path) and io.read_json(path).get("job") == job
    except (ValueError, AttributeError):  # not JSON, or not an object: not ours
        return False
