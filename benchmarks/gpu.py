"""The GPU check (issue 17): correctness in bf16 and fp16, speed against HF, and the bandwidth limit, one table.

    python benchmarks/gpu.py                      # on a CUDA GPU (H200-class: under 8 minutes)
    python benchmarks/gpu.py --only decode,bandwidth --budget-s 400
    python benchmarks/gpu.py --dry-run            # the same code paths on the CPU at tiny sizes (under a minute)

Sections, each row with its value, the issue's goal where it sets one, and PASS / MISS (goals), ok / FAIL
(correctness), info, ERROR (the error text: a row never stops the run) or SKIPPED (past --budget-s):
- correctness, per dtype (bf16, fp16): SmolLM2 unprocessed (its logits are HF's), fxhook eager against HF
  eager and fxhook compiled against fxhook eager, within fxhook.testing's dtype tolerance; greedy tokens of
  fxhook's compiled decode equal to HF generate's for 32 tokens;
- speed: SmolLM2 processed (what from_pretrained gives, its norms' neutral ops removed), no hooks: its
  compiled logits against its eager ones; the compiled forward and the compiled run_with_cache of every
  hook against HF eager and HF compiled (`torch.compile(hf)`), median times;
- decode: batch 1, 8 and 32 (left-padded prompts), greedy: the compiled decode step of
  `generate(use_compiled_decode=True)` under `model.compile(mode="reduce-overhead")` (CUDA graphs over the
  static cache) against HF generate with `cache_implementation="static"` and its compiled decode step
  (HF's CompileConfig, reduce-overhead). A step is (time for n tokens - time for 1) / (n - 1);
- bandwidth: a Llama-3.2-1B-shape model with random weights (no download), batch 1: weight bytes read per
  token (every matrix once: linear layers and the unembedding) / step time, as a fraction of the device's
  memory bandwidth (a table of known GPUs by name; else a measured device-to-device copy).
Goals (issue 17, GPU): run_with_cache compiled at most 1.05x HF compiled forward; compiled decode at batch 1
at least as fast as HF's static-cache compiled generate; at least 50% of the bandwidth limit at batch 1.

--dry-run runs every section on the CPU with a tiny random Llama in place of SmolLM2 and of the 1B model
(loading SmolLM2 alone takes 12 to 45 s on a shared 2-core machine): fp32 and bf16, 3 greedy tokens, decode at
batch 1 and 2, torch.compile's "eager" backend (dynamo without inductor, so the compiled code paths run
without minutes of code generation). Its figures mean nothing; tests/test_gpu_benchmark.py checks that
every row comes out.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # fxhook from this checkout

from fxhook import HookedTransformer  # noqa: E402
from fxhook.testing.tolerance import tolerance  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,", "def fibonacci(n):",
           "The three primary colours are", "In 1969 the first humans", "Water boils at",
           "My favourite book is one that", "Photosynthesis turns sunlight into"]
RWC_GOAL = 1.05  # compiled run_with_cache / HF compiled forward, at most
DECODE_GOAL = 1.0  # compiled decode step at batch 1 / HF static-cache compiled step, at most
BANDWIDTH_GOAL = 0.5  # fraction of the bandwidth limit at batch 1, at least
# HBM bandwidth in bytes/s by a name fragment of torch.cuda.get_device_name(); the first match wins (so
# longer names that contain shorter ones come first: GH200 before H200, L40S before L4)
KNOWN_BANDWIDTH = (("GH200", 4.0e12), ("H200", 4.8e12), ("H100 NVL", 3.9e12), ("H100 PCIe", 2.0e12),
                   ("H100", 3.35e12), ("H800", 3.35e12), ("B200", 8.0e12), ("A100-SXM4-80GB", 2.039e12),
                   ("A100 80GB PCIe", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12), ("L4", 0.3e12),
                   ("A10G", 0.6e12), ("RTX 4090", 1.008e12), ("V100", 0.9e12))
LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)
SECTIONS = ("correctness", "speed", "decode", "bandwidth")


@dataclass(frozen=True)
class Plan:
    device: str
    dtypes: tuple[torch.dtype, ...]  # correctness
    speed_dtype: torch.dtype
    greedy_tokens: int
    forward_shape: tuple[int, int]  # batch, positions
    decode_batches: tuple[int, ...]
    decode_tokens: int  # n of a timed generate call (its steps: n - 1)
    repeats: int
    backend: str
    decode_mode: str | None  # torch.compile mode of the decode step, fxhook's and HF's
    speed_model: str  # "smollm2" or "tiny" (the correctness and speed sections' model)
    big_model: dict = field(default_factory=dict)  # LlamaConfig of the bandwidth model


FULL = Plan("cuda", (torch.bfloat16, torch.float16), torch.bfloat16, 32, (8, 512), (1, 8, 32), 64, 10, "inductor",
            "reduce-overhead", "smollm2", LLAMA_1B)
DRY = Plan("cpu", (torch.float32, torch.bfloat16), torch.float32, 3, (2, 16), (1, 2), 3, 1, "eager", None, "tiny",
           TINY)


@dataclass
class Row:
    section: str
    check: str
    value: str
    goal: str = ""
    result: str = "info"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_times(calls: dict[str, Callable[[], object]], repeats: int, device: str, warmup: int = 2
                 ) -> dict[str, float]:
    """Median seconds of each call, the calls interleaved within each repeat (drift cancels), after warm-up
    calls (compilation)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in calls.values():
                fn()
        for _ in range(repeats):
            for name, fn in calls.items():
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def goal_row(section: str, check: str, ratio: float, goal: float, at_most: bool, detail: str, unit: str = "x"
             ) -> Row:
    met = ratio <= goal if at_most else ratio >= goal
    return Row(section, check, f"{ratio:.3f}{unit} ({detail})", f"{'<=' if at_most else '>='} {goal}",
               "PASS" if met else "MISS")


