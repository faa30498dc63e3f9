"""TransformerLens-style utilities: activation names, the language-model loss, test_prompt."""
from __future__ import annotations

import torch

_FULL_NAMES = {
    "embed": "hook_embed", "pos_embed": "hook_pos_embed",
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out", "mlp_in": "hook_mlp_in",
    "attn_in": "hook_attn_in", "q_input": "hook_q_input", "k_input": "hook_k_input",
    "v_input": "hook_v_input",
    "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "z": "attn.hook_z",
    "rot_q": "attn.hook_rot_q", "rot_k": "attn.hook_rot_k", "result": "attn.hook_result",
    "attn_scores": "attn.hook_attn_scores", "scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern", "attn": "attn.hook_pattern",
    "pre": "mlp.hook_pre", "pre_linear": "mlp.hook_pre_linear", "post": "mlp.hook_post",
    "scale": "hook_scale", "normalized": "hook_normalized",
    # TransformerLens's aliases
    "attn_logits": "attn.hook_attn_scores", "key": "attn.hook_k", "query": "attn.hook_q",
    "value": "attn.hook_v", "mlp_pre": "mlp.hook_pre", "mlp_post": "mlp.hook_post",
}
_TOP_LEVEL = {"embed", "pos_embed"}


def get_act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """Expand a short activation name to its full hook name, as TransformerLens does.

    get_act_name("pattern", 3) == "blocks.3.attn.hook_pattern";
    get_act_name("scale", 2, "ln1") == "blocks.2.ln1.hook_scale";
    get_act_name("scale") == "ln_final.hook_scale". Full names pass through.
    """
    if "." in name or name.startswith("hook_"):
        return name
    if layer is None and name not in _TOP_LEVEL and name not in ("scale", "normalized"):
        import re

        match = re.match(r"([a-z_]+?)(\d+)([a-z]+\d?)?$", name)  # "pattern3", "resid_pre0", "scale4ln1"
        if match:
            name, layer, layer_type = match.group(1), int(match.group(2)), match.group(3) or layer_type
    if name not in _FULL_NAMES:
        raise KeyError(f"unknown activation short name {name!r}; known: {sorted(_FULL_NAMES)}")
    full = _FULL_NAMES[name]
    if name in _TOP_LEVEL:
        return full
    if name in ("scale", "normalized"):
        if layer is None:
            return f"ln_final.{full}"
        layer_type = {"a": "ln1", "m": "ln2", "attn": "ln1", "mlp": "ln2"}.get(layer_type, layer_type)
        if layer_type not in ("ln1", "ln2"):
            raise ValueError(f"get_act_name({name!r}, {layer}) needs layer_type 'ln1' or 'ln2'")
        return f"blocks.{layer}.{layer_type}.{full}"
    if layer is None:
        raise ValueError(f"get_act_name({name!r}) needs a layer index")
    return f"blocks.{layer}.{full}"


def lm_cross_entropy_loss(
    logits: torch.Tensor,  # [batch, pos, d_vocab]
    tokens: torch.Tensor,  # [batch, pos]
    attention_mask: torch.Tensor | None = None,  # [batch, pos]
    per_token: bool = False,
) -> torch.Tensor:
    """Next-token cross entropy; padded positions (mask 0) are left out of the mean."""
    log_probs = logits[:, :-1].float().log_softmax(dim=-1)
    nll = -log_probs.gather(-1, tokens[:, 1:, None].to(log_probs.device))[..., 0]  # [batch, pos - 1]
    if attention_mask is not None:
        keep = (attention_mask[:, 1:] * attention_mask[:, :-1]).to(nll.dtype).to(nll.device)
        if per_token:
            return nll * keep
        return (nll * keep).sum() / keep.sum()
    return nll if per_token else nll.mean()


def test_prompt(prompt: str, answer: str | list[str], model, prepend_space_to_answer: bool = True,
                print_details: bool = True, prepend_bos: bool | None = None, top_k: int = 10
                ) -> list[list[tuple[str, int]]]:
    """Print how the model does on `answer` after `prompt`: rank, logit and probability of each
    answer token, and the top_k tokens it prefers, as TransformerLens's test_prompt does.

    A list of answers compares their first tokens as alternatives for the next token. Returns the
    ranks (0 is the model's top choice): one list of (token, rank) per answer position.
    """
    answers = [answer] if isinstance(answer, str) else list(answer)
    if not answers:
        raise ValueError("test_prompt needs an answer (a string, or a list of alternative answers)")
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    several = len(answers) > 1
    prompt_tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)  # [1, prompt_len]
    answer_str_tokens = [model.to_str_tokens(a, prepend_bos=False) for a in answers]
    answer_tokens = [model.to_tokens(a, prepend_bos=False)[0] for a in answers]
    answer_len = 1 if several else len(answer_tokens[0])
    rows = torch.stack([torch.cat([prompt_tokens[0], a[:answer_len].to(prompt_tokens.device)])
                        for a in answer_tokens])  # [n_answers, prompt_len + answer_len]
    start = prompt_tokens.shape[-1]
    if print_details:
        print("Tokenized prompt:", model.to_str_tokens(prompt, prepend_bos=prepend_bos))
        print("Tokenized answers:" if several else "Tokenized answer:",
              answer_str_tokens if several else answer_str_tokens[0])
    with torch.no_grad():
        logits = model(rows).float()  # [n_answers, pos, d_vocab]
    probs = logits.softmax(dim=-1)
    ranks: list[list[tuple[str, int]]] = []
    for offset in range(answer_len):
        at = start + offset - 1  # the position that predicts this answer token
        step = []
        if print_details:
            print(f"Performance on answer token{'s' if several else ''}:")
        for i in range(len(answers)):
            token = int(rows[i, at + 1])
            rank = int((logits[i, at] > logits[i, at, token]).sum())
            text = answer_str_tokens[i][offset]
            step.append((text, rank))
            if print_details:
                print(f"Rank: {rank:<8} Logit: {logits[i, at, token].item():5.2f} "
                      f"Prob: {probs[i, at, token].item():6.2%} Token: |{text}|")
        if print_details:
            top_probs, top_ids = probs[0, at].topk(top_k)
            for k, (p, t) in enumerate(zip(top_probs, top_ids)):
                print(f"Top {k}th token. Logit: {logits[0, at, t].item():5.2f} Prob: {p.item():6.2%} "
                      f"Token: |{model.to_string(t)}|")
        ranks.append(step)
    if several:
        print(f"Ranks of the answer tokens: {ranks}")
    else:
        print(f"Ranks of the answer tokens: {[step[0] for step in ranks]}")
    return ranks


test_prompt.__test__ = False  # a utility, not a pytest test, despite its name
