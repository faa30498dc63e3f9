"""Models split across devices: n_devices / device_map, the placement pass, per-layer KV caches.

Without an accelerator the split is checked two ways: every block mapped to the CPU must give the HF
model's own logits and greedy tokens, and the placement pass's output on a map naming devices this
machine lacks is run on the CPU by an interpreter that follows the device each value would live on
(`VirtualDevices`: torch's rule that an op's operands share a device), its values compared with the
HF model's. Where CUDA is available, a GPU/CPU split is
compared with the model on one device.
"""
from __future__ import annotations

import re
from types import SimpleNamespace

import pytest
import torch
from transformer_lens.utilities.multi_gpu import get_device_for_block_index

from fxhook import HookedTransformer, pipeline
from fxhook.core.hook_point import HookPoint
from fxhook.passes.placement import (Placement, place_on_devices, placement_from_map, placement_from_n_devices,
                                     to_device, transfer_nodes, untie_split_embeddings_)
from fxhook.pipeline import DecodeKind, GraphSpec
from models import VOCAB, ModelSpec, build_hf_model

LLAMA = ModelSpec("llama", 4, 4, 2, 8, 32, False, False, 3)  # GQA, rotary, untied
SMALL = ModelSpec("llama", 2, 4, 2, 8, 32, False, False, 4)
GPT2 = ModelSpec("gpt2", 3, 4, 4, 8, 32, True, True, 5)  # absolute positions, tied embedding
CPU, GPU0, GPU1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


def sharpened(spec: ModelSpec):
    """A random model whose greedy tokens are well separated (embeddings x30, final norm x10), so
    token-for-token comparisons are robust and discriminating."""
    hf = build_hf_model(spec)
    norm = hf.transformer.ln_f if spec.family == "gpt2" else hf.model.norm
    embed = hf.transformer.wte if spec.family == "gpt2" else hf.model.embed_tokens
    with torch.no_grad():
        norm.weight.mul_(10.0)
        embed.weight.mul_(30.0)
    hf.generation_config.eos_token_id = None
    return hf.eval()


