"""docs/configuration.md: every key of the jobs' config and of the search app's args, with its
type, default and description, read from the pydantic models (align.config.Config and
serve.config.ServeArgs) by align.config.reference.

    python -m serve.config_reference            (make docs) writes docs/configuration.md
    python -m serve.config_reference --check    exits 1 when the file differs from the models

It lives in serve/ because it documents both: the library (align/) may not import serve/.
tests/serve/test_config_reference.py fails when the file is out of date.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from align.config.reference import job_reference, reference_tables, render
from serve.config import ServeArgs

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

HEADER = """# Configuration reference

Written by `python -m serve.config_reference` (`make docs`) from the typed models; do not edit it
by hand. `tests/serve/test_config_reference.py` fails when this file differs from what the
command writes.

- [Job configs](#job-configs): `align/config/`, `Config`. Every job reads one YAML file
  (`--config configs/demo.yaml`) and dotted overrides (`world.seed=3`); unknown keys and wrong
  types end the job with exit code 2 and a line naming the key. `{output_dir}` in a path expands
  to `output_dir`; the default paths between jobs are spelled once, in `align/storage/paths.py`.
- [Serve args](#serve-args): `serve/config.py`, `ServeArgs`: the `args` of an application in a
  Ray Serve config file (`configs/serve.yaml`); unknown keys stop the app from starting.

A type such as `` `auto`, `flat` `` lists the values a key takes; `>= 1` and the like are the
bounds the model checks. A default of `section` points at the section's own table.
"""

JOBS = """## Job configs

`python -m pipelines.<job> --config PATH [key=value ...]`; each job reads the sections it needs.
"""

SERVE = """## Serve args

`applications[].args` of a Serve config file (`serve run configs/serve.yaml`). Per-deployment
resources (`autoscaling_config`, `ray_actor_options`, `max_ongoing_requests`,
`max_queued_requests`) are the file's `deployments:` entries, which Serve applies itself.
"""


def document() -> str:
    """The whole reference, as `make docs` writes it."""
    jobs = job_reference()
    serve_args = render(reference_tables(ServeArgs, "args"))
    return "\n".join([HEADER, JOBS, jobs, SERVE, serve_args]).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write (or --check) docs/configuration.md.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is out of date")
    parser.add_argument("--output", type=Path, default=REFERENCE)
    args = parser.parse_args(argv)
    text = document()
    if args.check:
        current = args.output.read_text() if args.output.is_file() else ""
        if current != text:
            print(f"{args.output} is out of date with the config models: run `make docs`")
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
