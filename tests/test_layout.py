"""Imports flow one way: service -> optimizer -> modelcard, training -> plant -> modelcard; the contract imports
none of them, and no module imports itself back through others. export sits inside training's layers: it builds
its graph from training's model (training.model, training.config) and training's pipeline (training.run,
training.publish) calls it to write a version, so the two packages import each other, their modules never in a
cycle (``test_export_sits_between_trainings_model_and_its_pipeline``)."""

from __future__ import annotations

import ast
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

FORBIDDEN = {
    "modelcard": {"service", "optimizer", "plant", "training", "export", "torch", "fastapi", "bench", "tests"},
    "service": {"plant", "training", "export", "torch", "bench", "tests"},
    # Setpoint advice searches over the contract's runtime: no web framework, no training, no simulator.
    "optimizer": {"service", "plant", "training", "export", "torch", "fastapi", "bench", "tests"},
    # The plant side (catalogs, simulator, scenarios, historian import) is read without the training loop.
    "plant": {"training", "service", "optimizer", "export", "torch", "bench", "tests"},
    "training": {"service", "optimizer", "bench", "tests"},  # training imports plant, modelcard and export
    "export": {"service", "optimizer", "bench", "tests"},  # export imports modelcard, training and plant
}
PROJECT = ("modelcard", "optimizer", "plant", "training", "export", "service", "bench")


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level package of every import (also inside functions), per file of ``package``."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
        out[str(path.relative_to(ROOT))] = found
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_upward_imports(package: str) -> None:
    bad = {f: sorted(pkgs & FORBIDDEN[package]) for f, pkgs in imported_packages(package).items()}
    assert not {f: p for f, p in bad.items() if p}


def module_name(path: Path, root: Path = ROOT) -> str:
    """``plant/scenarios.py`` -> ``plant.scenarios``; a package's ``__init__.py`` is the package."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """Project module -> the project modules it imports, anywhere in the file (a function-level import runs too).
    ``from a import b`` is an import of the module ``a.b`` when there is one; a script folder without
    ``__init__.py`` (bench/) also finds its siblings by their bare name, as Python does for a script."""
    files = {module_name(p, root): p for package in PROJECT for p in sorted((root / package).rglob("*.py"))}

    def resolve(name: str, folder: str) -> str | None:
        for candidate in (name, f"{folder}.{name}"):
            while candidate and candidate not in files:
                candidate = candidate.rpartition(".")[0]
            if candidate:
                return candidate
        return None

    graph: dict[str, set[str]] = {}
    for module, path in files.items():
        folder = module.rpartition(".")[0] if path.name != "__init__.py" else module
        sibling = folder if not (path.parent / "__init__.py").exists() else ""
        names: list[str] = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names += [f"{node.module}.{alias.name}" for alias in node.names]
        graph[module] = {m for n in names if (m := resolve(n, sibling)) is not None and m != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle (its modules, the first repeated at the end), or [] when the graph is acyclic."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once every import below it is checked
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return [*path[path.index(imported) :], imported]
            if imported not in state and (cycle := visit(imported)):
                return cycle
        state[module] = "done"
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return []


def test_no_import_cycle_anywhere() -> None:
    graph = import_graph()
    assert {"plant.scenarios", "training.data", "service.app"} <= set(graph)
    assert "plant.scenarios" in graph["plant.historian"] and "plant.historian" in graph["training.data"]
    assert not find_cycle(graph), " -> ".join(find_cycle(graph))


EXPORT_READS = {"training.model", "training.config"}  # what a graph is built from
EXPORT_CALLED_BY = {"training.run", "training.publish", "training.recalibrate"}  # what writes a version


def test_export_sits_between_trainings_model_and_its_pipeline() -> None:
    graph = import_graph()
    reads = {m for mod, deps in graph.items() if mod.startswith("export.") for m in deps if m.startswith("training.")}
    callers = {
        mod for mod, deps in graph.items() if mod.startswith("training.") and any(d.startswith("export") for d in deps)
    }
    assert reads <= EXPORT_READS, f"export imports training's {sorted(reads - EXPORT_READS)}"
    assert callers <= EXPORT_CALLED_BY, f"{sorted(callers - EXPORT_CALLED_BY)} import export"
    below = set().union(*(graph[m] for m in EXPORT_READS))
    assert not below & EXPORT_CALLED_BY  # the model never reaches the pipeline back


def test_a_cycle_through_a_function_level_import_is_found(tmp_path: Path) -> None:
    """The cycle training.data and training.historian once had: each imported the other inside functions."""
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "__init__.py").write_text("")
    (tmp_path / "training" / "data.py").write_text("def load():\n    from training.historian import load_dataset\n")
    (tmp_path / "training" / "historian.py").write_text("def imp():\n    from training.data import save_scenario\n")
    assert find_cycle(import_graph(tmp_path)) == ["training.data", "training.historian", "training.data"]


def test_contract_imports_without_torch_or_web_framework() -> None:
    code = (
        "import sys, modelcard.card, modelcard.store, modelcard.runtime; "
        "print(sorted({'torch', 'fastapi'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("module", ["training.run", "training.data", "training.promote", "export", "service.openapi"])
def test_help_imports_neither_torch_nor_the_simulator(module: str) -> None:
    """`--help` answers at once: torch and bsm2-python (numba) take seconds to import, so they load after it."""
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", module, "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0 and "usage:" in out.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in out.stderr.splitlines() if line.startswith("import time")}
    assert not {"torch", "bsm2_python", "matplotlib"} & imported


MODEL_BENCHES = ["accuracy", "blend_bound", "closed_loop", "counterfactual", "inference", "optimize", "peers"]


@pytest.mark.parametrize("bench", [*MODEL_BENCHES, "plans", "service_load", "service_probe"])
def test_a_bench_told_a_missing_store_or_version_says_so_in_one_line(bench: str, tmp_path: Path) -> None:
    """Each printed a traceback (CardError, FileNotFoundError, a TypeError on None), some after minutes of work
    or leaving a temporary store behind; they now stop before any work, naming what is missing."""
    tries = [(["--store", str(tmp_path / "nostore")], "no model store at")]
    if bench in MODEL_BENCHES:
        tries.append((["--version", "nope"], "no version 'nope' in models; have"))
    before = set(Path(tempfile.gettempdir()).glob("kovae-bench-*"))
    for args, words in tries:
        out = subprocess.run(
            [sys.executable, f"bench/{bench}.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
        )
        assert out.returncode in (1, 2) and words in out.stderr, out.stderr[-800:]
        assert "Traceback" not in out.stderr
    assert set(Path(tempfile.gettempdir()).glob("kovae-bench-*")) == before


@pytest.mark.parametrize("bench", ["blend_bound", "peers"])
def test_a_bench_told_a_mistyped_setting_says_so_before_any_work(bench: str) -> None:
    out = subprocess.run(
        [sys.executable, f"bench/{bench}.py", "model.h_dimm=3"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "did you mean model.h_dim?" in out.stderr and "Traceback" not in out.stderr
