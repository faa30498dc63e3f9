"""Check fxhook's import layering: imports go down the declared layers, and no file imports itself back.

    python scripts/check_layers.py        # prints each violation; exit status 1 if any

Every `import` / `from ... import` in fxhook/ and adapters/ counts, including imports inside
functions; only imports under `if TYPE_CHECKING:` (type hints, never executed) are left out.
A module may import modules of its own layer or of a lower one. Files must not form import cycles,
whatever their layers (networkx finds the cycles).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("fxhook", "adapters")

# lowest first; a module belongs to the layer of the longest prefix that names it
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("schema and graph ops", ("fxhook.core", "fxhook.adapter", "fxhook.weights", "fxhook.config",
                              "fxhook.factored_matrix", "fxhook.infer_adapter")),
    ("adapters", ("adapters", "fxhook.native")),  # fxhook.native: TransformerLens's own model family
    ("capture", ("fxhook.capture",)),
    ("passes", ("fxhook.passes", "fxhook.processing")),
    ("pipeline", ("fxhook.pipeline",)),
    ("runtime", ("fxhook.runtime", "fxhook.from_config", "fxhook.models_offline", "fxhook.datasets")),
    ("analysis", ("fxhook.analysis",)),
    ("api", ("fxhook.model", "fxhook.utils", "fxhook.hook_points", "fxhook.patching")),
    ("tools", ("fxhook.store", "fxhook.testing", "fxhook.evals", "fxhook.head_detector", "fxhook.SVDInterpreter",
               "fxhook.train")),  # built on the api: harvesting, property checks, TL's companion modules
    ("cli", ("fxhook.cli", "fxhook.commands", "fxhook.__main__", "fxhook")),  # "fxhook": the package's __init__ (its front door)
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for index, (_name, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    if best is None:
        raise ValueError(f"{module} is in no layer: add it to LAYERS in scripts/check_layers.py")
    return best


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, module: str, known: set[str]) -> set[str]:
    """The project modules `module` imports (resolved to files: `from a import b` is a.b when a.b exists)."""
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_lines(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # "fxhook.core.hook_names.block_hook" -> the module
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> nx.DiGraph:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for module, path in files.items():
        for target in imports_of(path, module, set(files)):
            graph.add_edge(module, target)
    return graph


def violations(graph: nx.DiGraph | None = None) -> list[str]:
    graph = import_graph() if graph is None else graph
    problems = []
    for source, target in sorted(graph.edges):
        low, high = layer_of(target), layer_of(source)
        if low > high:
            problems.append(f"{source} ({LAYERS[high][0]}) imports {target} ({LAYERS[low][0]}), a higher layer")
    for cycle in nx.simple_cycles(graph):
        problems.append("import cycle: " + " -> ".join([*cycle, cycle[0]]))
    return problems


def main() -> int:
    problems = violations()
    for problem in problems:
        print(problem)
    order = " < ".join(name for name, _ in LAYERS)
    print(f"{len(problems)} layering problems (layers: {order})")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
