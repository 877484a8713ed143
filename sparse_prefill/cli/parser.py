"""The argument parser: every command, its options and their help (the reference page is generated from it)."""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Any

from sparse_prefill.cli.calibrate import CALIBRATION_TEXT_OFFSET, KL_OPTIONS, MIN_HEAD_RECALL, cmd_calibrate
from sparse_prefill.cli.catalog import cmd_executors, cmd_patterns
from sparse_prefill.cli.common import DEFAULT_POLICIES, DTYPES
from sparse_prefill.cli.compare import cmd_perplexity, cmd_run
from sparse_prefill.cli.evaluate import EVAL_POLICIES, cmd_eval
from sparse_prefill.cli.policy_files import cmd_convert_minference, cmd_validate
from sparse_prefill.policy import shipped_policies

DESCRIPTION = """`sparse-prefill`: the side-by-side demo, perplexity, whole-model evaluation, theta calibration, policy
checks, patterns and executors. Each command has its own --help."""


def _version() -> str:
    """The installed distribution's version, with the torch, triton and transformers it runs on."""
    import importlib.metadata

    import sparse_prefill

    found = []
    for name in ("torch", "triton", "transformers"):
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} missing")
    return f"{sparse_prefill.__version__} ({', '.join(found)})"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in every help line, except where there is none to show (None, False): those
    options say in words what happens when they are left out."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)

    def _split_lines(self, text: str, width: int) -> list[str]:  # never "--kl-" at one line's end, "budget" below
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def _command(commands: Any, name: str, summary: str, description: str | None = None) -> argparse.ArgumentParser:
    """A sub-command with its one-line help in the command list, a description and its defaults in --help."""
    return commands.add_parser(name, help=summary, description=description or summary[0].upper() + summary[1:] + ".",
                               formatter_class=_HelpFormatter)


