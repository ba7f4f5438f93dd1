"""The code's shape, read from the source with ``ast``: the layers, and no function longer than 60 lines.

Layers of ``wsss/``, lowest first (docs/ARCHITECTURE.md, "Layers"). A module may import only from its own
layer or a lower one, at any depth (imports inside functions count too, relative ones are resolved):

     1. core (registry, schema, param_rules, weights): imports nothing of wsss
     2. refine
     3. ops
     4. backbones, heads, data
     5. model (wsss/model.py)
     6. methods
     7. config (wsss/config/)
     8. engine
     9. analysis
    10. api (predictor, hub) and the package's ``__init__`` (``wsss.Segmenter``, ``wsss.from_pretrained``)
    11. commands, and cli.py that assembles them

Every package and module at the root of ``wsss/`` has a layer here: a new one must be placed.

No two modules under ``wsss/`` share a file name (distinct names for distinct jobs), except ``__init__.py``
and the exact groups of :data:`SHARED_NAMES`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "wsss"
LAYERS = (
    ("core",),
    ("refine",),
    ("ops",),
    ("backbones", "heads", "data"),
    ("model",),
    ("methods",),
    ("config",),
    ("engine",),
    ("analysis",),
    ("api", "__init__"),
    ("commands", "cli"),
)
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}
MAX_LINES = 60

#: The only file names that several modules under wsss/ may share, each with exactly the files that share it.
SHARED_NAMES = {
    # the base classes / contract of their package
    "base.py": {"backbones/base.py", "heads/base.py", "methods/base.py", "data/base.py"},
    # a command module is named after its CLI subcommand, over the engine or analysis module it runs
    "train.py": {"commands/train.py", "engine/train.py"},
    "evaluate.py": {"commands/evaluate.py", "engine/evaluate.py"},
    "calibrate.py": {"commands/calibrate.py", "engine/calibrate.py"},
    "analyze.py": {"commands/analyze.py", "analysis/analyze.py"},
    "report.py": {"commands/report.py", "analysis/report.py"},
}


def _modules(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py"))


def unit_of_path(path: Path) -> str:
    """The root package or module of wsss/ a file belongs to: ``engine``, ``config``, ``__init__``."""
    parts = path.relative_to(ROOT).parts
    return parts[0] if len(parts) > 1 else Path(parts[0]).stem


def unit_of_module(module: str) -> str | None:
    """The root package or module of an imported name (``wsss.engine.runs.open_run`` -> ``engine``);
    ``__init__`` for the package itself or a name it defines; None outside wsss."""
    parts = module.split(".")
    if parts[0] != "wsss":
        return None
    return parts[1] if len(parts) > 1 and parts[1] in RANK else "__init__"


def _package_of(path: Path) -> list[str]:
    """``wsss/data/build.py`` (or ``wsss/data/__init__.py``) -> [wsss, data]: where the file's relative
    imports start from."""
    return list(path.relative_to(ROOT.parent).parts[:-1])


def imported_names(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in the file, at any depth (functions included); relative imports
    of a file under wsss/ are resolved to their absolute names."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                module = node.module
            elif node.level > 0 and path.is_relative_to(ROOT):
                package = _package_of(path)
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                continue
            out.append((node.lineno, module))
            out += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return out


def layer_violations(path: Path, unit: str) -> list[str]:
    """Each import of ``path`` (a module of ``unit``) from a higher layer, as ``file:line imports name``."""
    where = path.relative_to(ROOT.parent) if path.is_relative_to(ROOT) else path
    out = []
    for line, module in imported_names(path):
        target = unit_of_module(module)
        if target is not None and RANK[target] > RANK[unit]:
            out.append(f"{where}:{line} imports {module} ({unit} is layer {RANK[unit] + 1}, {target} "
                       f"layer {RANK[target] + 1})")
    return out


def test_every_root_package_and_module_has_a_layer():
    units = {p.name if p.is_dir() else p.stem for p in ROOT.iterdir()
             if (p.is_dir() and (p / "__init__.py").is_file()) or p.suffix == ".py"}
    assert units - set(RANK) == set(), "place these in LAYERS (and in docs/ARCHITECTURE.md)"
    assert set(RANK) - units == set(), "LAYERS names packages or modules that are gone"


def test_at_most_five_modules_at_the_package_root():
    assert len(list(ROOT.glob("*.py"))) <= 5


@pytest.mark.parametrize("unit", sorted(RANK))
def test_imports_follow_the_layers(unit):
    files = _modules(ROOT / unit) if (ROOT / unit).is_dir() else [ROOT / f"{unit}.py"]
    bad = [v for p in files for v in layer_violations(p, unit)]
    assert not bad, "\n".join(bad)


def test_the_check_sees_imports_inside_functions_and_relative_ones(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from wsss.refine.par import PAR\n\ndef g():\n    from wsss.analysis.viz import colorize\n"
                 "    import wsss.api.hub\n    from wsss import cli\n")
    assert [m for _, m in imported_names(f) if unit_of_module(m) == "analysis"] == [
        "wsss.analysis.viz", "wsss.analysis.viz.colorize"]
    assert [v.split(" imports ")[1].split(" (")[0] for v in layer_violations(f, "engine")] == [
        "wsss.analysis.viz", "wsss.analysis.viz.colorize", "wsss.api.hub", "wsss", "wsss.cli"]
    assert layer_violations(f, "commands") == []
    assert "wsss.data.io.save_mask" in {m for _, m in imported_names(ROOT / "data" / "synthetic.py")}
    assert "wsss.data.synthetic" in {m for _, m in imported_names(ROOT / "data" / "__init__.py")}


def long_functions(path: Path) -> list[tuple[int, str, int]]:
    """(line, name, length) of each function (methods and nested ones too) over MAX_LINES lines."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if n > MAX_LINES:
                out.append((node.lineno, node.name, n))
    return out


def test_no_function_is_longer_than_60_lines(tmp_path):
    bad = [f"{p.relative_to(ROOT.parent)}:{line} {name} ({n} lines)"
           for p in _modules(ROOT) for line, name, n in long_functions(p)]
    assert not bad, "\n".join(bad)
    f = tmp_path / "m.py"
    f.write_text("class A:\n    def g(self):\n" + "        x = 1\n" * MAX_LINES)
    assert long_functions(f) == [(2, "g", MAX_LINES + 1)]


def shared_file_names(root: Path) -> dict[str, set[str]]:
    """``file name -> {paths relative to root}`` of every name that more than one module carries
    (``__init__.py`` excepted)."""
    by_name: dict[str, set[str]] = {}
    for p in _modules(root):
        if p.name != "__init__.py":
            by_name.setdefault(p.name, set()).add(p.relative_to(root).as_posix())
    return {name: paths for name, paths in by_name.items() if len(paths) > 1}


def test_no_two_modules_share_a_file_name(tmp_path):
    shared = shared_file_names(ROOT)
    assert "cam.py" not in shared, "only methods/cam.py (the method named 'cam') may be called cam.py"
    bad = {name: sorted(paths) for name, paths in shared.items() if SHARED_NAMES.get(name) != paths}
    assert not bad, f"modules sharing a file name: {bad}; give each its own name"
    stale = sorted(set(SHARED_NAMES) - set(shared))
    assert not stale, f"SHARED_NAMES lists names no longer shared: {stale}; remove them"
    for rel in ("a/x.py", "b/x.py", "a/__init__.py", "b/__init__.py", "a/y.py"):
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_text("")
    assert shared_file_names(tmp_path) == {"x.py": {"a/x.py", "b/x.py"}}
