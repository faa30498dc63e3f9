"""A failed weight operation leaves the model exactly as it was: parameters, ties, graphs, logits."""
from __future__ import annotations

import pytest
import torch

import fxhook.processing as processing
from fxhook import HookedTransformer, pipeline
from fxhook.processing import transforms
from models import ModelSpec, build_hf_model

SPEC = ModelSpec("llama", n_layers=2, n_heads=4, n_kv_heads=2, d_head=4, d_mlp=16, bias=False, tied=True, seed=9)
TOKENS = torch.tensor([[3, 1, 4, 1, 5, 9]])


class Injected(RuntimeError):
    pass


def fail(*_args, **_kwargs):
    raise Injected("injected fault")


@pytest.fixture
def model() -> HookedTransformer:
    return HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(SPEC))


def state(model: HookedTransformer):
    """Every parameter slot of the HF model: (its object, a copy of its value), the configs, the logits."""
    slots = {f"{m}.{n}": (p, p.detach().clone(), p.dtype) for m, module in model.hf_model.named_modules()
             for n, p in module._parameters.items() if p is not None}
    absent = sorted(f"{m}.{n}" for m, module in model.hf_model.named_modules()
                    for n, p in module._parameters.items() if p is None)
    with torch.no_grad():
        logits = model(TOKENS)
    return slots, absent, dict(vars(model.cfg)), dict(vars(model.hf_model.config)), logits


def assert_unchanged(model: HookedTransformer, before) -> None:
    slots, absent, cfg, hf_cfg, logits = before
    now_slots, now_absent, now_cfg, now_hf_cfg, now_logits = state(model)
    assert now_slots.keys() == slots.keys() and now_absent == absent
    for key, (param, value, dtype) in slots.items():
        assert now_slots[key][0] is param, f"{key} is another Parameter object"
        assert param.dtype == dtype and torch.equal(param.detach(), value), f"{key} changed"
    assert now_cfg == cfg and now_hf_cfg == hf_cfg
    assert torch.equal(now_logits, logits)
    hf = model.hf_model
    assert hf.lm_head.weight is hf.model.embed_tokens.weight  # still tied
    with torch.no_grad():  # and the graph reads the live parameters: an edit shows
        saved = hf.lm_head.weight.detach().clone()
        model.W_U.mul_(0)
        assert model(TOKENS).abs().max() == 0
        hf.lm_head.weight.copy_(saved)


PROCESSING_STEPS = [
    (processing, "untie_unembed"), (transforms, "fold_layer_norm"), (transforms, "center_unembed"),
    (transforms, "fold_value_biases"), (processing, "write_weights"), (pipeline, "capture_forward"),
]


@pytest.mark.parametrize("where,step", PROCESSING_STEPS, ids=[s for _, s in PROCESSING_STEPS])
def test_a_fault_in_any_step_of_process_weights_changes_nothing(model, monkeypatch, where, step):
    before = state(model)
    calls = {"n": 0}
    original = getattr(where, step)

    def fail_once(*args, **kwargs):  # the rebuild after the failure may call it again
        calls["n"] += 1
        if calls["n"] == 1:
            raise Injected(step)
        return original(*args, **kwargs)
    monkeypatch.setattr(where, step, fail_once)
    with pytest.raises(Injected):
        model.process_weights_()
    assert calls["n"] >= 1
    monkeypatch.undo()
    assert_unchanged(model, before)


def test_a_refused_flag_changes_nothing(model):
    before = state(model)
    with pytest.raises(ValueError, match="rotary"):
        model.process_weights_(refactor_factored_attn_matrices=True)
    assert_unchanged(model, before)


@pytest.mark.parametrize("fault", ["writing", "processing"])
def test_a_fault_while_loading_a_state_dict_changes_nothing(model, monkeypatch, fault):
    before = state(model)
    weights = {k: v.detach().clone() + 0.5 for k, v in model.live_weights().items()}
    target = (processing, "write_weights") if fault == "writing" else (transforms, "fold_value_biases")
    original = getattr(*target)
    calls = {"n": 0}

    def fail_late(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1 and fault == "writing":
            original(*args, **kwargs)  # some weights are already written when it fails
        if calls["n"] == 1:
            raise Injected(fault)
        return original(*args, **kwargs)
    monkeypatch.setattr(*target, fail_late)
    with pytest.raises(Injected):
        model.load_and_process_state_dict(weights)
    monkeypatch.undo()
    assert_unchanged(model, before)


def test_a_fault_in_the_middle_of_a_move_changes_nothing(model, monkeypatch):
    before = state(model)
    original = torch.Tensor.to
    calls = {"n": 0}

    def flaky_to(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:  # some tensors are converted already
            raise Injected("out of memory")
        return original(self, *args, **kwargs)
    monkeypatch.setattr(torch.Tensor, "to", flaky_to)
    with pytest.raises(Injected):
        model.to(torch.float64)
    monkeypatch.undo()
    assert calls["n"] >= 7
    assert_unchanged(model, before)
    assert model.cfg.dtype == torch.float32


def test_a_fault_after_a_move_rebuilds_the_graph_for_the_old_dtype(model, monkeypatch):
    before = state(model)
    original = pipeline.capture_forward
    calls = {"n": 0}

    def fail_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise Injected("capture")
        return original(*args, **kwargs)
    monkeypatch.setattr(pipeline, "capture_forward", fail_once)
    with pytest.raises(Injected):
        model.to(torch.float64)
    monkeypatch.undo()
    assert_unchanged(model, before)
