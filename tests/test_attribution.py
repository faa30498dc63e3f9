"""Attribution patching equals (clean - corrupted) . gradient computed by hand from
run_with_cache(incl_bwd=True), summed to the shapes of the actual sweeps; bad input fails clearly."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fxhook import HookedTransformer
from fxhook.analysis import patching
from fxhook.core.hook_names import get_act_name
from models import ModelSpec, build_hf_model


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    model = HookedTransformer.from_pretrained_no_processing(
        hf_model=build_hf_model(ModelSpec("llama", 2, 4, 2, 8, 40, True, False, 7)))
    g = torch.Generator().manual_seed(0)
    clean = torch.randint(2, 90, (2, 5), generator=g)
    corrupted = clean.clone()
    corrupted[:, 1] = (corrupted[:, 1] + 7) % 90
    return model, clean, corrupted


def loss_metric(tokens: torch.Tensor):
    """The mean next-token loss, computed from the logits by hand: equal to return_type="loss"."""
    def metric(logits: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    return metric


def test_matches_gradient_times_difference(setup):
    model, clean, corrupted = setup
    with torch.no_grad():
        _, clean_cache = model.run_with_cache(clean)
    _, cache = model.run_with_cache(corrupted, return_type="loss", incl_bwd=True)
    model.zero_grad(set_to_none=True)

    def by_hand(short: str, layer: int) -> torch.Tensor:
        name = get_act_name(short, layer)
        return (clean_cache[name] - cache[name]) * cache[name + "_grad"]

    layers = range(model.cfg.n_layers)
    got = patching.attribution_patch(model, clean, corrupted, loss_metric(corrupted),
                                     hooks=["resid_pre", "z", "pattern", "post", "k"], per="pos")
    assert torch.allclose(got["resid_pre"], torch.stack([by_hand("resid_pre", l).sum((0, 2)) for l in layers]),
                          atol=1e-6)
    assert torch.allclose(got["z"], torch.stack([by_hand("z", l).sum((0, 3)) for l in layers]), atol=1e-6)
    assert got["k"].shape == (2, 5, 2)  # kv heads
    assert torch.allclose(got["pattern"], torch.stack([by_hand("pattern", l).sum((0, 3)) for l in layers]),
                          atol=1e-6)  # [layer, head, dest_pos]
    assert torch.allclose(got["post"], torch.stack([by_hand("post", l).sum(0) for l in layers]), atol=1e-6)
    heads = patching.attribution_patch(model, clean, corrupted, loss_metric(corrupted), hooks="z", per="head")
    assert torch.allclose(heads, torch.stack([by_hand("z", l).sum((0, 1, 3)) for l in layers]), atol=1e-6)
    neurons = patching.attribution_patch(model, clean, corrupted, loss_metric(corrupted), hooks="post", per="neuron")
    assert torch.allclose(neurons, torch.stack([by_hand("post", l).sum((0, 1)) for l in layers]), atol=1e-6)
    entries = patching.attribution_patch(model, clean, corrupted, loss_metric(corrupted), hooks="pattern",
                                         per="dest_src_pos")
    assert torch.allclose(entries, torch.stack([by_hand("pattern", l).sum(0) for l in layers]), atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # the estimate leaves no gradients behind
    assert not model.live_hooks()


def test_errors(setup):
    model, clean, corrupted = setup
    metric = loss_metric(corrupted)
    with pytest.raises(ValueError, match="per='head' does not apply"):
        patching.attribution_patch(model, clean, corrupted, metric, hooks="resid_pre", per="head")
    with pytest.raises(ValueError, match="short names"):
        patching.attribution_patch(model, clean, corrupted, metric, hooks="blocks.0.attn.hook_z")
    with pytest.raises(ValueError, match="per-block activations"):
        patching.attribution_patch(model, clean, corrupted, metric, hooks="embed")
    with pytest.raises(ValueError, match="same shape"):
        patching.attribution_patch(model, clean[:, :4], corrupted, metric)
    with pytest.raises(ValueError, match="scalar tensor"):
        patching.attribution_patch(model, clean, corrupted, lambda logits: float(logits[0, -1, 0]))
    assert not model.live_hooks()
