"""The error contract of every job: the user's input errors in one line naming the key or path
(exit 2), everything else with its traceback (exit 1); no stale manifest; atomic writes."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.fs as pafs
import pytest

from align.config import Config, ConfigError
from align.data.contracts import ContractError
from align.errors import InputNotFound, OutputWriteError, UserError
from align.runtime.cli import run_job
from align.runtime.manifest import MANIFEST_NAME, JobManifest
from align.storage import io
from tests.helpers import REPO


def _run(body, capsys) -> tuple[int, str]:
    code = run_job("unit", body, ["--config", str(REPO / "configs" / "demo.yaml")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    "error, named",
    [
        (ConfigError("finetune.max_steps: must be > 0"), "finetune.max_steps"),
        (InputNotFound("pairs not found: /data/pairs"), "/data/pairs"),
        (ContractError("table /x.parquet lacks column 'image'"), "/x.parquet"),
    ],
)
def test_user_errors_are_one_line_naming_the_key_or_path(error, named, capsys):
    def body(config):
        raise error

    code, err = _run(body, capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("unit: error: ") and named in err


def test_a_library_file_not_found_keeps_its_traceback(capsys):
    """pyarrow's FileNotFoundError has errno 2 as args[0]: it must never become 'error: 2'."""

    def body(config):
        pafs.LocalFileSystem().open_input_stream("/nonexistent/train_summary.json")

    with pytest.raises(FileNotFoundError) as info:
        _run(body, capsys)
    assert not isinstance(info.value, UserError)
    assert "error: 2" not in capsys.readouterr().err


