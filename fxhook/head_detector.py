"""TransformerLens's `head_detector`: score every attention head against an expected attention pattern.

`from fxhook.head_detector import detect_head` where a notebook had `transformer_lens.head_detector`: the
same names, parameters and scores, on fxhook's HookedTransformer. Bad input raises a ValueError naming
what was wrong (TransformerLens asserts), and the caller's cache is never written to.
"""
from __future__ import annotations

import logging
from collections import defaultdict
from typing import Callable, Dict, List, Literal, Optional, Tuple, Union, get_args

import torch

from fxhook.analysis.cache import ActivationCache
from fxhook.model import HookedTransformer
from fxhook.utils import is_lower_triangular, is_square
from fxhook.core.hook_names import block_hook

HeadName = Literal["previous_token_head", "duplicate_token_head", "induction_head"]
HEAD_NAMES: Tuple[HeadName, ...] = get_args(HeadName)  # a tuple, as TransformerLens's
ErrorMeasure = Literal["abs", "mul"]

LayerHeadTuple = Tuple[int, int]
LayerToHead = Dict[int, List[int]]

INVALID_HEAD_NAME_ERR = f"detection_pattern must be a Tensor or one of head names: {HEAD_NAMES}; got %s"
CACHE_WITH_SEQ_LIST_ERR = (
    "A single cache holds the activations of one prompt, so `cache` cannot be used when `seq` is a list: "
    "pass one prompt at a time, or omit `cache` and let each prompt be run.")
SEQ_LEN_ERR = "The sequence must be non-empty and must fit within the model's context window."
DET_PAT_NOT_SQUARE_ERR = ("The detection pattern must be a lower triangular matrix of shape (sequence_length, "
                          "sequence_length); sequence_length=%d; got detection pattern of shape %s")
TENSOR_PATTERN_WITH_SEQ_LIST_ERR = (
    "A detection pattern tensor fits one prompt's length, so `seq` must be a single prompt when "
    "`detection_pattern` is a tensor: pass one prompt, or a head name (its pattern is built per prompt).")


def detect_head(
    model: HookedTransformer,
    seq: Union[str, List[str]],
    detection_pattern: Union[torch.Tensor, HeadName],
    heads: Optional[Union[List[LayerHeadTuple], LayerToHead]] = None,
    cache: Optional[ActivationCache] = None,
    *,
    exclude_bos: bool = False,
    exclude_current_token: bool = False,
    error_measure: ErrorMeasure = "mul",
) -> torch.Tensor:
    """Score each head's attention on `seq` against `detection_pattern` -> [n_layers, n_heads].

    `detection_pattern` is a [pos, pos] lower-triangular tensor, or a name in HEAD_NAMES (built from the
    prompt's tokens; with a list of prompts the scores are averaged over prompts). "mul": the share of
    the head's attention on the pattern's ones; "abs": 1 - mean |pattern - attention| * pos, rounded to
    three places. Heads not listed in `heads` score -1. `cache` (from run_with_cache on the same prompt)
    saves the forward pass.
    """
    if error_measure not in get_args(ErrorMeasure):
        raise ValueError(f"Invalid error_measure={error_measure!r}; valid values are {get_args(ErrorMeasure)}")
    cfg = model.cfg
    if isinstance(detection_pattern, str):
        if detection_pattern not in HEAD_NAMES:
            raise ValueError(INVALID_HEAD_NAME_ERR % detection_pattern)
        if isinstance(seq, list):
            if cache is not None:
                raise ValueError(CACHE_WITH_SEQ_LIST_ERR)
            scores = [detect_head(model, one, detection_pattern, heads=heads, exclude_bos=exclude_bos,
                                  exclude_current_token=exclude_current_token, error_measure=error_measure)
                      for one in seq]
            return torch.stack(scores).mean(0)
    elif not isinstance(detection_pattern, torch.Tensor):
        raise ValueError(INVALID_HEAD_NAME_ERR % type(detection_pattern).__name__)
    elif isinstance(seq, list):
        if len(seq) != 1:
            raise ValueError(TENSOR_PATTERN_WITH_SEQ_LIST_ERR)
        seq = seq[0]

    tokens = model.to_tokens(seq)  # [1, pos]
    seq_len = tokens.shape[-1]
    if not 1 < seq_len < cfg.n_ctx:
        raise ValueError(f"{SEQ_LEN_ERR} Got {seq_len} tokens; n_ctx is {cfg.n_ctx}.")
    if isinstance(detection_pattern, str):
        detection_pattern = DETECTION_PATTERNS[detection_pattern](tokens.cpu())
    detection_pattern = detection_pattern.to(tokens.device)
    if detection_pattern.ndim != 2 or not is_square(detection_pattern) or seq_len != detection_pattern.shape[0] \
            or not is_lower_triangular(detection_pattern):
        raise ValueError(DET_PAT_NOT_SQUARE_ERR % (seq_len, tuple(detection_pattern.shape)))
    if error_measure == "mul" and not set(detection_pattern.unique().tolist()).issubset({0, 1}):
        logging.warning("Using detection pattern with values other than 0 or 1 with error_measure 'mul'")

    layer_to_heads = _layer_to_heads(heads, cfg.n_layers, cfg.n_heads)
    if cache is None:
        _, cache = model.run_with_cache(tokens, names_filter=_pattern_names(layer_to_heads), remove_batch_dim=True)
    matches = -torch.ones(cfg.n_layers, cfg.n_heads, dtype=cfg.dtype)
    for layer, layer_heads in layer_to_heads.items():
        patterns = _layer_patterns(cache, layer, seq_len)  # [n_heads, q_pos, k_pos]
        for head in layer_heads:
            matches[layer, head] = compute_head_attention_similarity_score(
                patterns[head], detection_pattern=detection_pattern, exclude_bos=exclude_bos,
                exclude_current_token=exclude_current_token, error_measure=error_measure)
    return matches


