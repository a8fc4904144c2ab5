"""The jobs' entry points as a user runs them: every job on the console entry point, and a job
that fails after it started leaves no manifest behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from align.runtime.manifest import MANIFEST_NAME
from pipelines.__main__ import JOBS
from tests.helpers import REPO

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("job", JOBS)
def test_every_job_runs_through_the_console_entry_point(job):
    proc = subprocess.run(
        [sys.executable, "-m", "pipelines", job, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"pipelines.{job}" in proc.stdout and "--config" in proc.stdout


def test_every_job_module_is_in_the_console_entry_point():
    jobs = {p.stem for p in (REPO / "pipelines").glob("*.py") if "def main(" in p.read_text()}
    assert jobs - {"__main__"} == set(JOBS)


def test_a_failed_job_leaves_no_manifest(tmp_path):
    """finetune fails on its missing pairs after it has started: the old manifest is gone."""
    from pipelines.finetune import main

    out = tmp_path / "finetune"
    out.mkdir()
    (out / MANIFEST_NAME).write_text("{}")
    code = main(
        [
            "--config",
            str(REPO / "configs" / "demo.yaml"),
            f"output_dir={tmp_path}",
            "model.pretrained=null",
        ]
    )
    assert code == 2 and not (out / MANIFEST_NAME).exists()
