"""Models split across devices: the block -> device map, its validation, and the placement pass.

A `Placement` says where each transformer block runs, and where the final norm and unembedding run.
The embedding (and everything computed before the first block: positions, masks, rotary tables) runs
on the first block's device. `n_devices=k` follows TransformerLens's `get_device_for_block_index`:
block i goes to device index base + (i * k) // n_layers; `device_map=` names block ranges.

The placement pass (`place_on_devices`) rewrites a graph captured on one device:
- every node gets a region: the embedding side (-1), block L, or the final side (n_layers), from its
  HF module path (`nn_module_stack`), its HookPoint name or its parameter's path; a node with no
  module of its own inherits the latest region among its inputs (a placeholder, or a node with no
  inputs, the earliest region among its users: a layer's KV-cache input belongs to that layer);
- device constants in the graph (`arange(..., device=...)`, `to(device)`) become the region's device;
- a `to_device` transfer is inserted where a value is read on another device than the one it was made
  on, once per value and device, just before its first reader there: at the block boundaries where
  the map changes device, and nowhere else.

Parameters and buffers are moved to their region's device by `place_tensors_` (same path rule), so the
graph's `get_attr` reads find them where its nodes expect them.
"""
from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import fx, nn

from fxhook.adapter import Adapter
from fxhook.core.graph import finish
from fxhook.core.hook_names import layer_of

DeviceLike = str | int | torch.device
DeviceMap = Mapping[str | int, DeviceLike] | Sequence[DeviceLike]
FINAL_KEY = "unembed"  # device_map key for the final norm and the unembedding


def to_device(x: Any, device: torch.device) -> Any:
    """The transfer node the placement pass inserts: `x` on `device` (non-tensors pass through)."""
    return x.to(device) if isinstance(x, torch.Tensor) else x


# ------------------------------------------------------------------ the map
@dataclass(frozen=True)
class Placement:
    """Where each block runs (`blocks[L]`) and where the final norm and unembedding run (`final`)."""

    blocks: tuple[torch.device, ...]
    final: torch.device

    @property
    def first(self) -> torch.device:
        """The embedding's device: the input (tokens, mask, KV-cache mask) lives here."""
        return self.blocks[0]

    def device_of(self, region: int) -> torch.device:
        """The device of a region: -1 the embedding side, 0..n_layers-1 a block, n_layers the final side."""
        if region < 0:
            return self.first
        return self.final if region >= len(self.blocks) else self.blocks[region]

    def boundaries(self) -> list[int]:
        """Regions whose device differs from the previous region's (where transfers belong)."""
        n = len(self.blocks)
        return [r for r in range(0, n + 1) if self.device_of(r) != self.device_of(r - 1)]

    @property
    def devices(self) -> list[torch.device]:
        return list(dict.fromkeys([*self.blocks, self.final]))

    def __str__(self) -> str:
        spans, start = [], 0
        for i in range(1, len(self.blocks) + 1):
            if i == len(self.blocks) or self.blocks[i] != self.blocks[start]:
                spans.append(f"blocks {start}-{i - 1}: {self.blocks[start]}" if i - 1 > start
                             else f"block {start}: {self.blocks[start]}")
                start = i
        return ", ".join(spans) + f", unembed: {self.final}"


def parse_device(value: DeviceLike, what: str) -> torch.device:
    """A torch.device from a string, torch.device or int (an int is a CUDA index, as in HF device maps)."""
    if isinstance(value, bool):
        raise TypeError(f"{what}: a device must be a string, torch.device or CUDA index, got {value!r}")
    if isinstance(value, int):
        return torch.device("cuda", value)
    if not isinstance(value, (str, torch.device)):
        raise TypeError(f"{what}: a device must be a string, torch.device or CUDA index, got {type(value).__name__}")
    try:
        device = torch.device(value)
    except RuntimeError as e:
        raise ValueError(f"{what}: {value!r} is not a device ({e})") from None
    if device.type in ("meta", "disk"):
        raise ValueError(f"{what}: {device.type!r} holds no weights; fxhook places blocks on devices that compute "
                         f"(cpu, cuda:N, ...)")
    return device


