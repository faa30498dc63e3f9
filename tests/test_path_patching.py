"""Path patching reproduces the same edit done by hand: each receiver head's split input set to the corrupted
residual stream plus the senders' per-head output changes (hook_result), everything else recomputed."""
from __future__ import annotations

import pytest
import torch

from fxhook import HookedTransformer
from fxhook.analysis import patching
from fxhook.core.hook_names import get_act_name
from models import ModelSpec, build_hf_model


@pytest.fixture(scope="module", params=["llama"])  # GQA and rotary: the harder case
def setup(request):
    torch.set_num_threads(1)
    spec = ModelSpec(request.param, 3, 4, 4 if request.param == "gpt2" else 2, 8, 40, True, False, 11)
    model = HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(spec))
    g = torch.Generator().manual_seed(1)
    clean = torch.randint(2, 90, (2, 5), generator=g)
    corrupted = clean.clone()
    corrupted[:, :2] = (corrupted[:, :2] + 5) % 90
    return model, clean, corrupted


def metric(logits: torch.Tensor) -> torch.Tensor:
    return (logits[:, -1, 3] - logits[:, -1, 4]).mean()


def by_hand(model, clean, corrupted, senders, receivers) -> float:
    """Receivers' inputs = corrupted resid_pre + sum of the senders' (clean - corrupted) head results."""
    model.set_use_attn_result(True)
    try:
        with torch.no_grad():
            _, clean_cache = model.run_with_cache(clean)
            _, corrupted_cache = model.run_with_cache(corrupted)
    finally:
        model.set_use_attn_result(False)
    hooks = []
    for layer, head, which in receivers:
        value = corrupted_cache[get_act_name("resid_pre", layer)].clone()
        for s_layer, s_head in senders:
            if s_layer < layer:
                name = get_act_name("result", s_layer)
                value += clean_cache[name][:, :, s_head] - corrupted_cache[name][:, :, s_head]

        def put(x, hook, head=head, value=value):
            x = x.clone()
            x[:, :, head] = value
            return x
        hooks.append((get_act_name(f"{which}_input", layer), put))
    model.set_use_split_qkv_input(True)
    try:
        with torch.no_grad():
            return float(metric(model.run_with_hooks(corrupted, fwd_hooks=hooks)))
    finally:
        model.set_use_split_qkv_input(False)


def test_matches_the_edit_by_hand(setup):
    model, clean, corrupted = setup
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    cases = [([(0, 1)], [(2, 3, "q")]),
             ([(0, 0), (1, 2)], [(2, 1, "k"), (2, 0, "v"), (1, 3, "q")]),
             ([(1, 0)], [(2, 1, "v"), (1, 2, "q")])]  # a receiver before the sender is left alone
    for senders, receivers in cases:
        expected = by_hand(model, clean, corrupted, senders, receivers)
        got = patching.path_patch(model, corrupted, clean_cache, metric, senders, receivers)
        assert abs(got - expected) < 1e-5, (senders, receivers)
    receivers = [(2, 1, "k"), (2, 0, "q")]
    grid = patching.get_path_patch_head_to_receivers(model, corrupted, clean_cache, metric, receivers,
                                                     patches_per_run=3)
    assert grid.shape == (3, 4)
    for layer, head in [(0, 2), (1, 3)]:
        assert abs(grid[layer, head] - by_hand(model, clean, corrupted, [(layer, head)], receivers)) < 1e-5
    with torch.no_grad():
        assert torch.allclose(grid[2], torch.full((4,), float(metric(model(corrupted)))))  # no path from layer 2
    assert not model.cfg.use_split_qkv_input and not model.live_hooks()


def test_errors(setup):
    model, clean, corrupted = setup
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    with pytest.raises(ValueError, match="no path"):
        patching.path_patch(model, corrupted, clean_cache, metric, [(2, 0)], [(1, 0, "q")])
    with pytest.raises(ValueError, match="receiver"):
        patching.path_patch(model, corrupted, clean_cache, metric, [(0, 0)], [(1, 9, "q")])
    with pytest.raises(ValueError, match="receiver"):
        patching.path_patch(model, corrupted, clean_cache, metric, [(0, 0)], [(1, 0, "z")])
    with pytest.raises(ValueError, match="sender"):
        patching.path_patch(model, corrupted, clean_cache, metric, [], [(1, 0, "q")])
