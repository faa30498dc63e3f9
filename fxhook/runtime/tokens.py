"""Tokenizer helpers with TransformerLens's prepend_bos / padding_side semantics.

prepend_bos: an explicit True/False wins, None means `cfg.default_prepend_bos`
(True unless the model was loaded with default_prepend_bos=False). Whatever the
tokenizer does by itself is reconciled: a tokenizer that adds BOS on its own
(`cfg.tokenizer_prepends_bos`, detected by `set_tokenizer`) has it removed when
prepend_bos is False; one that does not (GPT-2, SmolLM2) gets its BOS token
prepended to the text when prepend_bos is True.

padding_side: an explicit "left"/"right" wins, None means the tokenizer's
padding side (set from `cfg.default_padding_side` when the tokenizer is set).
Text padded on the left gets an attention mask that hides the padding, and
positions counted from the first real token, so the last position of each row
gives the same logits as that prompt alone. Right padding needs no mask (later
positions never change earlier ones) and, as in TransformerLens, gets none.
"""
from __future__ import annotations

import copy
from typing import Any, Sequence, Union

import numpy as np
import torch

from fxhook.config import HookedTransformerConfig

TokensLike = Union[torch.Tensor, np.ndarray, Sequence[int], int]
_SIDES = ("left", "right")


def get_tokenizer_with_bos(tokenizer: Any) -> Any:
    """The tokenizer a model keeps, as TransformerLens's `utils.get_tokenizer_with_bos` makes it: one that
    prepends BOS itself (`model.tokenizer.encode(text)` starts with BOS), reloaded from its files with
    add_bos_token=True, because some tokenizers (Llama's) split text differently when they add BOS.

    Unchanged when it has no BOS token or already adds it, and (as TransformerLens) when its files cannot
    be rebuilt with BOS (ValueError: e.g. bare vocab.json + merges.txt in transformers 5); unchanged too
    where there are no files to reload (a tokenizer built in memory), where TransformerLens fails.
    """
    if tokenizer.bos_token is None:
        return tokenizer
    init_kwargs = copy.deepcopy(tokenizer.init_kwargs)
    source = init_kwargs.pop("name_or_path", None) or getattr(tokenizer, "name_or_path", None)
    adds_bos = init_kwargs.pop("add_bos_token", None)
    if adds_bos is None:
        adds_bos = getattr(tokenizer, "add_bos_token", False)
    if adds_bos or not source:
        return tokenizer
    from transformers import AutoTokenizer

    try:
        with_bos = AutoTokenizer.from_pretrained(source, add_bos_token=True, **init_kwargs)
    except Exception:  # noqa: BLE001 (ValueError as TransformerLens; any other failure to reload alike)
        return tokenizer
    with_bos.padding_side = tokenizer.padding_side
    return with_bos


def _as_token_tensor(tokens: TokensLike) -> torch.Tensor:
    if isinstance(tokens, torch.Tensor):
        return tokens
    if isinstance(tokens, np.ndarray):
        return torch.from_numpy(tokens)
    if isinstance(tokens, (int, np.integer)):
        return torch.tensor(int(tokens))
    if isinstance(tokens, (list, tuple)):
        if tokens and isinstance(tokens[0], torch.Tensor):
            return torch.stack(list(tokens))
        return torch.tensor(tokens, dtype=torch.long)
    raise TypeError(f"expected token ids (a tensor, numpy array, int or list of ints), got {type(tokens).__name__}")


def check_token_ids(tokens: torch.Tensor, vocab_size: int | None, what: str = "the input") -> torch.Tensor:
    """`tokens` if it is a usable batch of token ids [batch >= 1, pos >= 1] within the vocabulary; a clear
    error otherwise (one check at the boundary, for every way tokens come in)."""
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise TypeError(f"{what} must be integer token ids, got a {tokens.dtype} tensor (embeddings are not "
                        f"tokens: generate takes them as input; forward takes the residual stream with "
                        f"start_at_layer)")
    if tokens.dim() != 2:
        raise ValueError(f"{what} must have shape [batch, pos] (or [pos]), got {tuple(tokens.shape)}")
    if tokens.shape[0] == 0:
        raise ValueError(f"{what} has no rows (batch size 0): pass at least one sequence")
    if tokens.shape[1] == 0:
        raise ValueError(f"{what} has no tokens (an empty string with prepend_bos=False tokenizes to nothing): "
                         f"pass at least one token")
    if vocab_size is not None:
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(f"{what} holds token id {bad}, outside the vocabulary [0, {vocab_size})")
    return tokens