def check_device_exists(device: torch.device, what: str) -> None:
    """Refuse a device this machine does not have (cuda:3 on a one-GPU machine, mps without Metal)."""
    if device.type == "cpu":
        return
    backend = getattr(torch, device.type, None)
    count = backend.device_count() if backend is not None and hasattr(backend, "device_count") else 0
    index = device.index or 0
    if index >= count:
        raise ValueError(f"{what}: {device} does not exist on this machine ({count} {device.type} device"
                         f"{'' if count == 1 else 's'}); use devices it has, e.g. 'cpu'")


def _block_range(key: str | int, n_layers: int) -> range:
    """Blocks named by a device_map key: 3, "3", or "2-5" (inclusive)."""
    text = str(key).strip()
    match = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", text)
    if isinstance(key, bool) or match is None:
        raise ValueError(f"device_map key {key!r} is not a block range: use 'a-b' (blocks a to b, inclusive), "
                         f"a block index, or {FINAL_KEY!r} for the final norm and unembedding")
    start = int(match.group(1))
    stop = int(match.group(2)) if match.group(2) is not None else start
    if start > stop or stop >= n_layers:
        raise ValueError(f"device_map key {key!r} names blocks outside 0-{n_layers - 1} (or backwards): the model "
                         f"has {n_layers} blocks")
    return range(start, stop + 1)


def placement_from_map(device_map: DeviceMap, n_layers: int) -> Placement:
    """A Placement from `device_map`: {"0-5": "cuda:0", "6-11": "cpu"} (every block once; optional
    "unembed": device for the final norm and unembedding, else the last block's), or a list of one
    device per block. Gaps, overlaps and malformed keys are refused with the blocks concerned."""
    if isinstance(device_map, (str, bytes)):
        raise TypeError(f"device_map={device_map!r}: accelerate's strategies ('auto', 'balanced', ...) are not "
                        f"fxhook's; pass block ranges, e.g. {{'0-5': 'cuda:0', '6-11': 'cpu'}}, or n_devices=k")
    if isinstance(device_map, Mapping):
        owner: dict[int, str] = {}
        devices: dict[int, torch.device] = {}
        final = None
        for key, value in device_map.items():
            if key == FINAL_KEY:
                final = parse_device(value, f"device_map[{key!r}]")
                continue
            for block in _block_range(key, n_layers):
                if block in owner:
                    raise ValueError(f"device_map keys {owner[block]!r} and {key!r} overlap at block {block}: "
                                     f"give each block once")
                owner[block] = str(key)
                devices[block] = parse_device(value, f"device_map[{key!r}]")
        missing = [b for b in range(n_layers) if b not in devices]
        if missing:
            raise ValueError(f"device_map leaves blocks {_ranges(missing)} without a device (a gap): the model has "
                             f"{n_layers} blocks and each needs one")
        blocks = tuple(devices[b] for b in range(n_layers))
    elif isinstance(device_map, Sequence):
        if len(device_map) != n_layers:
            raise ValueError(f"a device_map list gives one device per block: the model has {n_layers} blocks, the "
                             f"list has {len(device_map)} entries")
        blocks = tuple(parse_device(v, f"device_map[{i}]") for i, v in enumerate(device_map))
        final = None
    else:
        raise TypeError(f"device_map must be a dict of block ranges to devices or a list of one device per block, "
                        f"got {type(device_map).__name__}")
    return Placement(blocks, final if final is not None else blocks[-1])


def _ranges(blocks: list[int]) -> str:
    spans, start = [], blocks[0]
    for prev, cur in zip(blocks, blocks[1:] + [None]):
        if cur != prev + 1:
            spans.append(f"{start}-{prev}" if prev > start else f"{start}")
            start = cur
    return ", ".join(spans)


