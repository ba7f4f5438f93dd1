"""The code's shape: lower layers never import the commands (not even inside a function), and no
function in wsss/ is longer than 80 lines. Both read the source with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "wsss"
LOWER = ("ops", "refine", "backbones", "heads", "methods", "engine")
HIGHER = ("wsss.api.predictor", "wsss.api.hub", "wsss.analysis", "wsss.cli", "wsss.commands")
MAX_LINES = 80


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py"))


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth (functions included)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return out


def _is_higher(module: str) -> bool:
    return any(module == h or module.startswith(h + ".") for h in HIGHER)


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_do_not_import_the_commands(layer):
    bad = [f"{p.relative_to(ROOT.parent)}:{line} imports {mod}"
           for p in _modules(ROOT / layer) for line, mod in imported_names(p) if _is_higher(mod)]
    assert not bad, "\n".join(bad)


def test_the_check_sees_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from wsss.analysis.viz import colorize\n    import wsss.api.hub\n")
    assert [m for _, m in imported_names(f) if _is_higher(m)] == [
        "wsss.analysis.viz", "wsss.analysis.viz.colorize", "wsss.api.hub"]


def long_functions(path: Path) -> list[tuple[int, str, int]]:
    """(line, name, length) of each function (methods and nested ones too) over MAX_LINES lines."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if n > MAX_LINES:
                out.append((node.lineno, node.name, n))
    return out


def test_no_function_is_longer_than_80_lines(tmp_path):
    bad = [f"{p.relative_to(ROOT.parent)}:{line} {name} ({n} lines)"
           for p in _modules(ROOT) for line, name, n in long_functions(p)]
    assert not bad, "\n".join(bad)
    f = tmp_path / "m.py"
    f.write_text("class A:\n    def g(self):\n" + "        x = 1\n" * MAX_LINES)
    assert long_functions(f) == [(2, "g", MAX_LINES + 1)]
