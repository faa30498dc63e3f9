"""Attribution patching against actual patching, and the hook graph the fast sweeps run on.

    python examples/attribution_patching.py [OUT_DIR]      # OUT_DIR: save the two pictures as PNG

Which attention heads carry "France" to " Paris"? Actual patching puts each head's clean output
(hook_z) into the corrupted run, one head per forward pass: fxhook runs only the part of the model
after the patched head (`model.run_from`), the corrupted run cached once. Attribution patching
estimates all of them from one clean run and one corrupted forward and backward pass:
(clean z - corrupted z) . d(logit difference)/dz. The scatter shows how well the estimate tracks the
real effect (the correlation is printed); the second picture is the hook dependency graph of the
first two blocks, edges coloured by the path they take (residual, q, k, v, attention, MLP).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from fxhook import HookedTransformer
from fxhook.analysis import patching
from fxhook.analysis.hook_graph import draw_hook_graph

CLEAN, CORRUPTED = "The capital of France is", "The capital of Italy is"
ANSWER, WRONG = " Paris", " Rome"


def load_model() -> HookedTransformer:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    return HookedTransformer.from_pretrained("smollm2", device="cpu")


def main(model: HookedTransformer | None = None, layers: list[int] | None = None, out_dir: str | None = None
         ) -> dict:
    """layers: the layers whose heads are actually patched (default all; fewer is faster)."""
    model = model or load_model()
    clean, corrupted = model.to_tokens(CLEAN), model.to_tokens(CORRUPTED)
    right, wrong = model.to_single_token(ANSWER), model.to_single_token(WRONG)

    def logit_diff(logits: torch.Tensor) -> torch.Tensor:
        return logits[0, -1, right] - logits[0, -1, wrong]

    with torch.no_grad():
        clean_logits, clean_cache = model.run_with_cache(clean, names_filter=lambda name: name.endswith("hook_z"))
        corrupted_diff = float(logit_diff(model(corrupted)))
    layers = list(range(model.cfg.n_layers)) if layers is None else layers
    heads = [(layer, head) for layer in layers for head in range(model.cfg.n_heads)]
    actual = patching.generic_activation_patch(model, corrupted, clean_cache, logit_diff,
                                               patching.layer_head_vector_patch_setter, "z", index_df=heads)
    actual = actual - corrupted_diff  # the change patching makes
    estimate = patching.attribution_patch(model, clean, corrupted, logit_diff, hooks="z", per="head")[layers]
    estimate = estimate.reshape(-1)
    correlation = float(torch.corrcoef(torch.stack([actual, estimate]))[0, 1])
    print(f"logit difference: clean {float(logit_diff(clean_logits)):.3f}, corrupted {corrupted_diff:.3f}")
    print(f"{len(heads)} heads: correlation of attribution with actual patching {correlation:.3f}")
    order = actual.abs().argsort(descending=True)[:5]
    for i in order.tolist():
        layer, head = heads[i]
        print(f"  L{layer}H{head}: actual {actual[i]:+.3f}, attribution {estimate[i]:+.3f}")
    if out_dir is not None:
        _pictures(model, actual, estimate, correlation, Path(out_dir))
    return {"actual": actual, "estimate": estimate, "correlation": correlation, "heads": heads}


def _pictures(model: HookedTransformer, actual: torch.Tensor, estimate: torch.Tensor, correlation: float,
              out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(actual, estimate, s=12)
    low, high = float(min(actual.min(), estimate.min())), float(max(actual.max(), estimate.max()))
    ax.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--")
    ax.set_xlabel("actual patching: change in logit difference")
    ax.set_ylabel("attribution patching estimate")
    ax.set_title(f"each head's output (hook_z), correlation {correlation:.3f}")
    fig.tight_layout()
    fig.savefig(out / "attribution_vs_actual.png", dpi=120)
    plt.close(fig)
    graph = model.hook_graph()
    first_blocks = [name for name, layer in graph.nodes(data="layer") if layer in (None, 0, 1)
                    and not name.startswith("ln_final")]
    fig = draw_hook_graph(graph.subgraph(first_blocks), out / "hook_graph.png",
                          title="hook dependency graph, blocks 0-1")
    plt.close(fig)


if __name__ == "__main__":
    main(out_dir=sys.argv[1] if len(sys.argv) > 1 else None)
