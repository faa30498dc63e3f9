"""The finest decomposition of the residual stream: every head, every neuron (or MLP layer),
the embeddings and the accumulated biases, in TransformerLens's order and labels."""
from __future__ import annotations

import torch

from fxhook.analysis.neurons import _as_matrix
from fxhook.analysis.resid import _n_layers_if_default
from fxhook.analysis.slicing import SliceInput, as_slice


class DecompositionMixin:
    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False,
                                     pos_slice: SliceInput = None, return_labels: bool = False,
                                     project_output_onto: torch.Tensor | None = None):
        """[components, *bp, d_model (or k)] summing to the residual stream entering `layer`
        (its MLP with mlp_input): "L{l}H{h}" heads, then "L{l}N{n}" neurons (or "{l}_mlp_out"
        without expand_neurons), "embed", "pos_embed" (absolute positions), "bias" (every b_O
        and, with expand_neurons, b_out). project_output_onto: [d_model] or [d_model, k]."""
        layer = _n_layers_if_default(self.model, layer)
        if mlp_input and layer == self.model.cfg.n_layers:
            raise ValueError("mlp_input needs a block's MLP, but layer is n_layers (the unembedding)")
        pos = as_slice(pos_slice)
        project, squeeze = _as_matrix(project_output_onto)
        heads, labels = self.stack_head_results(layer + 1 if mlp_input else layer, pos_slice=pos,
                                                return_labels=True)
        parts = [heads]
        if not self.model.cfg.attn_only and layer > 0:
            if expand_neurons:
                # LN and projection done here for the neurons (their d_model vectors are never built)
                neurons, names = self.stack_neuron_results(layer, pos_slice=pos, return_labels=True,
                                                           apply_ln=apply_ln and project is not None,
                                                           project_output_onto=project)
            else:
                neurons, names = self.decompose_resid(layer, mlp_input=mlp_input, pos_slice=pos, mode="mlp",
                                                      incl_embeds=False, return_labels=True)
            parts.append(neurons)
            labels = labels + names
        for key, label, present in (("hook_embed", "embed", self.has_embed),
                                    ("hook_pos_embed", "pos_embed", self.has_pos_embed)):
            if present:
                parts.append(pos.apply(self[key], dim=-2)[None])
                labels.append(label)
        bias = self.model.accumulated_bias(layer, mlp_input, include_mlp_biases=expand_neurons)
        parts.append(bias.to(heads.dtype).expand(1, *heads.shape[1:-1], bias.shape[-1]))
        labels.append("bias")

        def finish(stack: torch.Tensor) -> torch.Tensor:  # d_model parts: norm, then projection
            if apply_ln:
                stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos)
            return stack @ project.to(stack.dtype) if project is not None else stack

        already_projected = project is not None and expand_neurons and len(parts) > 1 and \
            not self.model.cfg.attn_only and layer > 0
        if already_projected:
            stack = torch.cat([finish(parts[0]), parts[1], *(finish(p) for p in parts[2:])])
        else:
            stack = finish(torch.cat(parts))
        if squeeze:
            stack = stack.squeeze(-1)
        return (stack, labels) if return_labels else stack
