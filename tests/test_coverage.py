"""The family tests' CI examples cover what the README's support table stands on (issue #18).

Under the `ci` profile a hypothesis test draws few examples, and hypothesis's first draw is its minimal
one (1 layer, 1 head, no bias, no padding): the family tests therefore run once per coverage stratum
(models.STRATA), and each stratum fixes what a family's examples must cover. This file checks that, from
the same objects the family tests use (their parametrisations, strategies, batch strategies and explicit
examples), never from a log another process wrote (so it holds under pytest-xdist):

- every hypothesis test of a family test file runs every stratum for every family it checks;
- whatever the strategies draw in the strata a headline test runs, the HF models built from those specs
  (read from the HF model and its config, not from the spec) and the batches cover, per family: 2+
  layers, grouped-query attention where the HF class has it, attention biases on and off where its
  config can switch them (and exactly as the spec says everywhere), tied and untied embeddings,
  left-padded batches, and the family's own options away from their defaults;
- the headline logits test of tests/test_equivalence.py has explicit examples of every one of its
  families (Qwen2 included) covering the same, GQA among them.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import test_equivalence
import test_families_norms
import test_families_parallel
import test_moe
from family_models import build_family_model, family_specs
from models import NO_SHRINK, STRATA, build_hf_model, model_specs
from profiles import examples

FAMILY_TEST_MODULES = (test_families_norms, test_families_parallel, test_moe)
BIAS_SWITCHES = ("attention_bias", "enable_bias")  # the HF config options that turn attention biases off
SPECIALS = {  # the family's own options, away from their defaults, in the family test files
    "gemma2": {"query_pre_attn_scalar != d_head", "attention soft-cap", "logit soft-cap", "window < sequence"},
    "mistral": {"window < sequence"},
    "mixtral": {"top-2 of >2 experts"},
    "qwen3": {"q/k norm weights not 1"},
    "olmo2": {"q/k norm weights not 1"},
    "gpt_neox": {"parallel block", "sequential block", "partial rotary"},
    "gptj": {"partial rotary"},
    "phi": {"partial rotary"},
}


def required(family: str, config, specials: bool = True) -> set[str]:
    """What a family's examples must cover, the options read from its HF config: GQA where it has
    num_key_value_heads, biases on and off where it can switch them."""
    need = {"2+ layers", "tied", "untied", "left-padded"}
    if hasattr(config, "num_key_value_heads"):
        need.add("GQA")
    if any(option in config.to_dict() for option in BIAS_SWITCHES):
        need |= {"attention biases", "no attention biases"}
    return need | (SPECIALS.get(family, set()) if specials else set())


# --------------------------------------------------------------- what a built model and a batch have
def _rotary_dim(hf: torch.nn.Module, family: str) -> int | None:
    if family == "gptj":
        return hf.config.rotary_dim
    rotary = {"gpt_neox": "gpt_neox.rotary_emb", "phi": "model.rotary_emb"}.get(family)
    return None if rotary is None else 2 * hf.get_submodule(rotary).inv_freq.numel()


def observed(hf: torch.nn.Module, family: str, mask: torch.Tensor) -> set[str]:
    """The coverage properties of an HF model and a batch, read from the model (its config, parameters and
    modules) and the mask."""
    config = hf.config
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // heads
    props = set()
    if config.num_hidden_layers >= 2:
        props.add("2+ layers")
    if 1 < kv < heads:
        props.add("GQA")
    if kv == 1 < heads:
        props.add("MQA")
    qkv_bias = any(name.endswith(("q_proj.bias", "query_key_value.bias", "c_attn.bias"))
                   for name, _ in hf.named_parameters())
    props.add("attention biases" if qkv_bias else "no attention biases")
    tied = hf.get_output_embeddings().weight.data_ptr() == hf.get_input_embeddings().weight.data_ptr()
    props.add("tied" if tied else "untied")
    if bool(((mask[:, 0] == 0) & (mask.sum(-1) > 0)).any()):
        props.add("left-padded")
    window = getattr(config, "sliding_window", None)
    if window is not None and window < int(mask.sum(-1).max()):
        props.add("window < sequence")
    if family == "gemma2":
        if config.query_pre_attn_scalar != d_head:
            props.add("query_pre_attn_scalar != d_head")
        if config.attn_logit_softcapping is not None:
            props.add("attention soft-cap")
        if config.final_logit_softcapping is not None:
            props.add("logit soft-cap")
    if family == "mixtral" and config.num_experts_per_tok == 2 and config.num_local_experts > 2:
        props.add("top-2 of >2 experts")
    if family in ("qwen3", "olmo2"):
        norms = [w for name, w in hf.named_parameters() if name.endswith(("q_norm.weight", "k_norm.weight"))]
        if norms and all(not torch.equal(w, torch.ones_like(w)) for w in norms):
            props.add("q/k norm weights not 1")
    if family == "gpt_neox":
        props.add("parallel block" if config.use_parallel_residual else "sequential block")
    rotary = _rotary_dim(hf, family)
    if rotary is not None and rotary < d_head:
        props.add("partial rotary")
    return props


# --------------------------------------------------------------- what the family tests run
def parametrized(test) -> list[dict]:
    """The parameter sets of a test's @pytest.mark.parametrize marks, as {argname: value}."""
    rows = [{}]
    for mark in getattr(test, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names = [n.strip() for n in mark.args[0].split(",")]
        values = [p.values if hasattr(p, "values") else (p if len(names) > 1 else (p,)) for p in mark.args[1]]
        rows = [{**row, **dict(zip(names, v))} for row in rows for v in values]
    return rows


def hypothesis_family_tests(module) -> list:
    return [getattr(module, name) for name in dir(module)
            if name.startswith("test_") and hasattr(getattr(module, name), "hypothesis")]


def strata_by_family(test, family: str | None = None) -> dict[str, set[str]]:
    """family -> the strata the test runs it in (test_moe's tests are Mixtral's, with no family argument)."""
    out: dict[str, set[str]] = {}
    for row in parametrized(test):
        if "stratum" in row:
            out.setdefault(row.get("family", family), set()).add(row["stratum"])
    return out


@pytest.mark.parametrize("module", FAMILY_TEST_MODULES, ids=lambda m: m.__name__)
def test_every_family_property_runs_every_stratum(module):
    tests = hypothesis_family_tests(module)
    assert tests
    for test in tests:
        strata = strata_by_family(test, "mixtral" if module is test_moe else None)
        assert strata, f"{module.__name__}.{test.__name__} draws configs without a coverage stratum"
        short = {family: sorted(set(STRATA) - got) for family, got in strata.items() if got != set(STRATA)}
        assert not short, f"{module.__name__}.{test.__name__} misses strata {short}"


def _norms_spec(family, stratum):
    return family_specs(family, stratum)


def _parallel_spec(family, stratum):
    return model_specs(families=(family,), stratum=stratum)


# (headline test, its spec strategy, its batch strategy, the family it stands for when it has no family argument)
HEADLINE = {
    "norms": (test_families_norms.test_logits_exact_hooks_follow_the_contract_and_read_hf_values, _norms_spec,
              test_families_norms.BATCHES, None, build_family_model),
    "parallel": (test_families_parallel.test_unprocessed_equals_hf_and_hooks_follow_the_contract, _parallel_spec,
                 test_families_parallel.BATCHES, None, build_hf_model),
    "moe": (test_moe.test_editing_the_chosen_experts_matches_the_same_edit_in_hf, _norms_spec, test_moe.BATCHES,
            "mixtral", build_family_model),
}
CASES = [(key, family) for key, (test, _, _, default, _) in HEADLINE.items()
         for family in strata_by_family(test, default)]


@pytest.mark.parametrize("key, family", CASES, ids=[f"{k}-{f}" for k, f in CASES])
@settings(max_examples=examples(2), phases=NO_SHRINK)
@given(data=st.data())
def test_headline_family_examples_cover_the_listed_properties(key, family, data):
    """One draw per stratum the headline test runs, whichever draw it is: together they cover the list, and
    every spec's bias is what the HF model has."""
    test, spec_strategy, batches, default, build = HEADLINE[key]
    seen: set[str] = set()
    for stratum in sorted(strata_by_family(test, default)[family]):
        spec = data.draw(spec_strategy(family, stratum), label=f"spec {stratum}")
        _, mask = data.draw(batches, label=f"batch {stratum}")
        hf = build(spec)
        props = observed(hf, family, mask)
        assert ("attention biases" in props) == spec.bias, f"{spec}: spec.bias is not what the HF model has"
        seen |= props
    for prop in sorted(seen):
        event(f"{family}: {prop}")
    missing = required(family, hf.config) - seen
    assert not missing, f"{test.__name__}[{family}]: its CI examples never have {sorted(missing)}"


def test_headline_logits_examples_cover_every_family_with_gqa():
    """tests/test_equivalence.py's logits test: its explicit examples (the ones the test function carries,
    read from hypothesis) cover each of its families, Qwen2 and GQA included."""
    test = test_equivalence.test_logits_match_hf_and_left_padding_is_invisible
    explicit = [e.kwargs for e in test.hypothesis.inner_test.hypothesis_explicit_examples]
    seen: dict[str, set[str]] = {}
    configs = {}
    for kwargs in explicit:
        spec, (_, mask) = kwargs["spec"], kwargs["batch"]
        hf = build_hf_model(spec)
        props = observed(hf, spec.family, mask)
        assert ("attention biases" in props) == spec.bias, f"{spec}: spec.bias is not what the HF model has"
        seen.setdefault(spec.family, set()).update(props)
        configs[spec.family] = hf.config
    assert set(seen) == set(test_equivalence.FAMILIES), f"explicit examples for {sorted(seen)} only"
    missing = {f: sorted(required(f, configs[f], specials=False) - got) for f, got in seen.items()
               if required(f, configs[f], specials=False) - got}
    assert not missing, f"the logits test's explicit examples never have {missing}"
