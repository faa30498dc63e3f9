"""Gradients through hooks: run_with_cache(incl_bwd=True) and backward hooks.

Reference gradients come from torch.autograd.grad on the activations kept by a
plain forward hook, and, independently of fxhook, from the HF model itself
(the gradient w.r.t. its input embeddings, and w.r.t. the last residual stream
through HF's final norm and unembedding).
"""
from __future__ import annotations

import functools

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from fxhook import HookedTransformer
from fxhook.core.hook_point import HookShapeError
from models import NO_SHRINK, ModelSpec, build_hf_model, model_specs, positions_for, token_batches
from profiles import examples


GRAD_TOL = dict(atol=1e-6, rtol=1e-4)


@functools.lru_cache(maxsize=2)
def built(spec: ModelSpec) -> tuple[torch.nn.Module, HookedTransformer]:
    hf = build_hf_model(spec)
    return hf, HookedTransformer.from_pretrained_no_processing(hf_model=hf)


def has_a_loss_term(mask: torch.Tensor) -> bool:
    """At least one (real, real) next-token pair, so the mean loss is defined."""
    return bool((mask[:, 1:] * mask[:, :-1]).any())


def reference_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    nll = -logp.gather(-1, tokens[:, 1:, None])[..., 0]
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    return nll[valid].mean()


def autograd_reference(model, tokens, mask, names):
    """Loss and d loss / d activation for `names`, via activations kept by a forward hook."""
    acts = {}

    def keep(x, hook):
        acts[hook.name] = x

    with model.hooks(fwd_hooks=[(lambda n: n in names, keep)]):
        loss = model(tokens, attention_mask=mask, return_type="loss")
    grads = torch.autograd.grad(loss, [acts[n] for n in names], allow_unused=True)
    return loss, dict(zip(names, grads))


@settings(max_examples=examples(5), phases=NO_SHRINK)
@given(spec=model_specs(), batch=token_batches())
def test_incl_bwd_caches_gradients_of_every_hook(spec, batch):
    tokens, mask = batch
    assume(has_a_loss_term(mask))
    hf, model = built(spec)
    names = list(model.hook_dict)
    hf.zero_grad(set_to_none=True)
    loss, cache = model.run_with_cache(tokens, attention_mask=mask, return_type="loss", incl_bwd=True)
    assert set(cache.keys()) == set(names) | {n + "_grad" for n in names}
    for name in names:
        assert cache[name + "_grad"].shape == cache[name].shape, name
        assert not cache[name].requires_grad and not cache[name + "_grad"].requires_grad

    ref_loss, ref_grads = autograd_reference(model, tokens, mask, names)
    assert_close(loss.detach(), ref_loss.detach(), atol=1e-6, rtol=1e-6)
    missing = [n for n in names if ref_grads[n] is None]
    assert not missing, f"activations that do not reach the loss: {missing}"
    for name in names:
        grad = cache[name + "_grad"]
        # finite everywhere, padded query rows (which attend to nothing) included
        assert torch.isfinite(grad).all(), f"{name}_grad is not finite"
        assert_close(grad, ref_grads[name], **GRAD_TOL, msg=lambda m: f"{name}_grad: {m}")

    # Independently of fxhook: HF's gradient w.r.t. its input embeddings ...
    embed = hf.transformer.wte if spec.family == "gpt2" else hf.model.embed_tokens
    inputs = embed(tokens).detach().requires_grad_()
    hf_out = hf(inputs_embeds=inputs, attention_mask=mask, position_ids=positions_for(mask)).logits
    (g_embed,) = torch.autograd.grad(reference_loss(hf_out, tokens, mask), inputs)
    assert_close(cache["hook_embed_grad"], g_embed, **GRAD_TOL)
    # ... and w.r.t. the last residual stream, through HF's final norm and unembedding.
    last = f"blocks.{spec.n_layers - 1}.hook_resid_post"
    resid = cache[last].clone().requires_grad_()
    norm = hf.transformer.ln_f if spec.family == "gpt2" else hf.model.norm
    (g_resid,) = torch.autograd.grad(reference_loss(hf.lm_head(norm(resid)), tokens, mask), resid)
    assert_close(cache[last + "_grad"], g_resid, **GRAD_TOL)
    # the parameters' gradients (run_with_cache backpropagated into them) are finite
    assert all(torch.isfinite(p.grad).all() for p in hf.parameters() if p.grad is not None)
    hf.zero_grad(set_to_none=True)


@settings(max_examples=examples(4), phases=NO_SHRINK)
@given(spec=model_specs(), batch=token_batches(), data=st.data())
def test_backward_hooks_fire_during_backward_inside_the_block(spec, batch, data):
    tokens, mask = batch
    assume(has_a_loss_term(mask))
    hf, model = built(spec)
    names = data.draw(st.lists(st.sampled_from(sorted(model.hook_dict)), min_size=1, max_size=4, unique=True),
                      label="hooks")
    seen = {}

    def record(grad, hook):
        assert hook.name not in seen, "a backward hook fires once per backward pass"
        seen[hook.name] = grad.clone()

    _, ref_grads = autograd_reference(model, tokens, mask, names)
    with model.hooks(bwd_hooks=[(n, record) for n in names]):
        loss = model(tokens, attention_mask=mask, return_type="loss")
        assert seen == {}, "backward hooks must not fire in the forward pass"
        loss.backward()
    assert set(seen) == set(names)
    for name in names:
        assert_close(seen[name], ref_grads[name], **GRAD_TOL, equal_nan=True)
    assert not any(p.bwd_hooks for p in model.hook_dict.values())
    hf.zero_grad(set_to_none=True)


def _v_weight_grad(hf, spec: ModelSpec, layer: int) -> torch.Tensor:
    if spec.family == "gpt2":  # Conv1D [d_model, 3 * d_model]: q | k | v
        return hf.transformer.h[layer].attn.c_attn.weight.grad[:, 2 * spec.d_model:]
    return hf.model.layers[layer].self_attn.v_proj.weight.grad


@settings(max_examples=examples(4), phases=NO_SHRINK)
@given(spec=model_specs(), batch=token_batches(), data=st.data())
def test_backward_hook_return_value_replaces_the_gradient(spec, batch, data):
    tokens, mask = batch
    assume(has_a_loss_term(mask))
    hf, model = built(spec)
    layer = data.draw(st.integers(0, spec.n_layers - 1), label="layer")
    name = f"blocks.{layer}.attn.hook_v"

    hf.zero_grad(set_to_none=True)
    model(tokens, attention_mask=mask, return_type="loss").backward()
    assert _v_weight_grad(hf, spec, layer).abs().max() > 0
    hf.zero_grad(set_to_none=True)
    with model.hooks(bwd_hooks=[(name, lambda g, hook: torch.zeros_like(g))]):
        model(tokens, attention_mask=mask, return_type="loss").backward()
    assert (_v_weight_grad(hf, spec, layer) == 0).all(), "a zeroed gradient at hook_v stops W_V's gradient"
    hf.zero_grad(set_to_none=True)

    with model.hooks(bwd_hooks=[(name, lambda g, hook: g[..., :1])]):
        loss = model(tokens, attention_mask=mask, return_type="loss")
        with pytest.raises(HookShapeError, match=name):
            loss.backward()
    assert not any(p.bwd_hooks or p.fwd_hooks for p in model.hook_dict.values())
    hf.zero_grad(set_to_none=True)
