"""HookedTransformer's remaining TransformerLens surface against TransformerLens 3.9 on the same weights:
component views (embed, pos_embed, unembed, ln_final), caching by hand (cache_all, cache_some,
add_caching_hooks, get_caching_hooks), list_hooks, check_hooks_to_add, W_gate, n_params_total, the config's
fields, and HookedRootModule for a user's own module."""
from __future__ import annotations

import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from fxhook import HookedTransformer, HookedTransformerConfig
from fxhook.hook_points import HookedRootModule, HookPoint
from models import randomise_biases, randomise_norms
from tl_reference import tl_model

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformer_lens as tl
    from transformer_lens.hook_points import HookedRootModule as TLHookedRootModule, HookPoint as TLHookPoint


def _gpt2():
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32)).eval()
    randomise_norms(hf, torch.Generator().manual_seed(1))
    randomise_biases(hf, 2)
    return hf


@pytest.fixture(scope="module")
def pair():
    hf = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = tl_model(hf)
    return HookedTransformer.from_pretrained_no_processing(hf_model=hf), theirs


def test_component_views_compute_what_transformer_lens_components_compute(pair):
    ours, theirs = pair
    tokens = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    torch.testing.assert_close(ours.embed(tokens), theirs.embed(tokens))
    torch.testing.assert_close(ours.embed.W_E, theirs.embed.W_E)
    for offset, attention_mask in ((0, None), (3, None), (0, mask)):
        torch.testing.assert_close(ours.pos_embed(tokens, offset, attention_mask),
                                   theirs.pos_embed(tokens, offset, attention_mask))
    residual = torch.randn(2, 7, 32)
    torch.testing.assert_close(ours.ln_final(residual), theirs.ln_final(residual), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.ln_final.w, theirs.ln_final.w)
    torch.testing.assert_close(ours.unembed(residual), theirs.unembed(residual), rtol=1e-5, atol=1e-5)
    assert ours.hook_embed is ours.hook_dict["hook_embed"] and ours.hook_pos_embed.name == "hook_pos_embed"
    assert ours.ln_final.hook_scale.name == "ln_final.hook_scale"


def test_caching_by_hand_fills_what_transformer_lens_fills(pair):
    ours, theirs = pair
    tokens = torch.randint(0, 97, (1, 6), generator=torch.Generator().manual_seed(1))
    names = lambda name: name.endswith(("hook_resid_post", "hook_pattern"))  # noqa: E731
    for model in (ours, theirs):
        model.reset_hooks(including_permanent=True)
    results = []
    for model in (ours, theirs):
        everything, some, batchless = {}, {}, {}
        model.cache_all(everything)
        model.cache_some(some, names)
        model.add_caching_hooks(names, remove_batch_dim=True, cache=batchless)
        model(tokens)
        model.reset_hooks()
        results.append((everything, some, batchless))
        before = everything["hook_embed"]
        model(tokens * 0)  # nothing is cached once the hooks are gone
        assert everything["hook_embed"] is before
    for ours_dict, theirs_dict in zip(results[0], results[1]):
        shared = set(ours_dict) & set(theirs_dict)
        assert shared and set(ours_dict) <= set(theirs_dict)
        for name in shared:
            torch.testing.assert_close(ours_dict[name], theirs_dict[name], rtol=1e-5, atol=1e-5)
    cache, fwd, bwd = ours.get_caching_hooks(["blocks.1.hook_resid_post"], incl_bwd=True, pos_slice=-1)
    assert [name for name, _ in fwd] == ["blocks.1.hook_resid_post"] and len(bwd) == 1
    with ours.hooks(fwd, bwd):
        ours(tokens, return_type="loss").backward()
    assert cache["blocks.1.hook_resid_post"].shape == (1, 1, 32) and "blocks.1.hook_resid_post_grad" in cache
    assert not ours.list_hooks()


