"""fxhook.utils against TransformerLens 3.9's utils: the same names give the same results."""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, strategies as st

from fxhook import utils
from fxhook.factored_matrix import FactoredMatrix
from fxhook.models_offline import gpt2_tokenizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformer_lens.utils as tl_utils
    from transformer_lens import FactoredMatrix as TLFactoredMatrix


def printed(fn, *args, **kwargs) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn(*args, **kwargs)
    return out.getvalue()


shapes = st.lists(st.integers(1, 4), min_size=1, max_size=4)


@given(shapes, st.integers(0, 2 ** 16), st.integers(1, 4))
def test_tensor_helpers_equal_transformer_lens(shape, seed, n):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    assert np.array_equal(utils.to_numpy(x), tl_utils.to_numpy(x))
    assert torch.equal(utils.get_corner(x, n), tl_utils.get_corner(x, n))
    assert torch.equal(utils.remove_batch_dim(x), tl_utils.remove_batch_dim(x))
    for dim in range(x.ndim):
        for reverse in (False, True):
            assert torch.equal(utils.get_cumsum_along_dim(x, dim, reverse), tl_utils.get_cumsum_along_dim(x, dim, reverse))
    if x.ndim >= 2:
        assert torch.equal(utils.transpose(x), tl_utils.transpose(x))
    matrix = x.reshape(-1, 1) @ x.reshape(1, -1)
    for m in (matrix, matrix.tril(), x.reshape(1, -1)):
        assert utils.is_square(m) == tl_utils.is_square(m)
        assert utils.is_lower_triangular(m) == tl_utils.is_lower_triangular(m)


def test_to_numpy_of_other_inputs_and_its_error():
    for value in ([1, 2], (1.5, 2.5), 3, 2.0, True, torch.ones(2, dtype=torch.bfloat16), np.arange(3)):
        assert np.array_equal(utils.to_numpy(value), tl_utils.to_numpy(value))
    with pytest.raises(ValueError, match="cannot convert a dict"):
        utils.to_numpy({"a": 1})


@given(st.integers(0, 2 ** 16), st.integers(1, 4), st.booleans())
def test_repeat_along_head_dimension(seed, n_heads, clone):
    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(seed))
    ours, theirs = utils.repeat_along_head_dimension(x, n_heads, clone), tl_utils.repeat_along_head_dimension(x, n_heads, clone)
    assert torch.equal(ours, theirs)
    assert (ours.data_ptr() == x.data_ptr()) == (not clone)


def test_dict_and_attribute_helpers():
    d = {"blocks.0.attn.W_Q": 1, "blocks.0.mlp.W_in": 2, "blocks.1.attn.W_K": 3, "blocks.0x": 4}
    for prefix in ("blocks.0", "blocks.0.", "blocks.0.attn", "nothing"):
        assert utils.filter_dict_by_prefix(d, prefix) == tl_utils.filter_dict_by_prefix(d, prefix)
    layer = torch.nn.Sequential(torch.nn.Linear(2, 2))
    assert utils.get_nested_attr(layer, "0.weight") is tl_utils.get_nested_attr(layer, "0.weight")
    utils.set_nested_attr(layer, "0.bias", None)
    assert layer[0].bias is None
    assert utils.override_or_use_default_value(1, None) == tl_utils.override_or_use_default_value(1, None) == 1
    assert utils.override_or_use_default_value(1, 2) == 2

    def target(a, b, *, c=0):
        return a
    kwargs = {"a": 1, "c": 2, "z": 3}
    assert utils.select_compatible_kwargs(kwargs, target) == {"a": 1, "c": 2}  # TL drops keyword-only c
    assert set(tl_utils.select_compatible_kwargs(kwargs, target)) <= set(utils.select_compatible_kwargs(kwargs, target))
    assert utils.is_library_available("torch") and not utils.is_library_available("no_such_package_xyz")


