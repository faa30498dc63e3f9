"""fxhook.train against TransformerLens 3.9's train: the same tiny GPT-2 weights, data and seed give the
same per-step losses (1e-4) and the same trained weights; bad configs and data are refused up front, and a
failure part-way leaves the weights as they were."""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

import transformer_lens.train as tl_train
from fxhook import HookedTransformer
from fxhook.train import HookedTransformerTrainConfig, train
from models import randomise_biases, randomise_norms
from tl_reference import tl_model

VOCAB, N_CTX = 97, 16
LOSS_LINE = re.compile(r"^Epoch (\d+) Samples (\d+) Step (\d+) Loss (\S+)$", re.M)
COMPARED_WEIGHTS = ("W_E", "W_pos", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O", "W_in", "b_in",
                    "W_out", "b_out", "W_U")


def _hf_gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=4, n_inner=32, vocab_size=VOCAB, n_positions=N_CTX,
                        tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    randomise_norms(model, torch.Generator().manual_seed(1))
    randomise_biases(model, 2)
    return model.eval()


@pytest.fixture(scope="module")
def hf_model():
    return _hf_gpt2()


@pytest.fixture(scope="module")
def fx_model_factory(hf_model):
    """The fxhook model with hf_model's initial weights, put back on every call (one capture for all)."""
    model = HookedTransformer.from_pretrained_no_processing(hf_model=copy.deepcopy(hf_model), device="cpu")
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}

    def fresh() -> HookedTransformer:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(initial[name])
                p.grad = None
        return model

    return fresh


def _tl_model(hf_model):
    """TransformerLens's model with the same weights; its unembedding bias (which GPT-2 lacks, so fxhook
    has none) is frozen at zero so both train the same parameters."""
    model = tl_model(hf_model)
    model.unembed.b_U.requires_grad_(False)
    return model


def _dataset(n_rows: int = 10, seed: int = 3) -> Dataset:
    tokens = torch.randint(0, VOCAB, (n_rows, N_CTX), generator=torch.Generator().manual_seed(seed))
    data = Dataset.from_dict({"tokens": tokens.tolist()})
    data.set_format(type="torch", columns=["tokens"])
    return data


def _losses(output: str) -> list[tuple[int, int, int, float]]:
    return [(int(e), int(n), int(s), float(loss)) for e, n, s, loss in LOSS_LINE.findall(output)]


