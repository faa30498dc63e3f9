"""fxhook demo: a real model (SmolLM2-135M-Instruct, shipped in a PyPI package), fully offline.

    python examples/demo.py                       # "The capital of France is"
    python examples/demo.py "Your own prompt"

Prints the model's top-5 next tokens, then a few of the activations that
run_with_cache recorded, under TransformerLens's hook names.
"""
import os
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # quiet the GGUF dequantisation progress bar

import torch
from transformers.utils import logging as hf_logging

from fxhook import HookedTransformer

prompt = " ".join(sys.argv[1:]) or "The capital of France is"
hf_logging.disable_progress_bar()

start = time.perf_counter()
model = HookedTransformer.from_pretrained("smollm2")  # processed, as TransformerLens: fold_ln, centring
cfg = model.cfg
print(f"Loaded {cfg.model_name}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads "
      f"({cfg.n_key_value_heads} kv), on {cfg.device}, in {time.perf_counter() - start:.0f} s\n")

with torch.no_grad():
    logits, cache = model.run_with_cache(prompt)
str_tokens = model.to_str_tokens(prompt)
print(f"Prompt tokens: {str_tokens}\n")

print(f"Top 5 next tokens after {prompt!r}:")
probs = logits[0, -1].softmax(dim=-1)
for p, token in zip(*probs.topk(5)):
    print(f"  {model.to_string(token)!r:>14}  {p.item():6.1%}")

print("\nResidual stream norm at the last position, entering each block (blocks.L.hook_resid_pre):")
norms = [cache[f"blocks.{layer}.hook_resid_pre"][0, -1].norm().item() for layer in range(cfg.n_layers)]
for layer in [*range(0, cfg.n_layers - 1, 3), cfg.n_layers - 1]:
    print(f"  layer {layer:2d}  {norms[layer]:7.1f}  {'#' * round(40 * norms[layer] / max(norms))}")

last = cfg.n_layers - 1
pattern = cache[f"blocks.{last}.attn.hook_pattern"][0, :, -1]  # [head, key position] for the last query
print(f"\nWhere each head of the last layer looks from the last token (blocks.{last}.attn.hook_pattern):")
for head, weights in enumerate(pattern):
    weight, position = weights.max(dim=-1)
    print(f"  head {head}: {str_tokens[position]!r:>12} (position {position.item()}) with weight {weight:.2f}")

print("\nA few hooks and their shapes [batch, position, ...]:")
for name in ("hook_embed", "blocks.0.attn.hook_q", "blocks.0.attn.hook_k", "blocks.0.attn.hook_pattern",
             "blocks.0.mlp.hook_post", "ln_final.hook_normalized"):
    print(f"  {name:28s} {tuple(cache[name].shape)}")
print(f"\n{len(cache.cache_dict)} activations cached in all; model.hook_dict lists every hook name.")
