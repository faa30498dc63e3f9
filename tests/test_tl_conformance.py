"""Conformance with TransformerLens 3.9's public surface, by introspection: every public name of
HookedTransformer (with HookedRootModule), HookPoint, ActivationCache, FactoredMatrix, HookedTransformerConfig,
utils, patching and evals exists in fxhook under the same module path, and its positional parameters have
TransformerLens's names, order and defaults (extra options must be keyword-only).

What does not conform is listed in ALLOWED with its reason; the README's list of refused items is checked
against the entries whose reason starts with "refused"."""
from __future__ import annotations

import functools
import importlib
import inspect
import warnings
from pathlib import Path

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import transformer_lens as tl
    import transformer_lens.evals
    import transformer_lens.hook_points
    import transformer_lens.patching
    import transformer_lens.utils

ROOT = Path(__file__).resolve().parent.parent

# (surface, name) -> why it does not conform
ALLOWED: dict[tuple[str, str], str] = {
    ("HookedTransformer", "from_pretrained"): "dtype defaults to None: float32 when loading by name, as TL, but a "
                                              "passed hf_model keeps its dtype (TL converts the caller's model)",
    ("HookedTransformer", "from_pretrained_no_processing"): "dtype defaults to None, as from_pretrained",
    ("evals", "evaluate_on_dataset"): "device defaults to the model's device (TL's \"cuda\" fails without a GPU)",
    ("evals", "induction_loss"): "device defaults to the model's device (TL's \"cuda\" fails without a GPU)",
}
# items that exist with TransformerLens's signature and raise NotImplementedError with the reason; the README
# lists them
REFUSED: dict[tuple[str, str], str] = {
    ("ActivationCache", "compute_ssm_effective_attention"): "state-space",
    ("ActivationCache", "compute_ssm_state"): "state-space",
    ("ActivationCache", "ssm_layers"): "state-space",
}


def _default(value):
    if value is inspect.Parameter.empty:
        return "<required>"
    if isinstance(value, (list, tuple)):
        return tuple(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return value


def _positional(obj) -> list[tuple[str, object]] | None:
    try:
        signature = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [(p.name, _default(p.default)) for p in signature.parameters.values() if p.kind in kinds]


def _surfaces():
    """(label, TL object, fxhook object, names) for every surface the issue lists."""
    import fxhook
    from fxhook.analysis.cache import ActivationCache
    from fxhook.factored_matrix import FactoredMatrix
    from fxhook.hook_points import HookPoint

    module = torch.nn.Module
    public = lambda cls: [n for n in dir(cls) if not n.startswith("_") and n not in dir(module)]  # noqa: E731
    def functions(mod, reexports: bool = False) -> list[str]:
        """Public callables defined in `mod` (or, with reexports, anywhere in TransformerLens: its utils
        module gathers functions from transformer_lens.utilities); TL's sweeps are functools.partials."""
        def ours(obj) -> bool:
            where = getattr(obj, "__module__", "") or ""
            return isinstance(obj, functools.partial) or (where.startswith("transformer_lens") if reexports
                                                          else where == mod.__name__)
        return [n for n in dir(mod) if not n.startswith("_") and callable(getattr(mod, n))
                and not inspect.ismodule(getattr(mod, n)) and ours(getattr(mod, n))]

    config = tl.HookedTransformerConfig
    return [
        ("HookedTransformer", tl.HookedTransformer, fxhook.HookedTransformer,
         public(tl.HookedTransformer) + ["__init__"]),
        ("HookPoint", transformer_lens.hook_points.HookPoint, HookPoint, public(transformer_lens.hook_points.HookPoint)),
        ("ActivationCache", tl.ActivationCache, ActivationCache, [n for n in dir(tl.ActivationCache) if not n.startswith("_")]),
        ("FactoredMatrix", tl.FactoredMatrix, FactoredMatrix, [n for n in dir(tl.FactoredMatrix) if not n.startswith("_")]),
        ("HookedTransformerConfig", config, fxhook.HookedTransformerConfig,
         [n for n in dir(config) if not n.startswith("_")] + list(config.__dataclass_fields__) + ["__init__"]),
        ("utils", transformer_lens.utils, importlib.import_module("fxhook.utils"),
         functions(transformer_lens.utils, reexports=True)),
        ("patching", transformer_lens.patching, importlib.import_module("fxhook.patching"),
         functions(transformer_lens.patching)),
        ("evals", transformer_lens.evals, importlib.import_module("fxhook.evals"), functions(transformer_lens.evals)),
    ]


def _check(theirs, ours, name: str, is_field: bool) -> str | None:
    """None when `name` conforms, else what differs."""
    if not hasattr(ours, name) and not (is_field and name in getattr(ours, "__dataclass_fields__", {})):
        return "missing"
    target, mine = getattr(theirs, name, None), getattr(ours, name, None)
    if not callable(target) or isinstance(target, type) and name != "__init__":
        return None
    expected, actual = _positional(target), _positional(mine)
    if expected is None or actual is None:
        return None
    if actual[:len(expected)] != expected:
        return f"positional parameters {actual} != TransformerLens's {expected}"
    if len(actual) > len(expected):
        return f"extra positional parameters {actual[len(expected):]} (extras must be keyword-only)"
    return None


def conformance() -> tuple[dict[tuple[str, str], str], int]:
    problems, total = {}, 0
    for label, theirs, ours, names in _surfaces():
        fields = set(getattr(theirs, "__dataclass_fields__", {}))
        for name in sorted(set(names)):
            total += 1
            problem = _check(theirs, ours, name, name in fields)
            if problem is not None:
                problems[(label, name)] = problem
    return problems, total


def test_transformer_lens_surface_conforms_or_is_allowed_with_a_reason():
    problems, total = conformance()
    unexplained = {key: why for key, why in problems.items() if key not in ALLOWED}
    assert not unexplained, "\n".join(f"{label}.{name}: {why}" for (label, name), why in sorted(unexplained.items()))
    stale = [key for key in ALLOWED if key not in problems]
    assert not stale, f"allowed entries that now conform (remove them): {stale}"
    assert 1 - len(problems) / total >= 0.98, f"{total - len(problems)} of {total} conform"


def test_refused_items_raise_with_their_reason_and_the_readme_lists_them():
    from fxhook.analysis.cache import ActivationCache

    cache = ActivationCache({}, None)
    for (label, name), reason in REFUSED.items():
        with pytest.raises(NotImplementedError, match=reason):
            getattr(cache, name)()
    readme = (ROOT / "README.md").read_text()
    section = readme.split("<!-- refused-tl-items -->")[1].split("\n\n")[0]
    listed = sorted(line.split("`")[1] for line in section.splitlines() if line.startswith("- `"))
    assert listed == sorted(f"{label}.{name}" for label, name in REFUSED)


@pytest.mark.parametrize("name", ["embed", "pos_embed", "unembed", "ln_final", "hook_embed", "hook_pos_embed",
                                  "blocks"])
def test_component_attributes_exist_on_a_loaded_model(name):
    from transformers import GPT2Config, GPT2LMHeadModel

    from fxhook import HookedTransformer

    model = HookedTransformer.from_pretrained_no_processing(
        hf_model=GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=16)))
    assert getattr(model, name) is not None
