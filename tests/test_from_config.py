"""HookedTransformer(cfg) with no checkpoint: the model a TransformerLens-style config describes (HF's GPT-2
for GPT-2-like configs, fxhook's native TransformerLens model for the rest, Llama-like ones included),
captured as usual, initialised as TransformerLens initialises, and trainable."""
from __future__ import annotations

import contextlib
import math
import time

import pytest
import torch

from fxhook import HookedTransformer, HookedTransformerConfig
from fxhook.from_config import build_from_config, hf_model_from_config

GPT2_STYLE = dict(n_layers=2, d_model=64, n_ctx=16, d_head=16, n_heads=4, d_mlp=256, d_vocab=50,
                  act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard", seed=1,
                  device="cpu")
LLAMA_STYLE = dict(n_layers=2, d_model=64, n_ctx=16, d_head=16, n_heads=4, n_key_value_heads=2, d_mlp=128,
                   d_vocab=50, act_fn="silu", normalization_type="RMS", positional_embedding_type="rotary",
                   gated_mlp=True, rotary_base=5000.0, eps=1e-6, seed=1, device="cpu")
STYLES = {"gpt2": GPT2_STYLE, "llama": LLAMA_STYLE}
BUILT_AS = {"gpt2": "GPT2LMHeadModel", "llama": "TLNativeForCausalLM"}


