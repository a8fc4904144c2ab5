"""The layout: every module imports, the library stands alone and its subpackages import only
those below them (no circle), jobs import no other job and stay short, unit tests test the library
and the stages (one test file per stage)."""

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


# align's subpackages, lowest first: each may import only those before it (align/__init__.py says
# what each owns). `errors` and `log` are modules every subpackage may use.
LIBRARY_LAYERS = (
    ("errors", "log"),
    ("storage",),
    ("method",),
    ("config",),
    ("models",),
    ("runtime",),
    ("data",),
    ("search", "train"),
    ("evaluation",),
)


def _library_imports() -> dict[str, set[str]]:
    """For each subpackage (or top-level module) of align, the other ones it imports."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "align").rglob("*.py"):
        parts = path.relative_to(REPO / "align").with_suffix("").parts
        if parts == ("__init__",):
            continue
        source = parts[0]
        for name in _imports(path):
            if name.startswith("align."):
                target = name.split(".")[1]
                if target != source:
                    found.setdefault(source, set()).add(target)
    return found


def test_library_subpackages_import_only_those_below_them():
    level = {name: i for i, layer in enumerate(LIBRARY_LAYERS) for name in layer}
    packages = {p.name for p in (REPO / "align").iterdir() if (p / "__init__.py").exists()}
    modules = {p.stem for p in (REPO / "align").glob("*.py") if p.stem != "__init__"}
    assert packages | modules == set(level), "a subpackage is missing from LIBRARY_LAYERS"
    upward = [
        f"align.{source} imports align.{target}"
        for source, targets in _library_imports().items()
        for target in targets
        if level[target] >= level[source]
    ]
    assert not upward


def test_library_subpackages_have_no_circle():
    """The import graph between align's subpackages is acyclic (found by depth-first search, so
    a circle is caught even where LIBRARY_LAYERS were edited to allow it)."""
    graph = _library_imports()
    state: dict[str, str] = {}

    def circle_from(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return [*trail, node, nxt]
            if nxt not in state and (found := circle_from(nxt, [*trail, node])):
                return found
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (circle := circle_from(node, [])):
            raise AssertionError("a circle: " + " -> ".join(circle))


def test_every_library_subpackage_says_what_it_owns():
    missing = [
        p.parent.name
        for p in (REPO / "align").glob("*/__init__.py")
        if len((ast.get_docstring(ast.parse(p.read_text())) or "").split()) < 15
    ]
    assert not missing


def _function_level_imports(path: Path, packages: tuple[str, ...]) -> list[str]:
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top:
            name = node.names[0].name if isinstance(node, ast.Import) else node.module or ""
            if getattr(node, "level", 0) or "" in packages or name.split(".")[0] in packages:
                found.append(f"{path.relative_to(REPO)}:{node.lineno}: {name}")
    return found


def test_the_projects_own_modules_are_imported_at_the_top():
    """An import of the project's own code inside a function hides a dependency (and, in the
    library, a circle): they all sit at the top of the module."""
    inside = [
        hit
        for pkg in PACKAGES
        for path in (REPO / pkg).rglob("*.py")
        for hit in _function_level_imports(path, PACKAGES)
    ]
    assert not inside


# What may be imported inside a function, and only with a comment in the module saying why:
# import costs measured on the CI machine (torch 1.8 s, open_clip 4.7 s, deepspeed 5.5 s,
# matplotlib 0.5 s) paid by processes that never use them, an optional dependency (ray.data.llm
# needs vLLM), and the tar reader's child process that imports only the standard library.
LAZY_IMPORTS = ("torch", "open_clip", "deepspeed", "matplotlib", "ray.data.llm", "pyarrow.fs")


def test_imports_sit_at_the_top_unless_a_comment_says_why_not():
    unexplained = []
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            inside = [hit.rsplit(": ", 1)[1] for hit in _function_level_imports(path, ("",))]
            inside = [n for n in inside if n]
            allowed = [n for n in inside if n.split(".")[0] in LAZY_IMPORTS or n in LAZY_IMPORTS]
            if len(allowed) < len(inside) or (inside and "imported inside" not in path.read_text()):
                unexplained.append(f"{path.relative_to(REPO)}: {sorted(set(inside))}")
    assert not unexplained