def test_check_structure_prints_what_transformer_lens_prints():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    for b in (a * 2, torch.tensor([[4.0, 1.0], [3.0, 2.0]]), torch.tensor([[1.0, 0.0], [3.0, 4.0]])):
        assert printed(utils.check_structure, a, b) == printed(tl_utils.check_structure, a, b)
        # TransformerLens labels column mismatches "rows" in its verbose listing; ours says "columns"
        theirs = printed(tl_utils.check_structure, a, b, verbose=True).split("Checking columns")
        ours = printed(utils.check_structure, a, b, verbose=True).split("Checking columns")
        assert ours[0] == theirs[0] and ours[1] == theirs[1].replace("\trows", "\tcolumns")
    with pytest.raises(ValueError, match="one shape"):
        utils.check_structure(a, torch.ones(3, 3))


def test_temporarily_swap_parameter_restores_on_error():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(RuntimeError, match="inside"):
        with utils.temporarily_swap_parameter(p, torch.ones(3)) as swapped:
            assert swapped is p and torch.equal(p.data, torch.ones(3))
            raise RuntimeError("inside")
    assert torch.equal(p.data, torch.zeros(3))
    with pytest.raises(ValueError, match="shape and dtype"):
        with utils.temporarily_swap_parameter(p, torch.ones(4)):
            pass


@given(st.integers(0, 2 ** 16))
def test_activation_functions(seed):
    x = torch.randn(3, 7, generator=torch.Generator().manual_seed(seed)) * 4
    for name in ("gelu_new", "gelu_fast", "solu"):
        torch.testing.assert_close(getattr(utils, name)(x), getattr(tl_utils, name)(x), rtol=1e-6, atol=1e-6)
    for cap in (None, -1.0, 0, 2.5):
        assert utils.softcap_enabled(cap) == tl_utils.softcap_enabled(cap)
        torch.testing.assert_close(utils.apply_softcap(x, cap), tl_utils.apply_softcap(x, cap))


@given(st.integers(0, 2 ** 16), st.booleans())
def test_lm_accuracy_and_loss(seed, per_token):
    g = torch.Generator().manual_seed(seed)
    logits, tokens = torch.randn(2, 5, 4, generator=g), torch.randint(0, 4, (2, 5), generator=g)
    assert torch.equal(utils.lm_accuracy(logits, tokens, per_token), tl_utils.lm_accuracy(logits, tokens, per_token))
    torch.testing.assert_close(utils.lm_cross_entropy_loss(logits, tokens, per_token=per_token),
                               tl_utils.lm_cross_entropy_loss(logits, tokens, per_token=per_token))


def test_sample_logits_greedy_and_filtered_support():
    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(3, 11, generator=g), torch.randint(0, 11, (3, 6), generator=g)
    for penalty in (1.0, 1.7):
        assert torch.equal(utils.sample_logits(logits, temperature=0.0, repetition_penalty=penalty, tokens=tokens),
                           tl_utils.sample_logits(logits, temperature=0.0, repetition_penalty=penalty, tokens=tokens))
    # a draw lands where TransformerLens's filter leaves probability: top-k keeps exactly k tokens
    torch.manual_seed(1)
    drawn = torch.stack([utils.sample_logits(logits, top_k=2, repetition_penalty=1.3, tokens=tokens)
                         for _ in range(200)])  # [draws, batch]
    from fxhook.utils.lm import apply_repetition_penalty
    from transformer_lens.utilities.logits_utils import _apply_repetition_penalty

    penalised = apply_repetition_penalty(logits, tokens, 1.3)
    torch.testing.assert_close(penalised, _apply_repetition_penalty(logits.clone(), tokens, 1.3))
    top2 = penalised.topk(2, dim=-1).indices
    assert all(set(drawn[:, row].tolist()) <= set(top2[row].tolist()) for row in range(3))
    with pytest.raises(ValueError, match="needs tokens"):
        utils.sample_logits(logits, repetition_penalty=1.2)


