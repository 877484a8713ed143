"""The built-in plugin: registered through the `sparse_prefill.plugins` entry point like any other."""

from __future__ import annotations

from sparse_prefill.hookspecs import hookimpl
from sparse_prefill.interfaces import Executor, PatternSpec


@hookimpl
def sparse_prefill_patterns() -> list[PatternSpec]:
    from sparse_prefill.patterns.anchor import ANCHOR
    from sparse_prefill.patterns.block_topk import BLOCK_TOPK
    from sparse_prefill.patterns.dense import DENSE
    from sparse_prefill.patterns.flashprefill import FLASHPREFILL
    from sparse_prefill.patterns.flexprefill import FLEXPREFILL
    from sparse_prefill.patterns.oracle import ORACLE
    from sparse_prefill.patterns.streaming import STREAMING
    from sparse_prefill.patterns.vertical_slash import VERTICAL_SLASH
    from sparse_prefill.patterns.xattention import XATTENTION

    return [DENSE, STREAMING, ANCHOR, VERTICAL_SLASH, FLEXPREFILL, XATTENTION, FLASHPREFILL, BLOCK_TOPK, ORACLE]


@hookimpl
def sparse_prefill_executors() -> list[Executor]:
    from sparse_prefill.kernels import executors

    return [
        executors.TritonStripeExecutor(),
        executors.TritonBlockExecutor(),
        executors.DenseSDPAExecutor(),
        executors.ReferenceExecutor(),
    ]
