"""Smoke tests of the layout: every module imports, and the library stands alone."""

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("align", "actors", "pipelines", "serve")
MODULES = sorted(
    ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
    for pkg in PACKAGES
    for p in (REPO / pkg).rglob("*.py")
)


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports(module):
    importlib.import_module(module)


def test_library_imports_nothing_from_jobs_actors_or_serve():
    offenders = []
    for path in (REPO / "align").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [
                f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in PACKAGES[1:]
            ]
    assert not offenders


def test_importing_every_module_starts_nothing():
    """No ray.init, model load or network at import time (checked in a fresh interpreter)."""
    code = (
        "import importlib, sys, ray\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "assert not ray.is_initialized(), 'ray.init ran at import time'\n"
        "assert 'open_clip' not in sys.modules, 'a model library loaded at import time'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