def tokens(batch: int = 2, pos: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def hf_greedy(hf, toks: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        return hf.generate(toks, attention_mask=torch.ones_like(toks), do_sample=False, max_new_tokens=n,
                           use_cache=True, pad_token_id=0)


def greedy(model, toks: torch.Tensor, n: int, **kw) -> torch.Tensor:
    return model.generate(toks, max_new_tokens=n, do_sample=False, stop_at_eos=False, verbose=False, **kw)


# ------------------------------------------------------------------ the map
@pytest.mark.parametrize("base", ["cuda", "cuda:1"])
def test_n_devices_follows_transformer_lens(base):
    """Every (n_layers, n_devices) split puts each block where TransformerLens 3.9 puts it."""
    for n_layers in range(1, 14):
        for k in range(2, n_layers + 1):
            cfg = SimpleNamespace(device=base, n_devices=k, n_layers=n_layers)
            expected = [get_device_for_block_index(i, cfg) for i in range(n_layers)]
            placement = placement_from_n_devices(n_layers, k, base)
            assert list(placement.blocks) == expected, (n_layers, k)
            assert placement.final == expected[-1] and placement.first == expected[0]
            assert len(set(placement.blocks)) == k  # every device gets blocks


def test_device_map_forms():
    by_ranges = placement_from_map({"0-1": "cuda:0", 2: "cpu", "3-3": "cuda:1"}, 4)
    assert by_ranges.blocks == (GPU0, GPU0, CPU, GPU1) and by_ranges.final == GPU1
    assert by_ranges.boundaries() == [2, 3]
    by_list = placement_from_map(["cpu", 0, torch.device("cuda", 1)], 3)
    assert by_list.blocks == (CPU, GPU0, GPU1)
    chosen = placement_from_map({"0-2": "cuda:0", "unembed": "cpu"}, 3)
    assert chosen.final == CPU and chosen.boundaries() == [3]  # only the final norm and unembedding move
    assert str(chosen) == "blocks 0-2: cuda:0, unembed: cpu"


BAD_MAPS = [
    (dict(device_map={"0-1": "cpu"}), "blocks 2-3 without a device"),  # a gap
    (dict(device_map={"0-2": "cpu", "2-3": "cpu"}), "overlap at block 2"),
    (dict(device_map={"0-3": "gpu"}), "not a device"),
    (dict(device_map={"0-3": "cuda:99"}), "does not exist on this machine"),
    (dict(device_map={"0-3": "meta"}), "holds no weights"),
    (dict(device_map={"0-4": "cpu"}), "outside 0-3"),
    (dict(device_map={"model.layers.0": "cpu"}), "not a block range"),
    (dict(device_map=["cpu"] * 3), "one device per block.*4 blocks"),
    (dict(device_map="auto"), "accelerate's strategies"),
    (dict(device_map={"0-3": "cpu"}, device="cpu"), "pass one"),
    (dict(device_map={"0-3": "cpu"}, n_devices=2), "not both"),
    (dict(n_devices=5), "more devices than the model has blocks"),
    (dict(n_devices=0), "positive integer"),
    (dict(n_devices=2, device="cpu"), "to split between an accelerator and the CPU pass device_map"),
]


@pytest.mark.parametrize("kwargs, message", BAD_MAPS, ids=[m for _, m in BAD_MAPS])
def test_bad_maps_are_refused_at_load(kwargs, message):
    hf = build_hf_model(LLAMA)
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=message):
        HookedTransformer.from_pretrained_no_processing("tiny", hf_model=hf, **kwargs)
    assert all(torch.equal(before[k], v) and v.device == CPU for k, v in hf.state_dict().items())


# ------------------------------------------------------------------ every block on the CPU: real runs
def test_split_onto_one_device_equals_the_hf_model_until_moved():
    hf = sharpened(SMALL)
    model = HookedTransformer.from_pretrained_no_processing("tiny", hf_model=hf, device_map={"0": "cpu", "1": "cpu"})
    assert model.graphs.placement.blocks == (CPU,) * 2
    toks = tokens()
    with torch.no_grad():
        expected = hf(toks).logits
        torch.testing.assert_close(model(toks), expected, atol=1e-5, rtol=0)
        logits, cache = model.run_with_cache(toks, names_filter=lambda n: n.endswith("hook_resid_post"))
        hidden = hf(toks, output_hidden_states=True).hidden_states
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], hidden[1], atol=1e-5, rtol=0)
    assert not transfer_nodes(model.graph_module)  # one device: nothing to move
    prompt = toks[:, :3]
    reference = hf_greedy(hf, prompt, 6)
    assert torch.equal(greedy(model, prompt, 6), reference)
    assert torch.equal(greedy(model, prompt, 6, use_past_kv_cache=False), reference)
    kv = model.init_kv_cache(2)
    assert [k.device for k in kv.keys] == [CPU] * 2
    # a dtype keeps the split; a device undoes it (every block goes there)
    with torch.no_grad():
        model.to(torch.float64)
        assert model.graphs.placement is not None
        torch.testing.assert_close(model(toks).float(), expected, atol=1e-4, rtol=0)
        model.to("cpu")
        assert model.graphs.placement is None and model.cfg.device == "cpu"
        torch.testing.assert_close(model(toks).float(), expected, atol=1e-4, rtol=0)


def test_tied_embedding_is_untied_only_across_devices():
    hf = build_hf_model(GPT2)
    assert hf.lm_head.weight is hf.transformer.wte.weight
    from adapters import find_adapter

    adapter = find_adapter(hf)
    assert not untie_split_embeddings_(hf, Placement((CPU,) * 3, CPU), adapter)
    assert untie_split_embeddings_(hf, Placement((CPU,) * 3, GPU0), adapter)
    assert hf.lm_head.weight is not hf.transformer.wte.weight
    assert torch.equal(hf.lm_head.weight, hf.transformer.wte.weight)


# ------------------------------------------------------------------ devices this machine lacks: fake runs
def _expected_device(path: str, placement: Placement) -> torch.device:
    """The map's device for a parameter path, worked out by hand for Llama's module names."""
    match = re.search(r"model\.layers\.(\d+)\.", path)
    if match:
        return placement.blocks[int(match.group(1))]
    if "model.norm" in path or "lm_head" in path:
        return placement.final
    return placement.first


class DeviceMismatch(AssertionError):
    pass


def _devices_in(value) -> list[torch.device]:
    if isinstance(value, torch.device):
        return [value]
    if isinstance(value, (list, tuple)):
        return [d for v in value for d in _devices_in(v)]
    if isinstance(value, dict):
        return [d for v in value.values() for d in _devices_in(v)]
    return []


def _on_cpu(value):
    if isinstance(value, torch.device):
        return CPU
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(v) for v in value)
    if isinstance(value, dict):
        return {k: _on_cpu(v) for k, v in value.items()}
    return value