def placement_from_n_devices(n_layers: int, n_devices: int, base: DeviceLike = "cuda") -> Placement:
    """TransformerLens's split: block i on device index base + (i * n_devices) // n_layers; the embedding on
    the first block's device, the final norm and unembedding on the last block's."""
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices must be a positive integer, got {n_devices!r}")
    if n_devices > n_layers:
        raise ValueError(f"n_devices={n_devices} is more devices than the model has blocks ({n_layers}): each "
                         f"device needs at least one block")
    device = parse_device(base, "device")
    if n_devices > 1 and device.type == "cpu":
        raise ValueError(f"n_devices={n_devices} splits the blocks across {n_devices} accelerators (cuda:0, cuda:1, "
                         f"...), but the device is the CPU; to split between an accelerator and the CPU pass "
                         f"device_map=, e.g. {{'0-{n_layers // 2 - 1 if n_layers > 1 else 0}': 'cuda:0', ...}}")
    first = device.index or 0
    blocks = tuple(torch.device(device.type, first + (i * n_devices) // n_layers) if n_devices > 1 else device
                   for i in range(n_layers))
    return Placement(blocks, blocks[-1])


# ------------------------------------------------------------------ regions
class _Regions:
    """The region of an HF module or parameter path: -1 embedding side, L block L, n_layers final side."""

    def __init__(self, adapter: Adapter, n_layers: int):
        self.n_layers = n_layers
        self._block = re.compile(rf"^(?:hf\.)?{re.escape(adapter.blocks)}\.(\d+)(?:\.|$)")
        self._final = tuple(p for p in (adapter.final_norm, adapter.unembed) if p)

    def of_path(self, path: str) -> int | None:
        """The region a module or tensor path belongs to; None for model-level code (neither)."""
        match = self._block.match(path)
        if match:
            return int(match.group(1))
        bare = path[3:] if path.startswith("hf.") else path
        if any(bare == p or bare.startswith(p + ".") for p in self._final):
            return self.n_layers
        return None

    def of_hook(self, name: str) -> int:
        layer = layer_of(name)
        if layer is not None:
            return layer
        return self.n_layers if name.startswith(("ln_final.", "unembed.")) else -1  # the final norm, the unembedding


def _explicit_region(node: fx.Node, regions: _Regions) -> int | None:
    """The region a node names itself: its parameter's path, its HookPoint name, its HF module path."""
    if node.op == "get_attr":
        region = regions.of_path(str(node.target))
        return -1 if region is None else region
    if node.op == "call_module":
        return regions.of_hook(str(node.target))
    stack = node.meta.get("nn_module_stack")
    if node.op == "call_function" and stack:
        path = list(stack.values())[-1][0]
        return regions.of_path(path) if isinstance(path, str) else None
    return None


def node_regions(gm: fx.GraphModule, adapter: Adapter, n_layers: int) -> dict[fx.Node, int]:
    """Each node's region (see the module docstring), the output node excepted."""
    regions = _Regions(adapter, n_layers)
    region: dict[fx.Node, int] = {}
    pending: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        inputs = [region[i] for i in node.all_input_nodes if i in region]
        if node.op == "call_function" and node.target is operator.getitem and node.args[0] in region:
            region[node] = region[node.args[0]]  # a part of a tuple lives where the tuple does
            continue
        own = _explicit_region(node, regions)
        if own is not None:
            region[node] = own
        elif inputs:
            region[node] = max(inputs)
        else:
            pending.append(node)  # placeholders and nodes with no inputs: placed by their readers
    for node in reversed(pending):
        readers = [region[u] for u in node.users if u in region]
        region[node] = min(readers) if readers else -1
    return region


# ------------------------------------------------------------------ the pass
def _with_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.device):
        return device
    if isinstance(value, (list, tuple)):
        return type(value)(_with_device(v, device) for v in value)
    return value


