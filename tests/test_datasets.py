"""Dataset helpers work offline: local files and folders, in-memory datasets, lists of strings;
a hub name with the hub off is a clear error, never a download."""
from __future__ import annotations

import json

import datasets
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fxhook import HookedTransformer
from fxhook.datasets import load_sample_training_dataset, sample_datapoint
from fxhook.models_offline import gpt2_tokenizer

TEXTS = ["The cat sat on the mat.", "A dog ran in the park.", "Hello world, again and again."]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50257, n_positions=12)).eval()
    return HookedTransformer.from_pretrained_no_processing(hf_model=hf, tokenizer=gpt2_tokenizer())


def test_list_of_strings_and_sampling(model):
    dataset = load_sample_training_dataset(model, TEXTS)
    assert model.dataset is dataset and dataset["text"] == TEXTS
    samples = {sample_datapoint(model, seed=s) for s in range(12)}
    assert samples == set(TEXTS)  # every text can come out, nothing else does
    assert sample_datapoint(model, seed=3) == sample_datapoint(model, seed=3)
    tokens = sample_datapoint(model, tokenize=True, dataset=datasets.Dataset.from_dict({"text": [" word" * 40]}))
    assert tokens.shape == (1, model.cfg.n_ctx) and tokens[0, 0] == model.tokenizer.bos_token_id


def test_model_methods_as_in_transformer_lens(model):
    dataset = model.load_sample_training_dataset(source=TEXTS[:1])
    assert model.dataset is dataset
    assert model.sample_datapoint() == TEXTS[0]
    tokens = model.sample_datapoint(tokenize=True, prepend_bos=False)
    assert torch.equal(tokens, model.to_tokens(TEXTS[0], prepend_bos=False))


def test_local_files_and_folders(model, tmp_path):
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(TEXTS)))
    assert load_sample_training_dataset(model, jsonl)["text"] == TEXTS
    txt = tmp_path / "texts.txt"
    txt.write_text("\n".join(TEXTS) + "\n")
    assert load_sample_training_dataset(model, str(txt))["text"] == TEXTS
    csv = tmp_path / "other.csv"
    csv.write_text("body,n\n" + "".join(f'"{t}",{i}\n' for i, t in enumerate(TEXTS)))
    renamed = load_sample_training_dataset(model, csv, text_column="body")
    assert renamed.column_names == ["text"] and renamed["text"] == TEXTS
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": TEXTS}),
                          "test": datasets.Dataset.from_dict({"text": TEXTS[:1]})}).save_to_disk(saved)
    assert load_sample_training_dataset(model, saved, split="test")["text"] == TEXTS[:1]
    assert sample_datapoint(model) == TEXTS[0]


def test_in_memory_datasets(model):
    dict_dataset = datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": TEXTS})})
    assert load_sample_training_dataset(model, dict_dataset, split="validation")["text"] == TEXTS
    with pytest.raises(ValueError, match="splits \\['validation'\\]"):
        load_sample_training_dataset(model, dict_dataset)
    with pytest.raises(ValueError, match="no 'text' column"):
        load_sample_training_dataset(model, datasets.Dataset.from_dict({"body": TEXTS}))


def test_offline_errors_say_what_to_pass(model, tmp_path):
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        load_sample_training_dataset(model)  # GPT-2's default is a hub dataset: refused, not fetched
    with pytest.raises(FileNotFoundError, match="no such local file"):
        load_sample_training_dataset(model, tmp_path / "missing.jsonl")
    model.cfg.original_architecture = "LlamaForCausalLM"
    try:
        with pytest.raises(ValueError, match="no default sample dataset"):
            load_sample_training_dataset(model)
    finally:
        model.cfg.original_architecture = None
    with pytest.raises(TypeError, match="hold strings"):
        load_sample_training_dataset(model, [1, 2])
