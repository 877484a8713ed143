"""Every script in benchmarks/ answers --help on a machine without a GPU (most of them need one only to run)."""

import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))

# Runs each script as __main__ with --help in one fresh interpreter, so torch and transformers import once
# (a process per script took 50 s on two cores) while the test process itself stays untouched.
_RUN_EACH = """
import contextlib, io, json, os, runpy, sys
found = {}
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # as `python benchmarks/x.py` has it: siblings import
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code or 0
    except Exception as exc:
        code, err = 1, io.StringIO(f"{type(exc).__name__}: {exc}")
    found[script] = [code, out.getvalue()[:6], (err.getvalue().strip().splitlines() or [""])[-1]]
print(json.dumps(found))
"""
# Importing torch and transformers takes seconds; minutes mean --help runs what it should not.
HELP_SECONDS = 180


def test_every_benchmark_script_answers_help_without_a_gpu():
    assert SCRIPTS, f"no scripts found in {BENCHMARKS}"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # the same answer on a GPU machine
    done = subprocess.run([sys.executable, "-c", _RUN_EACH, *map(str, SCRIPTS)], cwd=BENCHMARKS.parent, env=env,
                          capture_output=True, text=True, timeout=HELP_SECONDS)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert sorted(found) == sorted(map(str, SCRIPTS))
    failed = {Path(script).name: f"exit {code}: {last_error}" for script, (code, usage, last_error) in found.items()
              if code != 0 or usage != "usage:"}
    assert not failed, failed
