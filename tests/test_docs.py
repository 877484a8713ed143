"""The documentation is tested like code.

* Every Python code block of README.md and docs/ runs as a test through pytest-markdown-docs
  (``--markdown-docs`` in pyproject's addopts, with README.md and docs/ in testpaths). A block that
  cannot run on a CPU in seconds says so in its info string, ```` ```python notest ````; the site
  build drops the word (docs/_hooks/site.py). The tests here keep that machinery switched on.
* Every ``sparse-prefill ...`` command in a shell block or an inline code span parses with the real
  argparse parser, and every repository path a command names exists.
* Generated reference pages match the code; every page is in the site's nav; every file in
  docs/benchmarks is linked from some page; no link leaves the repository.
* The plugin tutorial (docs/plugins.md) builds a working package from its files alone.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import yaml
from markdown_it import MarkdownIt

from sparse_prefill.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
NOT_PAGES = ("_hooks", "_scripts")  # build helpers beside the pages (mkdocs.yml's exclude_docs)
PAGES = sorted(p for p in DOCS.rglob("*.md") if not set(p.relative_to(DOCS).parts) & set(NOT_PAGES))
DOC_FILES = [ROOT / "README.md", *PAGES]
# Repository folders a command may name; a path starting with one of them must exist. Other paths in
# commands (/path/to/model, ./my-package) are the reader's.
REPO_DIRS = ("scripts/", "benchmarks/", "docs/", "plugins/", "sparse_prefill/", "patterns/", "kernels/", "tests/",
             ".ci/")
FENCE_OPTIONS = re.compile(r"^(notest|continuation|title=\S+)$")  # after shlex: title="a b" is title=a b
SHELL = ("bash", "sh", "shell", "console")


def _fences(path: Path) -> list[tuple[str, list[str], str, int]]:
    """(language, options, content, first line) of each fenced block, parsed as pytest-markdown-docs parses."""
    tokens = MarkdownIt("commonmark").parse(path.read_text(encoding="utf-8"))
    found = []
    for token in tokens:
        if token.type == "fence":
            words = shlex.split(token.info) if token.info.strip() else [""]
            found.append((words[0], words[1:], token.content, token.map[0] + 1))
    return found


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_markdown_docs_runs_the_docs_python_blocks(request):
    assert request.config.getoption("markdowndocs"), "pyproject's addopts must pass --markdown-docs"
    testpaths = request.config.getini("testpaths")
    assert "docs" in testpaths and "README.md" in testpaths, testpaths


def test_fence_options_are_ones_the_tests_and_the_site_understand():
    """A misspelt ``notest`` would neither skip the block nor render (superfences drops unknown words)."""
    bad = [f"{_rel(path)}:{line}: {lang} {' '.join(options)}"
           for path in DOC_FILES for lang, options, _, line in _fences(path)
           if any(not FENCE_OPTIONS.match(option) for option in options)]
    assert not bad, "unknown code-fence options (allowed: notest, continuation, title=\"file\"):\n" + "\n".join(bad)


def _commands(path: Path) -> list[tuple[int, str]]:
    """(line, command) for each shell command in the page's shell blocks and inline code spans.

    An inline span of a command's bare name (`sparse-prefill eval`) names it in prose and is left out;
    a span with arguments is a command a reader may copy, and counts."""
    commands = []
    for lang, _, content, line in _fences(path):
        if lang in SHELL:
            logical = content.replace("\\\n", " ").splitlines()
            commands += [(line + i, text.removeprefix("$ ").strip()) for i, text in enumerate(logical) if text.strip()]
    text = path.read_text(encoding="utf-8")
    for match in re.finditer(r"(?<!`)`((?:sparse-prefill|python3?|bash) [^`]+)`(?!`)", text):
        if re.fullmatch(r"sparse-prefill [\w-]+", match.group(1)):
            continue
        commands.append((text.count("\n", 0, match.start()) + 1, match.group(1)))
    return commands


def _argv(command: str) -> list[str]:
    return shlex.split(command, comments=True)


def test_every_sparse_prefill_command_in_the_docs_parses():
    known = set(_reference_module().subcommands(build_parser()))
    failures, checked = [], 0
    for path in DOC_FILES:
        for line, command in _commands(path):
            argv = _argv(command)
            if not argv or argv[0] != "sparse-prefill" or (len(argv) > 1 and argv[1] not in known
                                                           and not argv[1].startswith("-")):
                continue  # `sparse-prefill <command>: error: ...` is prose about output, not a command
            checked += 1
            if "..." in argv:
                failures.append(f"{_rel(path)}:{line}: `...` in place of arguments: {command}")
                continue
            try:
                build_parser().parse_args(argv[1:])
            except SystemExit as exc:
                if exc.code:  # --help and --version exit 0
                    failures.append(f"{_rel(path)}:{line}: does not parse: {command}")
    assert checked > 10, f"only {checked} sparse-prefill commands found: is the extraction broken?"
    assert not failures, "\n".join(failures)


def test_every_repository_path_a_command_names_exists():
    missing = []
    for path in DOC_FILES:
        for line, command in _commands(path):
            for word in _argv(command):
                word = word.split("=", 1)[-1]
                if word.startswith(REPO_DIRS) and "..." not in word and not (ROOT / word).exists():
                    missing.append(f"{_rel(path)}:{line}: {word} (in `{command}`)")
    assert not missing, "commands name paths that do not exist:\n" + "\n".join(missing)


def _table_rows(path: Path) -> list[tuple[int, int, int]]:
    """(line, cells, header cells) of each Markdown table row outside code fences (``\\|`` is no border)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    fenced = {i for _, _, content, start in _fences(path) for i in range(start - 1, start + content.count("\n") + 1)}
    rows, header = [], None
    for i, line in enumerate(lines):
        if i in fenced or not line.startswith("|"):
            header = None
            continue
        cells = len(re.split(r"(?<!\\)\|", line.strip().removeprefix("|").removesuffix("|")))
        header = header or cells
        rows.append((i + 1, cells, header))
    return rows


