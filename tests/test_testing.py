"""fxhook.testing: its properties hold on the tiny models of several families and on SmolLM2, and
catch deliberately broken models (a wrong causal mask, a changed norm epsilon, a head zeroed in the
graph only, a KV cache that drops a position), naming the first hook that diverges from HF."""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st

from family_models import FamilySpec, build_family_model
from models import ModelSpec, build_hf_model
from profiles import examples
from fxhook import HookedTransformer
from fxhook.models_offline import gpt2_tokenizer
from fxhook.testing import PropertyFailure, TokenBatch, assert_compiled_matches, assert_generation_matches, \
    assert_hooks_consistent, assert_matches_hf, strategies as fst, tolerance
from fxhook.testing.compare import hf_logits_difference
from fxhook.testing.tolerance import tolerance_table

# a left-padded batch with two real lengths: padding, BOS (id 0) and a later token of every kind
PADDED = TokenBatch(torch.tensor([[0, 5, 17, 33, 2, 90, 41, 8], [1, 1, 1, 0, 64, 12, 12, 77]]),
                    torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1, 1, 1]]))

# a GQA Llama whose greedy continuations of PADDED vary (many tiny random models repeat one token)
VARIED = ModelSpec("llama", 2, 4, 2, 8, 40, True, False, 12)