def test_a_library_error_exits_1_with_traceback_naming_the_file(tmp_path):
    """Through the real command line: exit 1 and the traceback names the missing file."""
    code = (
        "import sys, pyarrow.fs as f\n"
        "from align.runtime.cli import run_job\n"
        "body = lambda c: f.LocalFileSystem().open_input_stream('/nonexistent/model.pt')\n"
        f"sys.exit(run_job('unit', body, ['--config', {str(REPO / 'configs/demo.yaml')!r}]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "/nonexistent/model.pt" in proc.stderr


def test_a_user_error_carried_from_a_ray_worker_is_one_line(capsys):
    from ray.exceptions import RayTaskError

    cause = ConfigError("index_corpus.embed.batch_size: must be > 0")
    carried = RayTaskError("stage", "Traceback (most recent call last):\n  ...", cause)
    carried = carried.as_instanceof_cause()

    def body(config):
        raise carried

    code, err = _run(body, capsys)
    assert code == 2 and err == f"unit: error: {cause}\n"


def test_a_bad_config_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune: {max_stepz: 3}\n")
    code = run_job("unit", lambda c: None, ["--config", str(bad)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "max_stepz" in err


def test_a_starting_job_removes_the_stale_manifest(tmp_path):
    stale = tmp_path / MANIFEST_NAME
    stale.write_text(json.dumps({"job": "finetune", "counts": {}}))
    manifest = JobManifest("finetune", Config(), output=str(tmp_path))
    assert not stale.exists()
    manifest.write(str(tmp_path), rows_in=1, rows_out=1, rows_error=0)
    assert json.loads(stale.read_text())["job"] == "finetune"


def test_writers_use_their_own_temporary_names(tmp_path):
    """Two writers of one file never share a temporary file, and a failed write leaves none."""
    from align.storage.io import _temporary_name

    target = str(tmp_path / "metrics.jsonl")
    names = {_temporary_name(target) for _ in range(100)}
    assert len(names) == 100 and all(n.startswith(f"{tmp_path}/.metrics.jsonl.") for n in names)
    io.write_bytes(target, b"1")
    with pytest.raises(TypeError):
        io.write_bytes(str(tmp_path / "b.json"), object())  # the write itself fails
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 64 KiB tmpfs: a real full disk (ENOSPC). Needs root, as CI and this machine have."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_is_one_line_naming_the_path(tiny_disk, capsys):
    target = tiny_disk / "out" / "model.pt"

    def body(config):
        io.write_bytes(str(target), b"x" * 200_000)

    code, err = _run(body, capsys)
    assert code == 2 and err.count("\n") == 1 and str(target) in err and "No space" in err
    assert list((tiny_disk / "out").iterdir()) == []  # no temporary file left behind
    with pytest.raises(OutputWriteError):
        io.write_parquet(__import__("pyarrow").table({"x": list(range(100_000))}), str(target))


def test_a_job_never_empties_a_folder_of_files_it_did_not_write(tmp_path):
    from align.runtime.manifest import OutputNotOurs, empty_output_dir

    theirs = tmp_path / "photos" / "errors"
    theirs.mkdir(parents=True)
    (theirs / "holiday.jpg").write_bytes(b"precious")
    with pytest.raises(OutputNotOurs, match=str(theirs)):
        empty_output_dir(str(theirs), "evaluate")
    assert (theirs / "holiday.jpg").read_bytes() == b"precious"

    ours = tmp_path / "evaluate" / "errors"
    empty_output_dir(str(ours), "evaluate")  # new: created and marked
    (ours / "part-0.parquet").write_bytes(b"x")
    empty_output_dir(str(ours), "evaluate")  # its own files: emptied again
    assert [p.name for p in ours.iterdir()] == ["_written_by.json"]
    with pytest.raises(OutputNotOurs):  # another job's folder is not evaluate's to empty
        (ours / "part-0.parquet").write_bytes(b"x")
        empty_output_dir(str(ours), "train_scorer")


@pytest.mark.parametrize("name", [".env", "_data.json", ".git/config"])
def test_a_folder_of_dot_or_underscore_files_is_not_a_jobs_to_empty(tmp_path, name):
    from align.runtime.manifest import OutputNotOurs, empty_output_dir

    theirs = tmp_path / "project"
    (theirs / name).parent.mkdir(parents=True, exist_ok=True)
    (theirs / name).write_bytes(b"precious")
    with pytest.raises(OutputNotOurs, match=str(theirs)):
        empty_output_dir(str(theirs), "evaluate")
    assert (theirs / name).read_bytes() == b"precious"


def test_a_failed_run_keeps_its_folder_its_own(tmp_path):
    """The manifest goes at the start of a run; the folder must stay the job's for the next."""
    from align.runtime.manifest import empty_output_dir

    out = tmp_path / "finetune"
    JobManifest("finetune", Config(), output=str(out)).write(
        str(out), rows_in=0, rows_out=0, rows_error=0
    )
    (out / "ray").mkdir()
    (out / "ray" / "checkpoint").write_bytes(b"x")
    JobManifest("finetune", Config(), output=str(out))  # the next run starts...
    assert not (out / MANIFEST_NAME).exists()
    empty_output_dir(str(out / "ray"), "finetune")  # ...and may still start over
    assert not (out / "ray" / "checkpoint").exists()


def test_the_clusters_storage_is_the_output_dir_unless_the_command_line_gives_one(monkeypatch):
    """$AESTHETIC_ALIGN_OUTPUT_DIR (set where Ray starts, cluster.yaml) comes after the config
    file and before the command line's overrides."""
    from align.runtime.cli import OUTPUT_DIR_ENV, parse_args

    demo = ["--config", str(REPO / "configs" / "demo.yaml")]
    assert parse_args("unit", demo).output_dir == "outputs/demo"
    monkeypatch.setenv(OUTPUT_DIR_ENV, "s3://bucket/aesthetic-align")
    config = parse_args("unit", demo)
    assert config.output_dir == "s3://bucket/aesthetic-align"
    assert config.expand(config.finetune.output) == "s3://bucket/aesthetic-align/finetune"
    assert parse_args("unit", [*demo, "output_dir=/tmp/run"]).output_dir == "/tmp/run"
