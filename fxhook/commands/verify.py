"""`fxhook verify MODEL`: prove, with property-based tests, that fxhook's model of a checkpoint equals the
Hugging Face model of the same checkpoint (fxhook.testing's properties, under a time budget)."""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

NAME = "verify"
HELP = "check, with random inputs, that fxhook's model equals the Hugging Face model of the same checkpoint"
DESCRIPTION = """Load MODEL twice, as fxhook's HookedTransformer and as the plain Hugging Face model, and run
fxhook.testing's properties on inputs hypothesis draws (token ids from the vocabulary and tokenised text,
batches with left padding, BOS on and off):

  matches_hf          logits (log-probabilities when processed) equal HF's
  hooks_consistent    resid_post -> final norm -> unembed gives the logits; attention patterns are causal
                      and sum to 1; head results add up to attn_out; zeroing a hook equals zeroing HF's module
  generation_matches  greedy generation with and without the KV cache equals HF generate; padded rows
                      generate what they generate alone
  compiled_matches    (with --compiled) torch.compile gives the eager values

Prints a table (property, examples tried, worst difference, verdict); on a failure, the smallest failing
input found and the first hook whose value diverges from HF's module. Exit status 0 only when every
property holds."""


def parse_budget(text: str) -> float:
    """ "60s", "2m", "1.5m", "90" -> seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"cannot read budget {text!r}: write e.g. 60s, 2m or 90 (seconds)")
    return float(match.group(1)) * {"s": 1, "sec": 1, None: 1, "m": 60, "min": 60, "h": 3600}[match.group(2)]


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budget", type=parse_budget, default=60.0, metavar="TIME",
                        help="time for all properties together, e.g. 60s or 2m (default 60s; loading not counted)")
    parser.add_argument("--examples", type=positive_int, default=20, metavar="N",
                        help="at most N examples a property (default 20)")
    parser.add_argument("--compiled", action="store_true",
                        help="also check torch.compile against eager (compiles each hook set: minutes on a CPU)")
    parser.add_argument("--seed", type=int, default=None,
                        help="draw other inputs (default: the same, derandomised inputs every run)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (for CI)")


def load_reference(model, args):
    """The plain HF model of the same checkpoint, dtype, device and blocks as `model`."""
    from fxhook.runtime.loading import load_hf, resolve_dtype, truncate_layers

    path = Path(args.model).expanduser()
    source = str(path) if path.exists() else args.model
    hf_model, _tokenizer, _name = load_hf(source, dtype=resolve_dtype(args.dtype), revision=None,
                                          trust_remote_code=False, load_tokenizer=False, hf_kwargs={})
    if args.layers is not None:
        hf_model = truncate_layers(hf_model, model.adapter.blocks, args.layers, in_place=True)
    return hf_model.to(device=model.cfg.device).eval()


def format_table(results) -> str:
    rows = [("property", "examples tried", "worst difference", "verdict")]
    for r in results:
        worst = "-" if r.worst is None else f"{r.worst:.3g}"
        rows.append((r.name, str(r.tried), worst, r.verdict))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(model, args) -> int:
    from fxhook.cli import CliError

    try:
        from fxhook.testing.properties import NAMES, run_properties
    except ImportError as err:
        raise CliError(f"{err} (fxhook verify runs hypothesis)")
    try:
        hf_model = load_reference(model, args)
    except Exception as err:  # noqa: BLE001 - loading fails in many libraries' ways
        if args.debug:
            raise
        raise CliError(f"cannot load the Hugging Face model of {args.model!r} as the reference: {err}")
    names = NAMES if args.compiled else tuple(n for n in NAMES if n != "compiled_matches")
    if not args.json:
        print(f"Verifying {model.cfg.model_name} ({model.cfg.n_layers} blocks, {model.cfg.dtype}) against Hugging "
              f"Face, budget {args.budget:g} s ...", flush=True)
    progress = None if args.json else (lambda r: print(f"  {r.name}: {r.verdict} ({r.tried} examples, "
                                                       f"{r.seconds:.0f} s)", flush=True))
    results = run_properties(model, hf_model, budget_s=args.budget, examples=args.examples, names=names,
                             seed=args.seed, progress=progress)
    passed = all(r.verdict == "holds" for r in results)
    if args.json:
        json.dump({"model": args.model, "passed": passed, "budget_s": args.budget,
                   "properties": [r.to_json() for r in results]}, sys.stdout, indent=2)
        print()
        return 0 if passed else 1
    print()
    print(format_table(results))
    for r in results:
        if r.verdict == "FAILS":
            print(f"\n{r.name} FAILS on {r.counterexample}\n  first diverging hook: {r.first_diverging_hook}\n"
                  f"  {r.message}")
        elif r.verdict == "not run":
            print(f"\n{r.name} was not run: the budget was spent before it (raise --budget)")
    print("\nEvery property holds." if passed else "\nSome properties do not hold (exit status 1).")
    return 0 if passed else 1