def load(hf: torch.nn.Module, processed: bool) -> HookedTransformer:
    """fxhook's model of a copy of hf (the caller keeps hf as the untouched reference)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # OLMo 2 says fold_ln does not apply to post-norm blocks
        loader = HookedTransformer.from_pretrained if processed else HookedTransformer.from_pretrained_no_processing
        return loader(hf_model=copy.deepcopy(hf))


# ------------------------------------------------------------------ families
FAMILY_MODELS = {
    "gpt2 processed": (lambda: build_hf_model(ModelSpec("gpt2", 2, 4, 4, 8, 40, True, True, 1)), True),
    "llama GQA": (lambda: build_hf_model(ModelSpec("llama", 2, 4, 2, 8, 40, True, False, 2)), False),
    "neox sequential, partial rotary": (
        lambda: build_hf_model(ModelSpec("gpt_neox", 2, 2, 2, 8, 16, True, False, 3, variant=1)), False),
    "opt processed": (lambda: build_hf_model(ModelSpec("opt", 2, 2, 2, 8, 16, True, True, 4)), True),
    "gemma2 soft-caps, window": (lambda: build_family_model(FamilySpec(
        "gemma2", 2, 2, 1, 8, 16, False, True, 5, window=3, attn_softcap=1.0, logit_softcap=2.0,
        query_scale=16)), False),
    "mixtral processed": (lambda: build_family_model(FamilySpec(
        "mixtral", 2, 2, 1, 8, 16, False, False, 7, n_experts=3, top_k=2)), True),
}


@pytest.mark.parametrize("name", list(FAMILY_MODELS))
def test_properties_hold_on_family_models(name):
    build, processed = FAMILY_MODELS[name]
    reference = build()
    model = load(reference, processed)
    checks = assert_matches_hf(model, reference, PADDED)
    assert checks[0].name == ("matches_hf (log-probabilities)" if processed else "matches_hf (logits)")
    checks += assert_hooks_consistent(model, PADDED, hf_model=reference, ablate="blocks.0.hook_attn_out")
    assert all(c.difference.holds for c in checks)
    names = {c.name for c in checks}
    assert {"pattern causal", "pattern rows sum to 1", "resid_post -> final norm -> unembed == logits",
            "zero-ablation of blocks.0.hook_attn_out == HF"} <= names

    @settings(max_examples=examples(2))
    @given(batch=fst.token_batches(model, max_batch=3, max_length=9), ablate=fst.ablations(model))
    def drawn(batch, ablate):
        assert_matches_hf(model, reference, batch)
        assert_hooks_consistent(model, batch, hf_model=reference, ablate=ablate)
    drawn()


# every other family, on the fixed padded batch only (the drawn examples above cover the machinery)
MORE_FAMILY_MODELS = {
    "mistral window": lambda: build_family_model(FamilySpec("mistral", 2, 4, 2, 8, 16, False, False, 21, window=3)),
    "qwen2": lambda: build_family_model(FamilySpec("qwen2", 2, 4, 2, 8, 16, True, True, 22)),
    "qwen3 q/k norms": lambda: build_family_model(FamilySpec("qwen3", 2, 4, 2, 8, 16, False, False, 23)),
    "gemma": lambda: build_family_model(FamilySpec("gemma", 2, 2, 1, 8, 16, False, True, 24)),
    "olmo2 post-norms": lambda: build_family_model(FamilySpec("olmo2", 2, 4, 2, 8, 16, False, False, 25)),
    "gptj parallel": lambda: build_hf_model(ModelSpec("gptj", 2, 2, 2, 8, 16, False, False, 26)),
    "phi parallel": lambda: build_hf_model(ModelSpec("phi", 2, 2, 2, 8, 16, True, False, 27)),
}


@pytest.mark.parametrize("name", list(MORE_FAMILY_MODELS))
def test_properties_hold_on_every_other_family(name):
    reference = MORE_FAMILY_MODELS[name]()
    model = load(reference, False)
    checks = assert_matches_hf(model, reference, PADDED)
    checks += assert_hooks_consistent(model, PADDED, hf_model=reference, ablate="blocks.1.hook_mlp_out")
    assert all(c.difference.holds for c in checks) and len(checks) >= 4


def test_generation_matches_hf_on_a_padded_batch():
    reference = build_hf_model(VARIED)  # (test_a_kv_cache_that_drops_a_position_is_caught runs it unprocessed)
    checks = assert_generation_matches(load(reference, True), reference, PADDED, max_new_tokens=4)
    assert [c.name for c in checks] == ["greedy with KV cache == HF generate",
                                        "greedy without KV cache == HF generate", "padded rows == rows alone"]


def test_smollm2(smollm2_raw, smollm2_processed):
    reference = smollm2_raw.hf_model  # the unprocessed HF model of the checkpoint (its forward is HF's code)
    batch = fst.padded_batch(smollm2_raw, [smollm2_raw.to_tokens("The capital of France is")[0].tolist(),
                                      smollm2_raw.tokenizer("Once upon a", add_special_tokens=False)["input_ids"]])
    assert_matches_hf(smollm2_raw, reference, batch)
    assert_matches_hf(smollm2_processed, reference, batch)
    assert_hooks_consistent(smollm2_processed, batch, hf_model=reference, ablate="blocks.3.hook_mlp_out")


def test_smollm2_rounding_on_its_huge_residual_coordinates_is_measured_not_guessed(smollm2_processed):
    """Zeroing layer 12's attention on the token pair [1, 28151] moves fxhook's logits 5e-4 from HF's, beyond
    the dtype-and-depth tolerance (2e-4), because SmolLM2's residual stream has coordinates in the hundreds.
    HF's own float32 run is further still from the float64 result, so the check holds on that basis."""
    checks = assert_hooks_consistent(smollm2_processed, torch.tensor([[1, 28151]]), ablate="blocks.12.hook_attn_out")
    ablation = checks[-1].difference
    assert ablation.worst > tolerance(torch.float32, 30, torch.ones(1) * 3.0) and ablation.holds
    assert "rounding error against float64" in ablation.basis


def test_a_difference_beyond_hfs_own_rounding_still_fails(reference):
    """The float64 second opinion widens the tolerance only to what HF's own rounding explains: logits off by
    10x the dtype tolerance are still a failure, naming the basis it was judged on."""
    model = load(reference, False)
    mask = PADDED.attention_mask
    with torch.no_grad():
        logits = model(PADDED.tokens, attention_mask=mask)
    off = logits + 10 * tolerance(torch.float32, model.cfg.n_layers, logits)
    found = hf_logits_difference(model, reference, off, PADDED.tokens, mask, processed=False)
    assert not found.holds and "rounding error against float64" in found.basis
    assert hf_logits_difference(model, reference, logits, PADDED.tokens, mask, processed=False).holds


# ------------------------------------------------------------------ broken models
@pytest.fixture(scope="module")
def reference():
    return build_hf_model(VARIED)


def edit_capture(model: HookedTransformer, edit) -> HookedTransformer:
    """Apply edit(graph module) to the model's captured forward graph (the graphs built from it follow)."""
    gm = model.graphs.captured()
    edit(gm)
    gm.graph.lint()
    gm.recompile()
    model.graphs.clear(keep_capture=True)
    return model


