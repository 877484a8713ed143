"""Evaluation: attention recall, perplexity, needle retrieval and synthetic inputs."""

# Every comparison's first result: the model as it was, before any policy is applied. A policy
# may not use this label, so a row named "dense" is always the unpatched model.
BASELINE_LABEL = "dense"
