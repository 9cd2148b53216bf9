"""README's ARCHITECTURE section against the source tree: every module listed, nothing listed that is gone."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "intake"


def _modules() -> set[str]:
    """Every module of the package (packages' __init__.py included), as a path under src/intake/;
    migration scripts are data."""
    found = set()
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative.startswith("store/migrations/"):
            continue
        found.add(relative)
    return found


def _architecture_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Architecture\n")
    end = readme.find("\n## ", start + 1)
    return readme[start:end if end != -1 else None]


def _listed_modules() -> set[str]:
    """Paths in the first column of the module table: `| `store/models.py`, `store/db.py` | ... |`."""
    listed = set()
    for line in _architecture_section().splitlines():
        if line.startswith("| `"):
            first_column = line.split("|")[1]
            listed.update(re.findall(r"`([a-z_/]+\.py)`", first_column))
    return listed


def test_readme_lists_every_module():
    missing = sorted(_modules() - _listed_modules())
    assert not missing, f"README's Architecture table does not list: {missing}"


def test_readme_lists_no_module_that_is_gone():
    gone = sorted(_listed_modules() - _modules())
    assert not gone, f"README's Architecture table lists modules that do not exist: {gone}"


def test_every_package_has_a_docstring_saying_what_it_holds():
    for init in PACKAGE.glob("*/__init__.py"):
        if init.parent.name == "migrations":
            continue
        assert init.read_text().startswith('"""'), init


def test_no_issue_numbers_in_the_code():
    """Comments and docstrings say why, in the code's own words; issue numbers go stale."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"\bissues? #?\d+\b", text, re.IGNORECASE), path


def test_architecture_names_the_files_for_each_kind_of_change():
    section = _architecture_section()
    for change in ("add an SLA stage", "add a milestone", "add a mail #command", "add a routing decision",
                   "add a CLI command"):
        line = next((line for line in section.splitlines() if change.lower() in line.lower()), None)
        assert line is not None, f"Architecture does not say how to {change}"
        for path in re.findall(r"`([a-z_/]+\.(?:py|toml))`", line):
            assert (PACKAGE / path).exists() or (ROOT / path).exists(), f"{change}: {path} does not exist"
