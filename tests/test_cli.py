"""The `fxhook` command end to end on a tiny GPT-2 saved in a folder (with GPT-2's tokenizer)."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fxhook import HookedTransformer
from fxhook.analysis.hook_docs import describe
from fxhook.cli import main
from fxhook.models_offline import gpt2_tokenizer

PROMPT = "The capital of France is"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_gpt2_cli")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50257, n_positions=64)).save_pretrained(path)
    gpt2_tokenizer(tmp_path_factory.mktemp("bpe")).save_pretrained(path)
    return str(path)


_LOADED: dict = {}


@pytest.fixture(autouse=True)
def load_once(monkeypatch):
    """In-process commands load each model once for the module (loading itself is the loader's
    tests' business; the subprocess test below runs the command's own loading end to end)."""
    import fxhook.cli as cli_module

    real = cli_module.load_model

    def cached(args):
        key = (args.model, args.no_processing, args.layers)
        if key not in _LOADED:
            _LOADED[key] = real(args)
        return _LOADED[key]
    monkeypatch.setattr(cli_module, "load_model", cached)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_plot_end_to_end_through_the_installed_command(folder, tmp_path):
    command = shutil.which("fxhook")
    assert command is not None, "the fxhook console script is not installed: pip install -e ."
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([command, "plot", folder, PROMPT, "--corrupted", "The capital of Spain is",
                           "--answer", "Paris", "--wrong", "Madrid", "--out", str(tmp_path), "--html",
                           "--heads", "L1H0,0.3", "--device", "cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    for name in ("attention", "logit_lens", "patching_resid_pre"):
        png = tmp_path / f"{name}.png"
        assert png.read_bytes().startswith(PNG_MAGIC) and png.stat().st_size > 1000, name
        assert (tmp_path / f"{name}.html").stat().st_size > 1000, name
        assert str(png) in done.stdout


def test_help_speaks_to_a_newcomer(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("hooks", "run", "plot", "smollm2", "local folder", "hub name", "examples:"):
        assert expected in text
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate", "smollm2"])
    assert exit_info.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_hooks_lists_names_shapes_and_meanings(folder, capsys):
    status, out, _ = cli(capsys, "hooks", folder, "--prompt", PROMPT)
    assert status == 0
    model = HookedTransformer.from_pretrained(folder, device="cpu")
    with torch.no_grad():
        _, cache = model.run_with_cache(PROMPT)
    rows = re.finditer(r"^((?:blocks\.|ln_final\.|unembed\.|hook_)\S*)\s+(\d+(?:x\d+)*)\s", out, flags=re.M)
    listed = {m.group(1): m.group(2) for m in rows}
    expected = {n for n in model.hook_dict if not n.startswith("blocks.1.")}
    assert set(listed) == expected
    for name, shape in listed.items():
        assert shape == "x".join(map(str, cache[name].shape)), name
    assert "attention pattern (softmax of the scores)" in out and "Blocks 1..1 have the same hooks" in out
    model.set_use_attn_result(True)
    model.set_use_split_qkv_input(True)
    model.set_use_hook_mlp_in(True)
    assert all(describe(name)[1] for name in model.hook_dict)  # every hook has a meaning to show
    status, out, _ = cli(capsys, "hooks", folder, "--filter", "hook_pattern", "--all")
    assert status == 0 and "blocks.1.attn.hook_pattern" in out and "hook_z" not in out


def test_run_shows_the_top_next_tokens(folder, capsys):
    status, out, _ = cli(capsys, "run", folder, PROMPT, "--top-k", "3", "--answer", "Paris")
    assert status == 0
    model = HookedTransformer.from_pretrained(folder, device="cpu")
    with torch.no_grad():
        probs = model(PROMPT)[0, -1].softmax(-1)
    top = probs.topk(3)
    shown = re.findall(r"^\s+\d\. (.+?)\s+(\d+\.\d\d)%$", out, flags=re.M)
    assert [eval(token) for token, _ in shown] == [model.to_string(t) for t in top.indices]  # repr'd tokens
    assert [float(p) for _, p in shown] == pytest.approx([100 * p.item() for p in top.values], abs=0.006)
    assert "Rank:" in out and "| Paris|" in out  # the answer's rank, through test_prompt
    assert out.count("Tokenized prompt") + out.count("Prompt tokens") == 1  # the prompt's tokens, once


@pytest.mark.parametrize("argv,message", [
    (["run", "./no/such/folder", "hi"], "no such folder"),
    (["plot", "{folder}", PROMPT, "--heads", "three"], "cannot read head"),
    (["plot", "{folder}", PROMPT, "--heads", "L5H0"], "no such heads"),
    (["plot", "{folder}", PROMPT, "--corrupted", "Hello"], "same length"),
    (["plot", "{folder}", PROMPT, "--corrupted", "The capital of Spain is"], "both prompts lead to"),
    (["plot", "{folder}", PROMPT, "--answer", "Parisians"], "must be one token"),
    (["run", "{folder}", PROMPT, "--layers", "0"], "--layers must be at least 1"),
    (["run", "{folder}", PROMPT, "--top-k", "0"], "--top-k must be at least 1"),
    (["hooks", "{folder}", "--filter", "nothing_like_this"], "no hook name contains"),
])
def test_bad_arguments_are_explained(folder, capsys, tmp_path, argv, message):
    argv = [a.replace("{folder}", folder) for a in argv] + (["--out", str(tmp_path)] if argv[0] == "plot" else [])
    status, _, err = cli(capsys, *argv)
    assert status == 2 and message in err and err.startswith(f"fxhook {argv[0]}: error:")


def test_module_entry_point(folder):
    for module in ("fxhook.cli", "fxhook"):
        done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and "usage: fxhook" in done.stdout