def _train_both(hf_model, fx_model_factory, capsys, **fields):
    config = dict(num_epochs=2, batch_size=3, print_every=1, device="cpu", **fields)
    fx = train(fx_model_factory(), HookedTransformerTrainConfig(**config), _dataset())
    fx_losses = _losses(capsys.readouterr().out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = tl_train.train(_tl_model(hf_model), tl_train.HookedTransformerTrainConfig(**config), _dataset())
    tl_losses = _losses(capsys.readouterr().out)
    return fx, fx_losses, tl, tl_losses


@pytest.mark.parametrize("fields", [
    dict(lr=1e-2, max_steps=2),  # Adam; max_steps cuts each epoch after step index 2
    dict(lr=5e-3, optimizer_name="AdamW", weight_decay=0.1, warmup_steps=3, max_grad_norm=0.5),
    dict(lr=5e-2, optimizer_name="SGD", momentum=0.9, weight_decay=0.01, seed=7),
], ids=["adam-max_steps", "adamw-warmup-clip", "sgd-momentum"])
def test_train_matches_transformer_lens(hf_model, fx_model_factory, capsys, fields):
    fx, fx_losses, tl, tl_losses = _train_both(hf_model, fx_model_factory, capsys, **fields)
    assert len(fx_losses) == len(tl_losses) > 0
    expected_steps = 2 * (3 if "max_steps" in fields else 4)  # 10 rows / batch 3 -> 4 steps an epoch
    assert len(tl_losses) == expected_steps
    for ours, theirs in zip(fx_losses, tl_losses):
        assert ours[:3] == theirs[:3]  # epoch, samples, step
        assert ours[3] == pytest.approx(theirs[3], abs=1e-4)
    assert fx_losses[-1][3] < fx_losses[0][3]  # it learnt something (the test is not vacuous)
    for name in COMPARED_WEIGHTS:
        torch.testing.assert_close(getattr(fx, name).detach(), getattr(tl, name).detach(), atol=1e-4, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    for layer in range(2):  # the LayerNorm weights TransformerLens keeps per block
        for norm in ("ln1", "ln2"):
            for p in ("w", "b"):
                ours = getattr(getattr(fx.blocks[layer], norm), p).detach()
                theirs = getattr(tl.blocks[layer], norm).state_dict()[p]
                torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_train_saves_checkpoints(fx_model_factory, tmp_path, capsys):
    model = train(fx_model_factory(), HookedTransformerTrainConfig(
        num_epochs=1, batch_size=4, print_every=None, save_every=2, save_dir=str(tmp_path), device="cpu"),
        _dataset(n_rows=12))
    assert capsys.readouterr().out.count("Loss") == 0  # print_every=None prints nothing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_0.pt", "model_2.pt"]  # steps 0, 1, 2
    saved = torch.load(tmp_path / "model_2.pt")
    assert set(saved) == set(model.state_dict())


def test_train_config_defaults_match_transformer_lens():
    ours, theirs = HookedTransformerTrainConfig(1, 2), tl_train.HookedTransformerTrainConfig(1, 2)
    assert [f.name for f in ours.__dataclass_fields__.values()] == list(theirs.__dataclass_fields__)
    assert vars(ours) == vars(theirs)


@pytest.mark.parametrize("fields, message", [
    (dict(optimizer_name="RMSprop"), "not supported"),
    (dict(batch_size=0), "batch_size"),
    (dict(save_every=5), "save_dir"),
    (dict(print_every=0), "print_every"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
])
def test_bad_config_is_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        HookedTransformerTrainConfig(**{"num_epochs": 1, "batch_size": 2, **fields})


def test_bad_dataset_is_refused_before_training(fx_model_factory):
    model = fx_model_factory()
    before = model.W_E.detach().clone()
    config = HookedTransformerTrainConfig(num_epochs=1, batch_size=2, device="cpu")
    with pytest.raises(ValueError, match="'tokens'"):
        train(model, config, Dataset.from_dict({"text": ["a", "b"]}))
    with pytest.raises(ValueError, match="n_ctx"):
        train(model, config, [{"tokens": torch.zeros(N_CTX + 1, dtype=torch.long)}])
    with pytest.raises(ValueError, match="empty"):
        train(model, config, [])
    torch.testing.assert_close(model.W_E, before, atol=0, rtol=0)


class _FailingRows(torch.utils.data.Dataset):
    """Rows 0-3 are fine; reading any later row fails (a broken data source)."""

    def __init__(self):
        self.rows = _dataset(n_rows=8)

    def __len__(self):
        return 8

    def __getitem__(self, index):
        if index >= 4:
            raise OSError(f"row {index} unreadable")
        return self.rows[index]


def test_failure_part_way_restores_the_weights(fx_model_factory):
    model = fx_model_factory()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    config = HookedTransformerTrainConfig(num_epochs=1, batch_size=1, print_every=None, lr=0.1, device="cpu")
    with pytest.raises(OSError, match="unreadable"):
        train(model, config, _FailingRows())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[name], atol=0, rtol=0)
        assert p.grad is None


def test_wandb_missing_is_a_clear_error(fx_model_factory, monkeypatch):
    import fxhook.train as fx_train

    monkeypatch.setattr(fx_train, "is_library_available", lambda name: name != "wandb")
    with pytest.raises(ImportError, match="pip install wandb"):
        train(fx_model_factory(), HookedTransformerTrainConfig(num_epochs=1, batch_size=2, wandb=True), _dataset())
