"""Reading HF parameters into a graph being rewritten, as fx Proxies of get_attr nodes."""
from __future__ import annotations

from torch import fx, nn
from torch.fx.proxy import GraphAppendingTracer, Proxy

from fxhook.adapter import Adapter
from fxhook.weights import Projection, read_input_projection, read_output_projection

HF_ROOT = "hf"  # the captured graph keeps the HF model as this submodule


class BlockParams:
    """Parameters of block `layer` as Proxies in `gm.graph` (insert point set by the caller)."""

    def __init__(self, gm: fx.GraphModule, adapter: Adapter, layer: int, tracer: GraphAppendingTracer):
        self.gm = gm
        self.adapter = adapter
        self.tracer = tracer
        self.prefix = f"{HF_ROOT}.{adapter.blocks}.{layer}."
        self.layer = layer

    def module(self, path: str) -> nn.Module:
        return self.gm.get_submodule(self.prefix + path)

    def tensor(self, path: str, name: str) -> Proxy | None:
        if getattr(self.module(path), name, None) is None:
            return None
        return Proxy(self.gm.graph.get_attr(self.prefix + path + "." + name), self.tracer)

    def input_projection(self, proj: Projection, n_heads: int, d_head: int):
        """W [heads, d_model, d_head], b [heads, d_head] | None."""
        return read_input_projection(self.tensor(proj.module, "weight"), self.tensor(proj.module, "bias"),
                                     proj, n_heads, d_head)

    def output_projection(self, proj: Projection, n_heads: int, d_head: int):
        return read_output_projection(self.tensor(proj.module, "weight"), self.tensor(proj.module, "bias"),
                                      proj, n_heads, d_head)

    def norm(self, path: str, hook_prefix: str) -> tuple[Proxy | None, Proxy | None, float]:
        """weight, bias and epsilon of the norm at `path`, known by its hook prefix ("blocks.0.ln1.")."""
        eps = self.gm.meta["norm_eps"][hook_prefix]
        return self.tensor(path, "weight"), self.tensor(path, "bias"), eps
