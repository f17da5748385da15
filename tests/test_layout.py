"""Imports flow one way: service -> modelcard and training -> modelcard; the contract imports neither."""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT

FORBIDDEN = {
    "modelcard": {"service", "training", "export", "torch", "fastapi", "bench", "tests"},
    "service": {"training", "export", "torch", "bench", "tests"},
    "training": {"service", "bench", "tests"},
}


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
