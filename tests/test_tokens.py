"""Tokenizer helpers: TransformerLens's prepend_bos / padding_side semantics, on four kinds of tokenizer.

gpt2      GPT-2's BPE: does not add BOS itself; BOS == EOS == pad (the hard case for masks)
gpt2_bos  the same with add_bos_token=True: adds BOS itself, BOS == pad
word      a small word-level tokenizer that does not add BOS; BOS != pad (like SmolLM2's)
word_bos  the same with a post-processor that adds BOS itself (like Llama's)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer, LlamaConfig, LlamaForCausalLM, \
    PreTrainedTokenizerFast

from fxhook import HookedTransformer
from fxhook.models_offline import gpt2_tokenizer

WORDS = "<pad> <s> </s> <unk> the cat sat on mat a dog ran and . hello world big small red".split()
PROMPTS = {
    "gpt2": ["The cat sat on the mat and the dog ran", "Hello", "A big red dog"],
    "word": ["the cat sat on the mat and the dog ran", "hello", "a big red dog"],
}
KINDS = ("gpt2", "gpt2_bos", "word", "word_bos")


def word_tokenizer(adds_bos: bool) -> PreTrainedTokenizerFast:
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if adds_bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                          special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt2_tokenizer")
    gpt2_tokenizer(folder)
    return folder


def make_tokenizer(kind: str, gpt2_dir):
    if kind == "gpt2":
        return GPT2Tokenizer.from_pretrained(gpt2_dir)
    if kind == "gpt2_bos":
        return GPT2Tokenizer.from_pretrained(gpt2_dir, add_bos_token=True)
    return word_tokenizer(adds_bos=kind == "word_bos")


@pytest.fixture(scope="module")
def models_by_vocab():
    """One tiny random model per vocabulary, captured once; tests switch tokenizers with set_tokenizer."""
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50257, n_positions=64)).eval()
    llama = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=48, vocab_size=len(WORDS),
                                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                                         pad_token_id=0)).eval()
    return {"gpt2": HookedTransformer.from_pretrained_no_processing("tiny-gpt2", hf_model=gpt2),
            "word": HookedTransformer.from_pretrained_no_processing("tiny-llama", hf_model=llama)}


@pytest.fixture(params=KINDS)
def kind(request):
    return request.param


@pytest.fixture
def model(kind, models_by_vocab, gpt2_dir):
    m = models_by_vocab[kind.split("_")[0]]
    m.cfg.default_prepend_bos = True
    m.set_tokenizer(make_tokenizer(kind, gpt2_dir), default_padding_side="right")
    return m


def prompts_for(kind):
    return PROMPTS[kind.split("_")[0]]


# ------------------------------------------------------------------ set_tokenizer
def test_set_tokenizer_detects_who_adds_bos(model, kind):
    assert model.cfg.tokenizer_prepends_bos is kind.endswith("_bos")
    tok = model.tokenizer
    assert tok.pad_token is not None  # GPT-2 has none: set to EOS
    assert tok.padding_side == "right" and model.cfg.default_padding_side == "right"
    if kind.startswith("gpt2"):
        assert tok.pad_token_id == tok.bos_token_id == tok.eos_token_id


@pytest.mark.parametrize("saved", [True, False])
@pytest.mark.parametrize("adds_bos", [False, True])
def test_the_kept_tokenizer_encodes_as_transformer_lens_s(models_by_vocab, gpt2_dir, adds_bos, saved, tmp_path):
    """The model keeps the tokenizer TransformerLens keeps: reloaded with add_bos_token=True from files saved
    by save_pretrained (as a hub checkpoint holds them), so it prepends BOS; from bare vocab.json +
    merges.txt, which transformers 5 cannot rebuild with BOS, the tokenizer as given."""
    import transformer_lens

    folder = gpt2_dir
    if saved:
        GPT2Tokenizer.from_pretrained(gpt2_dir).save_pretrained(tmp_path)
        folder = tmp_path
    ours = models_by_vocab["gpt2"]
    ours.set_tokenizer(GPT2Tokenizer.from_pretrained(folder, add_bos_token=adds_bos))
    tl_cfg = transformer_lens.HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=16, d_head=4, n_heads=2,
                                                      d_vocab=50257, attn_only=True, act_fn="gelu")
    theirs = transformer_lens.HookedTransformer(
        tl_cfg, tokenizer=GPT2Tokenizer.from_pretrained(folder, add_bos_token=adds_bos))
    assert ours.cfg.tokenizer_prepends_bos == theirs.cfg.tokenizer_prepends_bos == (saved or adds_bos)
    for text in PROMPTS["gpt2"]:
        assert ours.tokenizer.encode(text) == theirs.tokenizer.encode(text)
        assert ours.tokenizer(text)["input_ids"] == theirs.tokenizer(text)["input_ids"]
        assert ours.to_tokens(text).tolist() == theirs.to_tokens(text).tolist()


def test_set_tokenizer_validates(models_by_vocab, gpt2_dir):
    m = models_by_vocab["gpt2"]
    with pytest.raises(TypeError, match="Hugging Face tokenizer"):
        m.set_tokenizer("gpt2")
    with pytest.raises(ValueError, match="default_padding_side"):
        m.set_tokenizer(make_tokenizer("gpt2", gpt2_dir), default_padding_side="middle")
    tok = make_tokenizer("gpt2", gpt2_dir)
    tok.padding_side = "left"
    m.set_tokenizer(tok)  # no side given: the tokenizer's own is kept
    assert m.cfg.default_padding_side == "left" and m.to_tokens(["a b c", "a"])[1, 0] == tok.pad_token_id


def test_text_without_tokenizer_is_a_clear_error():
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32)).eval()
    m = HookedTransformer.from_pretrained_no_processing(hf_model=hf)
    assert m.tokenizer is None
    for call in (lambda: m.to_tokens("hi"), lambda: m("hi"), lambda: m.to_string([1, 2]),
                 lambda: m.to_str_tokens("hi"), lambda: m.to_single_token("hi")):
        with pytest.raises(ValueError, match="needs a tokenizer"):
            call()
    tokens = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(m(tokens), hf(tokens).logits, atol=1e-5, rtol=0)


# ------------------------------------------------------------------ to_tokens: prepend_bos
def test_prepend_bos_adds_exactly_one_bos(model, kind):
    text = prompts_for(kind)[0]
    bos = model.tokenizer.bos_token_id
    with_bos = model.to_tokens(text, prepend_bos=True)[0]
    without = model.to_tokens(text, prepend_bos=False)[0]
    assert with_bos[0] == bos and int((with_bos == bos).sum()) == 1
    assert without[0] != bos and int((without == bos).sum()) == 0
    assert torch.equal(with_bos[1:], without)
    assert torch.equal(model.to_tokens(text)[0], with_bos)  # default: cfg.default_prepend_bos (True)
    model.cfg.default_prepend_bos = False
    assert torch.equal(model.to_tokens(text)[0], without)
    assert torch.equal(model.to_tokens(text, prepend_bos=True)[0], with_bos)  # an explicit value wins


def test_to_tokens_shape_dtype_and_device(model, kind):
    tokens = model.to_tokens(prompts_for(kind)[1])
    assert tokens.dim() == 2 and tokens.shape[0] == 1 and tokens.dtype == torch.long
    assert str(tokens.device) == str(torch.device(model.cfg.device))
    with pytest.raises(TypeError):
        model.to_tokens([1, 2, 3])


def test_truncation_to_n_ctx(models_by_vocab, gpt2_dir):
    m = models_by_vocab["gpt2"]
    m.set_tokenizer(make_tokenizer("gpt2", gpt2_dir), default_padding_side="right")
    long_text = " the cat" * 100  # 200 tokens > n_ctx 64
    assert m.to_tokens(long_text).shape[1] == m.cfg.n_ctx
    assert m.to_tokens(long_text, truncate=False).shape[1] == 201
    assert m(long_text).shape[1] == m.cfg.n_ctx
    m.set_tokenizer(make_tokenizer("gpt2_bos", gpt2_dir))
    assert m.to_tokens(long_text, prepend_bos=False).shape[1] == m.cfg.n_ctx  # BOS dropped after truncating


# ------------------------------------------------------------------ padding
@pytest.mark.parametrize("prepend_bos", [True, False])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_side_places_the_padding(model, kind, side, prepend_bos):
    prompts = prompts_for(kind)
    batch = model.to_tokens(prompts, prepend_bos=prepend_bos, padding_side=side)
    pad = model.tokenizer.pad_token_id
    for row, prompt in zip(batch, prompts):
        alone = model.to_tokens(prompt, prepend_bos=prepend_bos)[0]
        n_pad = batch.shape[1] - len(alone)
        real = row[n_pad:] if side == "left" else row[:len(alone)]
        padding = row[:n_pad] if side == "left" else row[len(alone):]
        assert torch.equal(real, alone)
        assert bool((padding == pad).all())
    assert model.tokenizer.padding_side == "right"  # a per-call side does not stick


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_left_padded_batch_gives_each_prompts_last_logits(model, kind, prepend_bos):
    prompts = prompts_for(kind)
    with torch.no_grad():
        batch_logits = model(prompts, prepend_bos=prepend_bos, padding_side="left")[:, -1]
        tokens = model.to_tokens(prompts, prepend_bos=prepend_bos, padding_side="left")
        from_tokens = model(tokens, prepend_bos=prepend_bos, padding_side="left")[:, -1]  # mask from the tokens
        for i, prompt in enumerate(prompts):
            alone = model(prompt, prepend_bos=prepend_bos)[0, -1]
            torch.testing.assert_close(batch_logits[i], alone, atol=1e-5, rtol=0)
            torch.testing.assert_close(from_tokens[i], alone, atol=1e-5, rtol=0)


def test_default_padding_side_left_is_used_by_forward(model, kind):
    model.set_tokenizer(model.tokenizer, default_padding_side="left")
    prompts = prompts_for(kind)
    with torch.no_grad():
        batch_logits = model(prompts)[:, -1]
        for i, prompt in enumerate(prompts):
            torch.testing.assert_close(batch_logits[i], model(prompt)[0, -1], atol=1e-5, rtol=0)


def test_right_padding_keeps_real_positions(model, kind):
    prompts = prompts_for(kind)
    with torch.no_grad():
        batch_logits = model(prompts, padding_side="right")
        for i, prompt in enumerate(prompts):
            alone = model(prompt)[0]
            torch.testing.assert_close(batch_logits[i, :len(alone)], alone, atol=1e-5, rtol=0)


def test_derived_mask_treats_a_pad_like_bos_as_real(models_by_vocab, gpt2_dir):
    m = models_by_vocab["gpt2"]
    m.set_tokenizer(make_tokenizer("gpt2", gpt2_dir), default_padding_side="left")
    eot = m.tokenizer.eos_token_id
    tokens = torch.tensor([[eot, eot, eot, 40, 41], [eot, 50, 51, 52, 53]])
    assert m.default_attention_mask(tokens, prepend_bos=True).tolist() == [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert m.default_attention_mask(tokens, prepend_bos=False).tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 1, 1]]
    assert m.default_attention_mask(tokens, padding_side="right").tolist() == [[1] * 5] * 2


def test_bad_padding_side(model, kind):
    with pytest.raises(ValueError, match="padding_side"):
        model.to_tokens(prompts_for(kind), padding_side="top")


# ------------------------------------------------------------------ tokens -> strings
def test_to_str_tokens(model, kind):
    text = prompts_for(kind)[0]
    bos = model.tokenizer.bos_token
    with_bos = model.to_str_tokens(text)
    without = model.to_str_tokens(text, prepend_bos=False)
    assert with_bos[0] == bos and with_bos[1:] == without
    tokens = model.to_tokens(text, prepend_bos=False)
    assert model.to_str_tokens(tokens) == without  # [1, pos]
    assert model.to_str_tokens(tokens[0]) == without  # [pos]
    assert model.to_str_tokens(tokens[0].cpu().numpy()) == without
    assert model.to_str_tokens(tokens[0].tolist()) == without
    assert model.to_str_tokens([text, text], prepend_bos=False) == [without, without]
    assert model.to_str_tokens(tokens[0, 0]) == without[:1]  # a single token
    if kind.startswith("gpt2"):
        assert "".join(without) == text
    else:
        assert without == text.split()
    with pytest.raises(ValueError, match="shape"):
        model.to_str_tokens(torch.zeros(2, 3, dtype=torch.long))


def test_to_string(model, kind):
    text = prompts_for(kind)[0]
    tokens = model.to_tokens(text, prepend_bos=False)
    decoded = model.to_string(tokens[0])
    assert isinstance(decoded, str)
    assert decoded == (text if kind.startswith("gpt2") else " ".join(text.split()))
    assert model.to_string(tokens) == [decoded]
    assert model.to_string(tokens[0].tolist()) == decoded
    assert model.to_string(np.array(tokens[0].tolist())) == decoded
    with pytest.raises(ValueError, match="rank"):
        model.to_string(torch.zeros(1, 1, 2, dtype=torch.long))


# ------------------------------------------------------------------ single tokens and positions
def test_to_single_token(model, kind):
    word = " Paris" if kind.startswith("gpt2") else "dog"
    token = model.to_single_token(word)
    assert isinstance(token, int)
    assert model.to_single_str_token(token) == word
    assert model.to_single_str_token(torch.tensor(token)) == word
    with pytest.raises(ValueError, match="not a single token"):
        model.to_single_token(" Paris is" if kind.startswith("gpt2") else "big dog")
    with pytest.raises(TypeError):
        model.to_single_str_token("dog")


def test_get_token_position(model, kind):
    if kind.startswith("gpt2"):
        text, word, first, last = "The cat and the dog and the bird", " the", 3, 6
    else:
        text, word, first, last = "the cat and the dog and the mat", "the", 0, 6
    assert model.get_token_position(word, text, prepend_bos=False) == first
    assert model.get_token_position(word, text, mode="last", prepend_bos=False) == last
    assert model.get_token_position(word, text) == first + 1  # the BOS shifts positions by one
    assert model.get_token_position(word, text, mode="last") == last + 1
    tokens = model.to_tokens(text, prepend_bos=False)
    token_id = model.to_single_token(word)
    assert model.get_token_position(token_id, tokens) == first  # [1, pos]
    assert model.get_token_position(torch.tensor(token_id), tokens[0], mode="last") == last  # [pos]
    with pytest.raises(ValueError, match="does not occur"):
        model.get_token_position(" Paris" if kind.startswith("gpt2") else "world", text)
    with pytest.raises(ValueError, match="mode"):
        model.get_token_position(word, text, mode="middle")
    with pytest.raises(ValueError, match=r"\[1, pos\]"):
        model.get_token_position(token_id, tokens.repeat(2, 1))


# ------------------------------------------------------------------ generation with a tokenizer
def test_generation_with_a_tokenizer_is_the_same_with_and_without_the_cache(model, kind):
    """Text prompts, left-padded as a batch: the KV cache changes nothing, for learned absolute positions
    (GPT-2) as for rotary ones. (TransformerLens 3.9 counts absolute positions differently with and
    without a tokenizer; fxhook takes positions from the attention mask either way.)"""
    prompts = prompts_for(kind)
    runs = [model.generate(prompts, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False,
                           padding_side="left", output_logits=True, return_type="tokens", use_past_kv_cache=c)
            for c in (True, False)]
    assert runs[0].sequences.tolist() == runs[1].sequences.tolist()
    torch.testing.assert_close(torch.stack(runs[0].logits), torch.stack(runs[1].logits), atol=1e-4, rtol=0)
    for row, prompt in enumerate(prompts):  # each row as the prompt alone
        alone = model.generate(prompt, max_new_tokens=5, do_sample=False, stop_at_eos=False, verbose=False,
                               return_type="tokens")
        assert alone[0, -5:].tolist() == runs[0].sequences[row, -5:].tolist()
