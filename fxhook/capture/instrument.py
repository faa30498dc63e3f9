"""Temporarily instrument a HF model so that export records every hook site.

Everything installed here is removed on exit: the user's model is left as it
was. Sites at module boundaries use module hooks; norms get fxhook's norm
computation; the attention core goes through the registered "fxhook"
attention implementation.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
from torch import nn

from fxhook.adapter import Adapter, Site, get_module
from fxhook.capture import hf_attention
from fxhook.capture.block_layout import TokenShape
from fxhook.capture.block_extras import install_block_extras
from fxhook.capture.rotary_args import rotary_inputs_marked
from fxhook.capture.norms import hooked_norm
from fxhook.core import hook_names as hn
from fxhook.core.ops import hook_marker

def _first_tensor(output) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def _replace_first(output, new: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return new
    return (new, *output[1:])


def _mark_split(x: torch.Tensor, name: str, split_heads: int | None) -> torch.Tensor:
    if not split_heads:
        return hook_marker(x, name)
    shape = x.shape
    return hook_marker(x.unflatten(-1, (split_heads, -1)), name).reshape(shape)


def norm_eps(module: nn.Module, adapter: Adapter) -> float:
    for attr in adapter.norms.eps_attr:
        if hasattr(module, attr):
            return float(getattr(module, attr))
    raise ValueError(f"cannot find the epsilon of norm {type(module).__name__}: "
                     f"the adapter looks for attributes {adapter.norms.eps_attr}")


class _Instrumenter:
    def __init__(self, adapter: Adapter, n_heads: int, n_kv_heads: int):
        self.adapter = adapter
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.handles: list = []
        self.norm_eps: dict[str, float] = {}  # hook prefix ("blocks.0.ln1.") -> epsilon
        self.patched_forwards: list[nn.Module] = []
        self.tokens = TokenShape()  # [b, p] of the running block, for blocks that flatten tokens (OPT)

    def mark_output(self, module: nn.Module, name: str, split_heads: int | None = None) -> None:
        def hook(_mod, _args, output):
            mark = (lambda x: _mark_split(x, name, split_heads))
            return _replace_first(output, self.tokens.apply(_first_tensor(output), mark))
        self.handles.append(module.register_forward_hook(hook))

    def mark_input(self, module: nn.Module, names: tuple[str, ...]) -> None:
        def mark(x: torch.Tensor) -> torch.Tensor:
            for name in names:
                x = hook_marker(x, name)
            return x

        def pre_hook(_mod, args, kwargs):
            if args:
                return (self.tokens.apply(args[0], mark), *args[1:]), kwargs
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            return args, {**kwargs, key: self.tokens.apply(kwargs[key], mark)}
        self.handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def mark_site(self, block: nn.Module, site: Site, name: str, heads: int) -> None:
        module = get_module(block, site.module)
        if site.side == "output":
            self.mark_output(module, name, heads if site.split_heads else None)
        else:
            self.mark_input(module, (name,))

    def patch_norm(self, module: nn.Module, prefix: str, kind: str | None = None) -> None:
        """Compute the norm `module` with its hooks under `prefix` (formula `kind`, default the adapter's;
        "none": an identity, left as it is, with no hooks)."""
        kind = kind or self.adapter.norms.kind
        if kind == "none":
            return
        eps = norm_eps(module, self.adapter)
        self.norm_eps[prefix] = eps

        def forward(mod, x):
            return self.tokens.apply(x, lambda h: hooked_norm(h, getattr(mod, "weight", None),
                                                              getattr(mod, "bias", None), eps, kind, prefix))
        module.forward = types.MethodType(forward, module)
        self.patched_forwards.append(module)

    def mark_tokens(self, embed: nn.Module) -> None:
        """hook_tokens on the token ids the embedding reads (dropped by a pass unless use_hook_tokens)."""
        def pre_hook(_mod, args, kwargs):
            name = hn.model_hook("hook_tokens")
            if args:
                return (hook_marker(args[0], name), *args[1:]), kwargs
            key = next(iter(kwargs))
            return args, {**kwargs, key: hook_marker(kwargs[key], name)}
        self.handles.append(embed.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def install(self, hf_model: nn.Module) -> None:
        a = self.adapter
        norms, attn, ff = a.norms, a.attention, a.feed_forward
        self.mark_tokens(get_module(hf_model, a.embed))
        unembed = get_module(hf_model, a.unembed)
        self.mark_input(unembed, (hn.model_hook("unembed.hook_in"),))
        self.mark_output(unembed, hn.model_hook("unembed.hook_out"))
        if a.scaled_embedding:  # the model scales the embedding: hook_embed is what enters block 0
            self.mark_input(get_module(hf_model, a.blocks)[0], (hn.model_hook("hook_embed"),))
        else:
            self.mark_output(get_module(hf_model, a.embed), hn.model_hook("hook_embed"))
        if a.positions.pos_embed is not None:
            self.mark_output(get_module(hf_model, a.positions.pos_embed), hn.model_hook("hook_pos_embed"))
        self.patch_norm(get_module(hf_model, a.final_norm), hn.norm_prefix(None, "ln_final"))
        for i, block in enumerate(get_module(hf_model, a.blocks)):
            def name(key: str, layer: int = i) -> str:
                return hn.block_hook(layer, key)
            self.mark_input(block, (name("hook_resid_pre"),))
            self.handles.append(block.register_forward_pre_hook(self.record_block_input, with_kwargs=True))
            self.mark_output(block, name("hook_resid_post"))
            self.mark_output(get_module(block, a.attn_out_module), name("hook_attn_out"))
            if not a.attn_only:  # attention-only blocks have no MLP half to mark
                self.install_mlp_half(block, i)
            self.patch_norm(get_module(block, norms.ln1), hn.norm_prefix(i, "ln1"))
            if attn.q_site is not None:
                self.mark_site(block, attn.q_site, name("attn.hook_q"), self.n_heads)
            if attn.k_site is not None:
                self.mark_site(block, attn.k_site, name("attn.hook_k"), self.n_kv_heads)
            for site, key in ((ff.pre_site, "mlp.hook_pre"), (ff.pre_linear_site, "mlp.hook_pre_linear"),
                              (ff.post_site, "mlp.hook_post")):
                if site is not None:
                    self.mark_site(block, site, name(key), 0)
            install_block_extras(self, block, i)

    def install_mlp_half(self, block: nn.Module, i: int) -> None:
        """hook_mlp_out, and what reads the residual into the MLP: hook_resid_mid, hook_mlp_in, ln2."""
        a = self.adapter
        self.mark_output(get_module(block, a.mlp_out_module), hn.block_hook(i, "hook_mlp_out"))
        if a.norms.ln2 is None:
            self.norm_again_for_mlp(block, i)
            return
        mid = () if a.parallel_attn_mlp else (hn.block_hook(i, "hook_resid_mid"),)
        self.mark_input(get_module(block, a.mlp_in_module), (*mid, hn.block_hook(i, "hook_mlp_in")))
        self.patch_norm(get_module(block, a.norms.ln2), hn.norm_prefix(i, "ln2"))

    def record_block_input(self, _mod, args, kwargs) -> None:
        """Remember the block's (marked) input: its [b, p], and resid_pre for a re-read norm."""
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
        self.tokens.record(x)
        self.resid_pre = x

    def norm_again_for_mlp(self, block: nn.Module, layer: int) -> None:
        """Shared-norm parallel blocks: the MLP reads ln1(hook_mlp_in(resid_pre)) hooked as ln2."""
        ln1 = get_module(block, self.adapter.norms.ln1)
        eps, kind = norm_eps(ln1, self.adapter), self.adapter.norms.kind
        ln2 = hn.norm_prefix(layer, "ln2")
        self.norm_eps[ln2] = eps

        def pre_hook(_mod, args, kwargs):
            x = hook_marker(self.resid_pre, hn.block_hook(layer, "hook_mlp_in"))
            x = hooked_norm(x, getattr(ln1, "weight", None), getattr(ln1, "bias", None), eps, kind, ln2)
            if args:
                return (x, *args[1:]), kwargs
            key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
            return args, {**kwargs, key: x}
        mlp = get_module(block, self.adapter.feed_forward.path)
        self.handles.append(mlp.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        for module in self.patched_forwards:
            del module.forward
        self.handles.clear()
        self.patched_forwards.clear()


@contextlib.contextmanager
def instrumented(hf_model: nn.Module, adapter: Adapter, n_heads: int, n_kv_heads: int
                 ) -> Iterator[dict[str, float]]:
    """Within the block, running `hf_model` emits fxhook markers at every hook site.

    Yields the epsilon of each norm by hook prefix (the exported graph keeps
    parameters but not the HF modules' attributes).
    """
    hf_attention.register()
    previous_impl = hf_model.config._attn_implementation
    inst = _Instrumenter(adapter, n_heads, n_kv_heads)
    attn = adapter.attention
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(hf_attention.attention_capture(
                mark_qk_here=attn.q_site is None and attn.rotary_fn is None, mark_rotated=adapter.rotary))
            if attn.rotary_fn is not None:
                attentions = [get_module(block, attn.path) for block in get_module(hf_model, adapter.blocks)]
                stack.enter_context(rotary_inputs_marked(attentions, attn.rotary_fn))
            hf_model.set_attn_implementation(hf_attention.IMPLEMENTATION_NAME)
            inst.install(hf_model)
            yield inst.norm_eps
    finally:
        inst.remove()
        hf_model.set_attn_implementation(previous_impl)
