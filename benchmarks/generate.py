"""Decode speed: fxhook generate (KV cache; eager and compiled decode) against HF generate and the floor.

    python benchmarks/generate.py                 # SmolLM2 (packaged, offline) and a GPT-2-small shape
    python benchmarks/generate.py --tokens 16 --repeats 3
    python benchmarks/generate.py --no-compiled   # skip compiled decode (its first call compiles: minutes)

Everything is measured in one run, interleaving the systems so machine drift cancels. The floor
is the time of one token's weight matrix-vector products alone (every linear layer and the
unembedding, one vector each): on a CPU decode cannot beat it, and the overhead above it is
what a runtime can win. Each system's decode step is timed apart from the prompt's forward (a call
for n tokens minus a call for one), and whole calls are reported as tokens/s.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fxhook import HookedTransformer


def matvec_floor(hf_model: torch.nn.Module, repeats: int) -> float:
    """Seconds for one vector through every 2-D weight that is used as a matrix (embeddings excluded)."""
    embeddings = {id(m.weight) for m in hf_model.modules() if isinstance(m, torch.nn.Embedding)}
    weights = [p.detach() for n, p in hf_model.named_parameters() if p.dim() == 2 and id(p) not in embeddings]
    if hf_model.get_output_embeddings() is not None:  # the unembedding, tied or not
        weights.append(hf_model.get_output_embeddings().weight.detach())
    vectors = [torch.randn(w.shape[1], dtype=w.dtype) for w in weights]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w, v in zip(weights, vectors):
            torch.mv(w, v)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_call(fn) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


def bench(name: str, model: HookedTransformer, tokens: torch.Tensor, n_new: int, repeats: int,
          compiled: bool = True) -> None:
    hf = model.hf_model
    hf.generation_config.pad_token_id = hf.generation_config.eos_token_id

    def run_hf(n: int):
        return lambda: hf.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False, max_new_tokens=n,
                                   min_new_tokens=n, use_cache=True)

    def fx(use_compiled_decode: bool):
        def run(n: int):
            return lambda: model.generate(tokens, max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False,
                                          use_compiled_decode=use_compiled_decode)
        return run

    systems = {"HF generate": run_hf, "fxhook generate (eager)": fx(False)}
    if compiled:
        systems["fxhook generate (compiled)"] = fx(True)
    for label, run in systems.items():  # warm-up: builds fxhook's decode graphs, compiles the decode step
        print(f"  warm-up {label}: {time_call(run(n_new)):.1f} s", flush=True)
    if compiled:  # the systems must agree before their speeds mean anything
        with torch.no_grad():
            outs = [model.generate(tokens, max_new_tokens=n_new, do_sample=False, stop_at_eos=False, verbose=False,
                                   use_compiled_decode=c) for c in (False, True)]
        print(f"  compiled decode tokens == eager tokens: {outs[0].tolist() == outs[1].tolist()}")
    # each system generates n_new tokens and 1 token: the difference over n_new - 1 is the decode
    # step alone (the prompt's forward, the first token, is reported apart)
    whole: dict[str, list[float]] = {label: [] for label in systems}
    first: dict[str, list[float]] = {label: [] for label in systems}
    floors = []
    for _ in range(repeats):  # interleaved with the floor, so machine drift hits every measure alike
        for label, run in systems.items():
            first[label].append(time_call(run(1)))
            whole[label].append(time_call(run(n_new)))
        floors.append(matvec_floor(hf, 3))
    floor_ms = 1000 * statistics.median(floors)
    print(f"\n{name}: batch 1, prompt {tokens.shape[1]} tokens, {n_new} new tokens, median of {repeats}, "
          f"{torch.get_num_threads()} threads")
    print(f"  {'system':<28}{'tokens/s':>10}{'first ms':>10}{'decode ms':>11}{'vs HF':>8}{'vs floor':>10}")
    decode_ms = {label: 1000 * (statistics.median(whole[label]) - statistics.median(first[label])) / (n_new - 1)
                 for label in systems}
    for label in systems:
        rate = n_new / statistics.median(whole[label])
        ms = decode_ms[label]
        print(f"  {label:<28}{rate:>10.1f}{1000 * statistics.median(first[label]):>10.1f}{ms:>11.2f}"
              f"{ms / decode_ms['HF generate']:>7.2f}x{ms / floor_ms:>9.2f}x")
    print(f"  {'matvec floor':<28}{'':>10}{'':>10}{floor_ms:>11.2f}")
    print("  tokens/s: the whole generate call; first ms: a call for one token (the prompt's forward);")
    print("  decode ms: one decode step, (whole - first) / (new tokens - 1); vs HF, vs floor: decode ms ratios")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per generate call (at least 2)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per system")
    parser.add_argument("--skip-gpt2", action="store_true", help="only SmolLM2")
    parser.add_argument("--no-compiled", action="store_true", help="skip compiled decode")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)

    smol = HookedTransformer.from_pretrained_no_processing("smollm2", device="cpu", dtype="float32")
    bench("SmolLM2-135M (fp32, CPU)", smol, smol.to_tokens("The capital of France is"), args.tokens,
          args.repeats, not args.no_compiled)
    if not args.skip_gpt2:
        hf = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2-small shape, random weights
        gpt2 = HookedTransformer.from_pretrained_no_processing(hf_model=hf)
        bench("GPT-2-small shape (random weights, fp32, CPU)", gpt2, torch.randint(0, 50257, (1, 8)),
              args.tokens, args.repeats, not args.no_compiled)


if __name__ == "__main__":
    main()
