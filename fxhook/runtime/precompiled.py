"""Hook-free compiled decode without dynamo: inductor's code for the step, called directly.

Under torch.compile every decode step pays dynamo's entry (cache lookup, guards over every
parameter and input, the AOT runtime wrapper): about a millisecond a token on SmolLM2, where the
step's matrix products take 36 ms. A static decode graph with no hook point left in it is already
an aten-level fx graph, and its inputs keep their layouts for a whole generate call. So it is
handed to inductor directly (`torch._inductor.standalone_compile`), once per input layout, and the
guards become one check per generate call: the inputs' layouts and every parameter's storage. A
parameter edited in place is seen (the code reads the same storage); one given new storage
(`p.data = ...`) selects new code. The caller uses this only for inference (no grad).

Graphs with hooked points keep torch.compile (runtime/decode.py), which splits them where hooks run.
"""
from __future__ import annotations

import collections
import copy
import threading
import warnings
from typing import Any

import torch
from torch import fx

stats: collections.Counter = collections.Counter()  # "compiled": how many layouts were compiled


class PrecompiledStep:
    """A static decode graph compiled by inductor, one artifact per input layout and parameter set."""

    def __init__(self, graph: fx.GraphModule):
        self.graph = graph
        self._artifacts: dict[tuple, Any] = {}
        self._lock = threading.Lock()

    def _key(self, args: tuple[torch.Tensor, ...]) -> tuple:
        layouts = tuple((a.shape, a.stride(), a.dtype, a.device) for a in args)
        storages = tuple(t.data_ptr() for t in self.graph.parameters()) + tuple(
            t.data_ptr() for t in self.graph.buffers())
        return layouts, storages

    def _graph_for_inductor(self) -> fx.GraphModule:
        """A graph of its own (the same parameter objects) that inductor may consume."""
        graph = fx.GraphModule(self.graph, copy.deepcopy(self.graph.graph))
        for node in graph.graph.nodes:  # shapes from the capture's own symbols: the inputs decide them
            for key in ("val", "tensor_meta", "example_value"):
                node.meta.pop(key, None)
        return graph

    def _compile(self, args: tuple[torch.Tensor, ...]) -> Any:
        # C++ calls the kernels (no Python line per op); the inputs are checked above, once per
        # generate call, instead of at every step
        try:
            artifact = _inductor(self._graph_for_inductor(), args, cpp_wrapper=True)
        except Exception as error:  # noqa: BLE001 - the Python wrapper runs the same kernels, a little slower
            warnings.warn(f"inductor's C++ wrapper failed for this decode step ({type(error).__name__}: {error}); "
                          f"using its Python wrapper", RuntimeWarning, stacklevel=3)
            artifact = _inductor(self._graph_for_inductor(), args, cpp_wrapper=False)
        stats["compiled"] += 1
        return artifact

    def artifact(self, *args: torch.Tensor) -> Any:
        """The compiled code for inputs of these layouts and the parameters' present storage (compiled on
        first use). A caller that knows later inputs keep these layouts (the next tokens of one generate
        call) calls it directly, without this check."""
        key = self._key(args)
        with self._lock:
            if key not in self._artifacts:
                self._artifacts[key] = self._compile(args)
            return self._artifacts[key]

    def __call__(self, *args: torch.Tensor) -> Any:
        return self.artifact(*args)(*args)


def _inductor(graph: fx.GraphModule, args: tuple[torch.Tensor, ...], cpp_wrapper: bool) -> Any:
    with torch._inductor.config.patch(cpp_wrapper=cpp_wrapper, size_asserts=False):
        return torch._inductor.standalone_compile(graph, list(args), dynamic_shapes="from_example_inputs",
                                                  donate_graph_module=True)
