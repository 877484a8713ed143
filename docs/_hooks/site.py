"""MkDocs hooks for the site (``hooks:`` in mkdocs.yml).

* Code-fence options meant for the doc tests (``python notest``, ``python continuation``, see
  ``tests/test_docs.py``) are dropped before rendering: pymdownx.superfences takes a fence whose
  info string has a bare word after the language for no fence at all, and renders it as text.
* Sphinx roles in docstrings (``:class:`~sparse_prefill.plan.Plan```), which mkdocstrings leaves
  as text, are shown as the code they name (``Plan``; a ``~`` keeps the last part, as Sphinx does).
* ``<!-- generated: cli -->`` is replaced by the ``--help`` of every ``sparse-prefill`` command,
  so the CLI reference is rebuilt from the parser on every build.
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parents[2]
# Only the words the doc tests read; a `title="..."` stays for superfences to show.
_TEST_OPTIONS = re.compile(r"^([ \t]*```+[ \t]*[\w+-]+)((?:[ \t]+(?:notest|continuation))+)(?=[ \t]|$)", re.MULTILINE)
_CLI_MARKER = "<!-- generated: cli -->"
_SPHINX_ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(~?)([\w.]+)</code>")


def _reference_module() -> Any:
    if str(_ROOT) not in sys.path:
        sys.path.insert(0, str(_ROOT))  # the checkout's sparse_prefill, as the tests use it
    spec = importlib.util.spec_from_file_location("_docs_reference", _ROOT / "docs" / "_scripts" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    markdown = _TEST_OPTIONS.sub(r"\1", markdown)
    if _CLI_MARKER in markdown:
        markdown = markdown.replace(_CLI_MARKER, _reference_module().cli_page_body())
    return markdown


def _role(match: re.Match) -> str:
    name = match.group(2).rsplit(".", 1)[-1] if match.group(1) else match.group(2)
    return f"<code>{name}</code>"


def on_page_content(html: str, page: Any, **_: Any) -> str:
    return _SPHINX_ROLE.sub(_role, html)
