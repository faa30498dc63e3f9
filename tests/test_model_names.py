"""TransformerLens's official model names and aliases resolve to the checkpoints TransformerLens 3.9 maps
them to; `from_pretrained` takes them, from the local hub cache when offline."""
from __future__ import annotations

import warnings

import pytest
import torch

from fxhook.runtime.model_names import ALIASES, REPOSITORIES, official_repository

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformer_lens.loading_from_pretrained as tl_loading

# TransformerLens lists these too, but they are no causal language models (encoders, speech, T5) or
# models fxhook has no adapter family for yet
NOT_CAUSAL = ("google-bert/", "google-t5/", "facebook/wav2vec2", "facebook/hubert", "google/medgemma",
              "google/gemma-3-4b", "google/gemma-3-12b", "google/gemma-3-27b", "Qwen/Qwen-", "allenai/Olmo-3",
              "swiss-ai/", "llama-", "ArthurConmy/", "Baidicoot/")


def test_every_alias_resolves_where_transformer_lens_resolves_it():
    wrong = {}
    for repo, aliases in tl_loading.MODEL_ALIASES.items():
        if repo.startswith(NOT_CAUSAL):
            continue
        for alias in [repo, *aliases]:
            if official_repository(alias) != repo:
                wrong[alias] = (official_repository(alias), repo)
    assert not wrong, wrong


def test_the_official_causal_names_are_covered():
    official = [n for n in tl_loading.OFFICIAL_MODEL_NAMES if not n.startswith(NOT_CAUSAL)]
    missing = [n for n in official if official_repository(n) != n]
    assert not missing
    assert set(REPOSITORIES) <= set(tl_loading.OFFICIAL_MODEL_NAMES)  # nothing invented
    assert all(target in REPOSITORIES for target in ALIASES.values())


@pytest.mark.parametrize("name", ["./my-model", "someone/else", "not-a-model-name"])
def test_other_names_pass_through(name):
    assert official_repository(name) is None


def test_from_pretrained_takes_an_alias_from_a_local_hub_cache(tmp_path):
    """A folder shaped like the hub cache (models--ORG--NAME/snapshots/REV, refs/main), no network."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from fxhook import HookedTransformer
    from fxhook.models_offline import gpt2_tokenizer

    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                          intermediate_size=64, vocab_size=50257, max_position_embeddings=64)).eval()
    repo = tmp_path / "models--EleutherAI--pythia-70m"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    hf.save_pretrained(snapshot)
    gpt2_tokenizer().save_pretrained(snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123456789abcdef")
    model = HookedTransformer.from_pretrained_no_processing("pythia-70m", cache_dir=str(tmp_path))
    tokens = model.to_tokens("Hello world")
    torch.testing.assert_close(model(tokens), hf(tokens).logits, rtol=1e-4, atol=1e-4)
    assert model.cfg.original_architecture == "GPTNeoXForCausalLM"


def test_transformer_lens_own_checkpoint_loads_by_its_official_name_from_the_local_cache(tmp_path):
    """"attn-only-2l" is NeelNanda/Attn_Only_2L512W_C4_Code, a TransformerLens-format repository (config.json of
    TL fields, model_final.pth): its snapshot in a hub-shaped cache builds the native model with TL's outputs."""
    import json

    from transformer_lens import HookedTransformer as TLHookedTransformer

    from fxhook import HookedTransformer
    from fxhook.runtime.tl_checkpoint import tl_config_from_json

    neel = dict(d_model=16, n_layers=2, d_head=4, n_heads=4, n_ctx=32, d_vocab=60, act_fn="gelu_new", attn_only=True,
                normalization="LN", shortformer_pos=False, tokenizer_name=None, lr=1e-3)  # Neel's spellings
    theirs = TLHookedTransformer(dict(tl_config_from_json(neel), device="cpu", seed=3))
    with torch.no_grad():
        for name, param in theirs.named_parameters():  # norms too: a unit weight would hide a misread one
            param.add_(0.1 * torch.randn_like(param))
    repo = tmp_path / "models--NeelNanda--Attn_Only_2L512W_C4_Code"
    snapshot = repo / "snapshots" / "feedc0de"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps(neel))
    torch.save(theirs.state_dict(), snapshot / "model_final.pth")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("feedc0de")

    ours = HookedTransformer.from_pretrained_no_processing("attn-only-2l", cache_dir=str(tmp_path))
    tokens = torch.randint(0, 60, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), theirs(tokens), atol=1e-5, rtol=1e-5)
    assert type(ours.hf_model).__name__ == "TLNativeForCausalLM"


def test_transformer_lens_own_checkpoints_not_in_the_cache_are_refused_with_what_to_do(tmp_path):
    from fxhook import HookedTransformer

    with pytest.raises(OSError, match=r"NeelNanda/Attn_Only_2L512W_C4_Code, which is not in the local HF cache.*"
                                      r"model_final.pth"):
        HookedTransformer.from_pretrained("attn-only-2l", cache_dir=str(tmp_path))
