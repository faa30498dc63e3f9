"""Small tensor helpers researchers call from notebooks (TransformerLens's names and behaviour)."""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import einops
import numpy as np
import torch

from fxhook.factored_matrix import FactoredMatrix


def to_numpy(tensor: Any) -> np.ndarray:
    """A tensor, Parameter, list, tuple, array or Python scalar as a numpy array (bfloat16 via float32,
    which numpy lacks)."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu()
        return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()
    if isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    raise ValueError(f"to_numpy cannot convert a {type(tensor).__name__}: pass a tensor, array, list or scalar")


def get_corner(tensor: torch.Tensor | FactoredMatrix, n: int = 3) -> torch.Tensor:
    """The first n entries along every axis: a cheap peek at a big tensor (a FactoredMatrix's corner is
    formed densely from its factors' corners)."""
    index = tuple(slice(n) for _ in range(tensor.ndim))
    return tensor[index].AB if isinstance(tensor, FactoredMatrix) else tensor[index]


def remove_batch_dim(tensor: torch.Tensor) -> torch.Tensor:
    """[1, ...] -> [...]; a tensor whose first axis is not 1 comes back unchanged."""
    return tensor.squeeze(0) if tensor.shape[0] == 1 else tensor


def transpose(tensor: torch.Tensor) -> torch.Tensor:
    """[..., a, b] -> [..., b, a]."""
    return tensor.transpose(-1, -2)


def is_square(x: torch.Tensor) -> bool:
    """Whether x is a 2-D matrix with as many rows as columns."""
    return x.ndim == 2 and x.shape[0] == x.shape[1]


def is_lower_triangular(x: torch.Tensor) -> bool:
    """Whether x is square with nothing above its diagonal."""
    return is_square(x) and bool(x.equal(x.tril()))


def get_cumsum_along_dim(tensor: torch.Tensor, dim: int, reverse: bool = False) -> torch.Tensor:
    """Cumulative sum along `dim`, from the end when reverse (used to find leading / trailing padding)."""
    if not reverse:
        return tensor.cumsum(dim=dim)
    return tensor.flip(dims=(dim,)).cumsum(dim=dim).flip(dims=(dim,))


def repeat_along_head_dimension(tensor: torch.Tensor, n_heads: int, clone_tensor: bool = True) -> torch.Tensor:
    """[batch, pos, d_model] -> [batch, pos, n_heads, d_model] (a copy per head unless clone_tensor=False,
    which returns a broadcast view sharing storage)."""
    repeated = einops.repeat(tensor, "batch pos d_model -> batch pos n_heads d_model", n_heads=n_heads)
    return repeated.clone() if clone_tensor else repeated


def filter_dict_by_prefix(dictionary: dict, prefix: str) -> dict:
    """The entries whose keys start with `prefix` + "." (the dot added if missing), prefix stripped."""
    search = prefix if prefix.endswith(".") else prefix + "."
    return {key[len(search):]: value for key, value in dictionary.items() if key.startswith(search)}


def get_offset_position_ids(past_kv_pos_offset: int, attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each row's first attended token (left padding gets 0), from the
    `past_kv_pos_offset`-th column on: attention_mask [batch, offset + pos] -> [batch, pos]."""
    positions = attention_mask.cumsum(dim=1) - 1
    return positions.clamp(min=0)[:, past_kv_pos_offset:]


def check_structure(t1: torch.Tensor, t2: torch.Tensor, *, verbose: bool = False) -> None:
    """Print whether two equally shaped matrices order their neighbouring rows and columns the same way
    ("PASSED", or the first kind of mismatch with its indices). A debugging aid, as in TransformerLens."""
    if t1.ndim != 2 or t1.shape != t2.shape:
        raise ValueError(f"check_structure compares two matrices of one shape, got {tuple(t1.shape)} and "
                         f"{tuple(t2.shape)}")

    def mismatches(a: torch.Tensor, b: torch.Tensor, what: str) -> list[int]:
        found = []
        for i in range(a.shape[0] - 1):
            ordered_a, ordered_b = a[i].ge(a[i + 1]), b[i].ge(b[i + 1])
            if not torch.equal(ordered_a, ordered_b):
                found.append(i)
                if verbose:
                    print(f"\t{what} {i}:{i + 1}\n\tt1: {ordered_a.tolist()}\n\tt2: {ordered_b.tolist()}")
        return found

    if verbose:
        print("Checking rows")
    rows = mismatches(t1, t2, "rows")
    if verbose:
        print("Checking columns")
    columns = mismatches(t1.T, t2.T, "columns")
    if rows:
        print(f"row mismatch: {rows}")
    elif columns:
        print(f"column mismatch: {columns}")
    else:
        print("PASSED")


def get_nested_attr(obj: Any, attr_str: str) -> Any:
    """obj.a.b.c for "a.b.c"."""
    for name in attr_str.split("."):
        obj = getattr(obj, name)
    return obj


def set_nested_attr(obj: Any, attr_str: str, value: Any) -> None:
    """obj.a.b.c = value for "a.b.c"."""
    *path, last = attr_str.split(".")
    setattr(get_nested_attr(obj, ".".join(path)) if path else obj, last, value)


@contextlib.contextmanager
def temporarily_swap_parameter(parameter: Any, new_value: Any) -> Iterator[torch.nn.Parameter]:
    """Give `parameter` the values of `new_value` inside the block and its own back after it, even on an
    exception. The Parameter object stays the same (ties, optimisers and hooks keep seeing it)."""
    if not isinstance(parameter, torch.nn.Parameter):
        raise TypeError(f"parameter must be a torch.nn.Parameter, got {type(parameter).__name__}")
    if isinstance(new_value, torch.nn.Parameter) or not isinstance(new_value, torch.Tensor):
        raise TypeError(f"new_value must be a plain tensor, got {type(new_value).__name__}")
    if new_value.shape != parameter.shape or new_value.dtype != parameter.dtype:
        raise ValueError(f"new_value ({tuple(new_value.shape)}, {new_value.dtype}) must have the parameter's "
                         f"shape and dtype ({tuple(parameter.shape)}, {parameter.dtype})")
    saved = parameter.detach().clone()
    try:
        with torch.no_grad():
            parameter.copy_(new_value)
        yield parameter
    finally:
        with torch.no_grad():
            parameter.copy_(saved)


__all__ = ["to_numpy", "get_corner", "remove_batch_dim", "transpose", "is_square", "is_lower_triangular",
           "get_cumsum_along_dim", "repeat_along_head_dimension", "filter_dict_by_prefix",
           "get_offset_position_ids", "check_structure", "get_nested_attr", "set_nested_attr",
           "temporarily_swap_parameter"]