class VirtualDevices(torch.fx.Interpreter):
    """Runs a placed graph for real on the CPU while following the device every value would live on,
    with torch's rule: an op's tensor operands share one device (0-dim CPU scalars excepted) and its
    result lives there; `to_device` moves a value; a device an op names must be the one its operands
    are on (the capture's own `to` ops must not move data across devices behind the pass's back)."""

    def __init__(self, gm, placement: Placement, inputs: list[torch.device]):
        super().__init__(gm)
        self.placement = placement
        self.inputs = iter(inputs)
        self.where: dict[torch.fx.Node, torch.device] = {}
        self.hooks: dict[str, torch.device] = {}
        named = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
        self.paths = {id(t): name for name, t in named}  # eager decode graphs read them as flat attributes

    def run_node(self, n):
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        named = _devices_in((n.args, n.kwargs))
        result = getattr(self, n.op)(n.target, _on_cpu(args), _on_cpu(kwargs))
        if n.op == "output":
            return result
        if n.op == "placeholder":
            self.where[n] = next(self.inputs)
            return result
        if n.op == "get_attr":
            self.where[n] = _expected_device(self.paths.get(id(result), str(n.target)), self.placement)
            return result
        operands = {self.where[i] for i in n.all_input_nodes
                    if i in self.where and isinstance(self.env[i], (torch.Tensor, tuple, list))
                    and not (isinstance(self.env[i], torch.Tensor) and self.env[i].dim() == 0
                             and self.where[i] == CPU)}
        if n.target is to_device:
            self.where[n] = n.args[1]
            return result
        if len(operands) > 1:
            raise DeviceMismatch(f"{n.name} ({n.target}) reads values on {sorted(map(str, operands))}")
        if named and operands and set(named) != operands:
            raise DeviceMismatch(f"{n.name} ({n.target}) names {named} but its operands are on {operands}")
        self.where[n] = (named or list(operands) or [CPU])[0]
        if n.op == "call_module":
            self.hooks[str(n.target)] = self.where[n]
        return result

    def devices_out(self) -> list[torch.device]:
        out = next(n for n in self.module.graph.nodes if n.op == "output")
        values = out.args[0] if isinstance(out.args[0], (tuple, list)) else [out.args[0]]
        return [self.where[v] for v in values]


def _hook_block(name: str, n_layers: int) -> int:
    if name.startswith("blocks."):
        return int(name.split(".")[1])
    return n_layers if name.startswith(("ln_final", "unembed.")) else -1


@pytest.fixture(scope="module")
def llama_model():
    return HookedTransformer.from_pretrained_no_processing("tiny", hf_model=build_hf_model(LLAMA), device="cpu")


SPLIT = {"0-1": "cpu", "2-3": "cuda:0", "unembed": "cuda:1"}


def test_transfers_sit_exactly_at_the_boundaries_the_map_names(llama_model):
    model, n = llama_model, LLAMA.n_layers
    placement = placement_from_map(SPLIT, n)
    gm = pipeline.build_forward(model.graphs.captured(), GraphSpec.from_cfg(model.cfg), model.cfg, model.adapter,
                                HookPoint, placement)
    toks = tokens(2, 5)
    run = VirtualDevices(gm, placement, [CPU, CPU])
    with torch.no_grad():
        logits = run.run(toks, torch.ones_like(toks))
        torch.testing.assert_close(logits, model.hf_model(toks).logits, atol=1e-5, rtol=0)  # values unchanged
    assert run.devices_out() == [GPU1]
    # hooks see tensors on their block's device (the embedding's on the first, ln_final's on the unembed's)
    assert len(run.hooks) > 10 * n
    for name, device in run.hooks.items():
        assert device == placement.device_of(_hook_block(name, n)), name
    # each transfer sits in the stretch of graph that belongs to a block where the map changes device
    order = list(gm.graph.nodes)
    points = [(i, node.target) for i, node in enumerate(order) if node.op == "call_module"]
    stretches = {}
    for transfer in transfer_nodes(gm):
        at = order.index(transfer)
        next_point = next(name for i, name in points if i > at)
        stretches.setdefault(_hook_block(next_point, n), []).append(transfer)
        assert transfer.args[1] == placement.device_of(_hook_block(next_point, n))
    assert sorted(stretches) == [2, n] == placement.boundaries()
    moved = [(t.args[0], t.args[1]) for t in transfer_nodes(gm)]
    assert len(moved) == len(set(moved))  # a value crosses to a device once
    # the residual stream crosses at block 2's entry and at the final norm, nowhere else
    residual = [t for t in transfer_nodes(gm) if str(t.args[0].target).endswith("hook_resid_post")]
    assert [t.args[0].target for t in residual] == ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    assert [u.target for u in residual[0].users] == ["blocks.2.hook_resid_pre"]


