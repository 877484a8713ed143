"""MInference's published per-head configurations through `convert-minference`, and a prefill under each.

    curl -LO https://files.pythonhosted.org/packages/.../minference-0.1.6.0.tar.gz   # sha256 2325...a0e
    tar xzf minference-0.1.6.0.tar.gz minference-0.1.6.0/minference/configs
    python benchmarks/minference_configs.py minference-0.1.6.0/minference/configs/*.json --out OUT.json

Each file is converted (the policy checked as any policy file is), then applied to a random Llama model
with the file's layers and heads (hidden size 16 per head, so a 70B layout fits a CPU) for one prefill of
``--length`` tokens with ``min_length`` 0, compared with the same model dense (``--max-heads`` bounds the layouts run). Recorded per file: the
model layout, how many heads get which pattern, the vertical/slash sizes, the policy's default and
overrides, what ran (sparse calls, mean density, dense fallbacks and why) and the logits' largest difference
from dense.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import time
from pathlib import Path

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import sparse_prefill
from sparse_prefill.minference import convert_minference
from sparse_prefill.policy import load_policy


def random_model(layers: int, heads: int) -> LlamaForCausalLM:
    """A random Llama with ``layers`` x ``heads`` attention heads (MHA) and 16 dims per head."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=16 * heads, intermediate_size=32 * heads, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, head_dim=16,
                         max_position_embeddings=1 << 20)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).eval()


def check(path: Path, length: int, max_heads: int) -> dict:
    data = json.loads(path.read_text())
    policy_dict = convert_minference(data, str(path))
    policy = load_policy(policy_dict)
    layers, heads = len(data), len(data[0])
    choices = collections.Counter(policy.choice_for(layer, head).pattern for layer in range(layers)
                                  for head in range(heads))
    sizes = collections.Counter((entry[1], entry[2]) for layer in data for entry in layer.values()
                                if entry[0] == "vertical_and_slash")
    row = {"file": path.name, "layers": layers, "heads": heads, "heads_per_pattern": dict(choices),
           "vertical_slash_sizes": {f"{v}/{s}": n for (v, s), n in sizes.most_common()},
           "default": policy_dict["default"], "overrides": len(policy_dict.get("overrides", []))}
    if layers * heads > max_heads:
        return {**row, "ran": False}
    model = random_model(layers, heads)
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        dense = model(ids).logits[0, -64:].float()
        start = time.perf_counter()
        handle = sparse_prefill.apply(model, {**policy_dict, "min_length": 0}, collect_stats=True)
        sparse = model(ids).logits[0, -64:].float()
        row["prefill_s"] = round(time.perf_counter() - start, 2)
        row["what_ran"] = handle.summary()
        row["mean_density"] = handle.stats.mean_density()
        sparse_prefill.remove(model)
    row["ran"], row["finite"] = True, bool(torch.isfinite(sparse).all())
    row["max_logit_difference"] = float((sparse - dense).abs().max())
    return row


def _positive(text: str) -> int:
    """An integer >= 1, checked before any model is built."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", type=Path, help="MInference JSON files")
    parser.add_argument("--length", type=_positive, default=4096, help="prompt tokens of the prefill under each policy")
    parser.add_argument("--max-heads", type=_positive, default=1280,
                        help="run the prefill only for layouts of at most this many heads (layers x heads; a CPU "
                             "takes about 3 minutes for 40 x 32 at 8192 tokens); larger ones are converted only")
    parser.add_argument("--out", required=True)
    parser.add_argument("--source", default="minference 0.1.6.0 sdist from PyPI, minference/configs")
    parser.add_argument("--commit", default="")
    args = parser.parse_args()
    rows = []
    for path in args.configs:
        rows.append(check(path, args.length, args.max_heads))
        print(json.dumps({key: value for key, value in rows[-1].items() if key != "what_ran"}), flush=True)
    record = {"source": args.source, "length": args.length, "commit": args.commit, "torch": torch.__version__,
              "transformers": transformers.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "configs": rows}
    Path(args.out).write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
