"""Tokenization helpers with TransformerLens's names: attention masks of padded batches, BOS handling,
and packing a text dataset into fixed-length token rows."""
from __future__ import annotations

from typing import Any

import einops
import numpy as np
import torch

from fxhook.runtime.tokens import get_tokenizer_with_bos  # noqa: F401 (TransformerLens's utils name)
from fxhook.utils.tensors import get_cumsum_along_dim


def get_attention_mask(tokenizer: Any, tokens: torch.Tensor, prepend_bos: bool,
                       padding_side: str | None = None) -> torch.Tensor:
    """1 for real tokens, 0 for padding, of tokens [..., pos]. Only the pads at the padded end count as
    padding (a pad id inside the text is a token); under left padding, a BOS that shares the pad id is
    kept when prepend_bos."""
    mask = torch.ones_like(tokens)
    if tokenizer is None:
        return mask
    side = padding_side or tokenizer.padding_side
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    real = tokens.ne(tokenizer.pad_token_id)
    if side == "right":
        mask[get_cumsum_along_dim(real, -1, reverse=True) == 0] = 0
        return mask
    leading_pad = get_cumsum_along_dim(real, -1) == 0
    mask[leading_pad] = 0
    if prepend_bos and tokenizer.bos_token_id == tokenizer.pad_token_id:
        bos_at = leading_pad.sum(-1) - 1  # the last "pad" before the text is its BOS
        mask[torch.arange(mask.shape[0]), bos_at] = 1
    return mask


def get_tokens_with_bos_removed(tokenizer: Any, tokens: torch.Tensor, padding_side: str | None = None
                                ) -> torch.Tensor:
    """tokens [batch, pos] without each row's BOS: [batch, pos - 1] (under left padding the BOS follows
    the pads). A tokenizer without a BOS token leaves tokens unchanged."""
    if tokenizer.bos_token_id is None:
        return tokens
    side = padding_side or tokenizer.padding_side
    if side == "right":
        return tokens[..., 1:]
    if tokenizer.bos_token_id == tokenizer.pad_token_id:
        bos_at = (get_cumsum_along_dim(tokens.ne(tokenizer.pad_token_id), -1) == 0).sum(-1) - 1
    else:
        bos_at = (tokens == tokenizer.bos_token_id).int().argmax(-1)
    keep = torch.ones_like(tokens, dtype=torch.bool).scatter(-1, bos_at[..., None], False)
    return tokens[keep].view(*tokens.shape[:-1], tokens.shape[-1] - 1)


def get_input_with_manually_prepended_bos(bos_token: str | None, input: str | list[str]) -> str | list[str]:
    """The text (or each text) with the BOS string in front; unchanged without a BOS token."""
    if bos_token is None:
        return input
    return bos_token + input if isinstance(input, str) else [bos_token + text for text in input]



def keep_single_column(dataset: Any, col_name: str) -> Any:
    """The HF dataset with every column but `col_name` removed."""
    return dataset.remove_columns([key for key in dataset.features if key != col_name])


def pack_token_rows(documents: list[list[int]], seq_len: int, bos_token_id: int | None, eos_token_id: int,
                    pad_token_id: int) -> np.ndarray:
    """Token ids of documents -> rows [n, seq_len (+1 with a BOS)]: the documents joined by EOS, cut into
    rows of seq_len tokens (the remainder dropped; one padded row when all of them are shorter), each row
    then led by BOS when bos_token_id is not None."""
    pieces: list[np.ndarray] = []
    for index, ids in enumerate(documents):
        pieces.append(np.asarray(ids, dtype=np.int64))
        if index < len(documents) - 1:
            pieces.append(np.array([eos_token_id], dtype=np.int64))
    joined = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
    if not len(joined):
        return np.zeros((0, seq_len + (bos_token_id is not None)), dtype=np.int64)
    if len(joined) < seq_len:
        joined = np.concatenate([joined, np.full(seq_len - len(joined), pad_token_id, dtype=np.int64)])
    n_rows = len(joined) // seq_len
    rows = einops.rearrange(joined[: n_rows * seq_len], "(row pos) -> row pos", row=n_rows, pos=seq_len)
    if bos_token_id is not None:
        rows = np.concatenate([np.full((n_rows, 1), bos_token_id, dtype=np.int64), rows], axis=1)
    return rows


def tokenize_and_concatenate(dataset: Any, tokenizer: Any, streaming: bool = False, max_length: int = 1024,
                             column_name: str = "text", add_bos_token: bool = True, num_proc: int | None = 10,
                             set_format: bool = True) -> Any:
    """A text dataset -> a dataset of token rows {"tokens": [max_length]}: each map batch of documents is
    joined with EOS and cut into rows of max_length tokens, each led by BOS when add_bos_token. Unlike
    TransformerLens, the tokenizer is not given a pad token (short batches pad with its own, or EOS)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenize_and_concatenate joins documents with EOS: the tokenizer has no EOS token")
    if add_bos_token and tokenizer.bos_token_id is None:
        raise ValueError("add_bos_token=True but the tokenizer has no BOS token: pass add_bos_token=False")
    seq_len = max_length - 1 if add_bos_token else max_length
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    bos = tokenizer.bos_token_id if add_bos_token else None

    def tokenize(batch: dict) -> dict:
        texts = batch[column_name]
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        return {"tokens": pack_token_rows(ids, seq_len, bos, tokenizer.eos_token_id, pad)}

    dataset = keep_single_column(dataset, column_name)
    extra = {} if streaming else {"num_proc": num_proc}
    packed = dataset.map(tokenize, batched=True, remove_columns=[column_name], **extra)
    if set_format:
        packed.set_format(type="torch", columns=["tokens"])
    return packed


def get_dataset(dataset_name: str, **kwargs) -> Any:
    """One of TransformerLens's named 10k-document datasets (openwebtext/owt, pile, c4, code/python,
    c4_code, wiki) through `datasets.load_dataset` (offline: from the local datasets cache only)."""
    from datasets import load_dataset

    if dataset_name not in DATASET_ALIASES:
        raise ValueError(f"unknown dataset {dataset_name!r}: choose one of {sorted(DATASET_ALIASES)}, or call "
                         "datasets.load_dataset yourself")
    return load_dataset(DATASET_ALIASES[dataset_name], split="train", **kwargs)


DATASET_ALIASES = {"openwebtext": "stas/openwebtext-10k", "owt": "stas/openwebtext-10k",
                   "pile": "NeelNanda/pile-10k", "c4": "NeelNanda/c4-10k", "code": "NeelNanda/code-10k",
                   "python": "NeelNanda/code-10k", "c4_code": "NeelNanda/c4-code-20k",
                   "c4-code": "NeelNanda/c4-code-20k", "wiki": "NeelNanda/wiki-10k"}

__all__ = ["get_attention_mask", "get_tokens_with_bos_removed", "get_input_with_manually_prepended_bos",
           "get_tokenizer_with_bos", "keep_single_column", "pack_token_rows", "tokenize_and_concatenate",
           "get_dataset"]
