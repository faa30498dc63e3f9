"""Concurrent calls on one model: each call sees only its own hooks and gets its own activations."""
from __future__ import annotations

import asyncio
import random
import threading

import pytest
import torch

from fxhook import HookedTransformer
from models import ModelSpec, build_hf_model
from profiles import examples

SPEC = ModelSpec("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=16, bias=True, tied=False, seed=8)
HOOK_SITES = ("blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.0.mlp.hook_post")
CACHE_FILTERS = (("blocks.0.hook_resid_pre",), ("blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"))
N_THREADS = 4


def scale_by(factor: float):
    def hook(x, hook):
        return x * factor
    return hook


def make_call(rng: random.Random):
    """(kind, site or filter index, factor, tokens) of one randomised call."""
    kind = rng.choice(("hooks", "cache", "generate"))
    tokens = torch.tensor([[rng.randrange(1, 90) for _ in range(rng.choice((3, 5)))]])
    return kind, rng.randrange(len(HOOK_SITES)), rng.choice((0.0, 0.5, 2.0)), tokens


def run_call(model: HookedTransformer, call) -> list[torch.Tensor]:
    kind, index, factor, tokens = call
    with torch.no_grad():
        if kind == "hooks":
            return [model.run_with_hooks(tokens, fwd_hooks=[(HOOK_SITES[index], scale_by(factor))])]
        if kind == "cache":
            names = CACHE_FILTERS[index % len(CACHE_FILTERS)]
            logits, cache = model.run_with_cache(tokens, names_filter=list(names))
            assert sorted(cache.keys()) == sorted(names), sorted(cache.keys())
            return [logits, *(cache[n] for n in names)]
        with model.hooks(fwd_hooks=[(HOOK_SITES[index], scale_by(factor))]):
            return [model.generate(tokens, max_new_tokens=3, do_sample=False, stop_at_eos=False, verbose=False)]


def stress(model: HookedTransformer, calls_per_thread: int, seed: int) -> int:
    """Run N_THREADS threads of randomised calls; the number of results that differ from the same call alone."""
    rng = random.Random(seed)
    plans = [[make_call(rng) for _ in range(calls_per_thread)] for _ in range(N_THREADS)]
    alone = {}
    for plan in plans:
        for i, call in enumerate(plan):
            alone[id(call)] = run_call(model, call)
    mismatches = [0] * N_THREADS
    errors: list[BaseException] = []
    start = threading.Barrier(N_THREADS)

    def worker(t: int) -> None:
        try:
            start.wait()
            for call in plans[t]:
                got = run_call(model, call)
                if any(g.shape != e.shape or not torch.allclose(g.float(), e.float(), atol=1e-6, rtol=0)
                       for g, e in zip(got, alone[id(call)])):
                    mismatches[t] += 1
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
    threads = [threading.Thread(target=worker, args=(t,)) for t in range(N_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    assert not any(p.fwd_hooks or p.bwd_hooks for p in model.graphs.points.values())  # nothing leaked
    return sum(mismatches)


@pytest.fixture(scope="module")
def model() -> HookedTransformer:
    return HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(SPEC))


def test_concurrent_calls_see_only_their_own_hooks_eager(model):
    assert stress(model, examples(50), seed=1) == 0


def test_concurrent_calls_see_only_their_own_hooks_compiled(model):
    model.compile()
    try:
        assert stress(model, examples(12), seed=2) == 0
    finally:
        model.compile(False)


def test_a_hook_in_one_thread_is_invisible_to_another(model):
    """Deterministic form of the guarantee: thread B runs while thread A is inside a hooks() block."""
    tokens = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        plain = model(tokens)
    inside, release = threading.Event(), threading.Event()

    def a():
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", scale_by(0.0))]):
            inside.set()
            release.wait(10)
    thread = threading.Thread(target=a)
    thread.start()
    inside.wait(10)
    try:
        assert model.live_hooks() == frozenset()  # A's hook is not this thread's
        with torch.no_grad():
            assert torch.equal(model(tokens), plain)
    finally:
        release.set()
        thread.join()


def test_asyncio_tasks_keep_their_own_hooks(model):
    tokens = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        plain = model(tokens)
        zeroed = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", scale_by(0.0))])

    async def hooked():
        with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", scale_by(0.0))]):
            await asyncio.sleep(0.01)
            with torch.no_grad():
                return model(tokens)

    async def plain_call():
        await asyncio.sleep(0.005)  # runs while the other task holds its hooks
        with torch.no_grad():
            return model(tokens)

    async def both():
        return await asyncio.gather(hooked(), plain_call())
    got_hooked, got_plain = asyncio.run(both())
    assert torch.equal(got_hooked, zeroed) and torch.equal(got_plain, plain)


def test_model_wide_hooks_are_seen_by_every_thread(model):
    tokens = torch.tensor([[5, 6, 7]])
    model.add_hook("blocks.0.hook_resid_post", scale_by(0.0))
    try:
        with torch.no_grad():
            expected = model(tokens)
        results = []
        thread = threading.Thread(target=lambda: results.append(model(tokens).detach()))
        thread.start()
        thread.join()
        assert torch.equal(results[0], expected)
    finally:
        model.reset_hooks(including_permanent=True)
