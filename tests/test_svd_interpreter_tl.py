"""fxhook's SVDInterpreter against TransformerLens 3.9's on the same tiny random GPT-2 (weights equal, no
processing): the same singular directions for OV, w_in and w_out, and clear errors for bad indices."""
from __future__ import annotations

import importlib
import warnings

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fxhook
import transformer_lens
from fxhook import HookedTransformer, SVDInterpreter
from models import randomise_biases, randomise_norms
from tl_reference import tl_model

N_LAYERS, N_HEADS, D_MODEL, D_VOCAB = 2, 4, 32, 101


@pytest.fixture(scope="module")
def interpreters():
    torch.manual_seed(0)
    config = GPT2Config(n_layer=N_LAYERS, n_embd=D_MODEL, n_head=N_HEADS, n_inner=48, vocab_size=D_VOCAB,
                        n_positions=32, tie_word_embeddings=False, activation_function="gelu_new")
    hf = GPT2LMHeadModel(config)
    randomise_norms(hf, torch.Generator().manual_seed(1))
    randomise_biases(hf, 2)
    hf.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = tl_model(hf)
    fx = HookedTransformer.from_pretrained_no_processing(hf_model=hf, device="cpu")
    return SVDInterpreter(fx), transformer_lens.SVDInterpreter(tl)


def test_exposed_as_in_transformer_lens():
    svd_module = importlib.import_module("fxhook.SVDInterpreter")
    assert fxhook.SVDInterpreter is svd_module.SVDInterpreter  # the package attribute is the class, as TL's
    assert svd_module.VECTOR_TYPES == ["OV", "w_in", "w_out"]


@pytest.mark.parametrize("vector_type, layer, head, num_vectors", [
    ("OV", 0, 0, 8), ("OV", 1, 3, 5), ("w_in", 0, None, 10), ("w_in", 1, None, 3), ("w_out", 1, None, 10),
    ("w_out", 0, 2, 4),  # a head index is accepted and unused for the MLP matrices, as in TransformerLens
])
def test_singular_vectors_match_transformer_lens(interpreters, vector_type, layer, head, num_vectors):
    ours_interp, theirs_interp = interpreters
    ours = ours_interp.get_singular_vectors(vector_type, layer, num_vectors, head)
    theirs = theirs_interp.get_singular_vectors(vector_type, layer, num_vectors=num_vectors, head_index=head)
    assert ours.shape == (D_VOCAB, 1, num_vectors)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_w_in_vectors_by_hand(interpreters):
    """The first w_in direction is the top right singular vector of W_in^T * ln2.w, read through W_U."""
    ours_interp, theirs_interp = interpreters
    tl = theirs_interp.model
    matrix = tl.blocks[0].mlp.W_in.detach().T * tl.blocks[0].ln2.w.detach()  # [d_mlp, d_model]
    top = torch.linalg.svd(matrix)[2][0]  # [d_model]
    expected = top @ tl.W_U.detach()  # [d_vocab]
    got = ours_interp.get_singular_vectors("w_in", 0, num_vectors=1)[:, 0, 0]
    # a singular vector's sign is arbitrary: compare up to sign
    sign = torch.sign((got * expected).sum())
    torch.testing.assert_close(got.detach() * sign, expected, atol=1e-4, rtol=1e-4)


def test_bad_arguments_are_refused(interpreters):
    ours, _ = interpreters
    with pytest.raises(ValueError, match="head_index"):
        ours.get_singular_vectors("OV", 0)
    with pytest.raises(ValueError, match="Vector type"):
        ours.get_singular_vectors("QK", 0, head_index=0)
    with pytest.raises(ValueError, match="Layer index"):
        ours.get_singular_vectors("w_out", N_LAYERS)
    with pytest.raises(ValueError, match="Head index"):
        ours.get_singular_vectors("OV", 0, head_index=N_HEADS)
    with pytest.raises(ValueError, match="exceeds"):
        ours.get_singular_vectors("OV", 0, num_vectors=9, head_index=0)  # OV has rank d_head = 8
