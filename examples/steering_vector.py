"""A steering vector added during generation: push the model from "hate" towards "love".

    python examples/steering_vector.py

The vector is the difference of the residual stream entering block LAYER between the prompts
"I love" and "I hate", at their last token (activation addition, Turner et al. 2023). A hook adds
COEFFICIENT times it at every position but the first (the BOS position's residual stream is huge
and read by every head as an attention sink: it is left alone) while the model generates;
`with model.hooks(...)` keeps the hook attached for the prefill and every decoding step. On this
small model the effect on the text is crude; the measured one is the shift of the next-token
logits from " hate" to " love".
"""
from __future__ import annotations

import torch

from fxhook import HookedTransformer

PROMPT = "I think dogs are"
LAYER, COEFFICIENT = 8, 1.0


def load_model() -> HookedTransformer:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return HookedTransformer.from_pretrained("smollm2", device="cpu")


def steering_vector(model: HookedTransformer, layer: int, towards: str, away: str) -> torch.Tensor:
    """[d_model]: resid_pre of `towards` minus that of `away`, at their last token."""
    name = f"blocks.{layer}.hook_resid_pre"
    with torch.no_grad():
        _, toward_cache = model.run_with_cache(towards, names_filter=name)
        _, away_cache = model.run_with_cache(away, names_filter=name)
    return toward_cache[name][0, -1] - away_cache[name][0, -1]


def main(model: HookedTransformer | None = None, prompt: str = PROMPT, layer: int = LAYER,
         coefficient: float = COEFFICIENT, max_new_tokens: int = 20) -> dict:
    model = model or load_model()
    vector = steering_vector(model, layer, "I love", "I hate")
    calls = []

    def steer(resid: torch.Tensor, hook) -> torch.Tensor:  # resid: [batch, pos, d_model]
        calls.append(resid.shape[1])
        first = 1 if resid.shape[1] > 1 else 0  # the prefill starts with BOS; a decoding step is one new token
        resid = resid.clone()
        resid[:, first:] += coefficient * vector
        return resid

    love, hate = model.to_single_token(" love"), model.to_single_token(" hate")
    with torch.no_grad():
        plain_logits = model(prompt)[0, -1]
        plain = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, verbose=False,
                               return_type="str")
        with model.hooks(fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", steer)]):
            steered_logits = model(prompt)[0, -1]
            calls.clear()  # count the hook's calls during generation only
            steered = model.generate(prompt, max_new_tokens=max_new_tokens, do_sample=False, verbose=False,
                                     return_type="str")
    plain_gap = (plain_logits[love] - plain_logits[hate]).item()
    steered_gap = (steered_logits[love] - steered_logits[hate]).item()
    print(f"Steering with {coefficient} x (I love - I hate) at blocks.{layer}.hook_resid_pre\n")
    print(f"without: {plain!r}")
    print(f"with:    {steered!r}\n")
    print(f"logit(' love') - logit(' hate') after the prompt: {plain_gap:+.2f} without, {steered_gap:+.2f} with")
    print(f"the hook ran {len(calls)} times during generation (prefill of {calls[0]} positions, then one "
          f"position a step)")
    return {"plain": plain, "steered": steered, "plain_gap": plain_gap, "steered_gap": steered_gap,
            "hook_positions": calls}


if __name__ == "__main__":
    main()
