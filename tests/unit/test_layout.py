"""The layout: every module imports, the library stands alone, jobs import no other job and stay
short, unit tests test the library and the stages (one test file per stage)."""

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


def _imports(path: Path) -> list[str]:
    """Absolute module names a file imports (at any depth: lazy imports count too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


JOBS = sorted(p.stem for p in (REPO / "pipelines").glob("*.py") if "def main(" in p.read_text())


def test_no_job_imports_another_job():
    """Jobs share library pieces, never each other; the demo runs the others, and pretrain is
    finetune with another section."""
    offenders = []
    for job in JOBS:
        if job in ("demo", "pretrain", "__main__"):
            continue
        for name in _imports(REPO / "pipelines" / f"{job}.py"):
            if name.startswith("pipelines.") and name.split(".")[1] in JOBS:
                offenders.append(f"{job} imports {name}")
    assert JOBS and not offenders


def test_unit_tests_import_only_the_library_and_the_stages():
    offenders = [
        f"{path.relative_to(REPO)}: {name}"
        for path in (REPO / "tests" / "unit").rglob("*.py")
        for name in _imports(path)
        if name.split(".")[0] in ("pipelines", "serve")
    ]
    assert not offenders


def test_every_stage_has_a_unit_test_of_its_own():
    stages = {p.stem for p in (REPO / "actors").glob("*.py") if p.stem != "__init__"}
    tested = {p.stem.removeprefix("test_") for p in (REPO / "tests/unit/stages").glob("test_*.py")}
    assert stages and stages <= tested, f"stages without a test: {sorted(stages - tested)}"


def test_jobs_read_like_a_table_of_contents():
    """No job file over 350 lines; no function over 60 lines in the code (a long function is
    logic that wants a name and a test of its own)."""
    long_files = [
        f"{p.name}: {n}"
        for p in (REPO / "pipelines").glob("*.py")
        if (n := len(p.read_text().splitlines())) > 350
    ]
    long_functions = []
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > 60:
                        long_functions.append(f"{path.relative_to(REPO)}:{node.name} ({lines})")
    assert not long_files and not long_functions
