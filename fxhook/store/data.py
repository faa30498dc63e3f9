"""The text a harvest reads, and its packing into rows of tokens.

Sources: a list of strings, a local .txt file (one document a line) or .jsonl file (one JSON object a
line, its `text_column` field), or a `datasets` Dataset. Text is read in chunks, so a source larger
than memory streams.

Packing follows TransformerLens's `tokenize_and_concatenate` (its `datasets.map` takes 1000 documents
at a time): each chunk of 1000 documents is tokenized without special tokens, joined with one EOS
token between documents, cut into rows of `seq_len - 1` tokens (the chunk's remainder is dropped; a
chunk shorter than one row is padded with the pad token, or EOS when there is none), and every row
gets a BOS token in front.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from fxhook.utils.tokenize import pack_token_rows

CHUNK_DOCS = 1000  # documents per packing chunk: datasets.map's default batch size, as TransformerLens
_READ_BYTES = 1 << 20


def describe_source(data: Any, text_column: str = "text") -> dict[str, Any]:
    """What identifies the data (kind, size, content hash) for a store's manifest; reading a file or list
    once to hash it costs far less than running the model on it."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data={os.fspath(data)!r} is not a file: pass a list of strings, a local "
                                    ".txt or .jsonl file, or a datasets.Dataset")
        if path.suffix.lower() not in (".txt", ".jsonl"):
            raise ValueError(f"cannot read {path.name}: a data file must be .txt (one document a line) or .jsonl "
                             f"(one JSON object a line, text in its {text_column!r} field)")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(_READ_BYTES), b""):
                digest.update(block)
        return {"kind": path.suffix.lower()[1:], "name": path.name, "bytes": path.stat().st_size,
                "sha256": digest.hexdigest(), "text_column": text_column}
    if isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        digest = hashlib.sha256()
        for index, text in enumerate(data):
            if not isinstance(text, str):
                raise TypeError(f"data[{index}] is a {type(text).__name__}: a list of data must hold strings")
            digest.update(text.encode())
            digest.update(b"\0")
        return {"kind": "list", "documents": len(data), "sha256": digest.hexdigest()}
    if _is_dataset(data):
        if text_column not in data.column_names:
            raise ValueError(f"the dataset has no {text_column!r} column (it has {data.column_names}): pass "
                             "text_column=")
        fingerprint = getattr(data, "_fingerprint", None)
        if fingerprint is None:
            raise ValueError("the dataset has no fingerprint to recognise it by on a resume: pass a "
                             "datasets.Dataset (not an IterableDataset), a list of strings or a file")
        return {"kind": "datasets", "documents": len(data), "fingerprint": fingerprint, "text_column": text_column}
    raise TypeError(f"data must be a list of strings, a .txt / .jsonl path or a datasets.Dataset, got "
                    f"{type(data).__name__}")


def _is_dataset(data: Any) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(data, datasets.Dataset)


def iter_documents(data: Any, text_column: str = "text") -> Iterator[str]:
    """The documents of `data` one at a time (a .txt file: each non-empty line)."""
    if isinstance(data, (str, os.PathLike)):
        path = Path(data).expanduser()
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                line = line.rstrip("\n")
                if not line.strip():
                    continue
                if path.suffix.lower() == ".txt":
                    yield line
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path.name} line {number} is not JSON ({err})") from None
                if not isinstance(record, dict) or not isinstance(record.get(text_column), str):
                    raise ValueError(f"{path.name} line {number} has no string field {text_column!r}")
                yield record[text_column]
    elif _is_dataset(data):
        for start in range(0, len(data), CHUNK_DOCS):
            yield from data[start:start + CHUNK_DOCS][text_column]
    else:
        yield from data


def _chunks(documents: Iterator[str], size: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    for doc in documents:
        chunk.append(doc)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def check_tokenizer(tokenizer) -> None:
    if tokenizer is None:
        raise ValueError("the model has no tokenizer, so it cannot read text: load it from a folder that holds "
                         "one, or call model.set_tokenizer(...)")
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("packing needs the tokenizer's BOS and EOS tokens (a BOS in front of every row, an "
                         "EOS between documents), and this tokenizer lacks one")


def packed_rows(documents: Iterator[str], tokenizer, seq_len: int) -> Iterator[torch.Tensor]:
    """Rows of `seq_len` token ids [seq_len] (int64), packed as the module docstring says."""
    check_tokenizer(tokenizer)
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (a BOS token and one token of text), got {seq_len}")
    body = seq_len - 1
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    for chunk in _chunks(documents, CHUNK_DOCS):
        encoded = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        yield from torch.from_numpy(pack_token_rows(encoded, body, bos, eos, pad))