# ------------------------------------------------------------------ models
def smollm2_hf(dtype: torch.dtype, device: str, cache: dict):
    """SmolLM2's HF model in `dtype` on `device` (a copy; the fp32 original is loaded once) and its tokenizer."""
    if "smollm2" not in cache:
        base = HookedTransformer.from_pretrained_no_processing("smollm2", device="cpu", dtype="float32")
        cache["smollm2"] = (base.hf_model, base.tokenizer)
    hf, tokenizer = cache["smollm2"]
    return copy.deepcopy(hf).to(device=device, dtype=dtype).eval(), tokenizer


def random_llama(config: dict, dtype: torch.dtype, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        hf = LlamaForCausalLM(LlamaConfig(**config, bos_token_id=0, eos_token_id=1, pad_token_id=0))
    return hf.to(dtype).eval()


def prompt_batch(tokenizer, batch: int, device: str, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts [batch, width] and their mask: SmolLM2's text prompts, or random tokens of
    different lengths (no tokenizer)."""
    if tokenizer is not None:
        rows = [torch.tensor(tokenizer(PROMPTS[i % len(PROMPTS)])["input_ids"]) for i in range(batch)]
    else:
        g = torch.Generator().manual_seed(batch)
        rows = [torch.randint(2, vocab, (int(n),), generator=g) for n in [8] + torch.randint(
            3, 9, (batch - 1,), generator=g).tolist()]
    width = max(len(r) for r in rows)
    tokens = torch.zeros((batch, width), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, width - len(row):], mask[i, width - len(row):] = row, 1
    return tokens.to(device), mask.to(device)


def hf_greedy(hf, tokens: torch.Tensor, mask: torch.Tensor, n: int, compile_config=None) -> torch.Tensor:
    """HF generate's greedy new tokens [batch, n]; with `compile_config`, its static cache and compiled step."""
    extra = {} if compile_config is None else dict(cache_implementation="static", compile_config=compile_config)
    out = hf.generate(tokens, attention_mask=mask, do_sample=False, max_new_tokens=n, min_new_tokens=n,
                      pad_token_id=0, **extra)
    return out[:, tokens.shape[1]:]


def fx_greedy(model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor, n: int) -> torch.Tensor:
    out = model.generate(tokens, attention_mask=mask, max_new_tokens=n, do_sample=False, stop_at_eos=False,
                         verbose=False, use_compiled_decode=True)
    return out[:, tokens.shape[1]:]


def hf_compile_config(plan: Plan):
    from transformers import CompileConfig

    config = CompileConfig(backend=plan.backend, mode=plan.decode_mode)
    if not plan.device.startswith("cuda"):
        config._compile_all_devices = True  # HF compiles generate's step on GPUs only unless told
    return config


def cudagraph_skips() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["inductor"].get(k, 0) for k in ("cudagraph_skips",))


# ------------------------------------------------------------------ sections
def correctness(plan: Plan, dtype: torch.dtype, cache: dict) -> list[Row]:
    name, section = dtype_name(dtype), "correctness"
    if plan.speed_model == "smollm2":
        hf, tokenizer = smollm2_hf(dtype, plan.device, cache)
    else:
        hf, tokenizer = random_llama(TINY, dtype, plan.device), None
    model = HookedTransformer.from_pretrained_no_processing(hf_model=hf, tokenizer=tokenizer)
    hf = model.hf_model  # the weights fxhook runs (from_pretrained works on a copy)
    tokens, mask = prompt_batch(tokenizer, 4, plan.device, model.cfg.d_vocab)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: HF counts positions from the first real token
    real = mask.bool()
    rows = []
    with torch.no_grad():
        reference = hf(tokens, attention_mask=mask, position_ids=positions).logits[real].float()
        eager = model(tokens, attention_mask=mask)[real].float()
        model.compile(backend=plan.backend)
        compiled = model(tokens, attention_mask=mask)[real].float()
    tol = tolerance(dtype, model.cfg.n_layers, reference)
    for check, a, b in (("fxhook eager logits vs HF", eager, reference),
                        ("fxhook compiled logits vs eager", compiled, eager)):
        diff = float((a - b).abs().max())
        rows.append(Row(section, f"{name}: {check}", f"max abs diff {diff:.3g}", f"<= {tol:.3g}",
                        "ok" if diff <= tol else "FAIL"))
    n = plan.greedy_tokens
    with torch.no_grad():
        expected = hf_greedy(hf, tokens[:1, real[0]], mask[:1, real[0]], n)
        model.compile(backend=plan.backend, mode=plan.decode_mode, dynamic=False)
        got = fx_greedy(model, tokens[:1, real[0]], mask[:1, real[0]], n)
    same = (expected == got)[0]
    first = int((~same).nonzero()[0]) if not bool(same.all()) else None
    rows.append(Row(section, f"{name}: greedy tokens == HF ({n})",
                    f"{int(same.sum())}/{n} equal" + ("" if first is None else f", first differs at {first}"),
                    "all", "ok" if first is None else "FAIL"))
    return rows


def speed_models(plan: Plan, cache: dict):
    """(HF model, processed fxhook model, tokenizer) for the speed and decode sections, made once."""
    if "speed" not in cache:
        if plan.speed_model == "smollm2":
            hf, tokenizer = smollm2_hf(plan.speed_dtype, plan.device, cache)
        else:
            hf, tokenizer = random_llama(TINY, plan.speed_dtype, plan.device), None
        model = HookedTransformer.from_pretrained(hf_model=hf, tokenizer=tokenizer)
        cache["speed"] = (hf, model, tokenizer)
    return cache["speed"]


def speed(plan: Plan, cache: dict) -> list[Row]:
    hf, model, _ = speed_models(plan, cache)
    batch, seq = plan.forward_shape
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, model.cfg.d_vocab, (batch, seq), generator=g).to(plan.device)
    model.compile(backend=plan.backend)
    hf_compiled = torch.compile(hf, backend=plan.backend)
    n_hooks = len(model.hook_dict)
    with torch.no_grad():
        with model.graphs.eager():
            eager = model(tokens).float()
        diff = float((model(tokens).float() - eager).abs().max())
    tol = tolerance(plan.speed_dtype, model.cfg.n_layers, eager)
    t = median_times({"hf": lambda: hf(tokens, use_cache=False),
                      "hf_compiled": lambda: hf_compiled(tokens, use_cache=False),
                      "forward": lambda: model(tokens),
                      "rwc": lambda: model.run_with_cache(tokens)}, plan.repeats, plan.device)
    ms = {k: f"{v * 1e3:.2f} ms" for k, v in t.items()}
    section = "speed"
    return [
        Row(section, "processed: compiled logits vs eager", f"max abs diff {diff:.3g}", f"<= {tol:.3g}",
            "ok" if diff <= tol else "FAIL"),
        Row(section, "forward: compiled / HF eager", f"{t['forward'] / t['hf']:.3f}x ({ms['forward']} vs {ms['hf']})"),
        Row(section, "forward: compiled / HF compiled",
            f"{t['forward'] / t['hf_compiled']:.3f}x ({ms['forward']} vs {ms['hf_compiled']})"),
        Row(section, "run_with_cache: compiled / HF eager",
            f"{t['rwc'] / t['hf']:.3f}x ({ms['rwc']}, {n_hooks} hooks, vs {ms['hf']})"),
        goal_row(section, "run_with_cache: compiled / HF compiled forward", t["rwc"] / t["hf_compiled"], RWC_GOAL,
                 True, f"{ms['rwc']} vs {ms['hf_compiled']}"),
    ]


