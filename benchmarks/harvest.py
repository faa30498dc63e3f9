"""Harvest throughput against the hooked forward alone, and peak memory for 1x and 10x the data.

    python benchmarks/harvest.py                   # GPT-2-small shape (random weights), GPT-2's tokenizer
    python benchmarks/harvest.py --quick           # a tiny model and little data: a smoke test
    python benchmarks/harvest.py --model smollm2 --hooks blocks.15.hook_resid_post

The forward alone runs `run_with_cache` on the same packed rows, batch by batch, keeping the same hooks
and stopping at the same layer as `harvest` does, with the tokens already made; `harvest` does that
plus tokenizing, copying into shards and writing them (on its writer thread). The ratio of their
tokens/s is the cost of the store (goal: at least 0.9). Peak memory is the process's peak RSS above
what was resident before the harvest (/proc/self/status VmHWM, reset before each run; the script
re-executes itself with glibc's mmap threshold at 64 KiB so that freed tensors leave the RSS): with
shards written as they fill, it should not grow with the amount of data.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

_MMAP = "MALLOC_MMAP_THRESHOLD_"
if os.environ.get(_MMAP) != "65536":
    os.environ[_MMAP] = "65536"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import torch  # noqa: E402

from fxhook import HookedTransformer  # noqa: E402
from fxhook.models_offline import gpt2_tokenizer  # noqa: E402
from fxhook.store import ActivationStore, harvest  # noqa: E402
from fxhook.store.data import iter_documents, packed_rows  # noqa: E402
from fxhook.store.harvesting import stop_layer  # noqa: E402

WORDS = ("the of and to in is was for on that with as by at from his her it an were are which this be or had "
         "river stone market light green old city north water field house people time year work") .split()


def _status_bytes(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def write_text(path: Path, n_docs: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 200))) + "\n")
    return path


def build_model(args) -> HookedTransformer:
    if args.model != "gpt2-small-random":
        return HookedTransformer.from_pretrained(args.model, device=args.device)
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    shape = dict(n_layer=2, n_embd=64, n_head=4) if args.quick else dict(n_layer=12, n_embd=768, n_head=12)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=1024, **shape)).eval()
    tokenizer = gpt2_tokenizer(tempfile.mkdtemp(prefix="fxhook-bpe-"))
    return HookedTransformer.from_pretrained("gpt2-small-random", hf_model=hf, tokenizer=tokenizer).to(args.device)


def forward_alone(model, rows: torch.Tensor, hooks: list[str], batch_size: int) -> float:
    """Seconds for the hooked forward over `rows`, batch by batch, as harvest runs it (results kept on the CPU)."""
    stop = stop_layer(hooks)
    start = time.perf_counter()
    with torch.no_grad():
        for first in range(0, len(rows), batch_size):
            _, cache = model.run_with_cache(rows[first:first + batch_size].to(model.cfg.device), names_filter=hooks,
                                            stop_at_layer=stop, return_type=None)
            for name in hooks:
                cache[name].to("cpu")
    if model.cfg.device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed_harvest(model, data: Path, hooks: list[str], out: Path, args) -> tuple[float, int]:
    """(seconds, peak bytes above the resident set before it) of one harvest into a new folder."""
    base = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start = time.perf_counter()
    harvest(model, data, hooks, out, seq_len=args.seq_len, batch_size=args.batch_size, shard_size=args.shard_size,
            progress=False)
    return time.perf_counter() - start, _status_bytes("VmHWM") - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a tiny model and little data (a smoke test)")
    parser.add_argument("--model", default="gpt2-small-random", help="a model name or folder (default: GPT-2-small "
                        "shape with random weights)")
    parser.add_argument("--hooks", default=None, help="comma-separated hooks (default: the middle block's resid_post)")
    parser.add_argument("--docs", type=int, default=None, help="documents in the 1x data (default 2000; quick 40)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 128 (quick 32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=64, help="rows per shard (default 64)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.docs = args.docs or (40 if args.quick else 2000)
    args.seq_len = args.seq_len or (32 if args.quick else 128)
    model = build_model(args)
    hooks = args.hooks.split(",") if args.hooks else [f"blocks.{model.cfg.n_layers // 2}.hook_resid_post"]
    work = Path(tempfile.mkdtemp(prefix="fxhook-harvest-bench-"))
    data = {scale: write_text(work / f"data_{scale}x.txt", args.docs * scale) for scale in (1, 10)}
    rows = torch.stack(list(packed_rows(iter_documents(data[1]), model.tokenizer, args.seq_len)))
    forward_alone(model, rows[:args.batch_size], hooks, args.batch_size)  # warm up: graphs built once
    forward_s = forward_alone(model, rows, hooks, args.batch_size)
    harvest_s, peak_1x = timed_harvest(model, data[1], hooks, work / "store_1x", args)
    tokens = rows.numel()
    assert ActivationStore(work / "store_1x").manifest["total_tokens"] == tokens
    _, peak_10x = timed_harvest(model, data[10], hooks, work / "store_10x", args)
    tokens_10x = ActivationStore(work / "store_10x").manifest["total_tokens"]
    shard_mib = args.shard_size * args.seq_len * model.cfg.d_model * len(hooks) * model.cfg.dtype.itemsize / 2**20
    print(f"model {model.cfg.model_name} ({model.cfg.n_layers} blocks, d_model {model.cfg.d_model}), hooks {hooks}, "
          f"seq_len {args.seq_len}, batch {args.batch_size}, {args.threads} thread(s), device {args.device}")
    print(f"forward alone: {tokens / forward_s:10.0f} tokens/s ({tokens} tokens)")
    print(f"harvest:       {tokens / harvest_s:10.0f} tokens/s   ratio {forward_s / harvest_s:.2f}x (goal >= 0.9x)")
    print(f"peak memory above resident: 1x data {peak_1x / 2**20:.1f} MiB ({tokens} tokens), 10x data "
          f"{peak_10x / 2**20:.1f} MiB ({tokens_10x} tokens); a shard is {shard_mib:.1f} MiB")


if __name__ == "__main__":
    main()