def test_logits_to_df_equals_transformer_lens():
    logits = torch.randn(50257, generator=torch.Generator().manual_seed(0))
    tokenizer = gpt2_tokenizer()
    for kwargs in ({}, {"top_k": 5}, {"tokenizer": tokenizer, "top_k": 7}):
        ours, theirs = utils.logits_to_df(logits, **kwargs), tl_utils.logits_to_df(logits, **kwargs)
        assert list(ours.columns) == list(theirs.columns)
        assert ours["token_index"].tolist() == theirs["token_index"].tolist()
        np.testing.assert_allclose(ours["probability"], theirs["probability"], rtol=1e-6)
        if "token_string" in theirs:
            assert ours["token_string"].tolist() == theirs["token_string"].tolist()
    with pytest.raises(ValueError, match="one position's logits"):
        utils.logits_to_df(logits[None])


def test_composition_scores_and_matrix_corner():
    g = torch.Generator().manual_seed(0)
    a1, b1, a2, b2 = (torch.randn(*s, generator=g) for s in ((2, 3, 8, 4), (2, 3, 4, 8), (5, 8, 4), (5, 4, 8)))
    for broadcast in (True, False):
        left, right = FactoredMatrix(a1, b1), FactoredMatrix(a2, b2)
        tl_left, tl_right = TLFactoredMatrix(a1, b1), TLFactoredMatrix(a2, b2)
        if not broadcast:
            left, right = left[:, 0], right[:2]
            tl_left, tl_right = tl_left[:, 0], tl_right[:2]
        torch.testing.assert_close(utils.composition_scores(left, right, broadcast),
                                   tl_utils.composition_scores(tl_left, tl_right, broadcast), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(utils.get_matrix_corner(FactoredMatrix(a1, b1), 2),
                               tl_utils.get_matrix_corner(TLFactoredMatrix(a1, b1), 2))
    with pytest.raises(ValueError, match="columns to match"):
        utils.composition_scores(FactoredMatrix(a1, b1), FactoredMatrix(a2[..., :3, :], b2[..., :, :3]))


def test_initialisers_follow_transformer_lens_scale():
    for shape in ((64, 128), (8, 64, 16), (300,)):
        assert utils.calc_fan_in_and_fan_out(torch.empty(shape)) == tl_utils.calc_fan_in_and_fan_out(torch.empty(shape))
    w = torch.empty(400, 300)
    for ours, theirs, kwargs in ((utils.init_xavier_uniform_, tl_utils.init_xavier_uniform_, {"gain": 2.0}),
                                 (utils.init_xavier_normal_, tl_utils.init_xavier_normal_, {}),
                                 (utils.init_kaiming_uniform_, tl_utils.init_kaiming_uniform_, {"nonlinearity": "relu"}),
                                 (utils.init_kaiming_normal_, tl_utils.init_kaiming_normal_, {"mode": "fan_out"})):
        torch.manual_seed(3)
        mine = ours(w.clone(), **kwargs)
        torch.manual_seed(3)
        reference = theirs(w.clone(), **kwargs)
        torch.testing.assert_close(mine, reference)
    with pytest.raises(ValueError, match="1-, 2- and 3-axis"):
        utils.calc_fan_in_and_fan_out(torch.empty(2, 2, 2, 2))


def _padded(tokenizer, texts, side, prepend_bos):
    tokenizer.padding_side = side
    if prepend_bos:
        texts = [tokenizer.bos_token + t for t in texts]
    return tokenizer(texts, return_tensors="pt", padding=True)["input_ids"]


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("prepend_bos", [True, False])
def test_attention_mask_and_bos_removal(side, prepend_bos):
    tokenizer = gpt2_tokenizer()
    tokenizer.pad_token = tokenizer.eos_token  # pad == bos == eos: the hard case
    texts = ["Hello world, how are you", "Hi", "a b c"]
    tokens = _padded(tokenizer, texts, side, prepend_bos)
    assert torch.equal(utils.get_attention_mask(tokenizer, tokens, prepend_bos),
                       tl_utils.get_attention_mask(tokenizer, tokens, prepend_bos))
    if prepend_bos:
        assert torch.equal(utils.get_tokens_with_bos_removed(tokenizer, tokens),
                           tl_utils.get_tokens_with_bos_removed(tokenizer, tokens))
    for value in ("text", ["a", "b"]):
        assert utils.get_input_with_manually_prepended_bos("<s>", value) == \
            tl_utils.get_input_with_manually_prepended_bos("<s>", value)
    assert utils.get_input_with_manually_prepended_bos(None, "x") == "x"


def test_offset_position_ids():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    for offset in (0, 2):
        assert torch.equal(utils.get_offset_position_ids(offset, mask), tl_utils.get_offset_position_ids(offset, mask))


def test_tokenize_and_concatenate_equals_transformer_lens():
    from datasets import Dataset

    tokenizer = gpt2_tokenizer()
    texts = [f"Document {i} says " + "word " * (i * 7 % 23) for i in range(40)] + ["", "short"]
    data = Dataset.from_dict({"text": texts, "other": list(range(len(texts)))})
    for kwargs in ({"max_length": 16}, {"max_length": 9, "add_bos_token": False}, {"max_length": 2048}):
        ours = utils.tokenize_and_concatenate(data, tokenizer, num_proc=None, **kwargs)
        theirs = tl_utils.tokenize_and_concatenate(data, gpt2_tokenizer(), num_proc=None, **kwargs)
        assert torch.equal(ours[:]["tokens"], theirs[:]["tokens"]), kwargs
    assert tokenizer.pad_token == gpt2_tokenizer().pad_token  # ours leaves the tokenizer alone


def test_locally_overridden_defaults_restores_after_an_error():
    class Model:
        cfg = type("Cfg", (), {"default_prepend_bos": True})()
        tokenizer = gpt2_tokenizer()

    model = Model()
    model.tokenizer.padding_side = "right"
    with pytest.raises(KeyError):
        with utils.LocallyOverridenDefaults(model, prepend_bos=False, padding_side="left"):
            assert model.cfg.default_prepend_bos is False and model.tokenizer.padding_side == "left"
            raise KeyError("inside")
    assert model.cfg.default_prepend_bos is True and model.tokenizer.padding_side == "right"
    with pytest.raises(ValueError, match="only"):
        utils.LocallyOverridenDefaults(model, padding="left")
    with pytest.raises(ValueError, match="not one of"):
        utils.LocallyOverridenDefaults(model, padding_side="middle")


def test_every_transformer_lens_utility_function_exists():
    """Names TransformerLens's utils exposes that are not about its own multi-GPU internals or typing."""
    tl_names = {n for n in dir(tl_utils) if not n.startswith("_") and callable(getattr(tl_utils, n))}
    missing = sorted(n for n in tl_names if not hasattr(utils, n))
    assert len(missing) <= 15, missing


def test_device_helpers_follow_transformer_lens():
    from transformer_lens import HookedTransformerConfig as TLConfig

    from fxhook import HookedTransformerConfig

    for n_layers, n_devices in ((12, 1), (12, 2), (13, 3), (5, 5)):
        ours = HookedTransformerConfig(d_model=8, d_head=4, n_layers=n_layers, n_ctx=8, d_vocab=10,
                                       n_devices=n_devices, device="cuda")
        theirs = TLConfig(d_model=8, d_head=4, n_layers=n_layers, n_ctx=8, d_vocab=10, device="cpu")
        theirs.n_devices, theirs.device = n_devices, "cuda"
        for index in range(n_layers):
            assert utils.get_device_for_block_index(index, ours) == \
                tl_utils.get_device_for_block_index(index, theirs), (n_layers, n_devices, index)
    assert utils.sort_devices_based_on_available_memory([(0, 5), (1, 9)]) == \
        tl_utils.sort_devices_based_on_available_memory([(0, 5), (1, 9)])
    layer = torch.nn.Linear(2, 2)
    assert utils.count_unique_devices(layer) == 1
    from transformers import GPTNeoXConfig

    for factor in (0.25, 1.0):
        config = GPTNeoXConfig(rotary_pct=factor)
        assert utils.get_rotary_pct_from_config(config) == tl_utils.get_rotary_pct_from_config(config)