def test_without_the_pass_a_split_graph_fails_the_device_check(llama_model):
    """The device check is a real one: the unplaced graph on split weights is refused."""
    model = llama_model
    placement = placement_from_map(SPLIT, LLAMA.n_layers)
    gm = pipeline.build_forward(model.graphs.captured(), GraphSpec.from_cfg(model.cfg), model.cfg, model.adapter)
    toks = tokens(2, 5)
    with torch.no_grad(), pytest.raises(DeviceMismatch):
        VirtualDevices(gm, placement, [CPU, CPU]).run(toks, torch.ones_like(toks))


def test_decode_graph_keeps_each_layers_cache_on_its_device(llama_model):
    model, n = llama_model, LLAMA.n_layers
    placement = placement_from_map({"0": "cuda:0", "1-2": "cpu", "3": "cuda:1"}, n)
    step = model.graphs.decode_step(False, DecodeKind())
    gm = pipeline.build_decode(step, GraphSpec.from_cfg(model.cfg), DecodeKind(), model.cfg, model.adapter,
                               HookPoint, placement)
    toks = tokens(2, 5)
    mask = torch.ones_like(toks)
    empty = [torch.zeros((2, LLAMA.n_kv_heads, 0, LLAMA.d_head)) for _ in range(n)]
    layer_devices = list(placement.blocks)
    run = VirtualDevices(gm, placement, [GPU0, GPU0, GPU0, *layer_devices, *layer_devices])
    positions = torch.arange(5).expand(2, 5)
    with torch.no_grad():
        out = run.run(toks, positions, mask, *empty, *empty)
        torch.testing.assert_close(out[0], model.hf_model(toks).logits, atol=1e-5, rtol=0)
    # logits on the unembedding's device, each layer's new keys and values on that layer's device
    assert run.devices_out() == [placement.final, *layer_devices, *layer_devices]
    assert placement.boundaries() == [1, 3]


def test_pass_is_pure_on_its_input(llama_model):
    """The pass rewrites the graph it is given and nothing else: the capture stays single-device."""
    model = llama_model
    captured = model.graphs.captured()
    before = [(n.name, n.target, n.args, dict(n.kwargs)) for n in captured.graph.nodes]
    from fxhook.core.graph import copy_graph_module

    placed = place_on_devices(copy_graph_module(captured), placement_from_map(SPLIT, LLAMA.n_layers), model.adapter,
                              LLAMA.n_layers)
    assert [(n.name, n.target, n.args, dict(n.kwargs)) for n in captured.graph.nodes] == before
    assert any(n.target is to_device for n in placed.graph.nodes)


# ------------------------------------------------------------------ a real accelerator
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to split between it and the CPU")
@pytest.mark.parametrize("spec, device_map", [(LLAMA, {"0-1": "cuda:0", "2-3": "cpu"}),
                                              (GPT2, {"0-2": "cpu", "unembed": "cuda:0"})], ids=["llama", "gpt2"])
def test_gpu_cpu_split_matches_one_device(spec, device_map):
    one = HookedTransformer.from_pretrained_no_processing("tiny", hf_model=sharpened(spec), device="cuda")
    split = HookedTransformer.from_pretrained_no_processing("tiny", hf_model=sharpened(spec), device_map=device_map)
    placement = split.graphs.placement
    toks = tokens().cuda()
    with torch.no_grad():
        expected = one(toks)
        got, cache = split.run_with_cache(toks)
    assert got.device == placement.final
    torch.testing.assert_close(got.to(expected.device), expected, atol=1e-4, rtol=1e-4)
    for name, value in cache.items():
        assert value.device == placement.device_of(_hook_block(name, spec.n_layers)), name
    prompt = toks[:, :3]
    reference = greedy(one, prompt, 8)
    assert torch.equal(greedy(split, prompt, 8).to(reference.device), reference)
    assert torch.equal(greedy(split, prompt, 8, use_past_kv_cache=False).to(reference.device), reference)
    kv = split.init_kv_cache(2)
    assert [k.device for k in kv.keys] == list(placement.blocks)
    with torch.no_grad():
        split.to("cuda")
        torch.testing.assert_close(split(toks), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices for n_devices=2")
def test_n_devices_two_gpus_matches_one():
    one = HookedTransformer.from_pretrained_no_processing("tiny", hf_model=sharpened(LLAMA), device="cuda")
    split = HookedTransformer.from_pretrained_no_processing("tiny", hf_model=sharpened(LLAMA), n_devices=2)
    assert split.graphs.placement.blocks == (GPU0, GPU0, GPU1, GPU1)
    toks = tokens().cuda()
    with torch.no_grad():
        torch.testing.assert_close(split(toks).to(GPU0), one(toks), atol=1e-4, rtol=1e-4)
    prompt = toks[:, :3]
    assert torch.equal(greedy(split, prompt, 8), greedy(one, prompt, 8))
