"""Patching sweeps that reuse the unchanged prefix, against full recomputation and TransformerLens.

    python benchmarks/patching.py                 # SmolLM2 and a 12-layer GPT-2-small shape (random weights)
    python benchmarks/patching.py --quick         # a 2-layer toy model, seconds: checks the script runs

For each model, on one clean/corrupted pair of prompts: a get_act_patch_resid_pre sweep over every layer
and position (fxhook reusing the prefix, fxhook recomputing the whole forward batched the same way, and
TransformerLens 3.9's), the attn_head_out_all_pos and attn_head_out_by_pos head sweeps (reuse against full
recomputation), and attribution patching of every head and position against the actual by-position head
sweep. Prints seconds (best of --repeats: the first repeat also builds each patched hook's graph, the
same number of graphs either way), the ratios the issue asks for, and whether each goal is met.
Single-threaded (the machine is shared); the lead runs the full version for the figures.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fxhook import HookedTransformer
from fxhook.analysis import patching

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tl_reference import tl_model  # noqa: E402  (TransformerLens 3.9 built offline from the HF weights)


def gpt2_shape(n_layers: int, d_model: int, n_heads: int, vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=n_layers, n_embd=d_model, n_head=n_heads, vocab_size=vocab, n_positions=1024)
    return GPT2LMHeadModel(config).eval()


def seconds(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """The fastest of `repeats` calls (a sweep is long: the minimum is the least disturbed) and its result."""
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def bench(title: str, hf: torch.nn.Module, length: int, repeats: int, with_tl: bool) -> list[tuple[str, float, float]]:
    model = HookedTransformer.from_pretrained_no_processing(hf_model=hf)
    # steady state for both ways: every per-hook graph of a sweep stays built between repeats (the first
    # repeat pays for building them, as many graphs either way)
    model.graph_cache_size = 2 * model.cfg.n_layers + 4
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, model.cfg.d_vocab, (1, length), generator=g)
    corrupted = clean.clone()
    corrupted[0, : length // 2] = torch.randint(0, model.cfg.d_vocab, (length // 2,), generator=g)
    answer, wrong = int(clean[0, -1]), int(corrupted[0, -1])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, answer] - logits[0, -1, wrong]

    with torch.no_grad():
        _, cache = model.run_with_cache(clean)
    times: dict[str, float] = {}
    sweeps = {"resid_pre": patching.get_act_patch_resid_pre,
              "head_all_pos": patching.get_act_patch_attn_head_out_all_pos,
              "head_by_pos": patching.get_act_patch_attn_head_out_by_pos}
    for key, sweep in sweeps.items():
        for reuse in (True, False):
            times[f"{key} {'reuse' if reuse else 'full'}"], _ = seconds(
                lambda: sweep(model, corrupted, cache, metric, progress=False, reuse_prefix=reuse), repeats)
    times["attribution every head and pos"], _ = seconds(
        lambda: patching.attribution_patch(model, clean, corrupted, metric, hooks="z", per="pos"), repeats)
    if with_tl:
        import transformer_lens.patching as tl_patching

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tl = tl_model(hf)
        with torch.no_grad():
            _, tl_cache = tl.run_with_cache(clean)
        times["resid_pre TransformerLens"], _ = seconds(  # one repeat: TransformerLens builds nothing first
            lambda: tl_patching.get_act_patch_resid_pre(tl, corrupted, tl_cache, metric), 1)
    n = model.cfg.n_layers
    print(f"\n{title}: {n} layers, 1 x {length} tokens (seconds, best of {repeats})")
    for name, value in times.items():
        print(f"  {name:40} {value:8.3f}")
    goals = [(f"resid_pre: full / reuse (layers alone: at most {2 * n / (n + 1):.2f})",
              times["resid_pre full"] / times["resid_pre reuse"], 1.6),
             ("head_all_pos: full / reuse", times["head_all_pos full"] / times["head_all_pos reuse"], 1.4),
             ("head_by_pos: full / reuse", times["head_by_pos full"] / times["head_by_pos reuse"], 1.4),
             ("head_by_pos sweep / attribution", times["head_by_pos reuse"] / times["attribution every head and pos"],
              20.0)]
    if with_tl:
        goals.append(("resid_pre: TransformerLens / reuse", times["resid_pre TransformerLens"]
                      / times["resid_pre reuse"], 1.8))
    for name, value, goal in goals:
        print(f"  {name:58} {value:6.2f}x  (>= {goal:.1f})  {'met' if value >= goal else 'MISSED'}")
    return goals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "gpt2"], choices=["smollm2", "gpt2"])
    parser.add_argument("--length", type=int, default=12, help="prompt length in tokens")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-tl", action="store_true", help="leave TransformerLens out")
    parser.add_argument("--quick", action="store_true", help="a 2-layer toy model, one repeat: checks the script")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    if args.quick:
        bench("toy GPT-2 shape (quick: ratios mean little on a toy)", gpt2_shape(2, 64, 4, 500), 6, 2, not args.no_tl)
        return
    for name in args.models:
        if name == "gpt2":
            bench("GPT-2-small shape (random weights)", gpt2_shape(12, 768, 12, 50257), args.length, args.repeats,
                  not args.no_tl)
        else:
            hf = HookedTransformer.from_pretrained_no_processing("smollm2", dtype="float32", device="cpu").hf_model
            bench("SmolLM2-135M (packaged GGUF, dequantised)", hf, args.length, args.repeats, not args.no_tl)


if __name__ == "__main__":
    main()
