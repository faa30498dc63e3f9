"""test_prompt: how a model does on an expected answer, printed as TransformerLens prints it."""
from __future__ import annotations

import torch


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
