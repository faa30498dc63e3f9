"""Activation patching: where does the model keep "France" on its way to " Paris"?

    python examples/activation_patching.py [OUT_DIR]      # OUT_DIR: also save a heatmap PNG

Run the corrupted prompt ("...Italy is" -> " Rome"), and for each layer and position put back
the residual stream of the clean run ("...France is" -> " Paris"). The metric is the logit
difference Paris - Rome, scaled so that 0 is the corrupted run and 1 the clean one. Early on
only the " France" position matters; in the last layers only the final position does: the
information has been moved there by attention in between.
"""
from __future__ import annotations

import sys

import torch

from fxhook import HookedTransformer
from fxhook.analysis import patching

CLEAN, CORRUPTED = "The capital of France is", "The capital of Italy is"
ANSWER, WRONG = " Paris", " Rome"


def load_model() -> HookedTransformer:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return HookedTransformer.from_pretrained("smollm2", device="cpu")


def main(model: HookedTransformer | None = None, layers: list[int] | None = None, out_dir: str | None = None
         ) -> dict:
    """layers: the layers to patch (default all; fewer is faster)."""
    model = model or load_model()
    clean, corrupted = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    if clean.shape != corrupted.shape:
        raise ValueError("patching compares positions: the two prompts must have the same number of tokens")
    right, wrong = model.to_single_token(ANSWER), model.to_single_token(WRONG)

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, right] - logits[0, -1, wrong]

    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean)
        clean_diff, corrupted_diff = logit_diff(clean_logits).item(), logit_diff(model(corrupted)).item()

    def recovered(logits: torch.Tensor) -> torch.Tensor:  # 0: corrupted run, 1: clean run
        return (logit_diff(logits) - corrupted_diff) / (clean_diff - corrupted_diff)

    layers = list(range(model.cfg.n_layers)) if layers is None else list(layers)
    n_pos = clean.shape[-1]
    rows = [(layer, pos) for layer in layers for pos in range(n_pos)]
    results = patching.generic_activation_patch(model, corrupted, clean_cache, recovered,
                                                patching.layer_pos_patch_setter, "resid_pre",
                                                index_df=rows).reshape(len(layers), n_pos)

    str_tokens = model.to_str_tokens(clean)
    print(f"logit({ANSWER!r}) - logit({WRONG!r}): clean {clean_diff:.2f}, corrupted {corrupted_diff:.2f}")
    print("Fraction of the clean result recovered by patching resid_pre (rows: layers):")
    print("       " + "".join(f"{t[:8]!r:>11}" for t in str_tokens))
    for layer, row in zip(layers, results):
        print(f"  {layer:3d}  " + "".join(f"{v:>11.2f}" for v in row.tolist()))
    if out_dir is not None:
        from fxhook.analysis.plots import plot_patching

        paths = plot_patching(results, f"{out_dir}/patching_resid_pre.png", x_labels=str_tokens,
                              y_labels=[str(l) for l in layers], title="Recovered logit difference, resid_pre")
        print(f"Saved {paths[0]}")
    return {"results": results, "layers": layers, "str_tokens": str_tokens, "clean_diff": clean_diff,
            "corrupted_diff": corrupted_diff}


if __name__ == "__main__":
    main(out_dir=sys.argv[1] if len(sys.argv) > 1 else None)
