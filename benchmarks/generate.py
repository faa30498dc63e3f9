"""Generation speed: fxhook generate (eager and compiled decode) against HF generate, batch 1, 8 and 32.

    python benchmarks/generate.py                     # SmolLM2 (packaged, offline), batches 1 8 32, and GPT-2-small
    python benchmarks/generate.py --batch 8 --tokens 16 --repeats 3
    python benchmarks/generate.py --no-compiled       # skip compiled decode (its first calls compile: minutes)
    python benchmarks/generate.py --batch 1 --tokens 2 --repeats 7 --skip-gpt2 --threads 1   # first-token goal
    python benchmarks/generate.py --quick             # a tiny random model, batches 1 and 8: a smoke test

Everything is measured in one run, interleaving the systems so machine drift cancels. Batches are
left-padded prompts of different lengths. For each system: the first-token latency (a call for one
new token: the prompt's forward and its setup), tokens/s of a whole call (batch x new tokens over
its time) and one decode step (a call for n tokens minus a call for one, over n - 1). At batch 1 the
floor is printed too: one token's weight matrix-vector products alone (every linear layer and the
unembedding, one vector each); on a CPU decode cannot beat it. Compiled calls are timed after a
warm-up call that compiles them (the first call per batch size and shape compiles).

The goals (issue 17), each printed with its ratio and PASS/MISS: on SmolLM2, compiled first-token
latency at batch 1 at most 0.9x HF generate's; compiled tokens/s at batch 8 at least 1.2x HF's.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fxhook import HookedTransformer

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,", "def fibonacci(n):",
           "The three primary colours are", "In 1969 the first humans", "Water boils at",
           "My favourite book is one that", "Photosynthesis turns sunlight into"]
HF = "HF generate"
EAGER = "fxhook generate (eager)"
COMPILED = "fxhook generate (compiled)"
FIRST_TOKEN_GOAL = 0.9  # compiled first-token latency / HF's, at most (batch 1)
BATCH8_GOAL = 1.2  # compiled tokens/s / HF's, at least (batch 8)


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


def time_call(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return time.perf_counter() - start


def left_padded(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths -> tokens [batch, width] left-padded with pad_id, and their mask."""
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):] = row
        mask[i, width - len(row):] = 1
    return tokens, mask


