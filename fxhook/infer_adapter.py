"""Adapter inference: an `Adapter` for a decoder class no adapter names, from its module tree.

The common decoder layout: a token embedding, one ModuleList of num_hidden_layers blocks, each
with an attention module holding separate q/k/v/o linear projections, one or two norms and an
MLP, then a final norm and an unembedding. Names are matched loosely; what matters is checked by
running the model once on a few tokens with forward hooks, so an inferred adapter is one whose
hook sites are what the contract says (the block input is the embedding, ln1 feeds q/k/v, ln2 or
ln1 feeds the MLP, the block adds attention and MLP outputs to its input, the final norm feeds
the unembedding). Anything else raises an error naming what was not found and where to write
an adapter instead.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from fxhook.adapter import Adapter, Attention, FeedForward, NormKind, Norms, Positions, Site
from fxhook.weights import Layout, Projection

_Q = ("q_proj", "query", "q", "wq", "query_proj")
_K = ("k_proj", "key", "k", "wk", "key_proj")
_V = ("v_proj", "value", "v", "wv", "value_proj")
_O = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o", "output_proj", "proj")
_GATE = ("gate_proj", "w1", "gate", "wi_0", "fc_gate")
_UP = ("up_proj", "w3", "fc1", "fc_in", "c_fc", "dense_h_to_4h", "wi", "wi_1", "up", "in_proj")
_DOWN = ("down_proj", "w2", "fc2", "fc_out", "c_proj", "dense_4h_to_h", "wo", "down", "out_proj")


class InferredAdapterWarning(UserWarning):
    """fxhook wrapped a model with an adapter it inferred (the warning names the inferred paths)."""


class CannotInferAdapter(NotImplementedError):
    """The model's layout is not the common decoder layout: it needs an adapter in adapters/."""


@dataclass
class _Probe:
    """Inputs and outputs of block 0's modules (and a few model-level ones) on one forward."""

    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]
    return None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or \
        "norm" in type(module).__name__.lower()


def _layout(module: nn.Module) -> Layout | None:
    if isinstance(module, nn.Linear):
        return "linear"
    if type(module).__name__ == "Conv1D" and getattr(module, "weight", None) is not None:
        return "conv1d"
    return None


def _source(cls: type) -> str:
    """The source of `cls.forward` (of its module when that cannot be read alone)."""
    try:
        return inspect.getsource(cls.forward)
    except (OSError, TypeError):
        module = inspect.getmodule(cls)
        return inspect.getsource(module) if module is not None else ""


def _path_of(root: nn.Module, target: nn.Module) -> str | None:
    return next((name for name, m in root.named_modules() if m is target), None)


def _pick(candidates: dict[str, nn.Module], names: tuple[str, ...]) -> str | None:
    """The candidate path whose last component is the first of `names` present."""
    by_leaf = {path.rsplit(".", 1)[-1]: path for path in candidates}
    return next((by_leaf[n] for n in names if n in by_leaf), None)


