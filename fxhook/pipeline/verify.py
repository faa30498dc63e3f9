"""The decode self-check: a lowered decode graph must give the full graph's logits before it is used."""
from __future__ import annotations

import torch

from fxhook.core.kv_ops import positions_from_mask


def verify_decode(decode, full: torch.fx.GraphModule, n_layers: int, n_kv_heads: int, d_head: int, vocab: int,
                  static: bool = False, embed=None) -> None:
    """Check on a tiny input that prefill + single steps of `decode` give `full`'s logits.

    `decode` follows the calling convention of fxhook/passes/kv_cache.py (growing cache, or static
    with `static`); with `embed` (tokens -> embeddings) it takes the embeddings as its last input
    before any cache position. A model whose HF code derives positions or masks from something the
    decode root does not control would otherwise generate wrong tokens silently; this turns that
    into an error at build time.
    """
    param = next(iter(full.parameters()), None)
    device = param.device if param is not None else "cpu"
    dtype = param.dtype if param is not None else torch.float32
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, 5), generator=g).to(device)
    mask = torch.ones_like(tokens)
    mask[0, 0] = 0  # a left-padded row: positions must come from the mask
    length = 8 if static else 0  # static: slots past the sequence exist and must not be read
    kv = [torch.zeros((2, n_kv_heads, length, d_head), dtype=dtype, device=device) for _ in range(2 * n_layers)]
    buffer_mask = torch.ones((2, length), dtype=mask.dtype, device=device)
    buffer_mask[:, :5] = mask if static else buffer_mask[:, :5]
    with torch.no_grad():
        expected = full(tokens, mask)
        got = []
        for start, stop in ((0, 3), (3, 4), (4, 5)):
            ids = tokens[:, start:stop]
            positions = positions_from_mask(mask[:, :stop], stop - start)
            extra = [] if embed is None else [embed(ids)]
            if embed is not None:
                ids = torch.zeros_like(ids)  # the graph must not read the ids
            if static:
                got.append(decode(ids, positions, buffer_mask, *kv, *extra,
                                  torch.arange(start, stop, device=device)))
            else:
                out = decode(ids, positions, mask[:, :stop], *kv, *extra)
                got.append(out[0])
                kv = list(out[1:])
        got = torch.cat(got, dim=1)
    atol = 1e-3 if dtype == torch.float32 or dtype == torch.float64 else 5e-2
    scale = 1.0 + float(expected.abs().max())
    err = float((got.float() - expected.float()).abs().max())
    if not err <= atol * scale:
        raise NotImplementedError(
            f"fxhook's KV-cache decode graph disagrees with the full graph for this model (max logit difference "
            f"{err:.3g}): its HF code likely derives positions or the attention mask from something other than "
            f"position_ids and the padding mask. Generate with use_past_kv_cache=False.")