def text_batch(model: HookedTransformer, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [model.to_tokens(PROMPTS[i % len(PROMPTS)])[0] for i in range(batch)]
    return left_padded(rows, model.tokenizer.eos_token_id)


def random_batch(model: HookedTransformer, batch: int, longest: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    lengths = [longest] + torch.randint(2, longest + 1, (batch - 1,), generator=g).tolist()
    return left_padded([torch.randint(2, model.cfg.d_vocab, (n,), generator=g) for n in lengths], 0)


def systems_for(model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor, compiled: bool
                ) -> dict[str, Callable[[int], Callable[[], object]]]:
    """Each system as n -> a call generating n tokens greedily (no early stop) after the batch."""
    hf = model.hf_model

    def run_hf(n: int):
        return lambda: hf.generate(tokens, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                                   use_cache=True, pad_token_id=0)

    def fx(use_compiled_decode: bool):
        def run(n: int):
            return lambda: model.generate(tokens, attention_mask=mask, max_new_tokens=n, do_sample=False,
                                          stop_at_eos=False, verbose=False, use_compiled_decode=use_compiled_decode)
        return run

    systems = {HF: run_hf, EAGER: fx(False)}
    if compiled:
        systems[COMPILED] = fx(True)
    return systems


def bench(name: str, model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor, n_new: int, repeats: int,
          compiled: bool) -> dict[str, dict[str, float]]:
    """Time every system on one batch; print a table; return {system: {"first_ms", "tokens_s", "decode_ms"}}."""
    hf = model.hf_model
    hf.generation_config.pad_token_id = hf.generation_config.eos_token_id
    systems = systems_for(model, tokens, mask, compiled)
    for label, run in systems.items():  # warm-up: builds the graphs, compiles the prompt's and the token's step
        print(f"  warm-up {label}: {time_call(run(n_new)) + time_call(run(1)):.1f} s", flush=True)
    with torch.no_grad():  # the systems must agree before their speeds mean anything
        outs = {label: run(n_new)() for label, run in systems.items()}
    agree = {label: out.tolist() == outs[HF].tolist() for label, out in outs.items() if label != HF}
    print("  tokens equal HF generate's: " + ", ".join(f"{label}: {same}" for label, same in agree.items()))
    # each system generates n_new tokens and 1 token: the difference over n_new - 1 is the decode
    # step alone; the call for one token is the first-token latency
    whole: dict[str, list[float]] = {label: [] for label in systems}
    first: dict[str, list[float]] = {label: [] for label in systems}
    floors = []
    for _ in range(repeats):  # interleaved with the floor, so machine drift hits every measure alike
        for label, run in systems.items():
            first[label].append(time_call(run(1)))
            whole[label].append(time_call(run(n_new)))
        floors.append(matvec_floor(hf, 3))
    batch = tokens.shape[0]
    results = {label: {"first_ms": 1000 * statistics.median(first[label]),
                       "tokens_s": batch * n_new / statistics.median(whole[label]),
                       "decode_ms": 1000 * (statistics.median(whole[label]) - statistics.median(first[label]))
                       / (n_new - 1)} for label in systems}
    floor_ms = 1000 * statistics.median(floors)
    print(f"\n{name}: batch {batch} (prompts {mask.sum(1).min().item()}-{tokens.shape[1]} tokens, left-padded), "
          f"{n_new} new tokens, median of {repeats}, {torch.get_num_threads()} threads")
    print(f"  {'system':<28}{'tokens/s':>10}{'vs HF':>7}{'first ms':>10}{'vs HF':>7}{'decode ms':>11}"
          f"{'vs floor':>10}")
    base = results[HF]
    for label, r in results.items():
        print(f"  {label:<28}{r['tokens_s']:>10.1f}{r['tokens_s'] / base['tokens_s']:>6.2f}x{r['first_ms']:>10.1f}"
              f"{r['first_ms'] / base['first_ms']:>6.2f}x{r['decode_ms']:>11.2f}{r['decode_ms'] / floor_ms:>9.2f}x")
    if batch == 1:
        print(f"  {'matvec floor':<28}{'':>34}{floor_ms:>11.2f}")
    print("  tokens/s: batch x new tokens over a whole call; first ms: a call for one new token (the prompt's "
          "forward);\n  decode ms: one step, (whole - first) / (new tokens - 1); vs floor: decode ms over one "
          "vector's matvecs")
    return results


def goal_lines(results: dict[int, dict[str, dict[str, float]]]) -> list[str]:
    """The issue's goals with their ratios, from {batch: bench(...) results}."""
    lines = []
    if 1 in results and COMPILED in results[1]:
        ratio = results[1][COMPILED]["first_ms"] / results[1][HF]["first_ms"]
        lines.append(f"first-token latency, compiled / HF generate, batch 1: {ratio:.2f}x (goal <= {FIRST_TOKEN_GOAL}x) "
                     f"{'PASS' if ratio <= FIRST_TOKEN_GOAL else 'MISS'}")
    if 8 in results and COMPILED in results[8]:
        ratio = results[8][COMPILED]["tokens_s"] / results[8][HF]["tokens_s"]
        lines.append(f"tokens/s, compiled / HF generate, batch 8: {ratio:.2f}x (goal >= {BATCH8_GOAL}x) "
                     f"{'PASS' if ratio >= BATCH8_GOAL else 'MISS'}")
    return lines


def tiny_llama() -> HookedTransformer:
    """A small random Llama-shape model for --quick (no tokenizer: random token batches)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return HookedTransformer.from_pretrained_no_processing(hf_model=LlamaForCausalLM(config).eval())


def run_model(name: str, model: HookedTransformer, batches: list[int], batch_fn, n_new: int, repeats: int,
              compiled: bool) -> None:
    results = {}
    for batch in batches:
        tokens, mask = batch_fn(model, batch)
        results[batch] = bench(name, model, tokens, mask, n_new, repeats, compiled)
    lines = goal_lines(results)
    if lines:
        print(f"\n{name}: goals (ratios in this run)")
        for line in lines:
            print(f"  {line}")
    print(flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=None, choices=(1, 8, 32),
                        help="batch sizes (default 1 8 32; quick 1 8)")
    parser.add_argument("--tokens", type=int, default=None, help="new tokens per generate call (default 32; quick 4)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per system (default 3; quick 1)")
    parser.add_argument("--quick", action="store_true", help="a tiny random model, few tokens (a smoke test)")
    parser.add_argument("--skip-gpt2", action="store_true", help="only SmolLM2")
    parser.add_argument("--no-compiled", action="store_true", help="skip compiled decode")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    batches = args.batch or ([1, 8] if args.quick else [1, 8, 32])
    n_new = args.tokens or (4 if args.quick else 32)
    repeats = args.repeats or (1 if args.quick else 3)
    if n_new < 2:
        parser.error("--tokens must be at least 2 (a decode step is timed as n tokens minus one)")
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    compiled = not args.no_compiled
    if args.quick:
        run_model("tiny random Llama (fp32, CPU)", tiny_llama(), batches, random_batch, n_new, repeats, compiled)
        return
    smol = HookedTransformer.from_pretrained_no_processing("smollm2", device="cpu", dtype="float32")
    run_model("SmolLM2-135M (fp32, CPU)", smol, batches, text_batch, n_new, repeats, compiled)
    if not args.skip_gpt2:
        hf = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2-small shape, random weights
        gpt2 = HookedTransformer.from_pretrained_no_processing(hf_model=hf)
        run_model("GPT-2-small shape (random weights, fp32, CPU)", gpt2, batches, random_batch, n_new, repeats,
                  compiled)


if __name__ == "__main__":
    main()
