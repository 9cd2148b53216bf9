"""The shape of the code: no import cycle among intake's modules, and no module over 500 lines.

Imports are read from the source (ast), every one of them: at module level, inside functions and
under ``if TYPE_CHECKING:``, since a cycle through any of them still ties the modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "src" / "intake"
MAX_LINES = 500
# Modules allowed past MAX_LINES: {module: why}. Keep it empty, or say why a split would be worse.
LONG_MODULES: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE_ROOT.rglob("*.py"))}


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The intake modules that module *name* (at *path*) imports, wherever the import statement is.
    ``from intake.pkg import mod`` counts as importing ``intake.pkg.mod`` when that is a module."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the package this module is in (or is)
                package = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join(package + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in known else base)
    # "import intake.a.b" names intake.a.b; a name that is not a module is its nearest enclosing one.
    resolved = set()
    for target in found:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            resolved.add(target)
    return resolved


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported_modules(name, path, known) for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path (its first module repeated at the end), or None. A depth-first
    walk: a module met again while it is still on the walk's path closes a cycle."""
    finished: set[str] = set()
    for start in sorted(graph):
        if start in finished:
            continue
        path = [start]
        pending = [iter(sorted(graph[start]))]
        while pending:
            following = next(pending[-1], None)
            if following is None:
                pending.pop()
                finished.add(path.pop())
            elif following in path:
                return path[path.index(following):] + [following]
            elif following not in finished:
                path.append(following)
                pending.append(iter(sorted(graph.get(following, ()))))
    return None


def test_the_import_graph_is_read_from_every_kind_of_import_statement():
    graph = import_graph()
    assert "intake.understand.parse" in graph["intake.understand.parse_guard"]  # from intake.understand.parse import
    assert any(target.startswith("intake.") for target in graph["intake.run.service"])


def test_the_cycle_finder_reports_a_cycle_path():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_module_is_longer_than_the_limit():
    too_long = {}
    for name, path in modules().items():
        if ".migrations.versions." in name or name in LONG_MODULES:
            continue
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_LINES:
            too_long[name] = lines
    assert not too_long, f"modules over {MAX_LINES} lines (split them, or list them in LONG_MODULES with why): " \
                         + ", ".join(f"{name} ({lines})" for name, lines in sorted(too_long.items()))


def test_the_allow_list_names_only_long_modules():
    found = modules()
    for name in LONG_MODULES:
        assert name in found and len(found[name].read_text(encoding="utf-8").splitlines()) > MAX_LINES, name
