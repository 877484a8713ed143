"""`patterns` and `executors`: what is registered, built-in and from plugins, and what each takes."""

from __future__ import annotations

import argparse
import sys

from sparse_prefill.cli.common import UsageError
from sparse_prefill.registry import available_patterns, plugin_errors


def cmd_patterns(args: argparse.Namespace) -> int:
    """`patterns`: every registered pattern and its plugin, or one pattern's parameters."""
    if args.name is not None:
        return _print_pattern(args.name)
    infos = available_patterns()
    width = max((len(info.name) for info in infos), default=0)
    for info in infos:
        print(f"{info.name:{width}}  {info.description}  [plugin {info.plugin}, from {info.distribution}]")
    _print_plugin_errors()
    return 0


def _print_plugin_errors() -> None:
    """Plugins that failed to load: a listing without them must not look complete."""
    for error in plugin_errors():
        print(f"error: {error}", file=sys.stderr)


def _print_pattern(name: str) -> int:
    """One pattern's parameters as a policy sets them; a UsageError listing the patterns for an unknown name."""
    from sparse_prefill.registry import get_pattern

    try:
        spec = get_pattern(name)
    except KeyError:
        known = ", ".join(info.name for info in available_patterns()) or "none"
        raise UsageError(f"unknown pattern {name!r}; registered patterns: {known}") from None
    print(f"{spec.name}: {spec.description}")
    if not spec.parameters:
        print("  (no parameters)")
        return 0
    rows = [("parameter", "default", "allowed", "meaning")]
    rows += [(key, repr(param.default), param.allowed(), param.help) for key, param in spec.parameters.items()]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for key, default, allowed, meaning in rows:
        print(f"  {key:{widths[0]}}  {default:{widths[1]}}  {allowed:{widths[2]}}  {meaning}")
    return 0


def cmd_executors(args: argparse.Namespace) -> int:
    """`executors`: every registered executor, highest priority first, and what it takes."""
    from sparse_prefill.registry import get_registry

    for executor in get_registry().executors():
        kinds = ", ".join(kind.__name__ for kind in executor.plan_kinds)
        dtypes = ", ".join(sorted(str(d).removeprefix("torch.") for d in executor.dtypes))
        head_dims = "any" if executor.head_dims is None else ", ".join(map(str, sorted(executor.head_dims)))
        backward = "yes" if getattr(executor, "supports_backward", False) else "no"
        print(f"{executor.name} (priority {executor.priority}; {type(executor).__module__}.{type(executor).__name__})")
        print(f"  plans: {kinds}; devices: {', '.join(sorted(executor.devices))}; dtypes: {dtypes}; "
              f"head dims: {head_dims}; backward: {backward}")
    _print_plugin_errors()
    return 0
