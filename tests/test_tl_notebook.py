"""examples/tl_notebook.py, a notebook written for TransformerLens, runs unchanged on fxhook once its import
block says `fxhook` instead of `transformer_lens`, and prints the same labelled numbers (to 1e-4).

Both versions run as subprocesses (at the same time: about 30-60 s each on one core), with HF_HUB_OFFLINE=1:
the notebook loads "gpt2-small" from a hub-shaped cache folder it writes itself.
"""
from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import tokenize
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "tl_notebook.py"
BLOCK_START = "THE IMPORT BLOCK"
BLOCK_END = "end of the import block"
NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")
# the notebook's objects that TransformerLens made (a call of a method on one of them is a TL call)
TL_OBJECTS = ("model", "cache", "clean_cache", "wrapped", "point", "ov", "ioi")


def import_block(lines: list[str]) -> tuple[int, int]:
    """(first, last) line indexes of the marked import block."""
    starts = [i for i, line in enumerate(lines) if BLOCK_START in line]
    ends = [i for i, line in enumerate(lines) if BLOCK_END in line]
    assert len(starts) == 1 and len(ends) == 1 and starts[0] < ends[0], "one marked import block expected"
    return starts[0], ends[0]


def switch_to_fxhook(source: str) -> str:
    """The notebook with `transformer_lens` replaced by `fxhook` inside the import block, and only there."""
    lines = source.splitlines(keepends=True)
    first, last = import_block(lines)
    for i in range(first + 1, last):
        lines[i] = lines[i].replace("transformer_lens", "fxhook")
    return "".join(lines)


def labelled_lines(stdout: str) -> list[tuple[str, str]]:
    """(label, value) of each `label: value` line (other lines, such as loading messages, are skipped)."""
    pairs = []
    for line in stdout.splitlines():
        label, sep, value = line.partition(": ")
        if sep:
            pairs.append((label.strip(), value.strip()))
    return pairs


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-4 * max(1.0, abs(a), abs(b))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("tl_notebook")
    switched = folder / "tl_notebook_fxhook.py"
    switched.write_text(switch_to_fxhook(NOTEBOOK.read_text()))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONHASHSEED": "0",
           "OMP_NUM_THREADS": "1"}
    started = {lens: subprocess.Popen([sys.executable, str(path)], cwd=folder, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
               for lens, path in (("transformer_lens", NOTEBOOK), ("fxhook", switched))}
    done = {}
    for lens, process in started.items():
        stdout, stderr = process.communicate(timeout=600)
        done[lens] = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    return done


def test_both_runs_finish(runs):
    for lens, run in runs.items():
        assert run.returncode == 0, f"{lens} run failed:\n{run.stderr[-4000:]}"
        assert run.stdout.splitlines()[-1] == "done", lens


def test_the_same_labels_in_the_same_order(runs):
    theirs = [label for label, _ in labelled_lines(runs["transformer_lens"].stdout)]
    ours = [label for label, _ in labelled_lines(runs["fxhook"].stdout)]
    assert len(theirs) > 100
    assert ours == theirs


def test_every_number_agrees_to_1e_4(runs):
    theirs = labelled_lines(runs["transformer_lens"].stdout)
    ours = labelled_lines(runs["fxhook"].stdout)
    assert len(ours) == len(theirs)
    compared = 0
    for (label, their_value), (_, our_value) in zip(theirs, ours):
        # the text around the numbers (shapes' brackets, generated strings, labels in lists) is the same
        assert NUMBER.sub("#", our_value) == NUMBER.sub("#", their_value), (label, our_value, their_value)
        their_numbers = [float(x) for x in NUMBER.findall(their_value)]
        our_numbers = [float(x) for x in NUMBER.findall(our_value)]
        assert len(our_numbers) == len(their_numbers), label
        for a, b in zip(our_numbers, their_numbers):
            assert close(a, b), f"{label}: fxhook {our_value} != TransformerLens {their_value}"
        compared += len(their_numbers)
    assert compared > 500


def imported_from_transformer_lens(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "transformer_lens":
            names |= {alias.asname or alias.name for alias in node.names}
    return names


def distinct_tl_calls(source: str) -> set[str]:
    """Calls of what the import block gives (`utils.get_act_name(...)`, `HookPoint()`) and of methods of the
    notebook's TransformerLens objects (`model.run_with_cache(...)`), counted once each."""
    tree = ast.parse(source)
    imported = imported_from_transformer_lens(tree)
    receivers = imported | set(TL_OBJECTS)
    calls = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        if isinstance(node.func, ast.Name) and node.func.id in imported:
            calls.add(node.func.id)
        elif isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name) \
                and node.func.value.id in receivers:
            calls.add(f"{node.func.value.id}.{node.func.attr}")
    return calls


def test_at_least_40_distinct_transformer_lens_calls():
    source = NOTEBOOK.read_text()
    tree = ast.parse(source)
    assert {"HookedTransformer", "HookedTransformerConfig", "ActivationCache", "FactoredMatrix", "HookPoint",
            "utils", "patching", "evals"} <= imported_from_transformer_lens(tree)
    assigned = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                for element in node.targets for target in ast.walk(element) if isinstance(target, ast.Name)}
    assert set(TL_OBJECTS) <= assigned  # the receivers counted are the notebook's own variables
    calls = distinct_tl_calls(source)
    assert len(calls) >= 40, sorted(calls)
    for needed in ("HookedTransformer.from_pretrained", "model.run_with_cache", "model.run_with_hooks",
                   "model.hooks", "model.add_caching_hooks", "model.cache_some", "model.get_caching_hooks",
                   "model.reset_hooks", "cache.accumulated_resid", "cache.decompose_resid",
                   "cache.stack_head_results", "cache.logit_attrs", "cache.apply_ln_to_stack",
                   "utils.get_act_name", "utils.to_numpy", "utils.get_corner", "utils.lm_cross_entropy_loss",
                   "utils.lm_accuracy", "utils.tokenize_and_concatenate", "utils.test_prompt",
                   "patching.make_df_from_ranges", "patching.generic_activation_patch", "evals.induction_loss",
                   "evals.evaluate_on_dataset", "model.generate", "model.to_tokens", "model.to_str_tokens",
                   "model.to_string", "model.get_token_position"):
        assert needed in calls, needed
    assert 'from_pretrained("gpt2-small"' in source  # an official TransformerLens name
    assert "index_df=" in source and "return_index_df=True" in source


def test_the_notebook_names_fxhook_only_in_comments():
    source = NOTEBOOK.read_text()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            assert "fxhook" not in token.string.lower(), (token.start, token.string)


def test_switching_changes_the_import_block_only():
    source = NOTEBOOK.read_text()
    before, after = source.splitlines(), switch_to_fxhook(source).splitlines()
    first, last = import_block(before)
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    assert changed and all(first < i < last for i in changed)
    assert "transformer_lens" not in "\n".join(after[first + 1:last])
