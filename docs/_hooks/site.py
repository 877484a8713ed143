"""MkDocs hooks for the site (``hooks:`` in mkdocs.yml).

* Code-fence options meant for the doc tests (``python notest``, ``python continuation``, see
  ``tests/test_docs.py``) are dropped before rendering: pymdownx.superfences takes a fence whose
  info string has a bare word after the language for no fence at all, and renders it as text.
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
_TEST_OPTIONS = re.compile(r"^(\s*```+\s*[\w+-]+)((?:\s+(?:notest|continuation))+)(?=\s|$)", re.MULTILINE)
_CLI_MARKER = "<!-- generated: cli -->"


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