def test_list_hooks_and_a_subclass_refusing_hooks(pair):
    ours, _ = pair
    ours.add_perma_hook("hook_embed", lambda x, hook: None)
    with ours.hooks([("blocks.0.hook_resid_pre", lambda x, hook: None)]):
        assert set(ours.list_hooks()) == {"hook_embed", "blocks.0.hook_resid_pre"}
        assert set(ours.list_hooks(including_permanent=False)) == {"blocks.0.hook_resid_pre"}
    ours.reset_hooks(including_permanent=True)
    assert ours.list_hooks() == {}

    class NoPatternEdits(HookedTransformer):
        def check_hooks_to_add(self, hook_point, hook_point_name, hook, dir="fwd", is_permanent=False,
                               prepend=False):
            if hook_point_name.endswith("hook_pattern"):
                raise ValueError("patterns are read-only here")

    ours.__class__ = NoPatternEdits
    try:
        with pytest.raises(ValueError, match="read-only"):
            ours.add_hook("blocks.0.attn.hook_pattern", lambda x, hook: None)
        assert ours.list_hooks() == {}
    finally:
        ours.__class__ = HookedTransformer


def test_w_gate_and_parameter_counts_as_transformer_lens():
    gpt2 = _gpt2()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=48, vocab_size=97,
                                         max_position_embeddings=32)).eval()
    for hf in (gpt2, llama):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = tl_model(hf)
        ours = HookedTransformer.from_pretrained_no_processing(hf_model=hf)
        assert ours.n_params_total == theirs.n_params_total
        assert ours.cfg.n_params == theirs.cfg.n_params
        if theirs.W_gate is None:
            assert ours.W_gate is None
        else:
            torch.testing.assert_close(ours.W_gate, theirs.W_gate)
    assert ours.cfg.original_architecture == "LlamaForCausalLM"


def test_config_defaults_and_derived_fields_follow_transformer_lens():
    kwargs = dict(d_model=32, d_head=8, n_layers=2, n_ctx=16, d_vocab=11)
    for extra in ({}, {"attn_only": True}, {"gated_mlp": True, "d_mlp": 40}, {"positional_embedding_type": "rotary"},
                  {"use_attn_scale": False}, {"init_mode": "xavier_normal"}):
        ours = HookedTransformerConfig(**kwargs, **extra)
        theirs = tl.HookedTransformerConfig(**kwargs, **extra)
        for field in ("n_heads", "d_mlp", "d_vocab_out", "rotary_dim", "attn_scale", "initializer_range", "n_params",
                      "act_fn"):
            assert getattr(ours, field) == pytest.approx(getattr(theirs, field)), (field, extra)
    with pytest.raises(ValueError, match="window_size and attn_types"):
        HookedTransformerConfig(**kwargs, use_local_attn=True)
    assert HookedTransformerConfig.unwrap(tl.HookedTransformerConfig(**kwargs).to_dict()).d_mlp == 128


class Toy(HookedRootModule):
    def __init__(self, point_class):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.hook_in, self.hook_out = point_class(), point_class()
        self.setup()

    def forward(self, x):
        return self.hook_out(self.linear(self.hook_in(x)).relu())


class TLToy(TLHookedRootModule):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        self.hook_in, self.hook_out = TLHookPoint(), TLHookPoint()
        self.setup()

    forward = Toy.forward


def test_hooked_root_module_for_a_users_own_module_acts_as_transformer_lens():
    ours, theirs = Toy(HookPoint), TLToy()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 3, requires_grad=True)
    double = lambda a, hook: a * 2  # noqa: E731
    results = []
    for model in (ours, theirs):
        assert sorted(model.hook_dict) == ["hook_in", "hook_out"]
        hooked = model.run_with_hooks(x, fwd_hooks=[("hook_in", double)])
        out, cache = model.run_with_cache(x, names_filter=lambda n: n == "hook_out")
        model.add_hook("hook_out", double)
        added = model(x)
        model.reset_hooks()
        results.append((hooked, out, cache["hook_out"], added, model(x)))
    for mine, reference in zip(*results):
        torch.testing.assert_close(mine, reference)