class _Inference:
    def __init__(self, hf_model: nn.Module, supported: list[str] | None = None):
        self.hf = hf_model
        self.config = hf_model.config
        self.name = type(hf_model).__name__
        self.supported = supported

    def fail(self, what: str) -> CannotInferAdapter:
        known = f" Architectures with an adapter: {', '.join(self.supported)}." if self.supported else ""
        return CannotInferAdapter(
            f"fxhook has no adapter for {self.name} and could not infer one from its module tree: {what}. "
            f"Write an Adapter for it in adapters/ (adapters/llama.py is the common layout, adapters/neox.py a "
            f"fused and parallel one) and add it to ADAPTERS in adapters/__init__.py.{known}")

    # ------------------------------------------------------------------ the module tree
    def blocks(self) -> str:
        n_layers = int(getattr(self.config, "num_hidden_layers", -1))
        lists = [(name, m) for name, m in self.hf.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
        matching = [name for name, m in lists if len(m) == n_layers]
        if len(matching) != 1:
            found = ", ".join(f"{name} ({len(m)})" for name, m in lists) or "none"
            raise self.fail(f"expected exactly one ModuleList of num_hidden_layers={n_layers} blocks, found: {found}")
        return matching[0]

    def embeddings(self) -> tuple[str, str]:
        embed, unembed = self.hf.get_input_embeddings(), self.hf.get_output_embeddings()
        embed_path = _path_of(self.hf, embed) if embed is not None else None
        unembed_path = _path_of(self.hf, unembed) if unembed is not None else None
        if embed_path is None or not isinstance(embed, nn.Embedding):
            raise self.fail("no token embedding (get_input_embeddings() is not an nn.Embedding in the model)")
        if unembed_path is None or _layout(unembed) != "linear":
            raise self.fail("no unembedding (get_output_embeddings() is not an nn.Linear in the model)")
        return embed_path, unembed_path

    def outside_blocks(self, blocks: str, exclude: tuple[str, ...]) -> dict[str, nn.Module]:
        return {name: m for name, m in self.hf.named_modules()
                if name and not name.startswith(blocks + ".") and name != blocks and name not in exclude}

    def attention(self, block: nn.Module) -> tuple[str, dict[str, tuple[str, Layout]]]:
        """The attention child of the block and its q/k/v/o projections (block-relative paths)."""
        for child_name, child in block.named_children():
            linears = {f"{child_name}.{n}": m for n, m in child.named_modules() if n and _layout(m)}
            q, k, v = _pick(linears, _Q), _pick(linears, _K), _pick(linears, _V)
            if q and k and v:
                rest = {p: m for p, m in linears.items() if p not in (q, k, v)}
                o = _pick(rest, _O) or (next(iter(rest)) if len(rest) == 1 else None)
                if o is None:
                    raise self.fail(f"attention {child_name!r} has q/k/v projections but no single output "
                                    f"projection among {sorted(rest)}")
                inner_norms = [n for n, m in child.named_modules() if n and _is_norm(m)]
                if inner_norms:
                    raise self.fail(f"attention {child_name!r} normalises inside ({inner_norms}: q/k norms), "
                                    "which the common layout has no hooks for")
                if not isinstance(getattr(child, "layer_idx", None), int):
                    raise self.fail(f"attention {type(child).__name__} has no integer layer_idx attribute, by which "
                                    "fxhook's attention capture knows the layer")
                if "ALL_ATTENTION_FUNCTIONS" not in _source(type(child)):
                    raise self.fail(f"attention {type(child).__name__} does not go through transformers' attention "
                                    "registry (ALL_ATTENTION_FUNCTIONS), where fxhook marks q/k/v, scores and z")
                return child_name, {x: (p, _layout(linears[p])) for x, p in zip("qkvo", (q, k, v, o))}
        raise self.fail("no block child with separate q/k/v projections (names like q_proj/k_proj/v_proj); "
                        "fused qkv projections need an adapter")

    def mlp(self, block: nn.Module, attn: str, norms: list[str]) -> tuple[str, dict[str, tuple[str, Layout]]]:
        others = [(n, c) for n, c in block.named_children() if n != attn and n not in norms]
        with_linears = [(n, c) for n, c in others if any(_layout(m) for m in c.modules())]
        if len(with_linears) != 1:
            raise self.fail(f"expected one MLP child beside the attention and the norms, found "
                            f"{[n for n, _ in with_linears] or 'none'}")
        name, child = with_linears[0]
        linears = {f"{name}.{n}" if n else name: m for n, m in child.named_modules() if _layout(m)}
        down = _pick(linears, _DOWN)
        gate = _pick({p: m for p, m in linears.items() if p != down}, _GATE)
        up = _pick({p: m for p, m in linears.items() if p not in (down, gate)}, _UP)
        if down is None or up is None or len(linears) != 2 + (gate is not None):
            raise self.fail(f"MLP {name!r} has linear layers {sorted(linears)}: expected an up (or in) and a down "
                            f"(or out) projection, and optionally a gate (names like up_proj/down_proj/gate_proj)")
        parts = {"up": up, "down": down} | ({"gate": gate} if gate else {})
        return name, {k: (p, _layout(linears[p])) for k, p in parts.items()}

    # ------------------------------------------------------------------ one probe forward
    def probe(self, watch: dict[str, nn.Module]) -> _Probe:
        probe = _Probe()

        def hook(name):
            def fn(_mod, args, kwargs, output):
                x = args[0] if args else _first_tensor(next(iter(kwargs.values()), None))
                if name not in probe.inputs:
                    probe.inputs[name] = x.detach() if isinstance(x, torch.Tensor) else None
                    probe.outputs[name] = _first_tensor(output)
                    probe.order.append(name)
            return fn
        handles = [m.register_forward_hook(hook(n), with_kwargs=True) for n, m in watch.items()]
        device = next(self.hf.parameters()).device
        ids = torch.arange(1, 6, device=device)[None] % int(self.config.vocab_size)
        was_training = self.hf.training
        try:
            self.hf.eval()
            with torch.no_grad():
                self.hf(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        finally:
            self.hf.train(was_training)
            for h in handles:
                h.remove()
        return probe

    def norm_kind(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> NormKind:
        """Which formula the norm computes, told apart by its output on the probe input."""
        h, w, b = x.float(), getattr(module, "weight", None), getattr(module, "bias", None)
        eps = next((float(getattr(module, a)) for a in ("eps", "variance_epsilon") if hasattr(module, a)), None)
        if eps is None:
            raise self.fail(f"norm {type(module).__name__} has no eps / variance_epsilon attribute")
        centred = h - h.mean(-1, keepdim=True)
        candidates: dict[NormKind, torch.Tensor] = {
            "layernorm": centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt(),
            "rmsnorm": h / (h.pow(2).mean(-1, keepdim=True) + eps).sqrt(),
        }
        for kind, normed in list(candidates.items()):
            out = normed * (w.float() if w is not None else 1.0) + (b.float() if b is not None else 0.0)
            if torch.allclose(out, y.float(), atol=1e-4, rtol=1e-3):
                return kind
            if kind == "rmsnorm" and w is not None and torch.allclose(normed * (1.0 + w.float()), y.float(),
                                                                      atol=1e-4, rtol=1e-3):
                return "rmsnorm_plus_one"
        raise self.fail(f"norm {type(module).__name__} computes neither LayerNorm nor RMSNorm (w or 1 + w)")

    # ------------------------------------------------------------------ the adapter
    def infer(self) -> Adapter:
        blocks_path = self.blocks()
        embed, unembed = self.embeddings()
        blocks = self.hf.get_submodule(blocks_path)
        block = blocks[0]
        outside = self.outside_blocks(blocks_path, (embed, unembed))
        final_norms = [n for n, m in outside.items() if _is_norm(m)]
        if len(final_norms) != 1:
            raise self.fail(f"expected one norm outside the blocks (the final norm), found {final_norms or 'none'}")
        final_norm = final_norms[0]
        pos_tables = [n for n, m in outside.items() if isinstance(m, nn.Embedding)]
        rotary = [n for n, m in outside.items() if "rotary" in type(m).__name__.lower() or "rotary" in n]
        if len(pos_tables) > 1 or (pos_tables and rotary):
            raise self.fail(f"unexpected embeddings outside the blocks: {pos_tables + rotary}")
        if not pos_tables and not rotary:
            raise self.fail("no positional scheme found: neither a learned position table (an nn.Embedding "
                            "beside the token embedding) nor a rotary embedding module")
        attn, proj = self.attention(block)
        norms = [n for n, c in block.named_children() if _is_norm(c)]
        if len(norms) not in (1, 2):
            raise self.fail(f"expected one or two norms in each block, found {norms or 'none'} (sandwich or "
                            "post-norms need an adapter)")
        mlp, mlp_proj = self.mlp(block, attn, norms)

        watch = {"embed": self.hf.get_submodule(embed), "block": block, "last_block": blocks[-1],
                 "final_norm": self.hf.get_submodule(final_norm), "unembed": self.hf.get_submodule(unembed),
                 "attn": block.get_submodule(attn), "mlp": block.get_submodule(mlp)}
        if pos_tables:
            watch["pos"] = self.hf.get_submodule(pos_tables[0])
        watch.update({f"norm:{n}": block.get_submodule(n) for n in norms})
        watch.update({f"proj:{x}": block.get_submodule(p) for x, (p, _) in {**proj, **mlp_proj}.items()})
        seen = self.probe(watch)
        ln1, ln2, parallel = self.check_dataflow(seen, norms)
        kind = self.norm_kind(block.get_submodule(ln1), seen.inputs[f"norm:{ln1}"], seen.outputs[f"norm:{ln1}"])

        gated = "gate" in mlp_proj
        adapter = Adapter(
            architectures=(self.name,), embed=embed, blocks=blocks_path, final_norm=final_norm, unembed=unembed,
            positions=Positions("absolute", pos_embed=pos_tables[0]) if pos_tables else Positions("rotary"),
            norms=Norms(kind, ln1=ln1, ln2=ln2),
            attention=Attention(
                attn, q_site=Site(proj["q"][0], split_heads=True), k_site=Site(proj["k"][0], split_heads=True),
                q_proj=Projection(*proj["q"]), k_proj=Projection(*proj["k"]), v_proj=Projection(*proj["v"]),
                o_proj=Projection(*proj["o"])),
            feed_forward=FeedForward(
                mlp, pre_site=Site(mlp_proj["gate" if gated else "up"][0]),
                pre_linear_site=Site(mlp_proj["up"][0]) if gated else None,
                post_site=Site(mlp_proj["down"][0], side="input"), gated=gated,
                in_proj=Projection(*mlp_proj["up"]), gate_proj=Projection(*mlp_proj["gate"]) if gated else None,
                out_proj=Projection(*mlp_proj["down"])),
            parallel_attn_mlp=parallel,
        )
        return adapter

    def check_dataflow(self, seen: _Probe, norms: list[str]) -> tuple[str, str | None, bool]:
        """(ln1, ln2 or None, parallel) from what the probe saw; raises where the flow is not the common one."""
        def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
            return a is not None and b is not None and a.shape == b.shape and torch.allclose(a, b, atol=1e-5,
                                                                                           rtol=1e-4)
        x0, attn_out, mlp_out = seen.inputs["block"], seen.outputs["attn"], seen.outputs["mlp"]
        entering = seen.outputs["embed"] + (seen.outputs["pos"] if "pos" in seen.outputs else 0)
        if not same(x0, entering):
            raise self.fail("the first block's input is not the token embedding (plus the learned positions): "
                            "the embedding is scaled or normalised on the way")
        if not same(seen.outputs["last_block"], seen.inputs["final_norm"]) or \
                not same(seen.outputs["final_norm"], seen.inputs["unembed"]):
            raise self.fail("the last block's output does not go through the final norm into the unembedding")
        norm_of = {n: (seen.inputs[f"norm:{n}"], seen.outputs[f"norm:{n}"]) for n in norms}
        ln1 = next((n for n in norms if same(norm_of[n][0], x0) and same(norm_of[n][1], seen.inputs["proj:q"])), None)
        if ln1 is None:
            raise self.fail(f"no norm among {norms} reads the block input and feeds the q projection")
        if not all(same(norm_of[ln1][1], seen.inputs[f"proj:{x}"]) for x in "kv"):
            raise self.fail("q, k and v do not all read the first norm's output")
        if not same(seen.outputs["proj:o"], attn_out):
            raise self.fail("the attention module's output is not its output projection's (it adds something, "
                            "e.g. the residual, inside)")
        if not same(seen.outputs["proj:down"], mlp_out):
            raise self.fail("the MLP module's output is not its down projection's")
        mlp_reads = seen.inputs["mlp"]
        ln2 = next((n for n in norms if n != ln1), None)
        if ln2 is None:
            if not same(mlp_reads, norm_of[ln1][1]):
                raise self.fail("with one norm per block, the MLP must read that norm's output")
            parallel = True
        else:
            if not same(mlp_reads, norm_of[ln2][1]):
                raise self.fail(f"the MLP does not read the second norm {ln2!r}")
            if same(norm_of[ln2][0], x0):
                parallel = True
            elif same(norm_of[ln2][0], x0 + attn_out):
                parallel = False
            else:
                raise self.fail(f"the second norm {ln2!r} reads neither the block input (parallel) nor the block "
                                "input plus the attention output (sequential)")
        expected = x0 + attn_out + mlp_out
        if not same(seen.outputs["block"], expected):
            raise self.fail("the block's output is not its input plus the attention and MLP outputs "
                            "(post-norms or scaled residuals need an adapter)")
        for x in ("up", "gate"):
            if f"proj:{x}" in seen.inputs and not same(seen.inputs[f"proj:{x}"], mlp_reads):
                raise self.fail(f"the MLP's {x} projection does not read the MLP input")
        self.check_activation(seen, same)
        return ln1, ln2, parallel

    def check_activation(self, seen: _Probe, same) -> None:
        """The down projection reads act(gate) * up (gated) or act(up), with the config's activation, so
        that hook_pre / hook_pre_linear / hook_post are what they say (skipped without hidden_act)."""
        from transformers.activations import ACT2FN

        name = getattr(self.config, "hidden_act", None)
        if not isinstance(name, str) or name not in ACT2FN:
            return
        act = ACT2FN[name]
        up = seen.outputs["proj:up"]
        expected = act(seen.outputs["proj:gate"]) * up if "proj:gate" in seen.outputs else act(up)
        if not same(seen.inputs["proj:down"], expected):
            raise self.fail(f"the MLP's down projection does not read {name}(gate) * up (or {name}(up)): the "
                            "gate and up projections could not be told apart by name")


def infer_adapter(hf_model: nn.Module, supported: list[str] | None = None) -> Adapter:
    """The inferred adapter for `hf_model`, with a warning naming its paths; CannotInferAdapter
    (a NotImplementedError) naming what was not found otherwise."""
    adapter = _Inference(hf_model, supported).infer()
    pos, norms, attn, ff = adapter.positions, adapter.norms, adapter.attention, adapter.feed_forward
    sites = {"embed": adapter.embed, "pos_embed": pos.pos_embed, "blocks": adapter.blocks, "ln1": norms.ln1,
             "attn": attn.path, "ln2": norms.ln2, "mlp": ff.path, "final_norm": adapter.final_norm,
             "unembed": adapter.unembed, "norm_kind": norms.kind, "positional": pos.kind,
             "parallel_attn_mlp": adapter.parallel_attn_mlp, "gated_mlp": ff.gated}
    projections = {k: p.module for k, p in (("q_proj", attn.q_proj), ("k_proj", attn.k_proj), ("v_proj", attn.v_proj),
                                            ("o_proj", attn.o_proj), ("mlp_in", ff.in_proj), ("mlp_gate", ff.gate_proj),
                                            ("mlp_out", ff.out_proj)) if p is not None}
    warnings.warn(f"fxhook has no adapter for {type(hf_model).__name__}: inferred one from its module tree "
                  f"{sites}, projections {projections}. To pin it, add an Adapter in adapters/.",
                  InferredAdapterWarning, stacklevel=3)
    return adapter
