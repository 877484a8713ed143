"""A policy file back from a committed record: the YAML that a record's commands call ``NAME.yaml``.

    python benchmarks/policy_from_record.py docs/benchmarks/floor_sweep_qwen25_coder_05b_32k.json \
        layers-floor0.7 --out layers-floor0.7.yaml

Eval records keep each policy as ``Policy.describe()`` printed it (every parameter resolved), not as the
file that ran. This rebuilds that file and loads it before writing: only if its own ``describe()`` matches
the record's line for line (the source line aside; a parameter listed in ADDED_SINCE_RECORDS, at its default,
is what ran before it existed) is it written, so a description this script misreads is refused, never written
as a different policy. ``--list`` names the record's policies.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

from sparse_prefill.evaluation.calibrate import policy_file_text
from sparse_prefill.policy import PolicyError, load_policy
from sparse_prefill.registry import get_pattern

_CHOICE = re.compile(r"([\w.-]+)\((.*)\)")
_OVERRIDE = re.compile(r"layers (\S+), heads (\S+): (.+)")
_GUARD = re.compile(r"guard: KV groups whose output on (\d+) sampled rows errs more than (\S+) run dense"
                    r"(?:; a rejected group then runs dense for (\d+) calls before a new test)?")


class DescriptionError(ValueError):
    """A line of a policy description this script cannot read, or a rebuilt policy that describes itself
    differently."""


def record_policies(record: dict) -> dict[str, str]:
    """Every policy description of an eval record (merge_eval.py's ``runs[*].policies``), by label."""
    runs = record.get("runs", [])
    found: dict[str, str] = {}
    for run in runs.values() if isinstance(runs, dict) else runs:
        policies = run.get("policies") if isinstance(run, dict) else None
        if isinstance(policies, dict):
            found.update({label: text for label, text in policies.items() if isinstance(text, str)})
    return found


def description_body(description: str) -> list[str]:
    """A description's lines without its first, which names the file the policy was read from."""
    return description.splitlines()[1:]


def _choice(text: str) -> dict[str, Any]:
    match = _CHOICE.fullmatch(text.strip())
    if match is None:
        raise DescriptionError(f"not a pattern choice: {text!r}")
    params = [item.split("=", 1) for item in match[2].split(", ") if item]
    return {"pattern": match[1], **{key: yaml.safe_load(value) for key, value in params}}


def _selector(text: str) -> list[int | str] | None:
    if text == "all":
        return None
    return [int(item) if item.isdigit() else item for item in text.split(",")]


def policy_from_description(description: str) -> dict[str, Any]:
    """The policy document (as a YAML file holds it) that ``describe()`` printed as ``description``."""
    doc: dict[str, Any] = {}
    overrides: list[dict[str, Any]] = []
    for line in description_body(description):
        text = line.strip()
        if text.startswith("min_length:"):
            doc["min_length"] = int(text.split(":", 1)[1])
        elif text.startswith("default:"):
            doc["default"] = _choice(text.split(":", 1)[1])
        elif (guard := _GUARD.fullmatch(text)) is not None:
            doc["guard"] = {"rows": int(guard[1]), "max_error": float(guard[2]), "remember": int(guard[3] or 0)}
        elif (override := _OVERRIDE.fullmatch(text)) is not None:
            entry: dict[str, Any] = {}
            for key, selector in (("layers", _selector(override[1])), ("heads", _selector(override[2]))):
                if selector is not None:
                    entry[key] = selector
            overrides.append({**entry, **_choice(override[3])})
        else:
            raise DescriptionError(f"cannot read the line {line!r}")
    if overrides:
        doc["overrides"] = overrides
    return doc


# Parameters patterns gained after records were committed, by pattern: a record without one ran as its default.
ADDED_SINCE_RECORDS = {"xattention": {"float8_scores"}}


def _same_line(got: str, given: str) -> bool:
    """Equal, or equal but for parameters of ADDED_SINCE_RECORDS at their defaults (a new parameter's default is
    what ran before it existed)."""
    if got == given:
        return True
    got_head, _, got_choice = got.rpartition(": ")
    given_head, _, given_choice = given.rpartition(": ")
    if got_head != given_head or _CHOICE.fullmatch(got_choice.strip()) is None:
        return False
    try:
        new, old = _choice(got_choice), _choice(given_choice)
        parameters = get_pattern(new["pattern"]).parameters
    except (DescriptionError, KeyError):
        return False
    added = set(new) - set(old)
    return (set(old) <= set(new) and all(new[key] == old[key] for key in old)
            and added <= ADDED_SINCE_RECORDS.get(new["pattern"], set())
            and all(new[key] == parameters[key].default for key in added))


def rebuild(description: str, out: Path) -> str:
    """Writes the policy of ``description`` to ``out`` and returns its resolved description; raises
    DescriptionError, writing nothing, unless it matches the given one line for line."""
    document = policy_from_description(description)
    try:
        got = load_policy(document).describe()
    except PolicyError as exc:
        raise DescriptionError(f"the rebuilt policy does not load: {exc}") from None
    got_lines, given_lines = description_body(got), description_body(description)
    if len(got_lines) != len(given_lines) or not all(map(_same_line, got_lines, given_lines)):
        raise DescriptionError(f"the rebuilt policy describes itself differently:\n{got}")
    out.write_text(policy_file_text(document, ["rebuilt from a record's description by policy_from_record.py"]))
    return got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("record", type=Path, help="an eval record (docs/benchmarks/*.json)")
    parser.add_argument("label", nargs="?", help="the policy's label in the record")
    parser.add_argument("--out", type=Path, help="where to write the YAML (default: LABEL.yaml)")
    parser.add_argument("--list", action="store_true", help="print the record's policy labels and stop")
    args = parser.parse_args()
    try:
        record = json.loads(args.record.read_text())
    except (OSError, ValueError) as exc:
        sys.exit(f"cannot read the record {args.record} as JSON: {exc}")
    policies = record_policies(record if isinstance(record, dict) else {})
    if args.list or args.label is None:
        print("\n".join(policies) or f"{args.record}: no policy descriptions (runs[*].policies)")
        return
    if args.label not in policies:
        sys.exit(f"{args.record}: no policy {args.label!r}; it has: {', '.join(policies) or 'none'}")
    out = args.out or Path(f"{args.label}.yaml")
    try:
        rebuild(policies[args.label], out)
    except DescriptionError as exc:
        sys.exit(f"{args.record}, {args.label}: {exc}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