class TextCodec:
    """Text <-> tokens for one model: to_tokens, to_string, to_str_tokens, ... (HookedTransformer's
    methods of these names delegate here). Holds the tokenizer; reads the model's config for its
    defaults (default_prepend_bos, default_padding_side, n_ctx) and records what it learns there
    (tokenizer_prepends_bos, tokenizer_name)."""

    def __init__(self, cfg: HookedTransformerConfig, tokenizer: Any = None):
        self.cfg = cfg
        self.tokenizer = get_tokenizer_with_bos(tokenizer) if tokenizer is not None else None
        self._set_tokenizer_defaults()

    # ---------------------------------------------------------------- setting the tokenizer
    def set_tokenizer(self, tokenizer, default_padding_side: str | None = None) -> None:
        """Use `tokenizer` for text. It is adjusted in place, as TransformerLens does.

        default_padding_side: "left" or "right"; None keeps the tokenizer's own side ("right" if
        it has none). A missing pad token becomes the EOS token, a missing BOS token the EOS token.
        """
        from transformers.tokenization_utils_base import PreTrainedTokenizerBase

        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"the tokenizer must be a Hugging Face tokenizer (PreTrainedTokenizerBase), got "
                            f"{type(tokenizer).__name__}")
        if default_padding_side not in (*_SIDES, None):
            raise ValueError(f"default_padding_side must be 'left', 'right' or None, got {default_padding_side!r}")
        self.tokenizer = get_tokenizer_with_bos(tokenizer)  # as TransformerLens keeps it
        if default_padding_side is None:
            default_padding_side = tokenizer.padding_side if tokenizer.padding_side in _SIDES else "right"
        self.cfg.default_padding_side = default_padding_side
        self._set_tokenizer_defaults()

    def _set_tokenizer_defaults(self) -> None:
        """Finish setting `self.tokenizer` (model construction calls this with the loader's settings)."""
        tok = self.tokenizer
        if tok is None:
            self.cfg.tokenizer_prepends_bos = None
            return
        if tok.pad_token is None:
            fallback = tok.eos_token if tok.eos_token is not None else tok.bos_token
            if fallback is not None:
                tok.pad_token = fallback
        if tok.bos_token is None and tok.eos_token is not None:
            tok.bos_token = tok.eos_token
        tok.padding_side = self.cfg.default_padding_side or "right"
        empty = tok("")["input_ids"]
        self.cfg.tokenizer_prepends_bos = bool(len(empty) > 0 and tok.bos_token_id is not None
                                               and empty[0] == tok.bos_token_id)
        self.cfg.tokenizer_name = getattr(tok, "name_or_path", None) or type(tok).__name__

    def _decodable(self) -> int:
        """Ids below this decode: the tokenizer's and the model's vocabulary (which may be padded)."""
        return max(len(self.tokenizer), self.cfg.d_vocab or 0)

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, and this model has none: pass tokenizer= to "
                             f"from_pretrained or call model.set_tokenizer(tokenizer), or pass token ids")
        return self.tokenizer

    def _prepend_bos(self, prepend_bos: bool | None) -> bool:
        return bool(self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos)

    def _padding_side(self, padding_side: str | None) -> str:
        side = padding_side
        if side is None:
            side = getattr(self.tokenizer, "padding_side", None) or self.cfg.default_padding_side or "right"
        if side not in _SIDES:
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        return side

    # ---------------------------------------------------------------- text -> tokens
    def _tokenize(self, input, prepend_bos: bool | None, padding_side: str | None, truncate: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [b, p], mask [b, p]: 1 for real tokens, 0 for padding) for a string or list of strings."""
        tok = self._require_tokenizer("text input")
        texts = [input] if isinstance(input, str) else list(input)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("text input must be a string or a non-empty list of strings")
        prepend = self._prepend_bos(prepend_bos)
        side = self._padding_side(padding_side)
        tokenizer_adds_bos = bool(self.cfg.tokenizer_prepends_bos)
        if prepend and not tokenizer_adds_bos:
            if tok.bos_token is None:
                raise ValueError("prepend_bos=True, but the tokenizer has no BOS token: pass prepend_bos=False")
            texts = [tok.bos_token + t for t in texts]
        strip_bos = tokenizer_adds_bos and not prepend
        n_ctx = self.cfg.n_ctx + (1 if strip_bos else 0)
        enc = tok(texts, return_tensors="pt", padding=True, padding_side=side, truncation=truncate,
                  max_length=n_ctx if truncate else None)
        ids = enc["input_ids"].long()
        mask = enc["attention_mask"].long() if "attention_mask" in enc else torch.ones_like(ids)
        if strip_bos:
            ids, mask = self._strip_first_bos(ids, mask)
        return ids, mask

    def _strip_first_bos(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Drop the BOS the tokenizer put before each row's text (after any left padding)."""
        rows = torch.arange(ids.shape[0])
        first_real = mask.argmax(dim=-1)
        if not bool((ids[rows, first_real] == self.tokenizer.bos_token_id).all()):
            raise RuntimeError("the tokenizer was detected to prepend BOS but a row does not start with it; "
                               "call model.set_tokenizer(tokenizer) again after changing the tokenizer")
        keep = torch.ones_like(ids, dtype=torch.bool)
        keep[rows, first_real] = False
        shape = (ids.shape[0], ids.shape[1] - 1)
        return ids[keep].view(shape), mask[keep].view(shape)

    def to_tokens(self, input: str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> torch.Tensor:
        """Tokens [batch, pos] of a string (batch 1) or list of strings (padded to the longest).

        prepend_bos / padding_side: None uses the model's defaults (see the module docstring).
        Pass prepend_bos=False when tokenizing a fragment of a longer prompt. truncate: cut each
        text to the model's context length n_ctx.
        """
        tokens, _ = self._tokenize(input, prepend_bos, padding_side, truncate)
        if move_to_device and self.cfg.device is not None:
            tokens = tokens.to(self.cfg.device)
        return tokens

    # ---------------------------------------------------------------- model input
    def input_to_tokens(self, input, prepend_bos, padding_side, attention_mask):
        """Tokens [b, p] and the padding mask [b, p] for any accepted model input."""
        if isinstance(input, (list, tuple)) and input and all(isinstance(t, (int, np.integer)) for t in input):
            raise TypeError("a list of ints is not model input: pass token ids as a tensor, torch.tensor([ids]) "
                            "(text is a string or a list of strings)")
        if isinstance(input, (str, list, tuple)):
            tokens, real = self._tokenize(input, prepend_bos, padding_side)
            if attention_mask is None:
                attention_mask = real if self._padding_side(padding_side) == "left" else torch.ones_like(tokens)
        elif isinstance(input, torch.Tensor):
            tokens = input[None] if input.dim() == 1 else input
        else:
            raise TypeError(f"model input must be a string, a list of strings or a token tensor, "
                            f"got {type(input).__name__}")
        check_token_ids(tokens, self.cfg.d_vocab, "the model input")
        if self.cfg.device is not None:
            tokens = tokens.to(self.cfg.device)
        if attention_mask is None:
            attention_mask = self.default_attention_mask(tokens, prepend_bos, padding_side)
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the tokens have "
                             f"shape {tuple(tokens.shape)}")
        return tokens, attention_mask.to(tokens.device)

    def default_attention_mask(self, tokens: torch.Tensor, prepend_bos: bool | None = None,
                               padding_side: str | None = None) -> torch.Tensor:
        """The mask TransformerLens derives for token input: with left padding, leading pad tokens are 0.

        With right padding (or no tokenizer) every position is attended. When the BOS token is also
        the pad token (GPT-2) and prepend_bos is on, the last leading "pad" of each row is its BOS.
        """
        tok = self.tokenizer
        mask = torch.ones_like(tokens, dtype=torch.long)
        if tok is None or tok.pad_token_id is None or self._padding_side(padding_side) != "left":
            return mask
        leading_pad = (tokens != tok.pad_token_id).long().cumsum(dim=-1) == 0
        mask[leading_pad] = 0
        if self._prepend_bos(prepend_bos) and tok.bos_token_id == tok.pad_token_id:
            n_leading = leading_pad.sum(dim=-1)
            rows = torch.nonzero(n_leading > 0).flatten()
            mask[rows, n_leading[rows] - 1] = 1
        return mask

    # ---------------------------------------------------------------- tokens -> text
    def to_string(self, tokens: TokensLike) -> str | list[str]:
        """Decode token ids: a string for a rank-0/1 input, a list of strings for a [batch, pos] input."""
        tok = self._require_tokenizer("to_string")
        tokens = _as_token_tensor(tokens)
        if tokens.numel():
            check_token_ids(tokens.reshape(1, -1), self._decodable(), "to_string's input")
        if tokens.dim() == 2:
            return tok.batch_decode(tokens.tolist(), clean_up_tokenization_spaces=False)
        if tokens.dim() <= 1:
            return tok.decode(tokens.reshape(-1).tolist(), clean_up_tokenization_spaces=False)
        raise ValueError(f"to_string takes tokens of rank 0, 1 or 2, got shape {tuple(tokens.shape)}")

    def to_str_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None
                      ) -> list[str] | list[list[str]]:
        """Each token of `input` as its own string.

        input: a string (tokenized, with BOS per prepend_bos), token ids of shape [pos] or
        [1, pos] (tensor, numpy array or list of ints), or a list of strings / token tensors
        (giving a list of lists).
        """
        tok = self._require_tokenizer("to_str_tokens")
        if isinstance(input, (list, tuple)) and not all(isinstance(t, (int, np.integer)) for t in input):
            return [self.to_str_tokens(item, prepend_bos, padding_side) for item in input]
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side,
                                    move_to_device=False)[0]
        else:
            tokens = _as_token_tensor(input).squeeze()
            if tokens.dim() == 0:
                tokens = tokens[None]
            if tokens.dim() != 1:
                raise ValueError(f"to_str_tokens takes tokens of shape [pos] or [1, pos], got {tuple(tokens.shape)}")
            if tokens.numel():
                check_token_ids(tokens[None], self._decodable(), "to_str_tokens' input")
        return tok.batch_decode([[int(t)] for t in tokens.tolist()], clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of the token `string` is (no BOS). A ValueError if it is not exactly one token."""
        tokens = self.to_tokens(string, prepend_bos=False, move_to_device=False)[0]
        if tokens.numel() != 1:
            pieces = self.to_str_tokens(tokens)
            raise ValueError(f"{string!r} is not a single token: it tokenizes to {len(pieces)} tokens {pieces}")
        return int(tokens.item())

    def to_single_str_token(self, int_token: int) -> str:
        """The string of the token with id `int_token`."""
        if isinstance(int_token, torch.Tensor) and int_token.numel() == 1:
            int_token = int(int_token.item())
        if isinstance(int_token, bool) or not isinstance(int_token, (int, np.integer)):
            raise TypeError(f"to_single_str_token takes one token id (an int), got {type(int_token).__name__}")
        return self.to_str_tokens(torch.tensor([int(int_token)]))[0]

    def get_token_position(self, single_token: str | int, input, mode: str = "first",
                           prepend_bos: bool | None = None, padding_side: str | None = None) -> int:
        """The position of `single_token` (a string that is one token, or an id) in `input`.

        input: a string (tokenized with prepend_bos, which shifts positions by one) or tokens of
        shape [pos] or [1, pos]. mode: "first" or "last" occurrence. A ValueError if absent.
        """
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', got {mode!r}")
        if isinstance(input, str):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side, move_to_device=False)
        else:
            tokens = _as_token_tensor(input)
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"tokens of rank 2 must have shape [1, pos], got {tuple(tokens.shape)}")
            tokens = tokens[0]
        if tokens.dim() != 1:
            raise ValueError(f"get_token_position takes tokens of shape [pos] or [1, pos], got {tuple(tokens.shape)}")
        if isinstance(single_token, str):
            token_id = self.to_single_token(single_token)
        elif isinstance(single_token, torch.Tensor):
            token_id = int(single_token.item())
        else:
            token_id = int(single_token)
        where = torch.nonzero(tokens.cpu() == token_id).flatten()
        if len(where) == 0:
            raise ValueError(f"token {single_token!r} (id {token_id}) does not occur in the input")
        return int(where[0] if mode == "first" else where[-1])
