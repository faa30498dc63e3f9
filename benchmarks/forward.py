"""Forward and run_with_cache speed and memory: fxhook (eager, compiled) against HF and TransformerLens.

    python benchmarks/forward.py                        # GPT-2-small shape (random) and SmolLM2
    python benchmarks/forward.py --models gpt2 --repeats 5 --batch 4 --seq 128
    python benchmarks/forward.py --models small6 gpt2 --no-tl --threads 1   # issue 17's run_with_cache goals

One run measures every system on the same model and tokens, interleaving the systems within each
repeat so machine drift cancels, and prints the median time and its ratio to HF eager, the compile
time (first call minus a steady call) and the peak memory of one call above what was resident
before it. Peak memory is the process's peak RSS (/proc/self/status VmHWM, reset before each
call), exact for tensors because the script runs with glibc's mmap threshold fixed at 64 KiB
(every tensor is its own mapping, returned to the OS when freed); it re-executes itself to set it.
"""
from __future__ import annotations

import argparse
import copy
import os
import re
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

_MMAP = "MALLOC_MMAP_THRESHOLD_"
if os.environ.get(_MMAP) != "65536":
    os.environ[_MMAP] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from fxhook import HookedTransformer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tl_reference import tl_model  # noqa: E402  (TransformerLens 3.9 built offline from the HF weights)


def _status_bytes(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def peak_bytes(fn: Callable[[], object]) -> tuple[int, object]:
    """Peak resident memory of one call above what was resident before it, and the call's result."""
    base = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    out = fn()
    return _status_bytes("VmHWM") - base, out


def tensor_bytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(tensor_bytes(v) for v in x.values())
    if isinstance(x, (tuple, list)):
        return sum(tensor_bytes(v) for v in x)
    if hasattr(x, "cache_dict"):
        return tensor_bytes(x.cache_dict)
    return 0


@dataclass
class System:
    label: str
    fn: Callable[[], object]
    compiled: bool = False
    times: list[float] = field(default_factory=list)
    first_call: float = 0.0
    peak: int = 0
    kept: int = 0  # bytes of cached activations the call returns

    def call(self) -> float:
        start = time.perf_counter()
        self.fn()
        return time.perf_counter() - start


def gpt2_small() -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)
    return GPT2LMHeadModel(config).eval(), "GPT-2-small shape (random weights)"


def small6() -> tuple[torch.nn.Module, str]:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=6, n_embd=384, n_head=6, vocab_size=50257, n_positions=1024)
    return GPT2LMHeadModel(config).eval(), "6 layers, d_model 384 (GPT-2 family, random weights)"


def smollm2() -> tuple[torch.nn.Module, str]:
    model = HookedTransformer.from_pretrained_no_processing("smollm2", dtype="float32", device="cpu")
    return model.hf_model, "SmolLM2-135M (packaged GGUF, dequantised)"


MODELS = {"gpt2": gpt2_small, "small6": small6, "smollm2": smollm2}


def systems_for(hf: torch.nn.Module, tokens: torch.Tensor, with_tl: bool) -> list[System]:
    hf.set_attn_implementation("sdpa")
    hf_eager = copy.deepcopy(hf)
    hf_eager.set_attn_implementation("eager")
    hf_compiled = torch.compile(copy.deepcopy(hf), dynamic=True)
    fx_eager = HookedTransformer.from_pretrained_no_processing(hf_model=hf)
    fx_compiled = HookedTransformer.from_pretrained_no_processing(hf_model=hf).compile()
    resid_post = [f"blocks.{i}.hook_resid_post" for i in range(fx_eager.cfg.n_layers)]
    systems = [
        System("HF eager", lambda: hf_eager(tokens).logits),
        System("HF SDPA", lambda: hf(tokens).logits),
        System("HF compiled", lambda: hf_compiled(tokens).logits, compiled=True),
        System("fxhook eager, no hooks", lambda: fx_eager(tokens)),
        System("fxhook compiled, no hooks", lambda: fx_compiled(tokens), compiled=True),
        System("fxhook run_with_cache() eager", lambda: fx_eager.run_with_cache(tokens)),
        System("fxhook run_with_cache() compiled", lambda: fx_compiled.run_with_cache(tokens), compiled=True),
        System("fxhook run_with_cache(resid_post) compiled",
               lambda: fx_compiled.run_with_cache(tokens, names_filter=resid_post), compiled=True),
    ]
    if with_tl:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tl = tl_model(hf)
        systems += [System("TransformerLens forward", lambda: tl(tokens)),
                    System("TransformerLens run_with_cache()", lambda: tl.run_with_cache(tokens))]
    return systems


def measure(systems: list[System], repeats: int) -> None:
    with torch.no_grad():
        for s in systems:  # first call (compiles), then one steady call to warm caches
            s.first_call = s.call()
            s.call()
        for _ in range(repeats):
            for s in systems:
                s.times.append(s.call())
        for s in systems:
            s.peak, out = peak_bytes(s.fn)
            s.kept = tensor_bytes(out[1]) if isinstance(out, tuple) and len(out) == 2 else 0
            del out


def report(title: str, systems: list[System], shape: tuple[int, int]) -> None:
    by = {s.label: s for s in systems}
    base = statistics.median(by["HF eager"].times)
    mb = 1 / 2 ** 20
    print(f"\n## {title}: batch {shape[0]} x {shape[1]} tokens, fp32, {torch.get_num_threads()} CPU threads\n")
    print(f"| {'system':44} | median ms | vs HF eager | compile s | peak MB | cache MB |")
    print(f"|{'-' * 46}|----------:|-----------:|----------:|--------:|---------:|")
    for s in systems:
        med = statistics.median(s.times)
        comp = f"{s.first_call - med:9.1f}" if s.compiled else f"{'':9}"
        kept = f"{s.kept * mb:8.1f}" if s.kept else f"{'':8}"
        print(f"| {s.label:44} | {med * 1e3:9.1f} | {med / base:9.2f}x | {comp} | {s.peak * mb:7.1f} | {kept} |")

    def ratio(a: str, b: str) -> float:
        return statistics.median(by[a].times) / statistics.median(by[b].times)

    cache_all = by["fxhook run_with_cache() compiled"]
    goals = [
        ("compiled fxhook, no hooks / HF compiled", ratio("fxhook compiled, no hooks", "HF compiled"), 1.0),
        ("compiled run_with_cache(resid_post) / HF compiled",
         ratio("fxhook run_with_cache(resid_post) compiled", "HF compiled"), 1.1),
        ("compiled run_with_cache() / HF eager", ratio("fxhook run_with_cache() compiled", "HF eager"), 1.05),
        ("compiled run_with_cache() peak / (HF eager peak + cache)",
         cache_all.peak / (by["HF eager"].peak + cache_all.kept), 1.0),
    ]
    print("\nGoals (ratio, goal):")
    for name, value, goal in goals:
        print(f"  {name:58} {value:6.2f}  (<= {goal:.2f})  {'met' if value <= goal else 'MISSED'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["gpt2", "smollm2"], choices=list(MODELS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-tl", action="store_true", help="leave TransformerLens out")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    for name in args.models:
        hf, title = MODELS[name]()
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, hf.config.vocab_size, (args.batch, args.seq), generator=g)
        systems = systems_for(hf, tokens, with_tl=not args.no_tl)
        measure(systems, args.repeats)
        report(title, systems, (args.batch, args.seq))
        del systems, hf


if __name__ == "__main__":
    main()
