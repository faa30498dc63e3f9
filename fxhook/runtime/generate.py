"""generate and generate_stream on fxhook's rewritten graph (TransformerLens's interface).

Each step runs a decode graph (fxhook/runtime/decode.py) built with the same
HookPoint objects as the full graph, so hooks attached with `model.hooks(...)`
fire at every step (prefill and each decode step), seeing that step's
positions. Three ways to run the steps:

- eager, with a growing KV cache (the default);
- compiled decode (`use_compiled_decode=True`, or the model's compile setting):
  the prompt runs compiled into a static preallocated cache (padded on the left to
  one of a few shapes; eagerly and unpadded while a hook is attached), then every
  token runs one compiled graph whose input shapes never change; any batch size,
  left padding masked;
- no cache (`use_past_kv_cache=False`): the whole sequence every step.

Input may be text, tokens, or input embeddings [batch, pos, d_model] (these
replace the token embeddings at hook_embed; positional embeddings are still
added, as TransformerLens does).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
import tqdm

from fxhook.config import HookedTransformerConfig
from fxhook.runtime.decode import Decoder, check_context_length
from fxhook.runtime.graphs import GraphStore
from fxhook.runtime.tokens import TextCodec, check_token_ids
from fxhook.runtime.sampling import sample_logits

_RETURN_TYPES = ("input", "str", "tokens", "embeds")
_GENERATION_KWARGS = ("output_logits", "return_dict_in_generate")


class _Prompt:
    """What generation starts from: tokens [b, p] (None for embeddings input), embeds [b, p, d_model]
    (None for token input), the padding mask [b, p], and the input kind ("str", "tokens", "embeds")."""

    def __init__(self, tokens: torch.Tensor | None, embeds: torch.Tensor | None, mask: torch.Tensor, kind: str):
        self.tokens, self.embeds, self.mask, self.kind = tokens, embeds, mask, kind

    @property
    def batch(self) -> int:
        return self.mask.shape[0]

    @property
    def length(self) -> int:
        return self.mask.shape[1]


class Generator:
    """generate and generate_stream (HookedTransformer's methods of these names delegate here): the step
    loop over the decoder's KV cache (runtime/decode.py), text through the codec (runtime/tokens.py),
    sampling from runtime/sampling.py."""

    def __init__(self, cfg: HookedTransformerConfig, graphs: GraphStore, decoder: Decoder, codec: TextCodec):
        self.cfg = cfg
        self.graphs = graphs
        self.decoder = decoder
        self.codec = codec

    # ------------------------------------------------------------ inputs
    def _generation_input(self, input, prepend_bos, padding_side, attention_mask=None) -> _Prompt:
        if isinstance(input, str) or (isinstance(input, list) and input and all(isinstance(s, str) for s in input)):
            side = "left" if isinstance(input, list) and len(input) > 1 else padding_side
            tokens, mask = self.codec._tokenize(input, prepend_bos, side)
            if self.codec._padding_side(side) != "left":
                mask = torch.ones_like(tokens)
            prompt = _Prompt(tokens, None, mask, "str")
        elif isinstance(input, torch.Tensor) and input.is_floating_point():
            if input.dim() != 3 or input.shape[-1] != self.cfg.d_model:
                raise ValueError(f"input embeddings must have shape [batch, pos, d_model={self.cfg.d_model}], "
                                 f"got {tuple(input.shape)}")
            prompt = _Prompt(None, input, self._checked_mask(attention_mask, input.shape[:2]), "embeds")
        elif isinstance(input, torch.Tensor):
            tokens = input[None] if input.dim() == 1 else input
            if tokens.dim() != 2:
                raise ValueError(f"token input must have shape [batch, pos], got {tuple(input.shape)}")
            check_token_ids(tokens, self.cfg.d_vocab, "generate's input")
            mask = (self._checked_mask(attention_mask, tokens.shape) if attention_mask is not None
                    else self.codec.default_attention_mask(tokens, prepend_bos, padding_side))
            if attention_mask is None:
                self._warn_unmasked_padding(tokens, mask)
            prompt = _Prompt(tokens, None, mask, "tokens")
        else:
            raise TypeError(f"generate takes a string, a list of strings, tokens [batch, pos] or embeddings "
                            f"[batch, pos, d_model], got {type(input).__name__}")
        param = next(self.graphs.hf_model.parameters())
        device = self.graphs.input_device()  # the embedding's device (on a split model, the first block's)
        prompt.mask = prompt.mask.to(device)
        if prompt.tokens is not None:
            prompt.tokens = prompt.tokens.to(device)
        if prompt.embeds is not None:
            prompt.embeds = prompt.embeds.to(device, param.dtype)
        return prompt

    def _warn_unmasked_padding(self, tokens: torch.Tensor, mask: torch.Tensor) -> None:
        """Token batches carry no padding information: say so when rows look padded but nothing masks them."""
        pad = getattr(self.codec.tokenizer, "pad_token_id", None)
        if pad is None or tokens.shape[0] < 2:
            return
        is_pad = (tokens == pad) & (mask != 0)
        trailing = is_pad[:, -1]
        leading = is_pad[:, :2].all(dim=-1) if tokens.shape[1] > 1 else torch.zeros_like(trailing)
        if bool(trailing.any()) or bool(leading.any()):
            rows = (trailing | leading).nonzero().flatten().tolist()
            warnings.warn(f"rows {rows} of this token batch look padded (pad token {pad} at their ends), but no "
                          f"attention_mask says so: generation reads the pad tokens as text and continues after "
                          f"them. Pad on the left and pass attention_mask= (or padding_side='left'), or pass text",
                          stacklevel=4)

    @staticmethod
    def _checked_mask(attention_mask: torch.Tensor | None, shape) -> torch.Tensor:
        if attention_mask is None:
            return torch.ones(tuple(shape), dtype=torch.long)
        mask = attention_mask[None] if attention_mask.dim() == 1 else attention_mask
        if tuple(mask.shape) != tuple(shape):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but the input has [batch, pos] = "
                             f"{tuple(shape)}")
        return mask.long()

    def _stop_tokens(self, stop_at_eos: bool, eos_token_id) -> tuple[list[int], int]:
        if not stop_at_eos:
            return [], 0
        tok_eos = getattr(self.codec.tokenizer, "eos_token_id", None)
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

    def _use_compiled_decode(self, use_compiled_decode: bool | None, use_past_kv_cache: bool) -> bool:
        if use_compiled_decode is None:  # follow the model's compile setting (model.compile())
            return self.graphs.compile_options is not None and use_past_kv_cache
        if use_compiled_decode and not use_past_kv_cache:
            raise ValueError("compiled decode runs over a static KV cache: it needs use_past_kv_cache=True "
                             "(or pass use_compiled_decode=False)")
        return bool(use_compiled_decode)

    # ------------------------------------------------------------ the step loop
    def _step_runner(self, prompt: _Prompt, max_new_tokens: int, use_past_kv_cache: bool, compiled: bool
                     ) -> Callable[[torch.Tensor | None], torch.Tensor]:
        """A function: None -> the prompt's logits [b, vocab] at its last position, then each new
        token [b] -> the logits [b, vocab] after it."""
        b = prompt.batch
        ones = torch.ones((b, 1), dtype=torch.long, device=prompt.mask.device)
        if compiled:
            cache = self.decoder.static_kv_cache_for(b, prompt.length, max_new_tokens)

            def run(new):
                if new is None:  # the prompt: compiled in a few padded shapes (Decoder.prefill_static)
                    ids = prompt.tokens if prompt.tokens is not None else self._shape_ids(prompt)
                    return self.decoder.prefill_static(cache, ids, prompt.mask, prompt.embeds)
                return self.decoder.run_static(cache, new[:, None], ones, compiled=True)[:, -1]
            return run
        if use_past_kv_cache:
            cache = self.decoder.init_kv_cache(b)

            def run(new):
                if new is None:
                    ids = prompt.tokens if prompt.tokens is not None else self._shape_ids(prompt)
                    return self.decoder.run_growing(cache, ids, prompt.mask, prompt.embeds)[:, -1]
                return self.decoder.run_growing(cache, new[:, None], ones)[:, -1]
            return run
        state = {"tokens": prompt.tokens, "embeds": prompt.embeds, "mask": prompt.mask}

        def run(new):  # no cache: the whole sequence every step
            if new is not None:
                state["mask"] = torch.cat([state["mask"], ones], dim=1)
                if state["tokens"] is not None:
                    state["tokens"] = torch.cat([state["tokens"], new[:, None]], dim=1)
                else:
                    state["embeds"] = torch.cat([state["embeds"], self.graphs.embed_tokens(new[:, None])], dim=1)
            if state["tokens"] is not None:
                check_context_length(self.cfg, state["tokens"].shape[-1])
                entry = self.graphs.forward(self.decoder.spec())  # run compiled when the model is (model.compile())
                return self.graphs.run(entry, state["tokens"], state["mask"])[:, -1]
            ids = self._shape_ids(_Prompt(None, state["embeds"], state["mask"], "embeds"))
            return self.decoder.run_growing(self.decoder.init_kv_cache(b), ids, state["mask"], state["embeds"])[:, -1]
        return run

    @staticmethod
    def _shape_ids(prompt: _Prompt) -> torch.Tensor:
        """Placeholder ids [b, p] for a graph fed with embeddings (it reads only their shape)."""
        return torch.zeros((prompt.batch, prompt.length), dtype=torch.long, device=prompt.mask.device)

    def _generate_steps(self, prompt: _Prompt, max_new_tokens, stop_at_eos, eos_token_id, do_sample, top_k,
                        top_p, temperature, freq_penalty, use_past_kv_cache, verbose, generator=None,
                        compiled: bool = False, logits_out: list[torch.Tensor] | None = None
                        ) -> Iterator[torch.Tensor]:
        """Yield each step's new tokens [b] (finished rows padded with EOS)."""
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
        stop_tokens, eos_pad = self._stop_tokens(stop_at_eos, eos_token_id)
        device = prompt.mask.device
        stop_tensor = torch.tensor(stop_tokens, dtype=torch.long, device=device)
        finished = torch.zeros(prompt.batch, dtype=torch.bool, device=device)
        # the frequency penalty counts the prompt's tokens (when known) and the generated ones
        history = prompt.tokens if prompt.tokens is not None else torch.zeros((prompt.batch, 0), dtype=torch.long,
                                                                              device=device)
        history_mask = prompt.mask if prompt.tokens is not None else torch.zeros_like(history)
        run = self._step_runner(prompt, max_new_tokens, use_past_kv_cache, compiled) if max_new_tokens else None
        new = None
        for step in tqdm.tqdm(range(max_new_tokens), disable=not verbose):
            final = run(new).to(device)  # a split model's logits come from the last device
            if bool(torch.isnan(final).any()):
                rows = torch.isnan(final).any(dim=-1).nonzero().flatten().tolist()
                raise FloatingPointError(f"the logits of new token {step} are NaN (batch rows {rows}): a hook or the "
                                         f"weights produced NaN, and no token can be chosen from them")
            if logits_out is not None:
                logits_out.append(final.clone())
            if do_sample:
                new = sample_logits(final, top_k, top_p, temperature, freq_penalty, history, history_mask,
                                    generator)
            else:
                new = final.argmax(dim=-1)
            if stop_at_eos:
                new = torch.where(finished, torch.full_like(new, eos_pad), new)
                finished |= torch.isin(new, stop_tensor)
            if freq_penalty:
                history = torch.cat([history, new[:, None]], dim=1)
                history_mask = torch.cat([history_mask, torch.ones_like(new[:, None])], dim=1)
            yield new
            if stop_at_eos and bool(finished.all()):
                break

    # ------------------------------------------------------------ outputs
    def _check_return_type(self, return_type, kind: str) -> str:
        if return_type not in _RETURN_TYPES:
            raise ValueError(f"return_type must be one of {_RETURN_TYPES}, got {return_type!r}")
        if return_type == "input":
            return_type = {"str": "str", "tokens": "tokens", "embeds": "embeds"}[kind]
        if return_type == "str" and self.codec.tokenizer is None:
            what = "the new tokens of an embeddings input" if kind == "embeds" else "the output"
            raise ValueError(f"return_type='str' needs a tokenizer to decode {what}, and this model has none: "
                             f"set one with model.set_tokenizer(...) or use return_type='tokens'")
        return return_type

    def _format_output(self, output_tokens: torch.Tensor, return_type: str, embeds: torch.Tensor | None = None):
        if return_type == "tokens":
            return output_tokens
        if return_type == "embeds":
            return embeds if embeds is not None else self.graphs.embed_tokens(output_tokens)
        texts = [self.codec.tokenizer.decode(row, skip_special_tokens=True) for row in output_tokens.tolist()]
        return texts[0] if len(texts) == 1 else texts

    @staticmethod
    def _output_logits_flag(generation_kwargs: dict) -> bool:
        unknown = [k for k in generation_kwargs if k not in _GENERATION_KWARGS]
        if unknown:
            warnings.warn(f"generate ignores these generation kwargs: {unknown} (supported: output_logits; "
                          f"return_dict_in_generate is accepted and ignored)", UserWarning, stacklevel=3)
        return bool(generation_kwargs.get("output_logits", False))

    def generate(self, input: Any = "", max_new_tokens: int = 10, stop_at_eos: bool = True,
                 eos_token_id: int | Sequence[int] | None = None, do_sample: bool = True, top_k: int | None = None,
                 top_p: float | None = None, temperature: float = 1.0, freq_penalty: float = 0.0,
                 use_past_kv_cache: bool = True, prepend_bos: bool | None = None, padding_side: str | None = None,
                 return_type: str | None = "input", verbose: bool = True, *,
                 generator: torch.Generator | None = None, attention_mask: torch.Tensor | None = None,
                 use_compiled_decode: bool | None = None, **generation_kwargs):
        """Sample up to max_new_tokens tokens after `input` (TransformerLens's generate).

        input: a string, a list of strings (left-padded; each row generates as it would alone),
        tokens [batch, pos], or input embeddings [batch, pos, d_model] (they stand in for the token
        embeddings; positional embeddings are added). Rows that produce an EOS token (any of
        eos_token_id) are padded with EOS until every row has finished. return_type: "input" (the
        input's kind), "str", "tokens" or "embeds" (token embeddings of the whole sequence); with
        embeddings input, "tokens" and "str" give only the new tokens (as TransformerLens).
        freq_penalty counts the prompt's tokens and the generated ones (only the generated ones for
        embeddings input). Hooks attached with `model.hooks(...)` apply at every step.
        output_logits=True (a generation kwarg, as TransformerLens) returns a
        transformers GenerateDecoderOnlyOutput(sequences=tokens, logits=(one [batch, d_vocab] per step)).

        fxhook's additions: generator, a torch.Generator for sampling (otherwise torch's global RNG);
        attention_mask [batch, pos], the padding mask of left-padded tokens or embeddings;
        use_compiled_decode: run each new token through a torch.compile'd graph over a static KV
        cache (compiled once per batch size and cache bucket; None follows the model's compile
        setting). Under compiled decode, hook_attn_scores / hook_pattern span the whole static cache
        (unwritten slots masked: -inf scores, zero pattern).
        """
        output_logits = self._output_logits_flag(generation_kwargs)
        if attention_mask is not None and not isinstance(input, torch.Tensor):
            raise ValueError("attention_mask is for token or embeddings input; text gets its mask from the tokenizer")
        prompt = self._generation_input(input, prepend_bos, padding_side, attention_mask)
        return_type = self._check_return_type(return_type, prompt.kind)
        compiled = self._use_compiled_decode(use_compiled_decode, use_past_kv_cache)
        logits: list[torch.Tensor] | None = [] if output_logits else None
        with torch.no_grad():
            new = list(self._generate_steps(prompt, max_new_tokens, stop_at_eos, eos_token_id, do_sample, top_k,
                                            top_p, temperature, freq_penalty, use_past_kv_cache, verbose,
                                            generator, compiled, logits))
            new = torch.stack(new, dim=1) if new else torch.zeros((prompt.batch, 0), dtype=torch.long,
                                                                  device=prompt.mask.device)
            tokens = new if prompt.tokens is None else torch.cat([prompt.tokens, new], dim=1)
            embeds = None
            if return_type == "embeds" and prompt.embeds is not None:
                embeds = torch.cat([prompt.embeds, self.graphs.embed_tokens(new)], dim=1)
            result = self._format_output(tokens, return_type, embeds)
        if output_logits:
            from transformers.generation.utils import GenerateDecoderOnlyOutput

            return GenerateDecoderOnlyOutput(sequences=tokens, logits=tuple(logits))
        return result

    def generate_stream(self, input: Any = "", max_new_tokens: int = 10, max_tokens_per_yield: int = 25,
                        stop_at_eos: bool = True, eos_token_id: int | Sequence[int] | None = None,
                        do_sample: bool = True, top_k: int | None = None, top_p: float | None = None,
                        temperature: float = 1.0, freq_penalty: float = 0.0, use_past_kv_cache: bool = True,
                        prepend_bos: bool | None = None, padding_side: str | None = None,
                        return_type: str | None = "input", verbose: bool = True, *,
                        generator: torch.Generator | None = None, use_compiled_decode: bool | None = None
                        ) -> Iterator:
        """generate, yielding every max_tokens_per_yield tokens: first the input with the first new
        tokens, then only the tokens since the last yield (as TransformerLens does). return_type "str"
        (or "input" with text) yields decoded text of each chunk, otherwise token tensors."""
        if not isinstance(max_tokens_per_yield, int) or max_tokens_per_yield < 1:
            raise ValueError(f"max_tokens_per_yield must be a positive int, got {max_tokens_per_yield!r}")
        prompt = self._generation_input(input, prepend_bos, padding_side)
        if prompt.kind == "embeds":
            raise ValueError("generate_stream takes text or tokens; use generate for input embeddings")
        return_type = self._check_return_type(return_type, prompt.kind)
        if return_type == "embeds":
            raise ValueError("generate_stream yields text or tokens: return_type='embeds' is not supported")
        compiled = self._use_compiled_decode(use_compiled_decode, use_past_kv_cache)
        with torch.no_grad():
            pending: list[torch.Tensor] = [prompt.tokens]  # the first yield starts with the input
            count, new_pending = prompt.length, 0
            for new in self._generate_steps(prompt, max_new_tokens, stop_at_eos, eos_token_id, do_sample, top_k,
                                            top_p, temperature, freq_penalty, use_past_kv_cache, verbose,
                                            generator, compiled):
                pending.append(new[:, None])
                count, new_pending = count + 1, new_pending + 1
                if count >= max_tokens_per_yield:
                    yield self._format_output(torch.cat(pending, dim=1), return_type)
                    pending, count, new_pending = [], 0, 0
            if new_pending:
                yield self._format_output(torch.cat(pending, dim=1), return_type)