def test_every_table_row_has_the_header_cell_count():
    """GitHub and MkDocs drop or pad cells silently: a row with one cell too many loses its last one."""
    bad = [f"{_rel(path)}:{line}: {cells} cells, the header has {header}"
           for path in DOC_FILES for line, cells, header in _table_rows(path) if cells != header]
    assert not bad, "\n".join(bad)


def _reference_module():
    spec = importlib.util.spec_from_file_location("_docs_reference", DOCS / "_scripts" / "reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_patterns_page_matches_the_registry():
    reference = _reference_module()
    assert reference.PATTERNS_PAGE.read_text(encoding="utf-8") == reference.patterns_page(), (
        "docs/reference/patterns.md is stale: run `python docs/_scripts/reference.py` and commit it")


def test_every_built_in_pattern_says_where_its_defaults_come_from():
    from sparse_prefill.registry import get_registry

    registry, reference = get_registry(), _reference_module()
    built_in = {name for name, (_, plugin) in registry.patterns().items()
                if registry.source(plugin)[1] == reference.OWN_DISTRIBUTION}
    assert built_in and built_in == set(reference.DEFAULTS_SOURCE), "update DEFAULTS_SOURCE in docs/_scripts/reference.py"


def test_cli_page_has_every_command():
    body = _reference_module().cli_page_body()
    for name in _reference_module().subcommands(build_parser()):
        assert f"## `sparse-prefill {name}`" in body
    assert "<!-- generated: cli -->" in (DOCS / "reference" / "cli.md").read_text(encoding="utf-8")


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [page for value in node.values() for page in _nav_pages(value)]
    return [page for item in node for page in _nav_pages(item)]


def test_every_page_is_in_the_site_nav():
    nav = _nav_pages(yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"])
    pages = [str(p.relative_to(DOCS)) for p in PAGES]
    assert sorted(set(pages) - set(nav)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(nav) - set(pages)) == [], "nav entries without a page"


_LINK = re.compile(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def _links(path: Path) -> list[str]:
    return [target for target in _LINK.findall(path.read_text(encoding="utf-8"))]


def test_every_file_in_docs_benchmarks_is_linked_from_a_page():
    linked = set()
    for page in DOC_FILES:
        for target in _links(page):
            if "://" not in target:
                linked.add((page.parent / target.split("#")[0]).resolve())
    unlinked = sorted(_rel(f) for f in (DOCS / "benchmarks").iterdir() if f.is_file() and f.resolve() not in linked)
    assert not unlinked, "files in docs/benchmarks no page links to (link them, or delete them):\n" + "\n".join(unlinked)


def test_no_link_leaves_the_repository():
    """Links to files stay inside the repository and exist; web pages are https links."""
    outside = []
    for page in [*DOC_FILES, *ROOT.glob("plugins/*/README.md")]:
        for target in _links(page):
            if target.startswith("https://"):
                continue  # papers and projects on the web: cited, not checked (the tests run offline)
            if target.startswith(("http://", "file:", "/")):
                outside.append(f"{_rel(page)}: {target}")
            elif not target.startswith("#"):
                resolved = (page.parent / target.split("#")[0]).resolve()
                if not resolved.is_relative_to(ROOT) or not resolved.exists():
                    outside.append(f"{_rel(page)}: {target}")
    assert not outside, "links that leave the repository or point nowhere:\n" + "\n".join(outside)


def _tutorial_files() -> dict[str, str]:
    files = {}
    for _, options, content, _ in _fences(DOCS / "plugins.md"):
        for option in options:
            if option.startswith("title="):
                files[option.removeprefix("title=").strip('"')] = content
    return files


def _build_isolation_flags() -> list[str]:
    """``--no-build-isolation`` (offline, seconds) when this environment can build the tutorial's wheel
    itself: setuptools >= 70.1 builds wheels alone, older ones need the ``wheel`` package (a fresh
    Python 3.11 venv has setuptools 65 without it). Otherwise pip builds in isolation, fetching setuptools."""
    import importlib.metadata

    try:
        version = tuple(int(part) for part in importlib.metadata.version("setuptools").split(".")[:2])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return []
    return ["--no-build-isolation"] if version >= (70, 1) or importlib.util.find_spec("wheel") else []


def test_plugin_tutorial_builds_a_working_package(tmp_path):
    """The tutorial's files, as a newcomer would save them, install and register, and keep every key == dense."""
    files = _tutorial_files()
    assert {"pyproject.toml", "src/sparse_prefill_strided/__init__.py", "check_strided.py", "strided.yaml"} <= set(files)
    project = tmp_path / "sparse-prefill-strided"
    for name, content in files.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(content, encoding="utf-8")
    target = tmp_path / "site-packages"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    *_build_isolation_flags(), "--target", str(target), str(project)], check=True)
    assert time.monotonic() - started < 60, "pip install of the tutorial package got slow"
    # The checkout's sparse_prefill, the installed plugin (its entry point comes from its dist-info).
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), str(ROOT)])}
    env.pop("SPARSE_PREFILL_DISABLE_PLUGIN_AUTOLOAD", None)
    registered = (
        "import sparse_prefill\n"
        "info = {p.name: p for p in sparse_prefill.available_patterns()}['strided']\n"
        "assert info.distribution == 'sparse-prefill-strided', info\n"
        "assert not sparse_prefill.plugin_errors(), sparse_prefill.plugin_errors()\n"
        "policy = sparse_prefill.load_policy('strided.yaml')\n"
        "print(policy.min_length, policy.default)\n"
        "try:\n"
        "    sparse_prefill.load_policy({'default': {'pattern': 'strided', 'stride': 0}})\n"
        "except sparse_prefill.PolicyError as error:\n"
        "    assert 'default.stride: must be > 0 (got 0)' in str(error), error\n"
        "else:\n"
        "    raise AssertionError('stride 0 was accepted')\n"
    )
    for argv in ([sys.executable, "-c", registered], [sys.executable, "check_strided.py"]):
        result = subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{argv[1:]} failed:\n{result.stdout}\n{result.stderr}"


