"""MkDocs hooks of the documentation site (``mkdocs.yml``: ``hooks:``).

Before a page is rendered, two kinds of marker in its Markdown are replaced by generated text:

* ``<!-- results: NAME -->``: a results table read from ``benchmarks/results/`` (``results.py``, its builders in
  ``results_*.py``, imported from this folder: MkDocs puts it on ``sys.path`` while it runs this file);
* ``<!-- cli-reference -->``: the reference of the ``dlrt`` command (``cli_reference.py``).

The plots the benchmarks write (``benchmarks/results/*.png``) are published as ``assets/NAME.png``.

An unknown table name or a missing results file stops the build with an error.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

from mkdocs.config.defaults import MkDocsConfig
from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

HERE = Path(__file__).resolve().parent
# A marker is a line of its own (so that a page can mention one in `code` without triggering it).
RESULTS_MARKER = re.compile(r"^<!--\s*results:\s*([\w.-]+)\s*-->[ \t]*$", re.MULTILINE)
CLI_MARKER = re.compile(r"^<!--\s*cli-reference\s*-->[ \t]*$", re.MULTILINE)


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"dlrt_docs_{name}", HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


results = _load("results")
cli_reference = _load("cli_reference")


def on_files(files: Files, config: MkDocsConfig, **kwargs: Any) -> Files:
    for png in sorted(results.RESULTS.glob("*.png")):
        files.append(File.generated(config, f"assets/{png.name}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    try:
        markdown = RESULTS_MARKER.sub(lambda m: results.render(m[1]), markdown)
    except (KeyError, FileNotFoundError) as err:
        raise PluginError(f"{page.file.src_path}: {err}") from err
    if CLI_MARKER.search(markdown):
        markdown = CLI_MARKER.sub(lambda m: cli_reference.render(), markdown)
    return markdown
