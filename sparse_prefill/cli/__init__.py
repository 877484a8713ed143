"""`sparse-prefill`: the side-by-side demo, perplexity, whole-model evaluation, theta calibration, policy checks,
patterns and executors. Each command has its own --help; each lives in a module of this package (common.py holds
what they share, parser.py their options, checks.py the checks made before anything loads)."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Iterator

from sparse_prefill.cli.checks import check_args
from sparse_prefill.cli.common import UsageError
from sparse_prefill.cli.parser import build_parser
from sparse_prefill.policy import PolicyError

__all__ = ["main", "build_parser", "UsageError"]


@contextlib.contextmanager
def _notices(verbose: int) -> Iterator[None]:
    """The library's notices on stderr while a command runs, from sparse_prefill's logger: warnings always,
    what the policy chose with -v, decode steps too with -vv. Undone on exit: main() leaves no handler behind
    (a caller, or a test, runs it many times)."""
    logger = logging.getLogger("sparse_prefill")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("sparse-prefill: %(levelname)s: %(message)s"))
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel((logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)])
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run one command; a bad argument exits 2 with one ``sparse-prefill <cmd>: error: ...`` line, before the
    model's weights load."""
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        if getattr(args, "min_length", None) == -1:
            args.min_length = None
        with _notices(getattr(args, "verbose", 0)):
            return args.func(args)
    except (UsageError, PolicyError) as exc:
        args.command_parser.error(str(exc))  # exits 2