def _layer_to_heads(heads: Optional[Union[List[LayerHeadTuple], LayerToHead]], n_layers: int,
                    n_heads: int) -> LayerToHead:
    """`heads` (None: all; [(layer, head)]; {layer: [heads]}) as {layer: [heads]}, checked against the model."""
    if heads is None:
        return {layer: list(range(n_heads)) for layer in range(n_layers)}
    if isinstance(heads, dict):
        layer_to_heads = {layer: list(hs) for layer, hs in heads.items()}
    else:
        grouped: Dict[int, List[int]] = defaultdict(list)
        for pair in heads:
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise ValueError(f"heads must be (layer, head) pairs or a {{layer: [heads]}} dict; got {pair!r}")
            grouped[pair[0]].append(pair[1])
        layer_to_heads = dict(grouped)
    for layer, hs in layer_to_heads.items():
        bad = [h for h in hs if not 0 <= h < n_heads]
        if not 0 <= layer < n_layers or bad:
            raise ValueError(f"heads: layer {layer} head(s) {hs} out of range for a model with {n_layers} layers "
                             f"and {n_heads} heads")
    return layer_to_heads


def _pattern_names(layer_to_heads: LayerToHead) -> List[str]:
    return [block_hook(layer, "attn.hook_pattern") for layer in layer_to_heads]


def _layer_patterns(cache: ActivationCache, layer: int, seq_len: int) -> torch.Tensor:
    """The cache's pattern of `layer` as [n_heads, q_pos, k_pos] (a batch of one is accepted and dropped)."""
    pattern = cache["pattern", layer, "attn"]
    if pattern.ndim == 4 and pattern.shape[0] == 1:
        pattern = pattern[0]
    if pattern.ndim != 3 or pattern.shape[-1] != seq_len:
        raise ValueError(f"cache: layer {layer}'s attention pattern has shape {tuple(pattern.shape)}, expected "
                         f"[n_heads, {seq_len}, {seq_len}] for this prompt: build it with "
                         "model.run_with_cache(model.to_tokens(seq), remove_batch_dim=True)")
    return pattern


def get_previous_token_head_detection_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [1, pos] -> [pos, pos]: each position attends to the one before it."""
    pos = tokens.shape[-1]
    return torch.diag(torch.ones(pos - 1), diagonal=-1)


def get_duplicate_token_head_detection_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [1, pos] -> [pos, pos]: each position attends to earlier copies of its own token."""
    row = tokens.reshape(-1)
    same = (row[:, None] == row[None, :]).float()  # [q_pos, k_pos]
    same.fill_diagonal_(0)  # a token is trivially its own duplicate
    return torch.tril(same)


def get_induction_head_detection_pattern(tokens: torch.Tensor) -> torch.Tensor:
    """tokens [1, pos] -> [pos, pos]: each position attends to the token after an earlier copy of itself."""
    duplicates = get_duplicate_token_head_detection_pattern(tokens)
    shifted = torch.zeros_like(duplicates)
    shifted[:, 1:] = duplicates[:, :-1]
    return torch.tril(shifted)


DETECTION_PATTERNS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "previous_token_head": get_previous_token_head_detection_pattern,
    "duplicate_token_head": get_duplicate_token_head_detection_pattern,
    "induction_head": get_induction_head_detection_pattern,
}


def get_supported_heads() -> None:
    """Print the supported head names."""
    print(f"Supported heads: {HEAD_NAMES}")


def compute_head_attention_similarity_score(
    attention_pattern: torch.Tensor,  # [q_pos, k_pos]
    detection_pattern: torch.Tensor,  # [q_pos, k_pos]
    *,
    exclude_bos: bool,
    exclude_current_token: bool,
    error_measure: ErrorMeasure,
) -> float:
    """One head's score: "mul" the share of attention on the pattern, "abs" 1 - mean |difference| * pos
    (rounded to three places). The attention pattern is never modified (it may be a view into a cache)."""
    if not is_square(attention_pattern):
        raise ValueError(f"Attention pattern is not square; got shape {tuple(attention_pattern.shape)}")
    if error_measure == "mul":
        attention = attention_pattern.clone()
        if exclude_bos:
            attention[:, 0] = 0
        if exclude_current_token:
            attention.fill_diagonal_(0)
        return ((attention * detection_pattern).sum() / attention.sum()).item()
    if error_measure != "abs":
        raise ValueError(f"Invalid error_measure={error_measure!r}; valid values are {get_args(ErrorMeasure)}")
    abs_diff = (attention_pattern - detection_pattern).abs()
    if abs_diff.triu(1).sum() != 0:
        raise ValueError("attention_pattern and detection_pattern must both be lower triangular")
    size = len(abs_diff)
    if exclude_bos:
        abs_diff[:, 0] = 0
    if exclude_current_token:
        abs_diff.fill_diagonal_(0)
    return 1 - round((abs_diff.mean() * size).item(), 3)
