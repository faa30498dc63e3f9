"""`fxhook verify` on a tiny GPT-2 saved in a folder (save_pretrained, with GPT-2's tokenizer): its table,
its JSON, and a failing exit status with the first diverging hook when the model is broken."""
from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fxhook.cli as cli_module
from fxhook import HookedTransformer
from fxhook.cli import main
from fxhook.commands.verify import parse_budget
from fxhook.models_offline import gpt2_tokenizer
from test_testing import edit_capture, zero_head

PROPERTIES = ["matches_hf", "hooks_consistent", "generation_matches"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_gpt2_verify")
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50257, n_positions=64)).save_pretrained(path)
    gpt2_tokenizer(tmp_path_factory.mktemp("bpe")).save_pretrained(path)
    return str(path)


def table_rows(out: str) -> dict[str, tuple[int, float, str]]:
    rows = re.findall(r"^(\w+)\s+(\d+)\s+(\S+)\s+(holds|FAILS|not run)$", out, flags=re.M)
    return {name: (int(tried), float("nan") if worst == "-" else float(worst), verdict)
            for name, tried, worst, verdict in rows}


def test_verify_prints_a_table_and_passes(folder, capsys):
    status = main(["verify", folder, "--budget", "30s", "--examples", "2", "--device", "cpu"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert re.search(r"^property\s+examples tried\s+worst difference\s+verdict$", out, flags=re.M)
    rows = table_rows(out)
    assert list(rows) == PROPERTIES
    for name, (tried, worst, verdict) in rows.items():
        assert verdict == "holds" and 1 <= tried <= 2 and 0 <= worst < 1e-4, (name, rows[name])
    assert "Every property holds." in out


def test_verify_json_for_ci(folder, capsys):
    status = main(["verify", folder, "--json", "--no-processing", "--budget", "20s", "--examples", "1",
                   "--device", "cpu", "--seed", "3"])
    report = json.loads(capsys.readouterr().out)
    assert status == 0 and report["passed"] is True and report["budget_s"] == 20
    assert [p["name"] for p in report["properties"]] == PROPERTIES
    for prop in report["properties"]:
        assert prop["verdict"] == "holds" and prop["tried"] >= 1 and prop["counterexample"] is None


def test_verify_fails_on_a_broken_model_and_names_the_hook(folder, capsys, monkeypatch):
    """The model fxhook runs has head 2 of block 0 zeroed in its graph; the reference loads from the folder."""
    def broken(args):
        model = HookedTransformer.from_pretrained_no_processing(folder, device="cpu")
        return edit_capture(model, zero_head(0, 2, 4))
    monkeypatch.setattr(cli_module, "load_model", broken)
    status = main(["verify", folder, "--no-processing", "--budget", "20s", "--examples", "3"])
    out = capsys.readouterr().out
    assert status == 1
    assert table_rows(out)["matches_hf"][2] == "FAILS"
    assert "matches_hf FAILS on TokenBatch(rows=[[" in out  # the (shrunk) counterexample
    assert "first diverging hook: blocks.0.hook_attn_out" in out and "Some properties do not hold" in out
    status = main(["verify", folder, "--no-processing", "--budget", "10s", "--examples", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    first = report["properties"][0]
    assert status == 1 and report["passed"] is False
    assert first["verdict"] == "FAILS" and first["first_diverging_hook"] == "blocks.0.hook_attn_out"
    assert first["worst"] > 1e-3 and "TokenBatch(" in first["counterexample"]


def test_arguments_are_checked(capsys):
    assert parse_budget("60s") == 60 and parse_budget("2m") == 120 and parse_budget("90") == 90
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "smollm2", "--budget", "soon"])
    assert exit_info.value.code == 2 and "cannot read budget 'soon'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "smollm2", "--examples", "0"])
    assert exit_info.value.code == 2 and "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["verify", "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "--budget" in out and "first hook" in out and "--json" in out