def place_on_devices(gm: fx.GraphModule, placement: Placement, adapter: Adapter, n_layers: int) -> fx.GraphModule:
    """Pass: GraphModule captured on one device -> the same graph split as `placement` says (device
    constants rewritten per region, `to_device` transfers where a value crosses devices). Any form."""
    if len(placement.blocks) != n_layers:
        raise ValueError(f"the placement names {len(placement.blocks)} blocks but the model has {n_layers}")
    region = node_regions(gm, adapter, n_layers)
    transfers: dict[tuple[fx.Node, torch.device], fx.Node] = {}
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op == "output" or node not in region:
            continue
        device = placement.device_of(region[node])
        if node.op == "call_function":
            node.args = _with_device(node.args, device)
            node.kwargs = {k: _with_device(v, device) for k, v in node.kwargs.items()}
        if node.op == "call_function" and node.target is operator.getitem:
            continue  # moves with its tuple
        for source in node.all_input_nodes:
            if source not in region or placement.device_of(region[source]) == device:
                continue
            val = source.meta.get("val")
            if val is not None and not isinstance(val, torch.Tensor):
                continue  # sizes (SymInt) and tuples are not moved (a tuple's parts move through getitem)
            key = (source, device)
            if key not in transfers:
                with graph.inserting_before(node):
                    moved = graph.call_function(to_device, (source, device))
                moved.meta["placement_region"] = region[node]
                transfers[key] = moved
            node.replace_input_with(source, transfers[key])
    gm.meta["placement"] = placement
    return finish(gm)


def transfer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The transfers the placement pass inserted in `gm`."""
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is to_device]


# ------------------------------------------------------------------ tensors
def place_tensors_(module: nn.Module, placement: Placement, adapter: Adapter) -> None:
    """Move every parameter (in place: the same Parameter object, so graphs sharing it follow) and buffer of
    `module` to its region's device, by its path (an HF model's, or a capture's under `hf.`)."""
    regions = _Regions(adapter, len(placement.blocks))
    with torch.no_grad():
        for prefix, sub in module.named_modules(remove_duplicate=False):
            for slots in (sub._parameters, sub._buffers):
                for name, tensor in slots.items():
                    region = regions.of_path(f"{prefix}.{name}" if prefix else name)
                    device = placement.device_of(-1 if region is None else region)
                    if tensor is None or tensor.device == device:
                        continue
                    if isinstance(tensor, nn.Parameter):
                        tensor.data = tensor.data.to(device)
                    else:
                        slots[name] = tensor.to(device)


def untie_split_embeddings_(hf_model: nn.Module, placement: Placement, adapter: Adapter) -> bool:
    """Give the unembedding its own copy of a tied embedding matrix when the two sit on different devices
    (one Parameter cannot live on two). Returns whether it untied."""
    embed = hf_model.get_submodule(adapter.embed)
    unembed = hf_model.get_submodule(adapter.unembed)
    if unembed.weight is not embed.weight or placement.first == placement.final:
        return False
    unembed.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    if hasattr(hf_model.config, "tie_word_embeddings"):
        hf_model.config.tie_word_embeddings = False
    return True


def single(device: DeviceLike, n_layers: int) -> Placement:
    """Every block, the embedding and the unembedding on one device."""
    d = torch.device(device)
    return Placement((d,) * n_layers, d)


# ------------------------------------------------------------------ the loading boundary
def split_requested(n_devices: int, device_map: DeviceMap | None, device: DeviceLike | None) -> bool:
    """Whether from_pretrained's arguments ask for a split, refusing contradictory ones before anything loads."""
    if isinstance(n_devices, bool) or not isinstance(n_devices, int) or n_devices < 1:
        raise ValueError(f"n_devices must be a positive integer, got {n_devices!r}")
    if device_map is not None:
        if n_devices != 1:
            raise ValueError("pass n_devices= (an even split) or device_map= (blocks named), not both")
        if device is not None:
            raise ValueError("device= and device_map= both say where the model goes: pass one (device_map's "
                             f"{FINAL_KEY!r} key places the final norm and unembedding)")
        if isinstance(device_map, (str, bytes)) or not isinstance(device_map, (Mapping, Sequence)):
            placement_from_map(device_map, 1)  # raises the type's own error
    return n_devices != 1 or device_map is not None


def resolve_placement(n_layers: int, n_devices: int, device_map: DeviceMap | None,
                      device: DeviceLike | None) -> Placement:
    """The Placement from_pretrained's arguments ask for, every device checked to exist on this machine."""
    if device_map is not None:
        placement = placement_from_map(device_map, n_layers)
    else:
        placement = placement_from_n_devices(n_layers, n_devices, device if device is not None else "cuda")
    for d in placement.devices:
        check_device_exists(d, "device_map" if device_map is not None else f"n_devices={n_devices}")
    return placement