def test_every_policy_example_in_the_docs_loads():
    """YAML blocks with a `default:` are policies a reader will copy; the plugin tutorial's needs its plugin."""
    from sparse_prefill import load_policy

    checked = 0
    for path in DOC_FILES:
        if path == DOCS / "plugins.md":
            continue  # its pattern exists only once the tutorial's package is installed (tested above)
        for lang, _, content, line in _fences(path):
            raw = yaml.safe_load(content) if lang == "yaml" else None
            if isinstance(raw, dict) and "default" in raw:
                load_policy(raw)
                checked += 1
    assert checked >= 1, "no policy example found: is the extraction broken?"


def test_plan_picture_colours_exactly_what_each_plan_attends():
    """docs/img/plans.png is drawn from these plans: every attended key has a colour, no other key has one."""
    spec = importlib.util.spec_from_file_location("_plan_picture", DOCS / "_scripts" / "plan_picture.py")
    picture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(picture)
    stripe, block = picture.example_plans()
    parts = picture.stripe_parts(stripe)
    assert ((parts > 0) == stripe.to_dense()[0, 0]).all()
    assert set(parts.unique().tolist()) == {0, 1, 2, 3}  # the picture shows both windows and selected keys
    assert 0 < stripe.density() < 1 and 0 < block.density() < 1
    assert (DOCS / "img" / "plans.png").is_file()


def test_site_hook_drops_test_options_and_sphinx_roles_only():
    spec = importlib.util.spec_from_file_location("_site_hook", DOCS / "_hooks" / "site.py")
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    markdown = '```python notest title="a.py"\nx = 1\n```\n\n```python continuation\ny\n```\n\n```text\nnotest\n```\n'
    assert hook.on_page_markdown(markdown, page=None) == (
        '```python title="a.py"\nx = 1\n```\n\n```python\ny\n```\n\n```text\nnotest\n```\n')
    html = "A :class:<code>~sparse_prefill.plan.DensePlan</code> or :func:<code>load_policy</code>, :x:<code>y</code>"
    assert hook.on_page_content(html, page=None) == "A <code>DensePlan</code> or <code>load_policy</code>, :x:<code>y</code>"
