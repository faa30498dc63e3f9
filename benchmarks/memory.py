"""Memory that stays bounded: graphs for hook sets come and go without growing the process.

    python benchmarks/memory.py               # all three checks
    python benchmarks/memory.py --sets 500    # fewer hook sets (quicker)

1. RSS growth after warm-up over N distinct hook sets on a 4-layer model (goal: under 20 MB).
2. RSS growth per repeated `get_act_patch_resid_pre` sweep on a 24-layer model (goal: under 5 MB).
3. A compiled model cycling among as many hook sets as its graph cache holds: graphs built and
   torch.compile recompiles on the second cycle (goal: 0 and 0).

RSS is read from /proc/self/status after a garbage collection and malloc_trim (so freed memory that
the allocator still holds is not counted as growth). Runs with one torch thread.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fxhook import HookedTransformer
from fxhook.analysis import patching

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def rss_mb() -> float:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def tiny_llama(n_layers: int) -> HookedTransformer:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=n_layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return HookedTransformer.from_pretrained_no_processing(hf_model=LlamaForCausalLM(config).eval())


def distinct_hook_sets(model: HookedTransformer, count: int, seed: int) -> list[tuple[str, ...]]:
    names = sorted(model.hook_dict)
    pairs = list(itertools.combinations(names, 2))
    random.Random(seed).shuffle(pairs)
    if len(pairs) < count:
        raise ValueError(f"only {len(pairs)} distinct pairs of hook points")
    return pairs[:count]


def identity(x, hook):
    return x


def hook_set_growth(n_sets: int) -> tuple[float, float]:
    model = tiny_llama(4)
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6]])
    sets = distinct_hook_sets(model, n_sets + 200, seed=0)
    with torch.no_grad():
        for names in sets[:200]:  # warm-up: the graph cache fills, allocator pools settle
            model.run_with_hooks(tokens, fwd_hooks=[(n, identity) for n in names])
        before, start = rss_mb(), time.perf_counter()
        for names in sets[200:]:
            model.run_with_hooks(tokens, fwd_hooks=[(n, identity) for n in names])
    return rss_mb() - before, time.perf_counter() - start


def patching_growth(sweeps: int) -> list[float]:
    model = tiny_llama(24)
    clean = torch.tensor([[1, 5, 9, 13, 17, 21]])
    corrupted = torch.tensor([[1, 5, 9, 14, 17, 21]])
    with torch.no_grad():
        _, cache = model.run_with_cache(clean)

    def metric(logits):
        return logits[0, -1, 3] - logits[0, -1, 4]
    for _ in range(2):  # warm-up: the graph cache and the allocator's pools fill during the first sweeps
        patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
    growth, last = [], rss_mb()
    for _ in range(sweeps):
        patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=False)
        now = rss_mb()
        growth.append(now - last)
        last = now
    return growth


def compiled_cycle() -> tuple[int, int, int]:
    from torch._dynamo.utils import counters

    model = tiny_llama(2).compile()
    size = model.graph_cache_size
    tokens = torch.tensor([[1, 2, 3, 4]])
    sets = distinct_hook_sets(model, size, seed=1)
    with torch.no_grad():
        for names in sets:  # first cycle: each set builds and compiles its graph
            model.run_with_hooks(tokens, fwd_hooks=[(n, identity) for n in names])
        built, compiles = model.graphs.built, counters["stats"]["unique_graphs"]
        for names in sets:  # second cycle: everything is still cached
            model.run_with_hooks(tokens, fwd_hooks=[(n, identity) for n in names])
    return size, model.graphs.built - built, counters["stats"]["unique_graphs"] - compiles


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sets", type=int, default=2000, help="distinct hook sets on the 4-layer model")
    parser.add_argument("--sweeps", type=int, default=10, help="patching sweeps on the 24-layer model")
    parser.add_argument("--skip-compiled", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    growth, seconds = hook_set_growth(args.sets)
    print(f"{args.sets} distinct hook sets, 4 layers: RSS +{growth:.1f} MB after warm-up ({seconds:.0f} s) "
          f"[goal < 20 MB: {'ok' if growth < 20 else 'MISSED'}]")
    per_sweep = patching_growth(args.sweeps)
    worst = max(per_sweep)
    print(f"{args.sweeps} get_act_patch_resid_pre sweeps, 24 layers: RSS per sweep "
          f"{', '.join(f'{g:+.1f}' for g in per_sweep)} MB; worst {worst:+.1f} "
          f"[goal < 5 MB a sweep: {'ok' if worst < 5 else 'MISSED'}]")
    if not args.skip_compiled:
        size, built, compiles = compiled_cycle()
        print(f"compiled model cycling {size} hook sets (its graph cache size) a second time: {built} graphs "
              f"built, {compiles} recompiles [goal 0 and 0: {'ok' if built == compiles == 0 else 'MISSED'}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
