"""What the neutral-op pass (fxhook/passes/neutral_ops.py) removes and saves, in one run.

    python benchmarks/neutral_ops.py            # SmolLM2 (processed) and a GPT-2-small shape (random, processed)
    python benchmarks/neutral_ops.py --quick    # tiny random Llama and GPT-2, a few repeats (a smoke test)

For each model it builds the hook-free forward graph and the eager decode-step graph twice, with and
without the pass, and prints their node counts and the median time of one call (forward on
batch x seq tokens; a decode step at batch 1 after a prompt of seq tokens), the two graphs interleaved
within each repeat so machine drift cancels. Eager graphs run op by op, so the time saved is the
dispatch of the removed ops (on a GPU, their kernel launches); compiled graphs fuse them anyway.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fxhook import HookedTransformer
from fxhook.core.graph import copy_graph_module
from fxhook.core.kv_ops import positions_from_mask
from fxhook.pipeline import DecodeKind, GraphSpec, decode_passes, forward_passes, run_passes

PASS_NAME = "remove_neutral_ops"


def _models(quick: bool) -> dict[str, Callable[[], HookedTransformer]]:
    if quick:
        return {
            "llama-tiny": lambda: HookedTransformer.from_pretrained(hf_model=LlamaForCausalLM(LlamaConfig(
                num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, vocab_size=256, max_position_embeddings=64))),
            "gpt2-tiny": lambda: HookedTransformer.from_pretrained(hf_model=GPT2LMHeadModel(GPT2Config(
                n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64))),
        }
    return {
        "smollm2": lambda: HookedTransformer.from_pretrained("smollm2", device="cpu", dtype="float32"),
        "gpt2-small-shape": lambda: HookedTransformer.from_pretrained(hf_model=GPT2LMHeadModel(GPT2Config())),
    }


def _without_pass(passes):
    return [p for p in passes if p.name != PASS_NAME]


def _graphs(model: HookedTransformer):
    """{(kind, with_pass): graph} for the hook-free forward and eager decode step."""
    spec = GraphSpec.from_cfg(model.cfg, live_hooks=frozenset())
    make_point = model.graphs.make_point
    forward = forward_passes(spec, model.cfg, model.adapter, make_point)
    kind = DecodeKind()
    decode = decode_passes(spec, kind, model.cfg, model.adapter, make_point)
    captured, step = model.graphs.captured(), model.graphs.decode_step(False, kind)
    return {("forward", True): run_passes(copy_graph_module(captured), forward),
            ("forward", False): run_passes(copy_graph_module(captured), _without_pass(forward)),
            ("decode", True): run_passes(copy_graph_module(step), decode),
            ("decode", False): run_passes(copy_graph_module(step), _without_pass(decode))}


def _nodes(gm: torch.fx.GraphModule) -> int:
    return sum(n.op == "call_function" for n in gm.graph.nodes)


def _inputs(model: HookedTransformer, batch: int, seq: int):
    """(forward args, decode-step args): random tokens, and one new token after a prompt of `seq`."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, model.cfg.d_vocab, (batch, seq), generator=g)
    mask = torch.ones_like(tokens)
    cache = model.init_kv_cache(batch_size=1)
    with torch.no_grad():
        model(tokens[:1], attention_mask=mask[:1], past_kv_cache=cache)
    new = torch.randint(0, model.cfg.d_vocab, (1, 1), generator=g)
    full_mask = torch.cat([cache.attention_mask, torch.ones_like(new)], dim=1)
    step = (new, positions_from_mask(full_mask, 1), full_mask, *cache.keys, *cache.values)
    return (tokens, mask), step


def _median_pair(a: Callable, b: Callable, repeats: int, inner: int = 5) -> tuple[float, float]:
    """Median seconds per call of a() and b(): each repeat times `inner` calls of one, then of the other
    (alternating which goes first), after warm-up calls. Blocks of calls, because a call timed alone right
    after a different graph's call measured up to 3x off here (allocator and cache state)."""
    times: tuple[list[float], list[float]] = ([], [])
    with torch.no_grad():
        for _ in range(2):
            a(), b()
        for i in range(repeats):
            pairs = ((a, times[0]), (b, times[1]))
            for fn, out in pairs if i % 2 == 0 else pairs[::-1]:
                start = time.perf_counter()
                for _ in range(inner):
                    fn()
                out.append((time.perf_counter() - start) / inner)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny random models, few repeats (smoke test)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (4 if args.quick else 20)
    seq = min(args.seq, 32) if args.quick else args.seq
    print(f"{'model':18} {'graph':8} {'ops before':>10} {'ops after':>9} {'removed':>7} "
          f"{'ms before':>9} {'ms after':>9} {'ratio':>6}")
    for name, load in _models(args.quick).items():
        model = load()
        graphs = _graphs(model)
        forward_args, step_args = _inputs(model, args.batch, seq)
        for kind, call_args in (("forward", forward_args), ("decode", step_args)):
            before, after = graphs[(kind, False)], graphs[(kind, True)]
            t_before, t_after = _median_pair(lambda: before(*call_args), lambda: after(*call_args), repeats)
            n_before, n_after = _nodes(before), _nodes(after)
            print(f"{name:18} {kind:8} {n_before:10d} {n_after:9d} {n_before - n_after:7d} "
                  f"{t_before * 1e3:9.3f} {t_after * 1e3:9.3f} {t_after / t_before:6.3f}")


if __name__ == "__main__":
    main()