def _tl_weights(state_dict: dict) -> dict:
    return {k: v.clone() for k, v in state_dict.items() if not k.endswith((".mask", ".IGNORE"))}


@pytest.mark.parametrize("fold_biases,center_weights", [(True, True), (False, False), (True, False)])
def test_state_dict_processing_methods_equal_transformer_lens(pair, fold_biases, center_weights):
    ours, theirs = pair
    sd = _tl_weights(theirs.state_dict())
    mine = ours.fold_layer_norm(_tl_weights(sd), fold_biases, center_weights)
    reference = _tl_weights(theirs.fold_layer_norm(_tl_weights(sd), fold_biases, center_weights))
    assert set(mine) == set(reference)
    for key in reference:
        torch.testing.assert_close(mine[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
    for method in ("center_writing_weights", "center_unembed", "fold_value_biases"):
        mine, reference = getattr(ours, method)(_tl_weights(sd)), getattr(theirs, method)(_tl_weights(sd))
        for key in reference:
            torch.testing.assert_close(mine[key], reference[key], rtol=1e-5, atol=1e-6, msg=f"{method} {key}")


def test_loss_embeddings_and_offsets_as_transformer_lens(pair):
    ours, theirs = pair
    tokens = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(3))
    logits = ours(tokens)
    torch.testing.assert_close(ours.loss_fn(logits, tokens), theirs.loss_fn(logits, tokens))
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [1] * 6])
    torch.testing.assert_close(ours.loss_fn(logits, tokens, mask, per_token=True),
                               theirs.loss_fn(logits, tokens, mask, per_token=True))
    residual, out_tokens, shortformer, _ = ours.input_to_embed(tokens)
    reference = theirs.input_to_embed(tokens)
    torch.testing.assert_close(residual, reference[0], rtol=1e-5, atol=1e-6)
    assert torch.equal(out_tokens, tokens) and shortformer is None
    embed = ours.embed(tokens)
    for offset in (0, 2):
        mine = ours.get_residual(embed, offset, tokens=tokens)
        theirs_residual = theirs.get_residual(embed, offset, tokens=tokens)
        torch.testing.assert_close(mine[0], theirs_residual[0])
    assert ours.get_pos_offset(None, 2) == 0
    cache = ours.init_kv_cache(batch_size=2)
    ours(tokens, past_kv_cache=cache)
    assert ours.get_pos_offset(cache, 2) == 6
    with pytest.raises(ValueError, match="batch of 2"):
        ours.get_pos_offset(cache, 3)


def test_fill_missing_keys_fills_norms_and_refuses_matrices(pair):
    ours, _ = pair
    sd = {k: v.detach().clone() * 2 for k, v in ours.live_weights().items()}
    del sd["blocks.0.ln1.w"], sd["ln_final.b"]
    with pytest.warns(UserWarning, match="filled 2 missing weights"):
        filled = ours.fill_missing_keys(sd)
    torch.testing.assert_close(filled["blocks.0.ln1.w"], ours.blocks[0].ln1.w)
    assert torch.equal(filled["blocks.1.attn.W_Q"], sd["blocks.1.attn.W_Q"])
    del sd["blocks.1.mlp.W_in"]
    with pytest.raises(ValueError, match="lacks weight matrices.*blocks.1.mlp.W_in"):
        ours.fill_missing_keys(sd)


def test_deepcopy_is_independent_and_train_mode_switches(pair):
    import copy

    ours, _ = pair
    tokens = torch.tensor([[3, 1, 4, 1, 5]])
    clone = copy.deepcopy(ours)
    torch.testing.assert_close(clone(tokens), ours(tokens))
    with torch.no_grad():
        clone.blocks[0].attn.W_Q.add_(1.0)
    assert not torch.allclose(clone(tokens), ours(tokens))
    assert ours.train() is ours and ours.training and not ours.eval().training
