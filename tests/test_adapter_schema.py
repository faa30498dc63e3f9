"""The adapter schema: every registered adapter validates, each validation rule rejects an adapter that
breaks it with a message naming the architecture and the inconsistency, `find_adapter` picks the family
adapter (specialised to the config) or infers one, and adapters/ imports nothing above the schema."""
from __future__ import annotations

import ast
import dataclasses
import pathlib
from dataclasses import replace

import pytest
from transformers import LlamaForCausalLM

from adapters import ADAPTERS, BY_ARCHITECTURE, find_adapter
from adapters.gpt2 import GPT2
from adapters.llama import LLAMA
from adapters.mixtral import MIXTRAL
from adapters.neox import NEOX
from fxhook.adapter import Adapter, Attention, FeedForward, Norms, Positions, Site, adapter_problems
from fxhook.infer_adapter import InferredAdapterWarning
from fxhook.weights import Projection
from models import ModelSpec, build_hf_model

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("adapter", ADAPTERS, ids=[a.architectures[0] for a in ADAPTERS])
def test_every_registered_adapter_validates(adapter):
    assert adapter_problems(adapter) == []
    for arch in adapter.architectures:
        assert BY_ARCHITECTURE[arch] is adapter


def test_config_specialised_adapters_validate():
    sequential = NEOX.specialised(type("Cfg", (), {"use_parallel_residual": False})())
    assert adapter_problems(sequential) == [] and not sequential.parallel_attn_mlp and sequential.for_config is None


def _parts(base: Adapter, part: str, **changes) -> Adapter:
    """`base` with fields of one of its parts changed (built, hence validated)."""
    return replace(base, **{part: replace(getattr(base, part), **changes)})


