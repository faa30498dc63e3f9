"""The support table's bookkeeping: which cells a run credits, and how the README section is rewritten."""
from __future__ import annotations

import importlib.util
from pathlib import Path

from support import Record, cells

_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "support_table.py"


def _script():
    spec = importlib.util.spec_from_file_location("support_table", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_cell_passes_only_when_every_test_that_exercised_the_family_passed():
    records = [
        Record("a", [("*", "exact")], seen={"llama", "gpt2"}),  # wildcard: the families it drew
        Record("b", [("llama", "exact"), ("qwen2", "exact")], seen={"llama"}),  # qwen2 tagged, never drawn
        Record("c", [("gpt2", "exact")], seen={"gpt2"}, outcome="failed"),
        Record("d", [("opt", "hooks")]),  # builds its models itself: its explicit tags count
        Record("e", [("opt", "generate")], outcome="skipped"),
    ]
    table = cells(records)
    assert table["llama"] == {"exact": "pass"}
    assert table["gpt2"] == {"exact": "fail"}
    assert "qwen2" not in table
    assert table["opt"] == {"hooks": "pass", "generate": "skipped"}


def test_the_readme_section_between_the_markers_is_replaced_and_nothing_else():
    script = _script()
    table = script.render({"gemma2": {"exact": "pass", "generate": "fail"}, "llama": {"hooks": "pass"}})
    lines = table.splitlines()
    assert lines[0] == script.START and lines[-1] == script.END
    assert lines.index("| Llama | yes |  |  |  |  |") < lines.index("| Gemma 2 |  | yes |  | FAIL |  |")
    readme = f"intro\n{script.START}\nold table\n{script.END}\noutro\n"
    assert script.rewrite(readme, table) == f"intro\n{table}\noutro\n"
