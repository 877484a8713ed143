"""The repository root never shadows an installed distribution, however Python is started there.

`python -m pytest`, `python -c` and a REPL put the working directory first on sys.path. A regular
package at the root (a folder with __init__.py, or a .py file) would then win over any installed
distribution of the same import name: transformers >= 5.25 imports Hugging Face's `kernels`, and
a root `kernels/__init__.py` broke every transformers model import. The root's folders carry no
__init__.py, so an installed package of the same name always wins (Python's rule: a regular package
found anywhere on sys.path beats a folder without one).
"""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN_PACKAGE = "sparse_prefill"  # the root's only regular package: our own distribution's import name


def test_root_holds_no_importable_top_level_name_but_our_own():
    importable = sorted(
        entry.name for entry in ROOT.iterdir()
        if (entry.is_dir() and (entry / "__init__.py").exists()) or (entry.is_file() and entry.suffix == ".py")
    )
    assert importable == [OWN_PACKAGE], (
        f"{[name for name in importable if name != OWN_PACKAGE]} at the repository root would shadow installed "
        "distributions of the same name whenever Python starts there; keep root folders without __init__.py"
    )


@pytest.mark.parametrize("name", ["kernels", "patterns"])
def test_installed_distribution_wins_over_root_folder(tmp_path, name):
    site = tmp_path / "site"
    (site / name).mkdir(parents=True)
    (site / name / "__init__.py").write_text("ORIGIN = 'installed'\n")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    for argv in (["-c", f"import {name}; print({name}.ORIGIN)"], ["-m", name]):
        if argv[0] == "-m":  # `python -m` runs the package's __main__ from the same sys.path
            (site / name / "__main__.py").write_text("print('installed')\n")
        done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stdout.strip() == "installed", done.stderr


def test_our_subpackages_import_from_the_root_and_elsewhere(tmp_path):
    code = "import sparse_prefill.kernels.executors, sparse_prefill.patterns.anchor; print('ok')"
    for cwd in (ROOT, tmp_path):
        done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_transformers_models_import_from_the_root():
    # The failure that was reported: with Hugging Face's `kernels` installed (transformers >= 5.25
    # depends on it), a shadowing root folder made this ImportError.
    done = subprocess.run([sys.executable, "-c", "from transformers import LlamaForCausalLM, PreTrainedModel"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def test_kernels_never_import_patterns():
    """Layers point one way: patterns (identifiers, with their own Triton kernels beside their references) may use
    kernels/ (executors, the runtime probe); kernels/ knows no pattern, so there is no import loop between them."""
    offending = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                 for path in sorted((ROOT / "kernels").glob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1)
                 if "sparse_prefill.patterns" in line and line.lstrip().startswith(("import", "from"))]
    assert not offending, "kernels/ imports patterns:\n" + "\n".join(offending)