# case: (the adapter it breaks, the broken adapter, the message)
BROKEN = {
    "rotary with a position table": (
        LLAMA, lambda: _parts(LLAMA, "positions", pos_embed="model.embed_positions"),
        "rotary positions take no learned position table"),
    "absolute without a position table": (
        GPT2, lambda: _parts(GPT2, "positions", pos_embed=None),
        "absolute positions need pos_embed"),
    "adjacent pairs without rotary": (
        GPT2, lambda: _parts(GPT2, "positions", rotary_adjacent_pairs=True),
        "rotary_adjacent_pairs is set but positions are not rotary"),
    "negative position offset": (
        GPT2, lambda: _parts(GPT2, "positions", pos_embed_offset=-1),
        "pos_embed_offset=-1 needs a position table and must be >= 0"),
    "unknown positional kind": (
        GPT2, lambda: _parts(GPT2, "positions", kind="sinusoidal"),
        "positions.kind is 'sinusoidal'"),
    "unknown norm kind": (
        LLAMA, lambda: _parts(LLAMA, "norms", kind="batchnorm"),
        "norms.kind is 'batchnorm'"),
    "no epsilon attributes": (
        LLAMA, lambda: _parts(LLAMA, "norms", eps_attr=()),
        "norms.eps_attr is empty"),
    "shared norm in a sequential block": (
        LLAMA, lambda: _parts(LLAMA, "norms", ln2=None),
        r"ln2=None \(the MLP reads ln1's output\) needs parallel_attn_mlp=True"),
    "post-norm without ln2": (
        LLAMA, lambda: replace(LLAMA, norms=replace(LLAMA.norms, ln2=None, post_norm=True), parallel_attn_mlp=True),
        "post_norm blocks need ln2"),
    "post-norm with post norms": (
        LLAMA, lambda: _parts(LLAMA, "norms", post_norm=True, ln1_post="post_attention_layernorm"),
        "post_norm blocks normalise outputs with ln1/ln2"),
    "q norm without k norm": (
        LLAMA, lambda: _parts(LLAMA, "norms", q_norm="self_attn.q_norm"),
        "q_norm and k_norm are given together"),
    "q site without k site": (
        LLAMA, lambda: _parts(LLAMA, "attention", k_site=None),
        "q_site and k_site are given together"),
    "missing v projection": (
        LLAMA, lambda: _parts(LLAMA, "attention", v_proj=None),
        r"attention projections are given all four or none \(missing \['v_proj'\]\)"),
    "gated MLP without its gate projection": (
        LLAMA, lambda: _parts(LLAMA, "feed_forward", gate_proj=None),
        "a gated MLP with projections needs gate_proj"),
    "gated MLP without its linear-branch site": (
        LLAMA, lambda: _parts(LLAMA, "feed_forward", pre_linear_site=None),
        "a gated MLP with hook sites needs pre_linear_site"),
    "gate projection on an ungated MLP": (
        GPT2, lambda: _parts(GPT2, "feed_forward", gate_proj=Projection("mlp.c_fc", "conv1d")),
        "gate_proj / pre_linear_site are given but the MLP is not gated"),
    "in projection without out projection": (
        GPT2, lambda: _parts(GPT2, "feed_forward", out_proj=None),
        "MLP in_proj and out_proj are given together"),
    "experts beside a dense MLP": (
        MIXTRAL, lambda: _parts(MIXTRAL, "feed_forward", post_site=Site("mlp.down_proj", side="input")),
        r"a mixture-of-experts MLP has no dense MLP sites or projections, got \['post_site'\]"),
    "chunk out of range": (
        GPT2, lambda: _parts(GPT2, "attention", v_proj=Projection("attn.c_attn", "conv1d", chunk=3, n_chunks=3)),
        "attention.v_proj takes chunk 3 of n_chunks=3"),
    "interleaved but not fused": (
        LLAMA, lambda: _parts(LLAMA, "attention", q_proj=Projection("self_attn.q_proj", interleaved=True)),
        r"attention.q_proj is interleaved but not fused \(n_chunks=1\)"),
    "rotary_fn and q_site": (
        LLAMA, lambda: _parts(LLAMA, "attention", rotary_fn="apply_rotary_pos_emb"),
        "rotary_fn marks pre-rotary q / k on a rotary model with no q_site"),
    "rotary_fn without rotary": (
        GPT2, lambda: _parts(GPT2, "attention", rotary_fn="apply_rotary_pos_emb"),
        "rotary_fn marks pre-rotary q / k on a rotary model"),
    "split input site": (
        LLAMA, lambda: _parts(LLAMA, "feed_forward", post_site=Site("mlp.down_proj", side="input", split_heads=True)),
        "feed_forward.post_site marks a module's input, which is not split into heads"),
    "empty path": (
        LLAMA, lambda: replace(LLAMA, blocks=""),
        "path blocks is empty"),
    "part of the wrong type": (
        LLAMA, lambda: replace(LLAMA, positions="rotary"),
        "positions must be a Positions, got str"),
    "for_config not callable": (
        LLAMA, lambda: replace(LLAMA, for_config="yes"),
        r"for_config must be callable"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_each_rule_rejects_a_broken_adapter_naming_its_architecture(case):
    base, build, message = BROKEN[case]
    names = ", ".join(base.architectures)
    with pytest.raises(ValueError, match=f"^inconsistent adapter for {names}: (.*; )?{message}"):
        build()


def test_architectures_must_name_classes():
    with pytest.raises(ValueError, match="architectures must be a non-empty tuple of class names"):
        replace(LLAMA, architectures=())
    with pytest.raises(ValueError, match="architectures must be a non-empty tuple of class names"):
        replace(LLAMA, architectures="LlamaForCausalLM")


def test_an_adapter_written_from_its_parts_is_valid_and_reads_through_its_parts():
    adapter = Adapter(architectures=("ToyForCausalLM",), embed="embed", blocks="layers", final_norm="norm",
                      unembed="head", positions=Positions("rotary"), norms=Norms("rmsnorm", ln1="n1", ln2="n2"),
                      attention=Attention("attn"), feed_forward=FeedForward("mlp"))
    assert adapter.rotary and adapter.neutral_norm_weight == 1.0
    assert (adapter.attn_out_module, adapter.mlp_out_module, adapter.mlp_in_module) == ("attn", "mlp", "n2")
    assert not any(f.name == "extra" for f in dataclasses.fields(Adapter))


# --------------------------------------------------------------------------- find_adapter
def test_find_adapter_returns_the_family_adapter():
    assert find_adapter(build_hf_model(ModelSpec("gpt2", 1, 2, 2, 4, 16, True, False, 0))) is GPT2
    assert find_adapter(build_hf_model(ModelSpec("llama", 1, 2, 1, 4, 16, False, False, 0))) is LLAMA
    sequential = find_adapter(build_hf_model(ModelSpec("gpt_neox", 1, 2, 2, 4, 16, True, False, 0, variant=1)))
    assert sequential.architectures == NEOX.architectures and not sequential.parallel_attn_mlp


class RenamedLlamaForCausalLM(LlamaForCausalLM):
    """Llama under a class name no adapter lists: its adapter is inferred."""


def test_find_adapter_infers_an_adapter_for_an_unregistered_class():
    llama = build_hf_model(ModelSpec("llama", 1, 2, 1, 4, 16, False, False, 0))
    renamed = RenamedLlamaForCausalLM(llama.config)
    renamed.load_state_dict(llama.state_dict())
    with pytest.warns(InferredAdapterWarning, match="no adapter for RenamedLlamaForCausalLM"):
        inferred = find_adapter(renamed.eval())
    assert inferred.architectures == ("RenamedLlamaForCausalLM",)
    assert replace(inferred, architectures=LLAMA.architectures) == LLAMA
    assert adapter_problems(inferred) == []


def test_find_adapter_refuses_refused_architectures():
    from transformers import BloomConfig, BloomForCausalLM

    bloom = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=8, n_head=2, vocab_size=32))
    with pytest.raises(NotImplementedError, match="BloomForCausalLM has no fxhook adapter, by design"):
        find_adapter(bloom)


# --------------------------------------------------------------------------- layering
ALLOWED = ("fxhook.adapter", "fxhook.weights", "fxhook.infer_adapter", "fxhook.core")


def _allowed(module: str) -> bool:
    return module in ALLOWED or module.startswith("fxhook.core.")


def _fxhook_imports(path: pathlib.Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
        elif isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
    return [n for n in names if n == "fxhook" or n.startswith("fxhook.")]


@pytest.mark.parametrize("path", sorted((ROOT / "adapters").glob("*.py")) + [ROOT / "fxhook" / "infer_adapter.py"],
                         ids=lambda p: p.name)
def test_adapters_import_only_the_schema_layer(path):
    above = [n for n in _fxhook_imports(path) if not _allowed(n)]
    assert above == [], f"{path.name} imports {above} (allowed: {ALLOWED})"
