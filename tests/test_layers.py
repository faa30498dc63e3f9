"""Structure checks: import layering, hook names only through the schema, no call state on the model."""
from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import networkx as nx
import pytest
import torch

from fxhook import HookedTransformer
from models import ModelSpec, build_hf_model

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "fxhook" / "core" / "hook_names.py"


def _check_layers():
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "scripts" / "check_layers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_layers", module)
    spec.loader.exec_module(module)
    return module


def test_imports_go_down_the_declared_layers_without_cycles():
    problems = _check_layers().violations()
    assert problems == [], "\n".join(problems)


def test_the_layer_check_catches_an_upward_import_and_a_cycle():
    layers = _check_layers()
    graph = layers.import_graph()
    assert graph.number_of_edges() > 100  # imports inside functions are counted too
    assert graph.has_edge("fxhook.capture.block_extras", "fxhook.core.hook_names")
    graph.add_edge("fxhook.core.ops", "fxhook.runtime.graphs")  # an upward import that closes a cycle
    problems = layers.violations(graph)
    assert any("fxhook.core.ops (schema and graph ops) imports fxhook.runtime.graphs" in p for p in problems)
    assert any(p.startswith("import cycle: ") and "fxhook.core.ops" in p for p in problems)
    assert not list(nx.simple_cycles(layers.import_graph()))


# ------------------------------------------------------------------ hook names only through the schema
# splitting a dotted string is fine for module paths; these are the places that split module paths
_MODULE_PATH_SPLITS = {
    ("fxhook/passes/simplify.py", "node.target.split"),  # a get_attr target: a module path
    ("fxhook/runtime/loading.py", "blocks_path.rpartition"),  # an adapter's module path
    ("fxhook/capture/ungroup.py", "name.rpartition"),  # a buffer's module path in the HF model
    ("fxhook/infer_adapter.py", "path.rsplit"),  # a module path
    ("fxhook/runtime/saving.py", "key.rpartition"),  # a HF state-dict key: a module path and a leaf
    ("fxhook/utils/tensors.py", "attr_str.split"),  # get_nested_attr / set_nested_attr: attribute paths
}
_SPLITS = {"split", "rsplit", "partition", "rpartition"}


def _name_like(text: str) -> bool:
    return text.startswith(("blocks.", "hook_", "ln_final.", ".hook_"))


def _name_handling(path: Path) -> list[str]:
    """Places in `path` that format a hook name (f-string or + on a name-like literal) or split one."""
    rel = path.relative_to(ROOT).as_posix()
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.FormattedValue) for v in node.values):
            first = node.values[0]
            if isinstance(first, ast.Constant) and _name_like(first.value):
                found.append(f"{rel}:{node.lineno}: formats a name: {ast.unparse(node)}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            for side in (node.left, node.right):
                if isinstance(side, ast.Constant) and isinstance(side.value, str) and _name_like(side.value):
                    found.append(f"{rel}:{node.lineno}: concatenates a name: {ast.unparse(node)}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _SPLITS
              and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "."):
            call = ast.unparse(node.func)
            if not any(rel == f and call.endswith(c.split(".")[-1]) and c in call for f, c in _MODULE_PATH_SPLITS):
                found.append(f"{rel}:{node.lineno}: splits a dotted name: {ast.unparse(node)}")
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in ("re.match", "re.search", "re.compile") \
                and node.args and isinstance(node.args[0], ast.Constant) and "blocks" in str(node.args[0].value):
            found.append(f"{rel}:{node.lineno}: parses a name with a regex")
    return found


def test_hook_names_are_built_and_parsed_only_by_the_schema():
    files = [p for pkg in ("fxhook", "adapters") for p in (ROOT / pkg).rglob("*.py") if p != SCHEMA]
    found = [place for path in files for place in _name_handling(path)]
    assert found == [], "\n".join(found)


def test_the_name_check_sees_each_way_of_building_a_name(tmp_path):
    sample = ROOT / "fxhook" / "_sample_for_name_check.py"
    sample.write_text('a = f"blocks.{i}.attn.hook_q"\nb = "hook_" + x\nc = name.split(".")[1]\n')
    try:
        found = _name_handling(sample)
    finally:
        sample.unlink()
    assert [f.split(": ")[1] for f in found] == ["formats a name", "concatenates a name", "splits a dotted name"]


# ------------------------------------------------------------------ no call state on the model
@pytest.fixture(scope="module")
def model():
    spec = ModelSpec("gpt2", n_layers=2, n_heads=2, n_kv_heads=2, d_head=8, d_mlp=40, bias=True, tied=True, seed=3)
    return HookedTransformer.from_pretrained_no_processing(hf_model=build_hf_model(spec))


def test_run_with_cache_leaves_nothing_on_the_model(model):
    before = {k: id(v) for k, v in vars(model).items()}
    seen_during = []

    def look(x, hook):
        seen_during.append({k: id(v) for k, v in vars(model).items()})
    tokens = torch.tensor([[1, 2, 3, 4]])
    with model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", look)]):
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.1.hook_resid_post"])
    assert seen_during and all(state == before for state in seen_during)  # no request set on the model
    assert {k: id(v) for k, v in vars(model).items()} == before  # and no result left there
    assert list(cache.keys()) == ["blocks.1.hook_resid_post"]
