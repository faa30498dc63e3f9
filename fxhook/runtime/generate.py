"""Generation on fxhook's rewritten graph: forward with a KV cache, generate, generate_stream.

The cached path runs the decode graph (fxhook/capture/kv.py) built with the
same passes and the same HookPoint objects as the full graph, so hooks attached
with `model.hooks(...)` fire at every step (prefill and each decode step),
seeing that step's positions. Prefill is the decode graph with an empty past.

Sampling (`sample_logits`) follows TransformerLens: temperature, then the
frequency penalty, then top-k (or else top-p), then a draw from the softmax
with torch's global RNG (`torch.manual_seed` makes it reproducible), or from
`generator` when one is given.
"""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import tqdm
from torch import fx

from fxhook.runtime.kv_cache import KVCache

_RETURN_TYPES = ("input", "str", "tokens", "embeds")


# ---------------------------------------------------------------------- sampling helpers
def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive (use do_sample=False for greedy), got {temperature}")
    return logits / temperature


def apply_freq_penalty(logits: torch.Tensor, tokens: torch.Tensor, freq_penalty: float,
                       token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """logits [b, vocab] minus freq_penalty times how often each token occurs in its row of `tokens`
    (positions where token_mask is 0, i.e. padding, are not counted)."""
    if not freq_penalty:
        return logits
    weights = torch.ones_like(tokens, dtype=logits.dtype) if token_mask is None else token_mask.to(logits.dtype)
    counts = torch.zeros_like(logits).scatter_add_(-1, tokens.long(), weights)
    return logits - freq_penalty * counts


def top_k_filter(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the top_k largest logits of each row (ties with the k-th kept), -inf elsewhere."""
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p (always the top one)."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the token that crosses the threshold
    remove[..., 0] = False
    return logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))


def sample_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
                  temperature: float = 1.0, freq_penalty: float = 0.0, tokens: torch.Tensor | None = None,
                  token_mask: torch.Tensor | None = None, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Sample one token per row of logits [b, vocab]; temperature 0 means argmax."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = apply_temperature(logits.float(), temperature)
    if freq_penalty:
        if tokens is None:
            raise ValueError("freq_penalty needs the tokens generated so far")
        logits = apply_freq_penalty(logits, tokens, freq_penalty, token_mask)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    elif top_p is not None:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


# ---------------------------------------------------------------------- the mixin
class GenerationMixin:
    """forward(past_kv_cache=...), generate and generate_stream for HookedTransformer."""

    # ------------------------------------------------------------ the decode graph
    def _decode_kv_heads(self, spec) -> int:
        return self.cfg.n_heads if spec.ungroup_grouped_query_attention else self.cfg.n_kv_heads

    def decode_graph_for(self, spec) -> fx.GraphModule:
        """The hooked decode-step graph for `spec` (no layer slicing), built once; cleared with the variants."""
        from fxhook.compiler import build_variant, capture_decode_graph

        key = ("decode", spec)
        if key not in self._variants and spec.live_hooks is not None:
            import dataclasses

            from fxhook.compiler import pruned_variant

            full = self.decode_graph_for(dataclasses.replace(spec, live_hooks=None))
            self._remember_pruned(key, pruned_variant(full, spec.live_hooks))
        if key not in self._variants:
            ungroup = spec.ungroup_grouped_query_attention and self.cfg.n_kv_heads != self.cfg.n_heads
            captured_key = ("decode-captured", ungroup)
            if captured_key not in self._variants:
                if ungroup:
                    from fxhook.capture.ungroup import ungrouped_twin

                    hf = ungrouped_twin(self.hf_model, self.adapter, self.cfg.n_heads, self.cfg.n_kv_heads)
                    captured = capture_decode_graph(hf, self.adapter, self.cfg, n_kv_heads=self.cfg.n_heads)
                else:
                    captured = capture_decode_graph(self.hf_model, self.adapter, self.cfg)
                from fxhook.capture.kv import verify_decode

                verify_decode(captured, self._captured_for(spec), self.cfg.n_layers,
                              self.cfg.n_heads if ungroup else self.cfg.n_kv_heads, self.cfg.d_head, self.cfg.d_vocab)
                self._variants[captured_key] = captured
            self._variants[key] = build_variant(self._variants[captured_key], spec, self.cfg, self.adapter,
                                                self._make_point)
        return self._variants[key]

    def init_kv_cache(self, batch_size: int = 1) -> KVCache:
        """An empty KV cache for this model under its current flags."""
        from fxhook.compiler import GraphSpec

        param = next(self.parameters())
        return KVCache.init_cache(self.cfg, param.device, batch_size,
                                  n_kv_heads=self._decode_kv_heads(GraphSpec.from_cfg(self.cfg)), dtype=param.dtype)

    def _forward_with_cache(self, input, cache: KVCache, return_type, loss_per_token, prepend_bos, padding_side,
                            attention_mask, start_at_layer, stop_at_layer):
        from fxhook.compiler import GraphSpec

        if not isinstance(cache, KVCache):
            raise TypeError(f"past_kv_cache must be a fxhook KVCache (model.init_kv_cache(batch_size)), "
                            f"got {type(cache).__name__}")
        if start_at_layer is not None or stop_at_layer is not None:
            raise NotImplementedError("past_kv_cache with start_at_layer / stop_at_layer is not supported")
        if (cache.past_length > 0 and attention_mask is None and isinstance(input, torch.Tensor)
                and input.dtype in (torch.long, torch.int, torch.int32)):
            tokens = input[None] if input.dim() == 1 else input
            tokens = tokens.to(cache.attention_mask.device)
            attention_mask = torch.ones_like(tokens)  # a continuation has no leading padding
        else:
            tokens, attention_mask = self.input_to_tokens(input, prepend_bos, padding_side, attention_mask)
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"the input has batch size {tokens.shape[0]} but the cache was made for "
                             f"{cache.batch_size}")
        spec = GraphSpec.from_cfg(self.cfg, live_hooks=self.live_hooks())
        heads = self._decode_kv_heads(spec)
        if cache.keys and cache.keys[0].shape[1] != heads:
            raise ValueError(f"the cache holds {cache.keys[0].shape[1]} key/value heads but the model now uses "
                             f"{heads} (ungroup_grouped_query_attention changed?): make a new cache")
        full_mask = torch.cat([cache.attention_mask, attention_mask.to(cache.attention_mask)], dim=1)
        self._check_context_length(full_mask)
        out = self.decode_graph_for(spec)(tokens, full_mask, *cache.keys, *cache.values)
        n = self.cfg.n_layers
        logits = out[0]
        cache.update(out[1:1 + n], out[1 + n:1 + 2 * n], full_mask)
        return self._shaped_output(logits, tokens, attention_mask, return_type, loss_per_token)

    # ------------------------------------------------------------ generate
    def _generation_input(self, input, prepend_bos, padding_side, attention_mask=None):
        """(tokens [b, p], mask [b, p], input kind) for generate's accepted inputs."""
        if isinstance(input, str) or (isinstance(input, list) and input and all(isinstance(s, str) for s in input)):
            side = "left" if isinstance(input, list) and len(input) > 1 else padding_side
            tokens, mask = self._tokenize(input, prepend_bos, side)
            if self._padding_side(side) != "left":
                mask = torch.ones_like(tokens)
            kind = "str"
        elif isinstance(input, torch.Tensor):
            if input.is_floating_point():
                raise NotImplementedError(
                    "generate from input embeddings is not supported: fxhook's captured graph starts from token "
                    "ids (pass tokens or text)")
            tokens = input[None] if input.dim() == 1 else input
            if tokens.dim() != 2:
                raise ValueError(f"token input must have shape [batch, pos], got {tuple(input.shape)}")
            if attention_mask is not None:
                mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
                if mask.shape != tokens.shape:
                    raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but the tokens have shape "
                                     f"{tuple(tokens.shape)}")
                mask = mask.long()
            else:
                mask = self.default_attention_mask(tokens, prepend_bos, padding_side)
            kind = "tokens"
        else:
            raise TypeError(f"generate takes a string, a list of strings or a token tensor, "
                            f"got {type(input).__name__}")
        device = next(self.parameters()).device
        return tokens.to(device), mask.to(device), kind

    def _stop_tokens(self, stop_at_eos: bool, eos_token_id) -> tuple[list[int], int]:
        if not stop_at_eos:
            return [], 0
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if eos_token_id is None:
            if tok_eos is None:
                raise ValueError("stop_at_eos=True needs an EOS token: pass eos_token_id= (an int or a list of "
                                 "ints), attach a tokenizer with one, or pass stop_at_eos=False")
            eos_token_id = tok_eos
        if isinstance(eos_token_id, (int, torch.Tensor)) and not isinstance(eos_token_id, bool):
            stop = [int(eos_token_id)]
            return stop, stop[0]
        stop = [int(t) for t in eos_token_id]
        if not stop:
            raise ValueError("eos_token_id is an empty list")
        return stop, (tok_eos if tok_eos is not None else stop[0])

    def _generate_steps(self, tokens, mask, max_new_tokens, stop_at_eos, eos_token_id, do_sample, top_k, top_p,
                        temperature, freq_penalty, use_past_kv_cache, verbose, generator=None
                        ) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens [b] (finished rows padded with EOS)."""
        from fxhook.compiler import GraphSpec

        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        stop_tokens, eos_pad = self._stop_tokens(stop_at_eos, eos_token_id)
        stop_tensor = torch.tensor(stop_tokens, dtype=torch.long, device=tokens.device)
        batch = tokens.shape[0]
        finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
        cache = self.init_kv_cache(batch) if use_past_kv_cache else None
        step_input = tokens
        for _ in tqdm.tqdm(range(max_new_tokens), disable=not verbose):
            if cache is not None:
                new_mask = mask[:, cache.past_length:]
                logits = self._forward_with_cache(step_input, cache, "logits", False, None, None, new_mask,
                                                  None, None)
            else:
                self._check_context_length(tokens)
                logits = self.graph_for(GraphSpec.from_cfg(self.cfg, live_hooks=self.live_hooks()))(tokens, mask)
            final = logits[:, -1, :]
            if do_sample:
                new = sample_logits(final, top_k, top_p, temperature, freq_penalty, tokens, mask, generator)
            else:
                new = final.argmax(dim=-1)
            if stop_at_eos:
                new = torch.where(finished, torch.full_like(new, eos_pad), new)
                finished |= torch.isin(new, stop_tensor)
            tokens = torch.cat([tokens, new[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(new[:, None])], dim=1)
            step_input = new[:, None]
            yield new
            if stop_at_eos and bool(finished.all()):
                break

    def _check_return_type(self, return_type, kind: str) -> str:
        if return_type not in _RETURN_TYPES:
            raise ValueError(f"return_type must be one of {_RETURN_TYPES}, got {return_type!r}")
        if return_type == "input":
            return_type = "str" if kind == "str" else "tokens"
        if return_type == "str" and self.tokenizer is None:
            raise ValueError("return_type='str' needs a tokenizer, and this model has none: set one with "
                             "model.set_tokenizer(...) or use return_type='tokens'")
        return return_type

    def _format_output(self, output_tokens: torch.Tensor, return_type: str):
        if return_type == "tokens":
            return output_tokens
        if return_type == "embeds":
            from fxhook.capture.instrument import get_module

            return get_module(self.hf_model, self.adapter.embed)(output_tokens)
        texts = [self.tokenizer.decode(row, skip_special_tokens=True) for row in output_tokens.tolist()]
        return texts[0] if len(texts) == 1 else texts

    def generate(self, input: Any = "", max_new_tokens: int = 10, stop_at_eos: bool = True,
                 eos_token_id: int | Sequence[int] | None = None, do_sample: bool = True, top_k: int | None = None,
                 top_p: float | None = None, temperature: float = 1.0, freq_penalty: float = 0.0,
                 use_past_kv_cache: bool = True, prepend_bos: bool | None = None, padding_side: str | None = None,
                 return_type: str | None = "input", verbose: bool = True,
                 generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None):
        """Sample up to max_new_tokens tokens after `input` (TransformerLens's generate).

        input: a string, a list of strings (left-padded; each row generates as it would alone) or
        tokens [batch, pos]. Rows that produce an EOS token (any of eos_token_id) are padded with EOS
        until every row has finished. return_type: "input" (text for text input, tokens for
        tokens), "str", "tokens" or "embeds" (token embeddings of the whole sequence). Hooks attached
        with `model.hooks(...)` apply at every step. generator: an optional torch.Generator for
        sampling (otherwise torch's global RNG). attention_mask (fxhook's addition, token input only):
        the padding mask [batch, pos] of left-padded tokens, instead of the one derived from pad tokens.
        """
        if attention_mask is not None and not isinstance(input, torch.Tensor):
            raise ValueError("attention_mask is for token input; text input gets its mask from the tokenizer")
        tokens, mask, kind = self._generation_input(input, prepend_bos, padding_side, attention_mask)
        return_type = self._check_return_type(return_type, kind)
        with torch.no_grad():
            new = list(self._generate_steps(tokens, mask, max_new_tokens, stop_at_eos, eos_token_id, do_sample,
                                            top_k, top_p, temperature, freq_penalty, use_past_kv_cache, verbose,
                                            generator))
        output = torch.cat([tokens, torch.stack(new, dim=1)], dim=1) if new else tokens
        return self._format_output(output, return_type)

    def generate_stream(self, input: Any = "", max_new_tokens: int = 10, max_tokens_per_yield: int = 25,
                        stop_at_eos: bool = True, eos_token_id: int | Sequence[int] | None = None,
                        do_sample: bool = True, top_k: int | None = None, top_p: float | None = None,
                        temperature: float = 1.0, freq_penalty: float = 0.0, use_past_kv_cache: bool = True,
                        prepend_bos: bool | None = None, padding_side: str | None = None,
                        return_type: str | None = "input", verbose: bool = True,
                        generator: torch.Generator | None = None) -> Iterator:
        """generate, yielding every max_tokens_per_yield tokens: first the input with the first new
        tokens, then only the tokens since the last yield (as TransformerLens does). return_type "str"
        (or "input" with text) yields decoded text of each chunk, otherwise token tensors."""
        if not isinstance(max_tokens_per_yield, int) or max_tokens_per_yield < 1:
            raise ValueError(f"max_tokens_per_yield must be a positive int, got {max_tokens_per_yield!r}")
        tokens, mask, kind = self._generation_input(input, prepend_bos, padding_side)
        return_type = self._check_return_type(return_type, kind)
        if return_type == "embeds":
            raise ValueError("generate_stream yields text or tokens: return_type='embeds' is not supported")
        with torch.no_grad():
            pending: list[torch.Tensor] = [tokens]  # the first yield starts with the input
            count, new_pending = tokens.shape[1], 0
            for new in self._generate_steps(tokens, mask, max_new_tokens, stop_at_eos, eos_token_id, do_sample,
                                            top_k, top_p, temperature, freq_penalty, use_past_kv_cache, verbose,
                                            generator):
                pending.append(new[:, None])
                count, new_pending = count + 1, new_pending + 1
                if count >= max_tokens_per_yield:
                    yield self._format_output(torch.cat(pending, dim=1), return_type)
                    pending, count, new_pending = [], 0, 0
            if new_pending:
                yield self._format_output(torch.cat(pending, dim=1), return_type)