def marker(gm, hook_name: str):
    return next(n for n in gm.graph.nodes if n.op == "call_function" and "fxhook.hook" in str(n.target)
                and n.args[1] == hook_name)


def zero_head(layer: int, head: int, n_heads: int):
    def edit(gm):
        z = marker(gm, f"blocks.{layer}.attn.hook_z")  # [b, p, h, d_head]
        keep = torch.ones(1, 1, n_heads, 1)
        keep[0, 0, head] = 0
        gm.register_buffer("broken_head_keep", keep)
        with gm.graph.inserting_after(z):
            weight = gm.graph.get_attr("broken_head_keep")
        with gm.graph.inserting_after(weight):
            zeroed = gm.graph.call_function(torch.ops.aten.mul.Tensor, (z, weight))
        z.replace_all_uses_with(zeroed, delete_user_cb=lambda user: user is not zeroed)
    return edit


def no_causal_mask(layer: int):
    def edit(gm):
        attention = [n for n in gm.graph.nodes if n.op == "call_function" and "fxhook.attention" in str(n.target)]
        node = attention[layer]
        with gm.graph.inserting_before(node):
            everything = gm.graph.call_function(torch.ops.aten.ones_like.default, (node.args[3],))
        node.args = (*node.args[:3], everything, *node.args[4:])
    return edit


def test_a_head_zeroed_in_the_graph_is_caught_at_attn_out(reference):
    model = edit_capture(load(reference, False), zero_head(0, 1, 4))
    with pytest.raises(PropertyFailure) as failure:
        assert_matches_hf(model, reference, PADDED)
    assert failure.value.divergence.hook == "blocks.0.hook_attn_out"
    text = str(failure.value)
    assert "logits differ" in text and "rows=[[0, 5, 17" in text and "first diverging hook: blocks.0.hook_attn_out" \
        in text and failure.value.worst > 1e-3


def test_a_wrong_causal_mask_is_caught(reference):
    model = edit_capture(load(reference, False), no_causal_mask(1))
    with pytest.raises(PropertyFailure) as failure:
        assert_matches_hf(model, reference, PADDED)
    assert failure.value.divergence.hook == "blocks.1.hook_attn_out"
    with pytest.raises(PropertyFailure) as failure:
        assert_hooks_consistent(model, PADDED)
    assert failure.value.divergence.hook == "blocks.1.attn.hook_pattern"
    assert "not causal" in str(failure.value)


def test_a_changed_norm_epsilon_is_caught(reference):
    changed = copy.deepcopy(reference)
    changed.model.layers[1].post_attention_layernorm.variance_epsilon = 0.5  # captured into fxhook's graph
    model = load(changed, False)
    with pytest.raises(PropertyFailure) as failure:
        assert_matches_hf(model, reference, PADDED)
    assert failure.value.divergence.hook == "blocks.1.hook_mlp_out"
    assert failure.value.divergence.against == "HF module model.layers.1.mlp"


def test_a_kv_cache_that_drops_a_position_is_caught(reference):
    model = load(reference, False)
    decoder, real = model.decoder, model.decoder.run_growing

    def dropping(cache, tokens, mask, embeds=None):  # keeps all but the second position after each step
        logits = real(cache, tokens, mask, embeds)
        keep = [i for i in range(cache.past_length) if i != 1]
        cache.update([k[:, :, keep] for k in cache.keys], [v[:, :, keep] for v in cache.values],
                     cache.attention_mask[:, keep])
        return logits
    decoder.run_growing = dropping
    assert_matches_hf(model, reference, PADDED)  # the forward pass is right
    with pytest.raises(PropertyFailure) as failure:
        assert_generation_matches(model, reference, PADDED, max_new_tokens=4)
    assert "with KV cache" in str(failure.value)
    assert failure.value.divergence.hook == "blocks.0.attn.hook_rot_q"
    assert "without the KV cache" in failure.value.divergence.against


def test_compiled_matches_eager_under_the_models_own_compile_settings(reference):
    model = load(build_hf_model(ModelSpec("llama", 1, 2, 1, 8, 16, False, False, 12)), False)
    model.compile(backend="aot_eager")  # inductor's code generation takes most of a minute on 2 cores
    checks = assert_compiled_matches(model, PADDED, names=("blocks.0.hook_attn_out",))
    assert checks[0].difference.holds and model.compile_options.backend == "aot_eager"


