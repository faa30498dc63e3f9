"""fxhook.evals against TransformerLens 3.9's evals on the same tiny random GPT-2 (same weights, GPT-2's
tokenizer), offline: the data loaders read tiny local datasets (TransformerLens's `load_dataset` is
replaced by one returning them), IOI and MMLU prompts come from the same seeds, and every result equals
TransformerLens's to 1e-4."""
from __future__ import annotations

import random
import warnings

import pytest
import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel

import transformer_lens.evals as tl_evals
from fxhook import HookedTransformer, evals
from fxhook.models_offline import gpt2_tokenizer
from models import randomise_biases, randomise_norms
from tl_reference import tl_model

WORDS = "the cat sat on a mat while John and Mary went to the store to buy milk and bread".split()


@pytest.fixture(scope="module")
def models():
    """(fxhook model, TransformerLens model): one tiny GPT-2 with the full GPT-2 vocabulary and n_ctx 1024
    (the loaders pack 1024-token rows). Each has its own tokenizer: TransformerLens's packing edits its."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50257, n_positions=1024,
                        tie_word_embeddings=False, activation_function="gelu_new")
    hf = GPT2LMHeadModel(config)
    randomise_norms(hf, torch.Generator().manual_seed(1))
    randomise_biases(hf, 2)
    hf.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tl = tl_model(hf)
        tl.set_tokenizer(gpt2_tokenizer())
    tl.cfg.default_prepend_bos = True  # TransformerLens's usual default, and fxhook's for this model
    fx = HookedTransformer.from_pretrained_no_processing(hf_model=hf, tokenizer=gpt2_tokenizer(), device="cpu")
    return fx, tl


def _text_dataset(n_words: int = 2100, seed: int = 0) -> Dataset:
    """One long document (a single row: no worker processes when it is tokenised), under both column
    names the loaders read ("text", and "content" for code)."""
    rng = random.Random(seed)
    text = " ".join(rng.choice(WORDS) for _ in range(n_words))
    return Dataset.from_dict({"text": [text], "content": [text]})


@pytest.fixture
def local_datasets(monkeypatch):
    """Every load_dataset call (ours through the datasets package, TransformerLens's by its own name)
    returns the local dataset; the requested names are recorded."""
    requested = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        requested.append((path, name, split))
        return _text_dataset()

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    monkeypatch.setattr(tl_evals, "load_dataset", fake_load_dataset)
    return requested


def test_sanity_check_matches(models):
    fx, tl = models
    ours, theirs = evals.sanity_check(fx), tl_evals.sanity_check(tl)
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-4)
    assert 10 < ours.item() < 11.5  # an untrained model: about ln(50257) = 10.8


def test_induction_loss_matches(models):
    fx, tl = models
    torch.manual_seed(3)
    ours = evals.induction_loss(fx, batch_size=2, subseq_len=24)
    torch.manual_seed(3)
    theirs = tl_evals.induction_loss(tl, batch_size=2, subseq_len=24, device="cpu")
    assert ours.item() == pytest.approx(theirs.item(), abs=1e-4)
    torch.manual_seed(3)
    no_bos = evals.induction_loss(fx, batch_size=2, subseq_len=24, prepend_bos=False)
    torch.manual_seed(3)
    assert no_bos.item() == pytest.approx(
        tl_evals.induction_loss(tl, batch_size=2, subseq_len=24, prepend_bos=False, device="cpu").item(), abs=1e-4)


@pytest.mark.parametrize("loader", ["make_wiki_data_loader", "make_owt_data_loader", "make_pile_data_loader",
                                    "make_code_data_loader"])
def test_data_loaders_match(models, local_datasets, loader):
    fx, tl = models
    torch.manual_seed(0)
    ours = list(getattr(evals, loader)(fx.tokenizer, batch_size=1))
    torch.manual_seed(0)
    theirs = list(getattr(tl_evals, loader)(tl.tokenizer, batch_size=1))
    assert len(ours) == len(theirs) == 2  # two rows of 1024 tokens, in the same seeded order
    for ours_batch, theirs_batch in zip(ours, theirs):
        assert ours_batch["tokens"].shape == (1, 1024)
        assert torch.equal(ours_batch["tokens"], theirs_batch["tokens"])
    assert local_datasets[0] == local_datasets[1]  # the same dataset name, config and split as TransformerLens


def test_evaluate_on_dataset_matches(models):
    fx, tl = models
    tokens = torch.randint(100, 20000, (4, 2, 12), generator=torch.Generator().manual_seed(0))
    batches = [{"tokens": batch} for batch in tokens]  # 4 batches of [2, 12]
    ours = evals.evaluate_on_dataset(fx, batches, truncate=1)
    theirs = tl_evals.evaluate_on_dataset(tl, batches, truncate=1, device="cpu")
    assert ours == pytest.approx(theirs, abs=1e-4)
    # truncate=1 stops after truncate + 1 = 2 batches, as TransformerLens does
    by_hand = sum(tl(batch["tokens"], return_type="loss").item() for batch in batches[:2]) / 2
    assert ours == pytest.approx(by_hand, abs=1e-4)


def test_evaluate_matches(models, local_datasets, monkeypatch):
    fx, tl = models
    # TransformerLens's evaluate runs evaluate_on_dataset at its default device="cuda", which fails on a
    # CPU-only machine (fxhook's default is the model's device): run TL's on the CPU
    tl_on_dataset = tl_evals.evaluate_on_dataset
    monkeypatch.setattr(tl_evals, "evaluate_on_dataset",
                        lambda model, loader, truncate=100: tl_on_dataset(model, loader, truncate, device="cpu"))
    torch.manual_seed(0)
    ours = evals.evaluate(fx, truncate=0, batch_size=1)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = tl_evals.evaluate(tl, truncate=0, batch_size=1)
    assert list(ours) == list(theirs) == ["wiki_loss", "owt_loss", "pile_loss", "code_loss"]
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], abs=1e-4)


def test_loader_without_local_data_is_a_clear_error(models):
    fx, _ = models
    with pytest.raises(RuntimeError, match="'NeelNanda/pile-10k'.*local datasets cache"):
        evals.make_pile_data_loader(fx.tokenizer)


@pytest.mark.parametrize("options", [
    dict(num_samples=9, seed=4),
    dict(num_samples=8, symmetric=True, seed=11, prepend_bos=False),
    dict(num_samples=6, seed=2, templates=["[A] met with [B]. [B] gave the [OBJECT] to [A]"],
         names=["Alice", "Bob", "Charlie"], nouns={"OBJECT": ["ball", "book"]}),
])
def test_ioi_dataset_matches(models, options):
    fx, _ = models
    ours = evals.IOIDataset(fx.tokenizer, **options)
    theirs = tl_evals.IOIDataset(fx.tokenizer, **options)
    assert ours.samples == theirs.samples and len(ours) == len(theirs) == options["num_samples"]
    for index in range(len(ours)):
        for key, value in theirs[index].items():
            assert torch.equal(ours[index][key], value)


def test_ioi_dataset_with_seed_leaves_global_random_alone(models):
    fx, _ = models
    random.seed(123)
    expected = random.random()
    random.seed(123)
    evals.IOIDataset(fx.tokenizer, num_samples=5, seed=1)
    assert random.random() == expected


def test_ioi_eval_matches(models):
    fx, tl = models
    dataset = tl_evals.IOIDataset(fx.tokenizer, num_samples=10, seed=5, names=["John", "Mary", "Alexander"])
    torch.manual_seed(0)
    ours = evals.ioi_eval(fx, dataset=dataset, batch_size=4)
    torch.manual_seed(0)
    theirs = tl_evals.ioi_eval(tl, dataset=dataset, batch_size=4)
    assert ours["Accuracy"] == theirs["Accuracy"]
    assert ours["Logit Difference"] == pytest.approx(theirs["Logit Difference"], abs=1e-4)
    random.seed(9)
    torch.manual_seed(0)
    ours = evals.ioi_eval(fx, num_samples=6, symmetric=True)
    random.seed(9)
    torch.manual_seed(0)
    theirs = tl_evals.ioi_eval(tl, num_samples=6, symmetric=True)
    assert ours["Logit Difference"] == pytest.approx(theirs["Logit Difference"], abs=1e-4)
    assert ours["Accuracy"] == theirs["Accuracy"]


MMLU = {
    "astronomy": Dataset.from_dict({
        "question": ["Which planet is largest?", "What orbits the Earth?", "What is the Sun?"],
        "choices": [["Mars", "Jupiter", "Venus", "Mercury"], ["The Moon", "Mars", "The Sun", "Pluto"],
                    ["A planet", "A moon", "A star", "A comet"]],
        "answer": [1, 0, 2]}),
    "virology": Dataset.from_dict({
        "question": ["What does a virus need to replicate?", "Which is a virus?"],
        "choices": [["A host cell", "Sunlight", "Soil", "Nothing"], ["E. coli", "Influenza", "Yeast", "Algae"]],
        "answer": [0, 1]}),
}


@pytest.fixture
def tl_mmlu(monkeypatch):
    """TransformerLens's MMLU reads the local datasets above (by subject) instead of "cais/mmlu"."""
    monkeypatch.setattr(tl_evals, "load_dataset", lambda path, subject, split: MMLU[subject])


def _recording(model, monkeypatch) -> list:
    """Record the token tensors `model` is called with."""
    seen, forward = [], model.forward

    def recorded(tokens, *args, **kwargs):
        seen.append(tokens.clone())
        return forward(tokens, *args, **kwargs)

    monkeypatch.setattr(model, "forward", recorded)
    return seen


def test_mmlu_matches(models, tl_mmlu, monkeypatch):
    fx, tl = models
    ours_prompts, theirs_prompts = _recording(fx, monkeypatch), _recording(tl, monkeypatch)
    for subjects, num_samples in ((["astronomy", "virology"], None), ("astronomy", 2)):
        ours_rows = evals.make_mmlu_data_loader(subjects, num_samples=num_samples, dataset_by_subject=MMLU)
        assert ours_rows == tl_evals.make_mmlu_data_loader(subjects, num_samples=num_samples)
        ours = evals.mmlu_eval(fx, subjects=subjects, num_samples=num_samples, dataset_by_subject=MMLU)
        theirs = tl_evals.mmlu_eval(tl, subjects=subjects, num_samples=num_samples)
        assert ours == theirs
        assert ours["num_total"] == (5 if num_samples is None else 2)
    assert len(ours_prompts) == len(theirs_prompts) == 7  # the same prompts, token for token
    assert all(torch.equal(a, b) for a, b in zip(ours_prompts, theirs_prompts))


def test_bad_input_is_refused(models):
    fx, _ = models
    with pytest.raises(ValueError, match="Invalid subject"):
        evals.make_mmlu_data_loader("astrology", dataset_by_subject=MMLU)
    with pytest.raises(ValueError, match="no dataset for subject"):
        evals.mmlu_eval(fx, subjects=["astronomy", "anatomy"], dataset_by_subject=MMLU)
    with pytest.raises(ValueError, match="n_ctx"):
        evals.induction_loss(fx, subseq_len=600)
    with pytest.raises(ValueError, match="two distinct names"):
        evals.IOIDataset(fx.tokenizer, names=["John"])
    with pytest.raises(ValueError, match="no batches"):
        evals.evaluate_on_dataset(fx, [])
