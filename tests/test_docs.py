"""The documentation: every public name documented and in the API reference; a short README whose links work.

The site itself is built by ``make docs`` (``mkdocs build --strict``), which ``make test`` runs.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import itertools
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MODULES = ("dlrt", "dlrt.peft", "dlrt.robust", "dlrt.federated", "dlrt.kinetic")
DIRECTIVE = re.compile(r"^:::\s+([\w.]+)\s*$", re.MULTILINE)


def _directives() -> set[str]:
    found: set[str] = set()
    for page in (DOCS / "api").glob("*.md"):
        found.update(DIRECTIVE.findall(page.read_text(encoding="utf-8")))
    return found


def _public(module_name: str) -> list[tuple[str, object]]:
    module = importlib.import_module(module_name)
    return [(name, getattr(module, name)) for name in module.__all__]


def _defined_at(obj: object) -> str | None:
    """Where a class or function is defined (``module.qualname``); None for other objects."""
    if inspect.isclass(obj) or inspect.isfunction(obj):
        return f"{obj.__module__}.{obj.__qualname__}"
    return None


def _attribute_docstring(module_name: str, name: str) -> str | None:
    """The string literal right after ``name = ...`` in the module that assigns it (what mkdocstrings renders)."""
    module = importlib.import_module(module_name)
    for candidate in [module, *(sys.modules[m] for m in sorted(sys.modules) if m.startswith(module_name + "."))]:
        path = getattr(candidate, "__file__", None)
        if not path or not path.endswith(".py"):
            continue
        body = ast.parse(Path(path).read_text(encoding="utf-8")).body
        for stmt, after in itertools.pairwise(body):
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant):
                    return str(after.value.value)
    return None


def _docstring(module_name: str, name: str, obj: object) -> str | None:
    if inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isfunction(obj):
        doc = obj.__doc__
        # A dataclass without a docstring gets its signature as __doc__: that documents nothing.
        if inspect.isclass(obj) and doc and doc.startswith(f"{obj.__name__}("):
            return None
        return doc
    return _attribute_docstring(module_name, name)


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_has_a_docstring(module_name: str) -> None:
    missing = [name for name, obj in _public(module_name) if not (_docstring(module_name, name, obj) or "").strip()]
    assert not missing, f"{module_name}: no docstring for {missing}"


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_is_in_the_api_reference(module_name: str) -> None:
    directives = _directives()
    missing = []
    for name, obj in _public(module_name):
        accepted = {f"{module_name}.{name}", _defined_at(obj)}
        if not accepted & directives:
            missing.append(name)
    assert not missing, f"{module_name}: add `::: {module_name}.NAME` to docs/api/*.md for {missing}"


def test_api_reference_names_exist() -> None:
    for target in _directives():
        module_name, _, attr = target.rpartition(".")
        try:
            obj = importlib.import_module(target)
        except ImportError:
            obj = getattr(importlib.import_module(module_name), attr, None)
        assert obj is not None, f"docs/api: `::: {target}` names nothing"


def test_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; the manual is docs/"


def test_readme_keeps_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "make demo   # creates .venv" in text
    assert "make test   # same install, then ruff and the whole test suite" in text


def _headings_anchors(page: Path) -> set[str]:
    """The anchors MkDocs' toc extension gives the headings of a Markdown page (its default slugify)."""
    anchors = set()
    in_code = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            text = re.sub(r"[`*]", "", line.lstrip("#").strip())
            slug = re.sub(r"[^\w\s-]", "", text).strip().lower()
            anchors.add(re.sub(r"[-\s]+", "-", slug))
    return anchors


def test_readme_links_point_to_files_or_site_pages() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links, "the README should route to the site"
    broken = []
    for link in links:
        if re.match(r"^[a-z]+:", link):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = link.partition("#")
        target = ROOT / path if path else ROOT / "README.md"
        if not target.exists():
            broken.append(link)
        elif anchor and target.suffix == ".md" and anchor not in _headings_anchors(target):
            broken.append(link)
    assert not broken, f"README.md links to nothing: {broken}"


def test_readme_site_links_are_in_the_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {m.split("#")[0] for m in re.findall(r"\]\(docs/([^)\s]+)\)", (ROOT / "README.md").read_text())}
    missing = [p for p in pages if p not in nav]
    assert not missing, f"README.md links to site pages outside the nav: {missing}"


def test_results_markers_name_known_tables() -> None:
    sys.path.insert(0, str(ROOT / "scripts" / "docs"))
    try:
        results = importlib.import_module("results")
    finally:
        sys.path.pop(0)
    marker = re.compile(r"^<!--\s*results:\s*([\w.-]+)\s*-->[ \t]*$", re.MULTILINE)
    used = {name for page in DOCS.rglob("*.md") for name in marker.findall(page.read_text(encoding="utf-8"))}
    assert used <= set(results.TABLES), f"unknown results tables: {used - set(results.TABLES)}"
    for name in sorted(used):
        table = results.render(name)
        assert table.count("\n|") >= 2 and "Generated at build time from" in table, name
