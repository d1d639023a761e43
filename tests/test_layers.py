"""Layering of the product code, checked on its source (ast; no imports, no Ray).

- ``operators/`` never imports ``pipelines`` (top level, inside functions, under ``TYPE_CHECKING``, or by
  ``importlib.import_module("pipelines...")``): operators run without the driver side.
- no module of ``operators/`` or ``pipelines/`` imports another project module's private name
  (``from operators.x import _name``; dunder names such as ``__version__`` are fine): what is shared is public.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("operators", "pipelines")


def module_name(path: Path) -> str:
    """``operators/training/data.py`` -> ``operators.training.data``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join([*base, *([node.module] if node.module else [])])


def _in(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def layer_violations(source: str, module: str, path: str, is_package: bool = False) -> list[str]:
    """``path:line: ...`` for each import in ``source`` (the module ``module``) that breaks a layering rule."""
    out: list[str] = []
    in_operators = _in(module, "operators")
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if in_operators and _in(alias.name, "pipelines"):
                    out.append(f"{path}:{node.lineno}: operators module {module} imports {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            src = _absolute(node, module, is_package)
            if in_operators and _in(src, "pipelines"):
                names = ", ".join(a.name for a in node.names)
                out.append(f"{path}:{node.lineno}: operators module {module} imports {names} from {src}")
            if any(_in(src, p) for p in PACKAGES) and src != module:
                for alias in node.names:
                    if _is_private(alias.name):
                        out.append(f"{path}:{node.lineno}: {module} imports private name {alias.name} from {src}")
        elif (in_operators and isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and _in(node.args[0].value, "pipelines")
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.append(f"{path}:{node.lineno}: operators module {module} imports {node.args[0].value} dynamically")
    return out


def product_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def test_the_scan_sees_the_product_modules() -> None:
    names = {module_name(p) for p in product_files()}
    assert {"operators", "operators.training.data", "operators.training.common", "operators.metrics",
            "operators.runs", "pipelines", "pipelines.evaluate", "pipelines.publish"} <= names


def test_operators_never_import_pipelines_nor_private_names() -> None:
    found = []
    for p in product_files():
        found += layer_violations(p.read_text(encoding="utf-8"), module_name(p), str(p.relative_to(ROOT)),
                                  is_package=p.name == "__init__.py")
    assert not found, "layering violations:\n" + "\n".join(found)


# --- the checker itself, on source strings ------------------------------------------------------------


@pytest.mark.parametrize("source", [
    "import pipelines\n",
    "import pipelines.evaluate as ev\n",
    "from pipelines.evaluate import resolve_run\n",
    "from pipelines import publish\n",
    "def f():\n    from pipelines.x import y\n    return y\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pipelines.config import Config\n",
    "import importlib\nmod = importlib.import_module('pipelines.cli')\n",
])
def test_checker_flags_operators_importing_pipelines(source: str) -> None:
    found = layer_violations(source, "operators.training.data", "operators/training/data.py")
    assert len(found) == 1 and found[0].startswith("operators/training/data.py:")
    assert "pipelines" in found[0]


def test_checker_reports_file_line_and_name() -> None:
    src = "import os\n\n\ndef f():\n    from pipelines.evaluate import _stage_scores\n"
    found = layer_violations(src, "operators.training.common", "operators/training/common.py")
    assert found == [
        "operators/training/common.py:5: operators module operators.training.common imports _stage_scores "
        "from pipelines.evaluate",
        "operators/training/common.py:5: operators.training.common imports private name _stage_scores "
        "from pipelines.evaluate",
    ]


@pytest.mark.parametrize(("module", "source", "flagged"), [
    ("pipelines.tiny_vlm", "from pipelines.sample import _QUERY_TEMPLATES, COLORS\n", ["_QUERY_TEMPLATES"]),
    ("operators.pair_source", "from operators.rerank_ops import Piece, _docs_for_shards\n", ["_docs_for_shards"]),
    ("pipelines.explorer.views", "def f():\n    from pipelines.evaluate import CUTOFFS, _stage_scores\n",
     ["_stage_scores"]),
    ("operators.shard_source", "from .shards import _read_rows\n", ["_read_rows"]),  # relative
    ("pipelines.serve.app", "from ..sample import _x\n", ["_x"]),
    ("pipelines.cli", "from operators import __version__\n", []),  # dunder: fine
    ("pipelines.cli", "from pandas import _libs\nfrom ray import _private\n", []),  # not ours
    ("pipelines.cli", "from pipelines.evaluate import resolve_run\nimport operators.runs\n", []),
    ("pipelines.evaluate", "import pipelines\nfrom pipelines.publish import TMP\n", []),  # pipelines may
])
def test_checker_flags_private_names_across_modules(module: str, source: str, flagged: list[str]) -> None:
    found = layer_violations(source, module, module.replace(".", "/") + ".py")
    assert [f.split(" private name ")[1].split(" from ")[0] for f in found] == flagged, found


def test_checker_allows_operators_importing_operators() -> None:
    src = "import operators.storage\nfrom operators.runs import resolve_run\nfrom ..metrics import stage_scores\n"
    assert layer_violations(src, "operators.training.data", "operators/training/data.py") == []


def test_checker_resolves_relative_imports_of_a_package() -> None:
    # In operators/__init__.py, ``from .shards import _x`` names operators.shards.
    found = layer_violations("from .shards import _x\n", "operators", "operators/__init__.py", is_package=True)
    assert found == ["operators/__init__.py:1: operators imports private name _x from operators.shards"]


# --- the storage layout is spelled once -------------------------------------------------------------------

# Names of the output root's layout (operators/layout.py): no other product module spells them.
LAYOUT_NAMES = {"runs", "embeddings", "indexes", "LATEST", "_STAGES", "stats.json", "_pairs", "manifest.json"}
LAYOUT_MARKERS = ("_RUN.json", "_SUCCESS.json", "_MANIFEST.json")  # not even inside a longer string


def layout_spellings(source: str, path: str) -> list[str]:
    """``path:line: 'name'`` for each string constant (docstrings and comments aside) that spells a layout name."""
    tree = ast.parse(source, filename=path)
    docstrings = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            if node.value in LAYOUT_NAMES or any(m in node.value for m in LAYOUT_MARKERS):
                out.append(f"{path}:{node.lineno}: {node.value!r}")
    return out


def test_only_the_layout_module_spells_the_storage_layout() -> None:
    files = [p for p in product_files() if p != ROOT / "operators" / "layout.py"] + [ROOT / "notebooks" / "_helpers.py"]
    found = [f for p in files for f in layout_spellings(p.read_text(encoding="utf-8"), str(p.relative_to(ROOT)))]
    assert not found, "spell these through operators.layout:\n" + "\n".join(found)


def test_layout_checker_flags_strings_not_docstrings() -> None:
    src = '"""Writes ``_RUN.json``."""\nA = "LATEST"\nB = f"{x}/_SUCCESS.json"\nC = "no LATEST yet"\n'
    assert layout_spellings(src, "m.py") == ["m.py:2: 'LATEST'", "m.py:3: '/_SUCCESS.json'"]