# ------------------------------------------------------------------ strategies and tolerances
@pytest.fixture(scope="module")
def gpt2_with_tokenizer():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50257, n_positions=64)).eval()
    return HookedTransformer.from_pretrained_no_processing(hf_model=hf, tokenizer=gpt2_tokenizer())


@settings(max_examples=examples(6))
@given(data=st.data(), bos=st.none() | st.booleans(), left_padding=st.booleans())
def test_token_batches_are_left_padded_real_tokens(gpt2_with_tokenizer, data, bos, left_padding):
    model = gpt2_with_tokenizer
    batch = data.draw(fst.token_batches(model, max_batch=4, min_length=2, max_length=7, left_padding=left_padding,
                                        bos=bos))
    tokens, mask = batch.tokens, batch.attention_mask
    assert tokens.shape == mask.shape and 1 <= tokens.shape[0] <= 4 and 2 <= tokens.shape[1] <= 7
    assert bool((tokens >= 0).all() and (tokens < len(model.tokenizer)).all())
    assert bool((mask.diff(dim=1) >= 0).all()) and bool(mask[:, -1].all())  # zeros only on the left
    if not left_padding:
        assert bool(mask.all())
    first = torch.stack([row[0, 0] for row in batch.rows])
    if bos:
        assert bool((first == model.tokenizer.bos_token_id).all())


@settings(max_examples=examples(6))
@given(data=st.data())
def test_text_batches_decode_back_to_their_text(gpt2_with_tokenizer, data):
    model = gpt2_with_tokenizer
    batch = data.draw(fst.text_batches(model, max_batch=3, max_length=64, bos=False))
    for text, row in zip(batch.text, batch.rows):
        assert model.tokenizer.decode(row[0]) == text  # GPT-2's byte-level BPE is lossless


def test_hook_sets_and_ablations_name_real_hooks(gpt2_with_tokenizer):
    model = gpt2_with_tokenizer

    @settings(max_examples=examples(6))
    @given(names=fst.hook_sets(model, max_size=3), ablate=fst.ablations(model),
           gen=fst.generation_settings(5, sampling=True))
    def drawn(names, ablate, gen):
        assert 1 <= len(names) <= 3 and set(names) <= set(model.hook_dict)
        assert ablate in {"blocks.0.hook_attn_out", "blocks.0.hook_mlp_out"}
        assert 1 <= gen.max_new_tokens <= 5 and gen.do_sample
        out = model.generate(PADDED.tokens[:1, :3], verbose=False, stop_at_eos=False, return_type="tokens",
                             **gen.kwargs())
        assert out.shape == (1, 3 + gen.max_new_tokens)
    drawn()


def test_tolerance_follows_dtype_precision_and_depth():
    assert tolerance(torch.float32, 2) == pytest.approx(16 * 2**-23 * 3)
    assert tolerance(torch.bfloat16, 29) == pytest.approx(16 * 2**-7 * 30)
    assert tolerance(torch.float16, 1) == pytest.approx(16 * 2**-10 * 2)
    reference = torch.full((4,), 3.0)  # values of order 3 allow three times as much
    assert tolerance(torch.float32, 2, reference) == pytest.approx(3 * tolerance(torch.float32, 2))
    with pytest.raises(ValueError, match="floating-point"):
        tolerance(torch.int64, 2)


def test_readme_states_the_tolerances():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for depth in (2, 30):
        for dtype, atol in tolerance_table(depth).items():
            assert f"{atol:.2g}" in readme, (dtype, depth, f"{atol:.2g}")


def test_bad_inputs_are_refused(reference):
    model = load(reference, False)
    with pytest.raises(ValueError, match="left padding"):
        assert_matches_hf(model, reference, torch.tensor([[3, 4]]), torch.tensor([[1, 0]]))
    with pytest.raises(TypeError, match="TokenBatch or an integer tensor"):
        assert_matches_hf(model, reference, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="carries its own attention_mask"):
        assert_matches_hf(model, reference, PADDED, PADDED.attention_mask)
    with pytest.raises(ValueError, match="hook_attn_out or hook_mlp_out"):
        assert_hooks_consistent(model, PADDED, ablate="blocks.0.attn.hook_q")
    assert not math.isnan(assert_matches_hf(model, reference, PADDED)[0].worst)