@contextlib.contextmanager
def one_thread():
    """Tiny models run faster on one thread; two threads spin against each other on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _tokens(seed: int, d_vocab: int = 50, batch: int = 3, length: int = 10) -> torch.Tensor:
    return torch.randint(0, d_vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _expected_hooks(cfg: dict) -> set[str]:
    rotary = cfg["positional_embedding_type"] == "rotary"
    names = {"hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out"}
    if not rotary:
        names.add("hook_pos_embed")
    for layer in range(cfg["n_layers"]):
        p = f"blocks.{layer}."
        names |= {p + n for n in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
                                  "hook_mlp_out", "ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale",
                                  "ln2.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
                                  "attn.hook_z", "attn.hook_attn_scores", "attn.hook_pattern", "mlp.hook_pre",
                                  "mlp.hook_post")}
        if rotary:
            names |= {p + "attn.hook_rot_q", p + "attn.hook_rot_k"}
        if cfg.get("gated_mlp"):
            names.add(p + "mlp.hook_pre_linear")
    return names


# ----------------------------------------------------------- (a) building
@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("as_dict", [True, False])
def test_built_model_runs_with_hooks_cfg_and_its_hf_logits(style, as_dict):
    spec = STYLES[style]
    model = HookedTransformer(dict(spec) if as_dict else HookedTransformerConfig(**spec))
    assert type(model.hf_model).__name__ == BUILT_AS[style]
    assert model.cfg.original_architecture == type(model.hf_model).__name__
    for key, value in spec.items():
        assert getattr(model.cfg, key) == value, key
    assert model.cfg.n_kv_heads == spec.get("n_key_value_heads", spec["n_heads"])
    assert model.cfg.device == "cpu" and model.cfg.dtype == torch.float32
    assert set(model.hook_dict) == _expected_hooks(spec)
    tokens = _tokens(0)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        reference = model.hf_model(tokens).logits
    assert logits.shape == (*tokens.shape, spec["d_vocab"])
    assert (logits - reference).abs().max().item() < 1e-5
    assert cache["blocks.1.attn.hook_k"].shape == (*tokens.shape, model.cfg.n_kv_heads, spec["d_head"])
    assert cache["blocks.0.mlp.hook_post"].shape == (*tokens.shape, spec["d_mlp"])


def test_hf_architecture_follows_the_config():
    gpt2 = hf_model_from_config(dict(GPT2_STYLE, act_fn="relu", eps=1e-4, tie_word_embeddings=True))
    c = gpt2.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_inner, c.n_positions, c.vocab_size) == (2, 64, 4, 256, 16, 50)
    assert (c.activation_function, c.layer_norm_epsilon) == ("relu", 1e-4)
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert c.resid_pdrop == c.embd_pdrop == c.attn_pdrop == 0.0
    llama = hf_model_from_config(LLAMA_STYLE)  # Llama-like: the native model, read back by its modules' shapes
    block = llama.blocks[1]
    assert len(llama.blocks) == 2 and llama.embed.weight.shape == (50, 64) and not hasattr(llama, "pos_embed")
    assert block.attn.q_proj.weight.shape == (4 * 16, 64) and block.attn.k_proj.weight.shape == (2 * 16, 64)
    assert block.mlp.gate_proj.weight.shape == block.mlp.up_proj.weight.shape == (128, 64)
    assert (block.ln1.normalization_type, block.ln1.eps, llama.ln_final.normalization_type) == ("RMS", 1e-6, "RMS")
    c = llama.config
    assert (c.act_fn, c.rotary_base, c.rotary_dim, c.rotary_adjacent_pairs) == ("silu", 5000.0, 16, False)
    assert llama.unembed.weight is not llama.embed.weight
    tied = hf_model_from_config(dict(LLAMA_STYLE, tie_word_embeddings=True))
    assert tied.unembed.weight is tied.embed.weight


def test_dict_gets_transformer_lens_defaults():
    cfg = HookedTransformerConfig.from_dict(dict(n_layers=1, d_model=64, n_ctx=8, d_head=16, d_vocab=10))
    assert (cfg.n_heads, cfg.d_mlp, cfg.act_fn, cfg.init_mode) == (4, 256, "relu", "gpt2")
    assert cfg.initializer_range == pytest.approx(0.8 / 8)
    assert HookedTransformerConfig.from_dict(dict(n_layers=1, d_model=64, n_ctx=8, d_head=16, d_vocab=10,
                                                  init_mode="xavier_normal")).initializer_range == 1.0
    with pytest.raises(ValueError, match="d_vocab"):
        HookedTransformerConfig.from_dict(dict(n_layers=1, d_model=64, n_ctx=8, d_head=16))


@pytest.mark.parametrize("change, message", [
    # every other TransformerLens architecture is built natively (tests/test_native_tl.py); these are refused
    (dict(positional_embedding_type="relative_positional_bias"), "positional_embedding_type='relative_positional_bias'"),
    (dict(final_rms=True), "final_rms"),
    (dict(attention_dir="bidirectional"), "attention_dir"),
    (dict(act_fn="xielu"), "xielu"),
    (dict(normalization_type="RMS", act_fn="solu_ln", gated_mlp=True), "solu_ln"),
])
def test_unsupported_configs_say_what(change, message):
    with pytest.raises(NotImplementedError, match=message.replace("(", r"\(").replace(")", r"\)")):
        HookedTransformer(dict(GPT2_STYLE, **change))


def test_bad_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="act_fn='tanhh'"):
        HookedTransformer(dict(GPT2_STYLE, act_fn="tanhh"))
    with pytest.raises(ValueError, match="init_mode"):
        HookedTransformer(dict(GPT2_STYLE, init_mode="orthogonal"))
    with pytest.raises(NotImplementedError, match="rotary_dim"):
        HookedTransformer(dict(LLAMA_STYLE, rotary_dim=7))  # odd: no pairs to rotate
    with pytest.raises(TypeError, match="n_layer"):
        HookedTransformer(dict(GPT2_STYLE, n_layer=3))  # a typo, not a TransformerLens field
    # TransformerLens options at their "off" values are accepted
    HookedTransformer(dict(GPT2_STYLE, use_attn_scale=True, attn_scale=4.0, attention_dir="causal",
                           n_devices=1, use_local_attn=False, rotary_adjacent_pairs=False,
                           attn_scores_soft_cap=-1.0))


# --------------------------------------------------------- (b) init scales
# Independent of fxhook: each TransformerLens weight as (name, TransformerLens shape, HF tensor),
# read straight from the HF module tree. TransformerLens layouts (HookedTransformer 3.9):
# W_E [d_vocab, d_model], W_pos [n_ctx, d_model], W_Q/W_K/W_V [heads, d_model, d_head] (K/V at kv heads),
# W_O [heads, d_head, d_model], W_in/W_gate [d_model, d_mlp], W_out [d_mlp, d_model], W_U [d_model, d_vocab].
BIG = dict(n_layers=1, d_model=256, n_ctx=64, d_head=32, n_heads=8, d_mlp=1024, d_vocab=500, device="cpu")
BIG_STYLES = {
    "gpt2": dict(BIG, act_fn="gelu_new"),
    "llama": dict(BIG, n_key_value_heads=2, act_fn="silu", normalization_type="RMS",
                  positional_embedding_type="rotary", gated_mlp=True),
}


def _tl_weights(hf, style):
    d, h, dh, m, v, n_ctx = 256, 8, 32, 1024, 500, 64
    if style == "gpt2":
        blk = hf.transformer.h[0]
        qkv = blk.attn.c_attn.weight
        return [("W_E", (v, d), hf.transformer.wte.weight), ("W_pos", (n_ctx, d), hf.transformer.wpe.weight),
                ("W_Q", (h, d, dh), qkv[:, :d]), ("W_K", (h, d, dh), qkv[:, d:2 * d]),
                ("W_V", (h, d, dh), qkv[:, 2 * d:]), ("W_O", (h, dh, d), blk.attn.c_proj.weight),
                ("W_in", (d, m), blk.mlp.c_fc.weight), ("W_out", (m, d), blk.mlp.c_proj.weight),
                ("W_U", (d, v), hf.lm_head.weight)]
    blk = hf.blocks[0]  # the native model (fxhook/native/model.py)
    return [("W_E", (v, d), hf.embed.weight),
            ("W_Q", (h, d, dh), blk.attn.q_proj.weight), ("W_K", (2, d, dh), blk.attn.k_proj.weight),
            ("W_V", (2, d, dh), blk.attn.v_proj.weight), ("W_O", (h, dh, d), blk.attn.o_proj.weight),
            ("W_gate", (d, m), blk.mlp.gate_proj.weight), ("W_in", (d, m), blk.mlp.up_proj.weight),
            ("W_out", (m, d), blk.mlp.out_proj.weight), ("W_U", (d, v), hf.unembed.weight)]


def _tl_fans(shape):
    # transformer_lens.utilities.initialization_utils.calc_fan_in_and_fan_out
    return (shape[0], shape[1]) if len(shape) == 2 else (shape[1], shape[0] * shape[2])


def _documented_std(mode, name, shape, initializer_range):
    fan_in, fan_out = _tl_fans(shape)
    if mode == "gpt2":
        return initializer_range
    if mode.startswith("xavier"):  # bound gain * sqrt(6 / (fan_in + fan_out)) for uniform: same std
        return initializer_range * math.sqrt(2 / (fan_in + fan_out))
    if mode.startswith("kaiming"):  # fan_in mode, ReLU gain sqrt(2); uniform bound gain * sqrt(2) * sqrt(3 / fan_in)
        return initializer_range * math.sqrt(2) / math.sqrt(fan_in)
    # muP, as documented by HookedTransformer._init_weights_muP: input weights 1, output weights 1 / fan_in,
    # everything else 1 / sqrt(fan_in)
    if name in ("W_E", "W_pos"):
        return 1.0
    if name == "W_U":
        return 1 / fan_in
    return 1 / math.sqrt(fan_in)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("mode, initializer_range", [
    ("gpt2", None), ("gpt2", 0.05), ("xavier_uniform", None), ("xavier_normal", None), ("xavier_normal", 0.5),
    ("kaiming_uniform", None), ("kaiming_normal", None), ("kaiming_normal", 2.0), ("muP", None)])
def test_init_mode_gives_documented_std(style, mode, initializer_range):
    spec = dict(BIG_STYLES[style], init_mode=mode, seed=0)
    if initializer_range is not None:
        spec["initializer_range"] = initializer_range
    cfg, hf, _ = build_from_config(spec)  # what HookedTransformer(spec) builds, before capturing it
    # TransformerLens's default: 0.8 / sqrt(d_model) for gpt2 mode, a gain of 1 otherwise
    expected_range = initializer_range if initializer_range is not None else (
        0.8 / math.sqrt(256) if mode == "gpt2" else 1.0)
    assert cfg.initializer_range == pytest.approx(expected_range)
    uniform = mode.endswith("uniform")
    for name, shape, tensor in _tl_weights(hf, style):
        assert tensor.numel() == math.prod(shape), name
        std = _documented_std(mode, name, shape, expected_range)
        t = tensor.detach().double()
        assert t.std().item() == pytest.approx(std, rel=0.04), (name, t.std().item(), std)
        assert abs(t.mean().item()) < 0.05 * std, name
        peak = t.abs().max().item()
        if uniform:
            assert std * math.sqrt(3) * 0.97 < peak <= std * math.sqrt(3) * (1 + 1e-6), name
        else:
            assert peak > 2.5 * std, name  # a normal's tails, not a uniform's edge
    for pname, p in hf.named_parameters():
        if pname.endswith("bias"):
            assert not p.any(), pname
        elif "norm" in pname or ".ln_" in pname or pname.split(".")[-2].startswith("ln"):
            assert (p == 1).all(), pname


def test_tied_embedding_is_drawn_once_as_w_e():
    model = HookedTransformer(dict(BIG_STYLES["gpt2"], tie_word_embeddings=True, init_mode="kaiming_normal",
                                   seed=0))
    hf = model.hf_model
    assert hf.lm_head.weight is hf.transformer.wte.weight
    assert hf.lm_head.weight.std().item() == pytest.approx(math.sqrt(2 / 500), rel=0.04)  # W_E's fan_in


# ---------------------------------------------------------------- (c) seeds
def _weights(spec):
    _, hf, _ = build_from_config(spec)
    return {n: p.detach().clone() for n, p in hf.named_parameters()}


@pytest.mark.parametrize("style", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["gpt2", "xavier_uniform", "kaiming_normal", "muP"])
def test_same_seed_same_weights_different_seed_different(style, mode):
    a = _weights(dict(STYLES[style], init_mode=mode, seed=7))
    torch.manual_seed(12345)  # global state in between must not matter
    torch.randn(100)
    b = _weights(dict(STYLES[style], init_mode=mode, seed=7))
    c = _weights(dict(STYLES[style], init_mode=mode, seed=8))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[n], b[n]) for n in a)
    matrices = [n for n in a if n.endswith("weight") and a[n].dim() == 2]
    assert all(not torch.equal(a[n], c[n]) for n in matrices)


def test_seeded_models_compute_the_same_logits():
    tokens = _tokens(4)
    with torch.no_grad():
        first = HookedTransformer(dict(LLAMA_STYLE, seed=3))(tokens)
        again = HookedTransformer(dict(LLAMA_STYLE, seed=3))(tokens)
    assert torch.equal(first, again)


# ------------------------------------------------------------- (d) training
@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_gradients_reach_every_parameter(style):
    model = HookedTransformer(STYLES[style])
    params = dict(model.named_parameters())
    assert {id(p) for p in params.values()} == {id(p) for p in model.hf_model.parameters()}
    loss = model(_tokens(3), return_type="loss")
    assert loss.ndim == 0 and loss.requires_grad
    loss.backward()
    for name, p in params.items():
        assert p.grad is not None, name
        assert p.grad.abs().max().item() > 0, name
    # and the loss is the next-token cross entropy of the model's own logits, computed by hand
    tokens = _tokens(3)
    with torch.no_grad():
        logits = model.hf_model(tokens).logits
        by_hand = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        assert model(tokens, return_type="loss").item() == pytest.approx(by_hand.item(), abs=1e-5)


PAD, SEP, MAX_LEN = 0, 1, 6


def _reversal_batch(generator: torch.Generator, batch: int = 64) -> torch.Tensor:
    """[pads] a_1..a_n SEP a_n..a_1 [pads], n in 4..6, content tokens 2..15: always 13 tokens."""
    rows = []
    for _ in range(batch):
        n = int(torch.randint(4, MAX_LEN + 1, (1,), generator=generator))
        a = torch.randint(2, 16, (n,), generator=generator).tolist()
        rows.append([PAD] * (MAX_LEN - n) + a + [SEP] + a[::-1] + [PAD] * (MAX_LEN - n))
    return torch.tensor(rows)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_training_learns_to_reverse(style):
    start = time.perf_counter()
    spec = dict(STYLES[style], d_vocab=16, d_mlp=256, seed=0)
    with one_thread():
        model = HookedTransformer(spec)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
        generator = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(150):
            tokens = _reversal_batch(generator)
            per_token = model(tokens, return_type="loss", loss_per_token=True)  # [batch, 12]
            loss = per_token[:, MAX_LEN:].mean()  # predictions of the reversed half (and its padding)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    initial, final = losses[0], sum(losses[-10:]) / 10
    assert initial > 2.0  # about log(16) at initialisation
    assert final < 0.5 * initial, (initial, final)
    elapsed = time.perf_counter() - start
    assert elapsed < 90, f"training took {elapsed:.1f}s"


def test_transformer_lens_config_object_is_accepted():
    pytest.importorskip("transformer_lens")
    import warnings

    from transformer_lens import HookedTransformerConfig as TLConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl_cfg = TLConfig(**dict(LLAMA_STYLE, init_mode="xavier_normal", seed=4))
    cfg, hf, _ = build_from_config(tl_cfg)  # its derived fields (attn_scale, n_params, ...) are all "off" values
    assert type(hf).__name__ == "TLNativeForCausalLM"
    assert (cfg.init_mode, cfg.seed, cfg.initializer_range, cfg.n_kv_heads) == ("xavier_normal", 4, 1.0, 2)
    assert build_from_config(dict(LLAMA_STYLE))[0].n_params == tl_cfg.n_params  # TransformerLens's count


def test_same_dict_in_transformer_lens_gives_the_same_model():
    """TransformerLens's HookedTransformer(cfg_dict) with our weights computes our logits."""
    pytest.importorskip("transformer_lens")
    import warnings

    from transformer_lens import HookedTransformer as TLHookedTransformer
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    def native_weights(ours, theirs):  # our weight views, under TransformerLens's state-dict names
        live = ours.live_weights()
        return {key: live[key.replace("._W_", ".W_").replace("._b_", ".b_")]
                for key in theirs.state_dict() if key.replace("._W_", ".W_").replace("._b_", ".b_") in live}

    for spec, convert in ((GPT2_STYLE, lambda ours, theirs: convert_gpt2_weights(ours.hf_model, theirs.cfg)),
                          (LLAMA_STYLE, native_weights)):
        ours = HookedTransformer(dict(spec))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = TLHookedTransformer(dict(spec))
        state = {k: v.detach().clone() for k, v in convert(ours, theirs).items()}
        missing = set(theirs.load_state_dict(state, strict=False).missing_keys)
        buffers = ("rotary_sin", "rotary_cos", ".mask", ".IGNORE")  # GPT-2 has no b_U: TransformerLens's stays 0
        assert all(k.endswith(buffers) or (spec is GPT2_STYLE and k == "unembed.b_U") for k in missing), missing
        tokens = _tokens(5)
        with torch.no_grad():
            assert (ours(tokens) - theirs(tokens)).abs().max().item() < 1e-5
