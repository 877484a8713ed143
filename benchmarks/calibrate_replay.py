"""Time of a KL calibration's unit measurements with the dense layers before each unit replayed, against whole forwards.

    python benchmarks/calibrate_replay.py --model smollm2 --tokens 4096 --options 6 --out OUT.json
    python benchmarks/calibrate_replay.py --model MODEL.gguf --tokenizer TOKENIZER --policy base.yaml \
        --tokens 32752 --text-offset 65536 --options 6 10 --device cuda --out OUT.json

Measures every layer with each anchor theta of ``--options`` (every other layer dense) twice per round: with
:mod:`sparse_prefill.evaluation.dense_prefix` and with it switched off, in the same process on the same text,
and checks that the two give the same KL and density for every unit. On a GPU a warm-up measures two layers first
(kernels compile and tune on their first call).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from sparse_prefill.evaluation.dense_prefix import DensePrefix
from sparse_prefill.evaluation.layer_budget import measure_layer_options
from sparse_prefill.evaluation.models import essay_token_ids, load_tokenizer_and_config, load_weights, locate_model
from sparse_prefill.evaluation.whole_model import next_token_logprobs
from sparse_prefill.policy import load_policy

DEFAULT_BASE = {"min_length": 0, "default": {"pattern": "anchor", "theta": 9, "dense_above": 1.0}}


def _measure(model: Any, ids: torch.Tensor, base: Any, options: dict[str, Any], layers: list[int], score_last: int,
             reference: torch.Tensor, replay: bool) -> tuple[float, list[Any]]:
    """(seconds, the units measured) with the dense prefix replayed or not."""
    capture = DensePrefix.capture
    if not replay:
        DensePrefix.capture = classmethod(lambda cls, *args: None)  # type: ignore[method-assign,assignment]
    try:
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        measured, _ = measure_layer_options(model, ids, base, options, layers, score_last, reference)
        if next(model.parameters()).is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, measured
    finally:
        DensePrefix.capture = capture  # type: ignore[method-assign]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tokenizer", help="a folder with the tokenizer, where the model file's own is broken")
    parser.add_argument("--policy", type=Path, help="the base policy (default: anchor theta 9, dense_above 1.0)")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--text-offset", type=int, default=65536)
    parser.add_argument("--score-last", type=int, default=1024)
    parser.add_argument("--options", type=float, nargs="+", default=[6.0], help="anchor thetas, one unit each per layer")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    files = locate_model(args.model, args.tokenizer)
    tokenizer, config = load_tokenizer_and_config(files)
    on_gpu = args.device.startswith("cuda")
    model = load_weights(files, config, torch.bfloat16 if on_gpu else torch.float32, args.device, "sdpa")
    ids = essay_token_ids(tokenizer, args.tokens, args.text_offset)
    raw = yaml.safe_load(args.policy.read_text()) if args.policy else DEFAULT_BASE
    base = load_policy(raw)
    options = {f"theta={theta}": load_policy({**raw, "default": {**raw["default"], "theta": theta}}).default
               for theta in args.options}
    layers = list(range(config.get_text_config().num_hidden_layers))
    reference = next_token_logprobs(model, ids, args.score_last)
    if on_gpu:
        measure_layer_options(model, ids, base, options, [0, len(layers) // 2], args.score_last, reference)
    seconds: dict[str, list[float]] = {"replayed": [], "whole": []}
    units: dict[str, list[Any]] = {}
    for _ in range(args.rounds):
        for name in seconds:
            elapsed, units[name] = _measure(model, ids, base, options, layers, args.score_last, reference,
                                            replay=name == "replayed")
            seconds[name].append(round(elapsed, 2))
    report = {"model": Path(args.model).name, "tokens": args.tokens, "text_offset": args.text_offset,
              "layers": len(layers), "units": len(layers) * len(options), "options": list(options),
              "device": torch.cuda.get_device_name() if on_gpu else f"{platform.machine()}, {os.cpu_count()} CPUs",
              "torch": torch.__version__, "seconds": seconds,
              "units_equal": units["replayed"] == units["whole"]}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
