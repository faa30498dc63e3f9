"""Per-neuron outputs from the cache: what each MLP neuron writes to the residual stream.

Every neuron's d_model vector is large ([*bp, d_mlp, d_model] a layer): pass
`project_output_onto` (a [d_model] direction or [d_model, k] matrix) to get only
its projection, computed without materialising the vectors.
"""
from __future__ import annotations

import torch

from fxhook.analysis.resid import _n_layers_if_default
from fxhook.analysis.slicing import Slice, SliceInput, as_slice


def _as_matrix(project: torch.Tensor | None) -> tuple[torch.Tensor | None, bool]:
    """A [d_model] direction becomes [d_model, 1] (squeezed again at the end)."""
    if project is None or project.ndim == 2:
        return project, False
    if project.ndim == 1:
        return project[:, None], True
    raise ValueError(f"project_output_onto must be [d_model] or [d_model, k], got shape {tuple(project.shape)}")


class NeuronsMixin:
    """get_neuron_results and stack_neuron_results (labels "L{layer}N{neuron}")."""

    def get_neuron_results(self, layer: int, neuron_slice: SliceInput = None, pos_slice: SliceInput = None,
                           project_output_onto: torch.Tensor | None = None) -> torch.Tensor:
        """[*bp, neurons, d_model] (or [..., k] / [...] when projected): hook_post times W_out, per neuron."""
        neurons, pos = as_slice(neuron_slice), as_slice(pos_slice)
        acts = pos.apply(self[("post", layer)], dim=-2)  # [*bp, d_mlp]
        acts = neurons.apply(acts, dim=-1)
        w_out = neurons.apply(self.model.blocks[layer].mlp.W_out, dim=0)  # [neurons, d_model]
        if project_output_onto is None:
            return acts[..., None] * w_out
        projected = w_out @ project_output_onto.to(w_out.dtype)  # [neurons] or [neurons, k]
        return acts * projected if projected.ndim == 1 else acts[..., None] * projected

    def _neuron_stack_ln_projected(self, layer: int, pos: Slice, neurons: Slice, project: torch.Tensor
                                   ) -> torch.Tensor:
        """[neurons, *bp, k]: LN-scaled neuron outputs projected, from the linear form of the
        cached-scale norm: centring a neuron's output centres its W_out row."""
        scale = self._cached_scale(layer, False, pos, Slice(None))  # [*bp, 1]
        centre = self.model.cfg.normalization_type in ("LN", "LNPre")
        parts = []
        for l in range(layer):
            w_out = neurons.apply(self.model.blocks[l].mlp.W_out, dim=0)  # [neurons, d_model]
            if centre:
                w_out = w_out - w_out.mean(dim=-1, keepdim=True)
            acts = neurons.apply(pos.apply(self[("post", l)], dim=-2), dim=-1)  # [*bp, neurons]
            parts.append((acts / scale)[..., None] * (w_out @ project.to(w_out.dtype)))
        if not parts:
            like = pos.apply(self["hook_embed"], dim=-2)
            return like.new_zeros((0, *like.shape[:-1], project.shape[-1]))
        return torch.cat(parts, dim=-2).movedim(-2, 0)

    def stack_neuron_results(self, layer: int, pos_slice: SliceInput = None, neuron_slice: SliceInput = None,
                             return_labels: bool = False, incl_remainder: bool = False, apply_ln: bool = False,
                             project_output_onto: torch.Tensor | None = None):
        """[layer * neurons (+1), *bp, d_model (or k)]: every selected neuron's output in the
        blocks before `layer`; incl_remainder adds "remainder" (the rest of resid_post of block
        layer - 1), so the stack sums to it."""
        layer = _n_layers_if_default(self.model, layer)
        pos, neurons = as_slice(pos_slice), as_slice(neuron_slice)
        if neurons.mode == "int":  # keep the neuron axis: the stack concatenates along it
            neurons = Slice([neurons.selection])
        project, squeeze = _as_matrix(project_output_onto)
        labels = [f"L{l}N{n}" for l in range(layer) for n in neurons.indices(self.model.cfg.d_mlp)]
        if apply_ln and project is not None:
            stack = self._neuron_stack_ln_projected(layer, pos, neurons, project)
        else:
            parts = [self.get_neuron_results(l, neurons, pos, project) for l in range(layer)]
            if parts:
                stack = torch.cat(parts, dim=-2).movedim(-2, 0)
            else:
                like = pos.apply(self["hook_embed"], dim=-2)
                if project is not None:
                    like = like @ project.to(like.dtype)
                stack = like.new_zeros((0, *like.shape))
        if incl_remainder:
            if layer == 0:
                raise ValueError("incl_remainder needs a block before `layer`")
            rest = pos.apply(self[("resid_post", layer - 1)], dim=-2)
            if apply_ln and project is not None:
                rest = self.apply_ln_to_stack(rest[None], layer, pos_slice=pos)[0]
            if project is not None:
                rest = rest @ project.to(rest.dtype)
            stack = torch.cat([stack, (rest - stack.sum(dim=0))[None]])
            labels.append("remainder")
        if apply_ln and project is None:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos)
        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack
