"""Round trips through safetensors: a processed model (save_pretrained / from_pretrained(folder)) and an
ActivationCache (cache.save / ActivationCache.load). References: the saved model itself (outputs and
every parameter bit for bit) and the HF model's own log-probabilities. (The tokenizer's round trip is
checked in tests/test_store.py, whose model is loaded from a saved folder.)"""
from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from models import ModelSpec, build_hf_model

from fxhook import ActivationCache, HookedTransformer

TOKENS = torch.tensor([[0, 5, 17, 3, 42, 8, 91, 2], [0, 60, 4, 4, 9, 33, 1, 70]])
SPECS = {  # GPT-2 tied with biases (fold_ln creates a b_U the HF class has no place for), Llama GQA tied
    "gpt2": ModelSpec("gpt2", 2, 4, 4, 8, 40, True, True, 3),
    "llama": ModelSpec("llama", 2, 4, 2, 8, 40, False, True, 4),
}
pytestmark = pytest.mark.filterwarnings("ignore:no tokenizer could be loaded")


def hf_log_probs(hf, tokens=TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return hf(tokens).logits.log_softmax(-1)


@pytest.fixture(scope="module", params=sorted(SPECS))
def processed(request, tmp_path_factory):
    """(HF model, processed HookedTransformer, folder it was saved to)."""
    hf = build_hf_model(SPECS[request.param])
    model = HookedTransformer.from_pretrained(request.param, hf_model=hf)
    folder = tmp_path_factory.mktemp(f"saved_{request.param}")
    model.save_pretrained(folder)
    return hf, model, folder


def test_processed_model_round_trips_exactly(processed):
    hf, model, folder = processed
    loaded = HookedTransformer.from_pretrained(folder, device="cpu")
    saved_params = dict(model.hf_model.named_parameters())
    loaded_params = dict(loaded.hf_model.named_parameters())
    assert sorted(saved_params) == sorted(loaded_params)
    for name, value in saved_params.items():
        assert torch.equal(value, loaded_params[name]), name
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS), model(TOKENS))
        _, cache = model.run_with_cache(TOKENS)
        _, loaded_cache = loaded.run_with_cache(TOKENS)
    assert list(cache) == list(loaded_cache)
    for name in cache:
        assert torch.equal(cache[name], loaded_cache[name]), name
    assert loaded.cfg.normalization_type == model.cfg.normalization_type != "LN"  # folded: LNPre / RMSPre
    assert loaded.cfg.layer_norm_folding
    # independent reference: the processed model's log-probabilities are the HF model's
    torch.testing.assert_close(loaded(TOKENS).log_softmax(-1), hf_log_probs(hf), atol=1e-4, rtol=0)


def test_saved_folder_records_what_was_done(processed):
    _, _, folder = processed
    info = json.loads((folder / "fxhook.json").read_text())
    assert info["processing"] == dict(fold_ln=True, center_writing_weights=True, center_unembed=True,
                                      fold_value_biases=True, refactor_factored_attn_matrices=False)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False  # fold_ln untied


def test_processed_folder_is_never_silently_unprocessed(processed):
    _, model, folder = processed
    with pytest.raises(ValueError, match="already processed.*cannot be undone"):
        HookedTransformer.from_pretrained_no_processing(folder)
    with pytest.raises(ValueError, match="center_unembed=False"):
        HookedTransformer.from_pretrained(folder, center_unembed=False)


def test_unprocessed_model_saves_and_processes_on_load(tmp_path):
    hf = build_hf_model(SPECS["gpt2"])
    raw = HookedTransformer.from_pretrained_no_processing("gpt2", hf_model=hf)
    raw.save_pretrained(tmp_path)
    loaded_raw = HookedTransformer.from_pretrained_no_processing(tmp_path, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(loaded_raw(TOKENS), hf(TOKENS).logits, atol=1e-5, rtol=0)
    loaded = HookedTransformer.from_pretrained(tmp_path, device="cpu")
    assert loaded.cfg.layer_norm_folding
    torch.testing.assert_close(loaded(TOKENS).log_softmax(-1), hf_log_probs(hf), atol=1e-4, rtol=0)


# ------------------------------------------------------------------ ActivationCache
@pytest.fixture(scope="module")
def small_model():
    return HookedTransformer.from_pretrained("llama", hf_model=build_hf_model(SPECS["llama"]))


def assert_same_cache(a: ActivationCache, b: ActivationCache) -> None:
    assert list(a) == list(b)
    assert a.has_batch_dim == b.has_batch_dim
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_cache_round_trips_exactly(small_model, tmp_path):
    _, cache = small_model.run_with_cache(TOKENS)
    cache.save(tmp_path / "cache.safetensors")
    loaded = ActivationCache.load(tmp_path / "cache.safetensors", model=small_model)
    assert_same_cache(cache, loaded)
    assert loaded.model is small_model
    # the analysis methods work on the loaded cache as on the original
    torch.testing.assert_close(loaded.accumulated_resid(), cache.accumulated_resid(), atol=0, rtol=0)


def test_cache_without_batch_dim_and_with_gradients_round_trips(small_model, tmp_path):
    _, cache = small_model.run_with_cache(TOKENS[:1], names_filter=lambda n: "resid" in n, incl_bwd=True,
                                          return_type="loss")
    assert any(name.endswith("_grad") for name in cache)
    cache.remove_batch_dim()
    cache.save(tmp_path / "cache.safetensors")
    assert_same_cache(cache, ActivationCache.load(tmp_path / "cache.safetensors", model=small_model))


def test_cache_from_another_model_is_refused(small_model, tmp_path):
    _, cache = small_model.run_with_cache(TOKENS, names_filter="blocks.0.hook_resid_pre")
    cache.save(tmp_path / "cache.safetensors")
    # load reads only the model's config: a stand-in whose config differs in one field (no capture needed)
    other = SimpleNamespace(cfg=dataclasses.replace(small_model.cfg, d_mlp=small_model.cfg.d_mlp + 1))
    with pytest.raises(ValueError, match="load it with the model that made it"):
        ActivationCache.load(tmp_path / "cache.safetensors", model=other)
