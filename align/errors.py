"""The project's error types for problems with the user's input.

`align.runtime.cli.run_job` turns exactly these into one line on stderr and exit code 2; anything
else (a library's FileNotFoundError, a bug, a worker crash) keeps its traceback and exits 1. So a
project error always says in its message which key, path or row is wrong.
"""

from __future__ import annotations


class UserError(Exception):
    """Base of every error about the user's input: a config key, a path, a table, a model."""


class InputNotFound(UserError, FileNotFoundError):
    """A file or folder the config names (or a job should have written) does not exist; the
    message names the path. Still a FileNotFoundError, for callers that catch that."""


class OutputWriteError(UserError, OSError):
    """An output could not be written for a reason the user can fix (the disk is full, the
    folder is not writable); the message names the path."""