def _add_output_options(parser: argparse.ArgumentParser, progress: bool = True) -> None:
    """--verbose (the library's notices), and --progress where one prefill can keep a CPU busy for minutes."""
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="show why calls stayed dense as they happen (-v: also what the policy chose, "
                             "such as min_length; -vv: also decode steps); warnings are always shown")
    if progress:
        parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                            help="a bar per prefill over the decoder layers (default: when stderr is a terminal)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparse-prefill", description=DESCRIPTION, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _command(commands, "run", "dense vs sparse prefill on a needle-in-a-haystack prompt, side by side",
                   "Dense, then each policy: one long prompt with a number hidden in an essay, the answer each "
                   "generates, whether it found the number, time to first token and attention density; then what "
                   "ran under each policy (sparse calls, dense calls and why).")
    run.add_argument("--model", default="smollm2",
                     help="local Hugging Face model folder, a .gguf file, or 'smollm2' (the packaged model)")
    run.add_argument("--policy", action="append", default=None,
                     help=f"policy YAML path, or the name of a shipped policy ({', '.join(shipped_policies())}); "
                          f"repeat to compare several (default: {' and '.join(DEFAULT_POLICIES)})")
    run.add_argument("--length", type=int, default=4096, help="prompt length in tokens")
    run.add_argument("--depth", type=float, default=0.5, help="needle position, 0 = start, 1 = end")
    run.add_argument("--min-length", type=int, default=0,
                     help="override the policy's min_length; the default 0 forces the sparse path even at demo "
                          "lengths where the policy would stay dense (pass -1 to keep the policy's value)")
    run.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    run.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU")
    run.add_argument("--max-new-tokens", type=int, default=24, help="tokens generated after the prompt")
    _add_output_options(run)
    run.set_defaults(func=cmd_run, command_parser=run)

    ppl = _command(commands, "perplexity", "perplexity on long real text, dense vs each policy",
                   "Perplexity of one forward pass over real essay text, dense and under each policy, scored on "
                   "the last positions (where long context matters most); then what ran under each policy.")
    ppl.add_argument("--model", default="smollm2", help="as for `run`")
    ppl.add_argument("--policy", action="append", default=None,
                     help=f"as for `run` (repeatable; default: {' and '.join(DEFAULT_POLICIES)})")
    ppl.add_argument("--length", type=int, default=4096, help="tokens of text in the one forward pass")
    ppl.add_argument("--score-last", type=int, default=None,
                     help="score only the last N predictions (default: min(1024, length - 1); 0: all of them)")
    ppl.add_argument("--min-length", type=int, default=0, help="as for `run` (-1 keeps the policy's)")
    ppl.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ppl.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bfloat16 on GPU, float32 on CPU")
    _add_output_options(ppl)
    ppl.set_defaults(func=cmd_perplexity, command_parser=ppl)

    calibrate = _command(
        commands, "calibrate", "per-layer settings for a model, by attention recall or by a KL budget; writes a policy",
        "Without --kl-budget: the smallest anchor theta per layer that keeps --target-recall of the softmax mass on "
        "the model's own attention. With --kl-budget: each layer runs each --options setting alone (the rest dense) "
        "and the least mean density whose KL(dense || policy) of the next-token distributions stays within the "
        "budget is chosen, layers that cost too much staying dense; the choice is then checked on the whole model. "
        "Reads essay text from --text-offset, past what `eval` and `perplexity` score.")
    calibrate.add_argument("--model", default="smollm2", help="as for `run`")
    calibrate.add_argument("--policy", default="anchor.yaml",
                           help="the anchor policy to start from (its other parameters are kept)")
    calibrate.add_argument("--tokens", type=int, default=8192, help="essay tokens to run through the model")
    calibrate.add_argument("--layers", type=int, nargs="*", default=None, help="layers to calibrate (default: all)")
    calibrate.add_argument("--target-recall", type=float, default=0.95,
                           help="softmax mass each layer must keep (without --kl-budget)")
    calibrate.add_argument("--per-kv-group", action="store_true",
                           help="without --kl-budget: a theta (and with --locals a local window) per (layer, KV "
                                "group), the least mean density whose mean recall over every query head reaches "
                                "--target-recall (a layer's groups may differ: groups differing in theta alone share "
                                "one call, a dense group beside sparse ones or another local window runs apart); "
                                "with --kl-budget: each KV group runs each --options setting alone and a layer's "
                                "groups are all dense or all sparse in one call, their per-head settings (theta) "
                                "free")
    calibrate.add_argument("--one-call-per-layer", action="store_true",
                           help="with --per-kv-group: each layer runs as one attention call, its KV groups all "
                                "dense or all sparse with one local window (thetas may differ: one call takes a "
                                "theta per head); a dense group beside sparse ones, or groups of different "
                                "--locals, would run as a call each, which can cost more time than their density "
                                "saves")
    calibrate.add_argument("--min-head-recall", type=float, nargs="+", default=None,
                           help=f"with --per-kv-group: every query head keeps at least this much (default "
                                f"{MIN_HEAD_RECALL}: the worst heads carry the answers' loss, "
                                f"docs/benchmarks/recall.md; 0 for the mean alone); several floors share one "
                                f"measurement and write OUT-floorF.yaml each")
    calibrate.add_argument("--thetas", type=float, nargs="+", default=None,
                           help="with --per-kv-group: the thetas a group may take (default: "
                                "4 5 6 7 7.7 8.5 9.5 11 13 16)")
    calibrate.add_argument("--locals", type=int, nargs="+", default=None,
                           help="with --per-kv-group: local windows (keys) a group may take with each theta "
                                "(default: the policy's own); e.g. 128 512 1024")
    calibrate.add_argument("--kl-budget", type=float, nargs="+", default=None,
                           help="choose per layer by what the answers lose: mean KL(dense || policy) per scored "
                                "position allowed, nats (e.g. 0.02); several budgets share one measurement and "
                                "write OUT-klBUDGET.yaml each")
    calibrate.add_argument("--record", type=Path, default=None,
                           help="with --kl-budget: also write every measured (layer, option) and check as JSON; "
                                "with --per-kv-group: every measured (layer, KV group, setting), for --from-record")
    calibrate.add_argument("--from-record", type=Path, default=None,
                           help="with --per-kv-group: allocate from a --record of an earlier measurement instead of "
                                "running the model (other targets, floors, --one-call-per-layer in seconds)")
    calibrate.add_argument("--options", action="append", default=None, metavar="[PATTERN.]PARAM=V1,V2,...",
                           help=f"with --kl-budget: the settings a layer may take, as eval's --sweep (repeatable: "
                                f"their product); PATTERN.PARAM adds another pattern's settings, so each layer "
                                f"also chooses its pattern (by KL and --cost); default for anchor: "
                                f"--options {' --options '.join(KL_OPTIONS)}")
    calibrate.add_argument("--cost", choices=("auto", "time", "density"), default="auto",
                           help="with --kl-budget: what the choice minimises within the budget: each layer's "
                                "attention time, measured on this device against its dense attention (a costlier "
                                "identification or a plan denser than it saves then loses), or the attention "
                                "density; auto: time on a GPU, density elsewhere (and with --per-kv-group)")
    calibrate.add_argument("--score-last", type=int, default=None,
                           help="with --kl-budget: positions scored, the last ones (default: min(1024, tokens - 1))")
    calibrate.add_argument("--text-offset", type=int, nargs="+", default=[CALIBRATION_TEXT_OFFSET],
                           help="essay tokens skipped: eval and perplexity read from token 0, so calibration "
                                "reads text they do not score; with --kl-budget, several offsets calibrate on "
                                "several texts, each option costing its worst KL over them")
    calibrate.add_argument("--tokenizer", default=None,
                           help="a folder holding a saved tokenizer, used instead of the model's own")
    calibrate.add_argument("--out", type=Path, required=True, help="where to write the calibrated policy YAML")
    calibrate.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    calibrate.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                           help="default: bfloat16 on GPU, float32 on CPU")
    calibrate.set_defaults(func=cmd_calibrate, command_parser=calibrate)

    evaluation = _command(
        commands, "eval",
        "whole-model quality (perplexity, KL vs dense, needle) and prefill time, dense vs each policy",
        "Dense, then each policy, at each length: perplexity and KL(dense || policy) of the next-token "
        "distributions on real text, attention density per layer, which calls fell back and why, time "
        "to first token, and needle in a haystack. Writes results.json and plots to --out.")
    evaluation.add_argument("--model", default="smollm2", help="as for `run`")
    evaluation.add_argument("--tokenizer", default=None,
                            help="a folder holding a saved tokenizer, used instead of the model's own")
    evaluation.add_argument("--policy", action="append", default=None,
                            help=f"as for `run` (repeatable; default: {', '.join(EVAL_POLICIES)})")
    evaluation.add_argument("--sweep", action="append", default=None, metavar="[PATTERN.]PARAM=V1,V2,...",
                            help="run each policy whose default pattern has PARAM once per value (repeatable); "
                                 "guard.max_error=none,0.3 runs every policy without and with a guard")
    evaluation.add_argument("--lengths", type=int, nargs="+", default=[4096], help="prompt lengths in tokens")
    evaluation.add_argument("--score-last", type=int, default=1024,
                            help="positions scored for perplexity and KL (the last ones of each text)")
    evaluation.add_argument("--needle-depths", type=float, nargs="*", default=[0.1, 0.5, 0.9],
                            help="needle positions (0 = start, 1 = end); none: no needle test")
    evaluation.add_argument("--needle-new-tokens", type=int, default=12, help="tokens generated for each needle")
    evaluation.add_argument("--repeats", type=int, default=3, help="timed prefills per run (0: no timing)")
    evaluation.add_argument("--recall", action="store_true",
                            help="also measure each layer's attention recall (softmax mass its plans keep; mean and "
                                 "worst query head) on the dense model's q and k: one more forward per length, an "
                                 "exact softmax per layer")
    evaluation.add_argument("--layer-kl", action="store_true",
                            help="also measure each layer's share of a policy's KL: the policy on that layer alone, "
                                 "every other layer dense (one more forward per layer); finds the layers that lose")
    evaluation.add_argument("--ruler", nargs="+", default=[], metavar="TASK",
                            help="RULER tasks to score at each length, e.g. niah_multikey_1 vt cwe (see docs/ruler.md; "
                                 "needs the ruler extra)")
    evaluation.add_argument("--ruler-samples", type=int, default=5, help="samples of each RULER task per length")
    evaluation.add_argument("--min-length", type=int, default=-1,
                            help="override the policies' min_length (-1 keeps each policy's)")
    evaluation.add_argument("--out", type=Path, required=True, help="folder for results.json and the plots")
    evaluation.add_argument("--no-plots", action="store_true", help="write no plots (no matplotlib needed)")
    evaluation.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    evaluation.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                            help="default: bfloat16 on GPU, float32 on CPU")
    _add_output_options(evaluation, progress=False)  # eval has its own bar over (length, policy)
    evaluation.set_defaults(func=cmd_eval, command_parser=evaluation)

    validate = _command(commands, "validate", "check policy files; print them resolved",
                        "Loads each policy file as apply() would and prints it with every default filled in; "
                        "exits 1 if any is invalid, each error naming the file and the key.")
    validate.add_argument("policies", nargs="+", metavar="POLICY",
                          help="policy YAML paths or names of shipped policies")
    validate.set_defaults(func=cmd_validate, command_parser=validate)

    convert = _command(commands, "convert-minference", "turn an MInference per-head config (JSON) into a policy",
                       "Reads MInference's per-layer, per-head pattern file (vertical_and_slash, stream_llm, "
                       "block_sparse entries with their sizes) and writes the same choices as a policy: "
                       "vertical-slash, streaming and block-topk. Unknown entries are refused with the layer, the "
                       "head and what is allowed.")
    convert.add_argument("config", help="MInference's JSON: one {head: [type, vertical_size, slash_size, score]} "
                                        "per layer")
    convert.add_argument("-o", "--output", help="policy YAML to write (default: print it)")
    convert.set_defaults(func=cmd_convert_minference, command_parser=convert)

    patterns = _command(commands, "patterns", "list registered patterns, or one pattern's parameters",
                        "Without NAME: every registered pattern and the plugin it comes from. With NAME: that "
                        "pattern's parameters as a policy sets them (type, default, what is allowed, meaning).")
    patterns.add_argument("name", nargs="?", default=None, metavar="NAME",
                          help="a pattern whose parameters to list (default: list the patterns)")
    patterns.set_defaults(func=cmd_patterns, command_parser=patterns)

    executors = _command(commands, "executors", "list registered executors and what each supports",
                         "Every registered executor, highest priority first (the dispatcher takes the first that "
                         "supports a call): the plan kinds, devices, dtypes and head dims it takes, and whether "
                         "it has a backward.")
    executors.set_defaults(func=cmd_executors, command_parser=executors)
    return parser
