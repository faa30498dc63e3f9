"""What a graph computes: the keys the runtime asks the pipeline for graphs by."""
from __future__ import annotations

from dataclasses import dataclass

from fxhook.config import HookedTransformerConfig


@dataclass(frozen=True)
class GraphSpec:
    """One forward (or decode-step) graph variant: which flag-gated hooks exist, which layers run,
    which hook points stay in the graph and which activations it returns."""

    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_attn_in: bool = False
    use_hook_mlp_in: bool = False
    ungroup_grouped_query_attention: bool = False
    start_at_layer: int | None = None
    stop_at_layer: int | None = None
    live_hooks: frozenset[str] | None = None  # keep only these hook points (None: keep all)
    outputs: frozenset[str] = frozenset()  # activations returned as extra outputs (needs live_hooks)
    resume_from: frozenset[str] = frozenset()  # hook points the graph starts from (passes/resume_from.py)
    use_hook_tokens: bool = False  # TransformerLens's hook_tokens on the input token ids

    @classmethod
    def from_cfg(cls, cfg: HookedTransformerConfig, start: int | None = None, stop: int | None = None,
                 live_hooks: frozenset[str] | None = None, outputs: frozenset[str] = frozenset()
                 ) -> "GraphSpec":
        return cls(cfg.use_attn_result, cfg.use_split_qkv_input, cfg.use_attn_in, cfg.use_hook_mlp_in,
                   cfg.ungroup_grouped_query_attention, start, stop, live_hooks, outputs,
                   use_hook_tokens=bool(cfg.use_hook_tokens))

    @property
    def wanted_hooks(self) -> frozenset[str] | None:
        """Every hook point this graph must expose (None: all of them)."""
        return None if self.live_hooks is None else self.live_hooks | self.outputs | self.resume_from

    @property
    def pruned(self) -> bool:
        """A graph for one hook set (the runtime keeps a bounded number of these)."""
        return self.live_hooks is not None or bool(self.resume_from)


@dataclass(frozen=True)
class DecodeKind:
    """Which decode graph: static (preallocated cache, compiled decode) and/or fed with embeddings, and
    whether it returns the last position's logits only (a prompt's: passes/last_position.py; its hooks
    after the last block would see that one position, so it is for graphs with none live)."""

    static: bool = False
    embeds: bool = False
    last_position: bool = False