def step_times(plan: Plan, hf, model: HookedTransformer, tokens: torch.Tensor, mask: torch.Tensor
               ) -> tuple[float, float, int]:
    """Seconds per compiled decode step: fxhook's and HF's (static cache), and how many times inductor
    declined CUDA graphs meanwhile."""
    n, config = plan.decode_tokens, hf_compile_config(plan)
    model.compile(backend=plan.backend, mode=plan.decode_mode, dynamic=False)
    skips = cudagraph_skips()
    calls = {("fx", n): lambda: fx_greedy(model, tokens, mask, n), ("fx", 1): lambda: fx_greedy(model, tokens, mask, 1),
             ("hf", n): lambda: hf_greedy(hf, tokens, mask, n, config),
             ("hf", 1): lambda: hf_greedy(hf, tokens, mask, 1, config)}
    t = median_times(calls, plan.repeats, plan.device)  # the n-token calls warm up first: HF keeps their cache size
    per_step = {who: (t[(who, n)] - t[(who, 1)]) / (n - 1) for who in ("fx", "hf")}
    return per_step["fx"], per_step["hf"], cudagraph_skips() - skips


def decode(plan: Plan, batch: int, cache: dict) -> list[Row]:
    hf, model, tokenizer = speed_models(plan, cache)
    tokens, mask = prompt_batch(tokenizer, batch, plan.device, model.cfg.d_vocab)
    fx_step, hf_step, skips = step_times(plan, hf, model, tokens, mask)
    detail = f"{fx_step * 1e3:.3f} vs {hf_step * 1e3:.3f} ms/step, {batch / fx_step:.0f} tokens/s" + (
        f", CUDA graphs declined {skips}x" if skips else "")
    check = f"decode batch {batch}: compiled step / HF static compiled"
    if batch == 1:
        return [goal_row("decode", check, fx_step / hf_step, DECODE_GOAL, True, detail)]
    return [Row("decode", check, f"{fx_step / hf_step:.3f}x ({detail})")]


