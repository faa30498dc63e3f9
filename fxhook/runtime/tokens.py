"""Tokenizer helpers with TransformerLens's prepend_bos / padding_side semantics."""
from __future__ import annotations

import torch


class TokenizerMixin:
    """to_tokens, to_string, to_str_tokens, ... for HookedTransformer."""

    tokenizer = None
    cfg = None

    def _set_tokenizer_defaults(self) -> None:
        tok = self.tokenizer
        if tok is None:
            return
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.bos_token
        if self.cfg.default_padding_side:
            tok.padding_side = self.cfg.default_padding_side
        self.cfg.tokenizer_name = getattr(tok, "name_or_path", None)

    def _require_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise ValueError(f"{what} needs a tokenizer, and this model has none: pass tokenizer= to "
                             f"from_pretrained or call model.set_tokenizer(tokenizer), or pass token ids")
        return self.tokenizer

    def set_tokenizer(self, tokenizer, default_padding_side: str | None = None) -> None:
        self.tokenizer = tokenizer
        if default_padding_side is not None:
            self.cfg.default_padding_side = default_padding_side
        self._set_tokenizer_defaults()

    def to_tokens(self, input, prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> torch.Tensor:
        tok = self._require_tokenizer("to_tokens")
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        texts = [input] if isinstance(input, str) else list(input)
        if prepend_bos and tok.bos_token is not None:
            texts = [tok.bos_token + t for t in texts]
        side = padding_side or tok.padding_side
        old_side, tok.padding_side = tok.padding_side, side
        try:
            enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False,
                      truncation=truncate, max_length=self.cfg.n_ctx if truncate else None)
        finally:
            tok.padding_side = old_side
        tokens = enc["input_ids"]
        if move_to_device and self.cfg.device is not None:
            tokens = tokens.to(self.cfg.device)
        return tokens

    def input_to_tokens(self, input, prepend_bos, padding_side, attention_mask):
        """Tokens [b, p] and the padding mask [b, p] for any accepted model input."""
        if isinstance(input, (str, list)):
            tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side)
        elif isinstance(input, torch.Tensor):
            tokens = input[None] if input.dim() == 1 else input
        else:
            raise TypeError(f"model input must be a string, a list of strings or a token tensor, "
                            f"got {type(input).__name__}")
        if attention_mask is None:
            attention_mask = self.default_attention_mask(tokens, prepend_bos, padding_side)
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but the tokens have "
                             f"shape {tuple(tokens.shape)}")
        return tokens, attention_mask.to(tokens.device)

    def default_attention_mask(self, tokens: torch.Tensor, prepend_bos, padding_side) -> torch.Tensor:
        tok = self.tokenizer
        side = padding_side or (tok.padding_side if tok is not None else "right")
        if tok is None or side != "left" or tok.pad_token_id is None:
            return torch.ones_like(tokens)
        mask = (tokens != tok.pad_token_id).long()
        prepend_bos = self.cfg.default_prepend_bos if prepend_bos is None else prepend_bos
        if prepend_bos and tok.bos_token_id == tok.pad_token_id:
            # the first non-pad position is a BOS that looks like padding: un-mask it
            first_real = mask.argmax(dim=-1)
            has_real = mask.any(dim=-1)
            mask[torch.arange(len(mask)), (first_real - 1).clamp(min=0)] |= has_real.long() & (first_real > 0)
        return mask
