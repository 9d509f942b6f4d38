"""The core's architecture as a test: layers import only downwards, and common/ never names a paper package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

COMMON = REPO / "common"
PAPER_PACKAGES = {"sasa", "adaptive_span", "aacn", "sa_conv", "san", "vit"}
# Lowest first: a module may import its own layer and the ones below it.
LAYERS = {"foundation": 0, "ops": 1, "models": 2, "data": 3, "inspect": 4, "train": 5, "tasks": 6}
IMPORTABLE_EVERYWHERE = {"common.inspect.capture", "common.inspect.flops"}  # the two contracts (torch only)


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.get(parts[1], LAYERS["foundation"]) if len(parts) > 1 else LAYERS["foundation"]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, lazy ones inside functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def common_files() -> list[Path]:
    return sorted(COMMON.rglob("*.py"))


def test_common_never_imports_a_paper_package():
    offenders = [f"{path.relative_to(REPO)}:{line} imports {name}" for path in common_files()
                 for line, name in imports(path) if name.split(".")[0] in PAPER_PACKAGES]
    assert not offenders, "\n".join(offenders)


def test_only_the_registry_list_names_the_paper_packages():
    """Papers are reached by name in one place: the list whose import registers them."""
    from common import registry

    assert set(registry.MODEL_PACKAGES) >= PAPER_PACKAGES
    offenders = []
    for path in common_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in PAPER_PACKAGES:
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} names {node.value!r}")
    assert offenders and all(o.startswith("common/registry.py") for o in offenders), "\n".join(offenders)


def test_layers_import_only_downwards():
    offenders = []
    for path in common_files():
        here = module_name(path)
        for line, name in imports(path):
            if not name.startswith("common.") or name in IMPORTABLE_EVERYWHERE:
                continue
            if any(name.startswith(f"{allowed}.") for allowed in IMPORTABLE_EVERYWHERE):
                continue
            if layer(name) > layer(here):
                offenders.append(f"{path.relative_to(REPO)}:{line} ({here}) imports {name}, a higher layer")
    assert not offenders, "\n".join(offenders)


def test_each_subpackage_says_what_it_holds_and_may_import():
    for name in LAYERS:
        if name == "foundation":
            continue
        doc = ast.get_docstring(ast.parse((COMMON / name / "__init__.py").read_text()))
        assert doc and ("May import" in doc or "may import" in doc), f"common/{name}/__init__.py"


def test_the_contracts_load_without_matplotlib_or_the_training_stack():
    code = ("import sys, common.inspect.capture, common.inspect.flops, common.ops.neighborhood\n"
            "import common.models.resnet\n"
            "heavy = [m for m in ('matplotlib', 'common.train', 'common.tasks', 'common.data') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