def weight_bytes(hf) -> int:
    """Bytes of the weights one decode token reads: every matrix once (linear layers and the unembedding;
    the embedding table only by rows, so not counted unless it is the unembedding), norms and biases."""
    embeddings = {id(m.weight) for m in hf.modules() if isinstance(m, torch.nn.Embedding)}
    unembed = hf.get_output_embeddings().weight
    seen, total = set(), 0
    for p in hf.parameters():
        if id(p) in seen or (id(p) in embeddings and p is not unembed):
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    if id(unembed) not in seen:
        total += unembed.numel() * unembed.element_size()
    return total


def copy_bandwidth(device: str, n_bytes: int = 1 << 30) -> float:
    """Measured device memory bandwidth (bytes/s): a large copy reads and writes every byte once."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / min(times)


def device_bandwidth(device: str) -> tuple[float, str]:
    """(bytes/s, where the figure comes from): the table of known GPUs, else a measured copy."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        for fragment, bandwidth in KNOWN_BANDWIDTH:
            if fragment in name:
                return bandwidth, f"{name}, table"
        return copy_bandwidth(device), f"{name}, measured copy"
    return copy_bandwidth(device, 1 << 26), "CPU, measured copy"


def bandwidth(plan: Plan, cache: dict) -> list[Row]:
    if plan.big_model == TINY and plan.speed_model == "tiny":  # the dry run: the speed section's model will do
        hf, model, _ = speed_models(plan, cache)
    else:
        hf = random_llama(plan.big_model, plan.speed_dtype, plan.device)
        model = HookedTransformer.from_pretrained(hf_model=hf)
    n_bytes = weight_bytes(model.hf_model)
    tokens, mask = prompt_batch(None, 1, plan.device, model.cfg.d_vocab)
    fx_step, hf_step, skips = step_times(plan, hf, model, tokens, mask)
    limit, source = device_bandwidth(plan.device)
    params = sum(p.numel() for p in model.hf_model.parameters()) / 1e9
    detail = (f"{n_bytes / 1e9:.2f} GB/token over {fx_step * 1e3:.3f} ms = {n_bytes / fx_step / 1e12:.2f} TB/s "
              f"of {limit / 1e12:.2f} ({source}), {params:.2f}B params") + (
                  f", CUDA graphs declined {skips}x" if skips else "")
    return [goal_row("bandwidth", "1B batch 1: fraction of bandwidth limit", n_bytes / fx_step / limit,
                     BANDWIDTH_GOAL, False, detail, unit=""),
            Row("bandwidth", "1B batch 1: HF static compiled fraction",
                f"{n_bytes / hf_step / limit:.3f} ({hf_step * 1e3:.3f} ms/step)")]


