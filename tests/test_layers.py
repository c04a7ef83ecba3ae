"""The layers import downwards only, and the HTTP side of the server never touches torch.

evaluation (data, scores) and pruning (methods) know nothing above them; variants (the format,
loading, building) sits on both; service (the server) reaches models only through variants; the
client side (trimserve: CLI, load generator, report) may use everything.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("evaluation", "pruning", "variants", "service", "trimserve")
MAY_NOT_IMPORT = {
    "evaluation": {"pruning", "variants", "service", "trimserve"},
    "pruning": {"evaluation", "variants", "service", "trimserve"},
    "variants": {"service", "trimserve"},
    "service": {"pruning", "evaluation", "trimserve"},
    "trimserve": set(),
}


def imported_packages(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_go_downwards_only(package: str) -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(imported_packages(path) & MAY_NOT_IMPORT[package])
        for path in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_http_layer_and_the_manifest_reader_load_without_torch() -> None:
    modules = [
        "service.api.completions",
        "service.api.chat",
        "service.api.models",
        "service.api.health",
        "service.api.metrics",
        "service.serving",
        "service.state",
        "service.protocol",
        "service.errors",
        "service.backend",
        "service.registry",
        "service.backends.upstream",
        "variants.format",
    ]
    heavy = ("torch", "transformers")
    code = f"import sys\nfor m in {modules!r}: __import__(m)\nprint(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