# ------------------------------------------------------------------ the run
def planned_rows(plan: Plan, only: tuple[str, ...]) -> list[tuple[str, str, Callable[[dict], list[Row]]]]:
    """(section, the checks it prints, a function making its rows) in order."""
    jobs = []
    if "correctness" in only:
        for dtype in plan.dtypes:
            jobs.append(("correctness", f"correctness {dtype_name(dtype)}",
                         lambda c, d=dtype: correctness(plan, d, c)))
    if "speed" in only:
        jobs.append(("speed", "speed", lambda c: speed(plan, c)))
    if "decode" in only:
        for batch in plan.decode_batches:
            jobs.append(("decode", f"decode batch {batch}", lambda c, b=batch: decode(plan, b, c)))
    if "bandwidth" in only:
        jobs.append(("bandwidth", "bandwidth", lambda c: bandwidth(plan, c)))
    return jobs


def run(plan: Plan, only: tuple[str, ...], budget_s: float) -> list[Row]:
    rows: list[Row] = []
    cache: dict = {}
    start = time.perf_counter()
    for section, label, job in planned_rows(plan, only):
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            rows.append(Row(section, label, f"not run: {elapsed:.0f} s > --budget-s {budget_s:.0f}", "", "SKIPPED"))
            continue
        t0 = time.perf_counter()
        try:
            made = job(cache)
        except Exception as error:  # noqa: BLE001 - a row reports what failed; the rest still runs
            message = (str(error).splitlines() or [""])[0][:300]
            made = [Row(section, label, f"{type(error).__name__}: {message}", "", "ERROR")]
        for row in made:
            print_row(row)
        print(f"# {label}: {time.perf_counter() - t0:.1f} s", flush=True)
        rows.extend(made)
    return rows


def print_row(row: Row) -> None:
    print(f"| {row.section:11} | {row.check:52} | {row.value} | {row.goal} | {row.result} |", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (a smoke test of every path)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated sections of {SECTIONS}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no section after this many seconds (default 420; dry-run 300)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (dry-run)")
    args = parser.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown sections {unknown}; choose from {SECTIONS}")
    plan = DRY if args.dry_run else FULL
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or pass --dry-run for the CPU smoke test")
    torch.set_num_threads(args.threads)
    budget = args.budget_s if args.budget_s is not None else (300.0 if args.dry_run else 420.0)
    where = "CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    print(f"# fxhook GPU check on {where}, torch {torch.__version__}", flush=True)
    print(f"| {'section':11} | {'check':52} | value | goal | result |")
    start = time.perf_counter()
    rows = run(plan, only, budget)
    counts = {r: sum(row.result == r for row in rows) for r in ("PASS", "MISS", "ok", "FAIL", "ERROR", "SKIPPED")}
    print(f"# {len(rows)} rows in {time.perf_counter() - start:.0f} s: " +
          ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    return 1 if counts["FAIL"] or counts["ERROR"] else 0


if __name__ == "__main__":
    sys.exit(main())
