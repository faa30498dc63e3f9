"""The activation store (fxhook.store): harvesting, resuming after SIGKILL, torch.distributed (2 gloo
processes under torchrun), refusing mismatched resumes, reading, and `fxhook harvest`.

References: TransformerLens's tokenize_and_concatenate (packing), the model's own full forward
(activations), and an uninterrupted single-process store (resumed and distributed stores equal it
tensor for tensor). Every store here is made with one thread, as the subprocesses' are, so that
they agree bit for bit."""
from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from profiles import examples
from safetensors import safe_open

from fxhook import HookedTransformer
from fxhook.cli import main
from fxhook.models_offline import gpt2_tokenizer
from fxhook.store import ActivationStore, harvest
from fxhook.store.data import packed_rows

ROOT = Path(__file__).resolve().parent.parent
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"]
SETTINGS = dict(seq_len=16, batch_size=3, shard_size=4)
WORDS = "the a quick brown fox jumps over lazy dog river stone market light green old city".split()


def make_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"Note {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) + "." for i in range(n)]


@contextlib.contextmanager
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny processed GPT-2 (3 blocks, GPT-2's tokenizer) saved with save_pretrained, and a .jsonl of text."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=50257, n_positions=64)).eval()
    root = tmp_path_factory.mktemp("store")
    model = HookedTransformer.from_pretrained("tiny-gpt2", hf_model=hf, tokenizer=gpt2_tokenizer(root / "bpe"))
    model.save_pretrained(root / "model")
    data = root / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(120)))
    return root / "model", data, model


@pytest.fixture(scope="module")
def model(saved):
    return HookedTransformer.from_pretrained(saved[0], device="cpu")


def test_saved_model_keeps_its_tokenizer_and_outputs(saved, model):
    text = "The capital of France is Paris"
    original = saved[2]
    assert torch.equal(model.to_tokens(text), original.to_tokens(text))
    assert torch.equal(model(text), original(text))


@pytest.fixture(scope="module")
def reference(model, saved, tmp_path_factory):
    """The uninterrupted single-process store."""
    out = tmp_path_factory.mktemp("reference") / "store"
    with one_thread():
        harvest(model, saved[1], HOOKS, out, progress=False, **SETTINGS)
    return out


def assert_same_store(a: Path, b: Path) -> None:
    manifest_a, manifest_b = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    assert manifest_a == manifest_b
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))  # no leftover temporary files either
    for shard in manifest_a["shards"]:
        with safe_open(str(a / shard["file"]), "pt") as fa, safe_open(str(b / shard["file"]), "pt") as fb:
            assert sorted(fa.keys()) == sorted(fb.keys()) == sorted([*HOOKS, "tokens"])
            for key in fa.keys():
                assert torch.equal(fa.get_tensor(key), fb.get_tensor(key)), (shard["file"], key)


# ------------------------------------------------------------------ packing
@pytest.mark.parametrize("n_docs,seq_len", [(1100, 32), (3, 64)])  # chunks of 1000 docs; one short padded row
def test_packing_matches_transformer_lens(model, n_docs, seq_len):
    import datasets
    from transformer_lens.utilities import tokenize_and_concatenate

    texts = make_texts(n_docs, seed=n_docs)
    expected = tokenize_and_concatenate(datasets.Dataset.from_dict({"text": texts}), copy.deepcopy(model.tokenizer),
                                        max_length=seq_len, num_proc=None)[:]["tokens"]
    got = torch.stack(list(packed_rows(iter(texts), model.tokenizer, seq_len)))
    assert torch.equal(got, expected)


# ------------------------------------------------------------------ harvesting
def test_store_holds_the_models_activations_and_computes_nothing_past_its_hooks(model, saved, reference):
    store = ActivationStore(reference)
    texts = [json.loads(line)["text"] for line in saved[1].read_text().splitlines()]
    rows = torch.stack(list(packed_rows(iter(texts), model.tokenizer, 16)))
    assert len(store) == len(rows) and torch.equal(store["tokens"][:], rows)
    _, cache = model.run_with_cache(rows)  # the full forward, no layer slicing
    for hook in HOOKS:
        assert store.shape(hook) == tuple(cache[hook].shape)
        torch.testing.assert_close(store[hook][:], cache[hook], atol=1e-5, rtol=1e-5)
    manifest = store.manifest
    assert manifest["total_tokens"] == 16 * len(rows) and manifest["rows_per_shard"] == 4
    full, rest = divmod(len(rows), 4)
    assert [s["rows"] for s in manifest["shards"]] == [4] * full + ([rest] if rest else [])
    assert manifest["fxhook_version"] == metadata.version("fxhook") and manifest["identity"]["dtype"] == "float32"

    calls = []
    later = [("blocks.2.hook_resid_pre", lambda x, hook: calls.append(hook.name)),
             ("ln_final.hook_normalized", lambda x, hook: calls.append(hook.name))]
    with model.hooks(fwd_hooks=later):
        harvest(model, texts[:20], HOOKS, saved[1].parent / "stopped", seq_len=16, batch_size=4, progress=False)
        assert calls == []  # blocks after the last hooked one never ran
        model(rows[:1])
    assert calls == ["blocks.2.hook_resid_pre", "ln_final.hook_normalized"]


def test_store_dtype_and_embedding_hooks(model, tmp_path):
    texts = make_texts(30, seed=3)
    hooks = ["hook_embed", "blocks.0.mlp.hook_post"]
    harvest(model, texts, hooks, tmp_path / "s", seq_len=16, batch_size=8, dtype="bfloat16", max_tokens=160,
            progress=False)
    store = ActivationStore(tmp_path / "s")
    assert len(store) == 10
    _, cache = model.run_with_cache(store["tokens"][:])
    for hook in hooks:
        assert store[hook][:].dtype == torch.bfloat16
        torch.testing.assert_close(store[hook][:], cache[hook].to(torch.bfloat16), atol=0, rtol=0)


def test_every_kind_of_source_gives_the_same_store(model, tmp_path):
    import datasets

    texts = make_texts(40, seed=5)
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    sources = {"list": texts, "txt": tmp_path / "texts.txt",
               "dataset": datasets.Dataset.from_dict({"body": texts}), }
    stores = {}
    for kind, source in sources.items():
        harvest(model, source, HOOKS[:1], tmp_path / kind, seq_len=16, batch_size=5, progress=False,
                text_column="body" if kind == "dataset" else "text")
        stores[kind] = ActivationStore(tmp_path / kind)
    expected = torch.stack(list(packed_rows(iter(texts), model.tokenizer, 16)))
    for kind, store in stores.items():
        assert torch.equal(store["tokens"][:], expected), kind
        assert torch.equal(store[HOOKS[0]][:], stores["list"][HOOKS[0]][:]), kind
    assert {s.manifest["identity"]["data"]["kind"] for s in stores.values()} == {"list", "txt", "datasets"}


SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from fxhook import HookedTransformer
import fxhook.store.harvesting as h
model_folder, data, out, pause = sys.argv[1:5]
model = HookedTransformer.from_pretrained(model_folder, device="cpu")
if float(pause):  # slow the writer down, so that the parent can kill the run part way
    write = h.write_shard
    h.write_shard = lambda *args: (time.sleep(float(pause)), write(*args))[1]
h.harvest(model, data, {hooks!r}, out, progress=False, **{settings!r})
"""


def run_script(tmp_path: Path, args: list[str], launcher: list[str] | None = None, **popen) -> subprocess.Popen:
    script = tmp_path / "harvest_script.py"
    script.write_text(SCRIPT.format(hooks=HOOKS, settings=SETTINGS))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([*(launcher or [sys.executable]), str(script), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def test_harvest_killed_with_sigkill_resumes_to_the_same_store(model, saved, reference, tmp_path):
    out = tmp_path / "store"
    n_shards = len(json.loads((reference / "manifest.json").read_text())["shards"])
    rng = random.Random(int(time.time()))
    target = rng.randint(1, n_shards - 3)  # kill after this many shards, at a random moment after it
    process = run_script(tmp_path, [str(saved[0]), str(saved[1]), str(out), "0.1"])
    deadline = time.monotonic() + 240
    while (not out.exists() or len(list(out.glob("shard-*.safetensors"))) < target) and time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.01)
    delay = rng.uniform(0, 0.15)
    print(f"killed {delay:.3f} s after shard {target} of {n_shards} appeared")  # shown if the test fails
    time.sleep(delay)
    process.send_signal(signal.SIGKILL)
    process.wait()
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and len(list(out.glob("shard-*"))) < n_shards, "killed too late to test"
    with pytest.raises(ValueError, match="incomplete"):
        ActivationStore(out)
    with one_thread():
        harvest(model, saved[1], HOOKS, out, progress=False, **SETTINGS)  # the same call: resumes
    assert_same_store(out, reference)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with one_thread():
        harvest(model, saved[1], HOOKS, out, progress=False, **SETTINGS)  # finished: nothing is rewritten
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name != "manifest.json"} == \
        {k: v for k, v in before.items() if k != "manifest.json"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_make_the_single_process_store(saved, reference, tmp_path):
    out = tmp_path / "store"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                "127.0.0.1", "--master-port", str(_free_port())]
    process = run_script(tmp_path, [str(saved[0]), str(saved[1]), str(out), "0"], launcher=launcher)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert_same_store(out, reference)
    ranks = set()
    for shard in json.loads((out / "manifest.json").read_text())["shards"]:
        with safe_open(str(out / shard["file"]), "pt") as f:
            ranks.add(int(f.metadata()["shard"]) % 2)
    assert ranks == {0, 1}


# ------------------------------------------------------------------ refusals
def test_mismatched_resume_is_refused_and_leaves_the_store_alone(model, saved, reference, tmp_path):
    before = {p.name: p.read_bytes() for p in reference.iterdir()}
    texts = [json.loads(line)["text"] for line in saved[1].read_text().splitlines()]
    changed = tmp_path / "texts.jsonl"
    changed.write_text(saved[1].read_text().replace("Note 7:", "Note 8:"))
    other = HookedTransformer.from_pretrained(saved[0], device="cpu", first_n_layers=2)
    cases = [
        (dict(hooks=HOOKS[:1]), "hooks"),
        (dict(seq_len=32), "seq_len"),
        (dict(data=changed), "data"),
        (dict(data=texts), "data"),
        (dict(dtype=torch.float16), "dtype"),
        (dict(batch_size=4), "batch_size"),
        (dict(model=other), "model"),
    ]
    for change, what in cases:
        call = dict(model=model, data=saved[1], hooks=HOOKS, **SETTINGS)
        call.update(change)
        with pytest.raises(ValueError, match=f"different {what}.*never appended to"):
            harvest(call.pop("model"), call.pop("data"), call.pop("hooks"), reference, progress=False, **call)
    assert {p.name: p.read_bytes() for p in reference.iterdir()} == before
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an fxhook store"):
        harvest(model, texts, HOOKS, tmp_path / "busy", progress=False, **SETTINGS)


def test_bad_arguments_are_refused(model, tmp_path):
    texts = make_texts(5)
    with pytest.raises(KeyError, match="blocks.0.hook_resid_pots"):
        harvest(model, texts, ["blocks.0.hook_resid_pots"], tmp_path / "a", seq_len=16, batch_size=2)
    with pytest.raises(ValueError, match="seq_len=100 is longer than the model's context"):
        harvest(model, texts, HOOKS, tmp_path / "a", seq_len=100, batch_size=2)
    with pytest.raises(ValueError, match="max_tokens=8 is less than one row"):
        harvest(model, texts, HOOKS, tmp_path / "a", seq_len=16, batch_size=2, max_tokens=8)
    with pytest.raises(ValueError, match="must be .txt"):
        (tmp_path / "t.csv").write_text("x")
        harvest(model, tmp_path / "t.csv", HOOKS, tmp_path / "a", seq_len=16, batch_size=2)
    with pytest.raises(ValueError, match="more than once"):
        harvest(model, texts, [HOOKS[0], HOOKS[0]], tmp_path / "a", seq_len=16, batch_size=2)
    assert not (tmp_path / "a").exists()


# ------------------------------------------------------------------ reading
def _row_ids(store: ActivationStore) -> dict[bytes, int]:
    tokens = store["tokens"][:]
    ids = {row.numpy().tobytes(): index for index, row in enumerate(tokens)}
    assert len(ids) == len(store), "test data with repeated rows cannot identify rows"
    return ids


@settings(max_examples=examples(6))
@given(batch_size=st.integers(1, 20), seed=st.integers(0, 2**31 - 1), hooks=st.sampled_from([None, HOOKS[1:]]))
def test_batches_cover_every_row_once_per_epoch(reference, batch_size, seed, hooks):
    store = ActivationStore(reference)
    ids = _row_ids(store)
    orders = []
    for _ in range(2):
        order = []
        for batch in store.batches(batch_size, hooks=hooks, shuffle=True, seed=seed):
            assert sorted(batch) == sorted([*(hooks or HOOKS), "tokens"])
            assert len(batch["tokens"]) <= batch_size
            indices = [ids[row.numpy().tobytes()] for row in batch["tokens"]]
            for key in hooks or HOOKS:
                assert torch.equal(batch[key], torch.stack([store[key][i] for i in indices]))
            order += indices
        assert sorted(order) == list(range(len(store)))
        orders.append(order)
    assert orders[0] == orders[1]  # the seed fixes the order
    other = [ids[row.numpy().tobytes()] for b in store.batches(batch_size, seed=seed + 1) for row in b["tokens"]]
    assert other != orders[0]
    in_order = [ids[r.numpy().tobytes()] for b in store.batches(batch_size, shuffle=False) for r in b["tokens"]]
    assert in_order == list(range(len(store)))
    kept = sum(len(b["tokens"]) for b in store.batches(batch_size, seed=seed, drop_last=True))
    assert kept == len(store) // batch_size * batch_size


def test_rows_columns_and_a_dataloader_read_what_was_written(reference):
    store = ActivationStore(reference)
    full = {}
    for shard in store.manifest["shards"]:
        with safe_open(str(reference / shard["file"]), "pt") as f:
            for key in f.keys():
                full.setdefault(key, []).append(f.get_tensor(key))
    full = {k: torch.cat(v) for k, v in full.items()}
    n = len(store)
    assert n == len(full["tokens"])
    hook = HOOKS[1]
    assert torch.equal(store[hook][3:11], full[hook][3:11])  # crosses a shard boundary (4 rows a shard)
    assert torch.equal(store[hook][-1], full[hook][-1]) and torch.equal(store[hook][1:n:3], full[hook][1:n:3])
    assert all(torch.equal(store[5][k], full[k][5]) for k in full)
    assert torch.equal(store.rows([9, 2, 9], [hook])[hook], full[hook][[9, 2, 9]])
    loader = torch.utils.data.DataLoader(store.dataset(hooks=[hook]), batch_size=5, num_workers=1)
    got = [batch for batch in loader]
    assert torch.equal(torch.cat([b[hook] for b in got]), full[hook])
    assert torch.equal(torch.cat([b["tokens"] for b in got]), full["tokens"])
    with pytest.raises(KeyError, match="not in this store"):
        store["blocks.2.hook_resid_post"]
    with pytest.raises(IndexError):
        store[n]


# ------------------------------------------------------------------ the command line
def test_cli_harvest_on_a_saved_model(model, saved, tmp_path, capsys):
    out = tmp_path / "cli_store"
    argv = ["harvest", str(saved[0]), "--data", str(saved[1]), "--hooks", "blocks.1.hook_mlp_out", "--out", str(out),
            "--seq-len", "16", "--batch-size", "4", "--max-tokens", "200", "--device", "cpu", "--no-progress"]
    assert main(argv) == 0
    assert "Wrote 12 rows of 16 tokens" in capsys.readouterr().out
    store = ActivationStore(out)
    texts = [json.loads(line)["text"] for line in saved[1].read_text().splitlines()]
    rows = torch.stack(list(packed_rows(iter(texts), model.tokenizer, 16)))[:12]
    assert torch.equal(store["tokens"][:], rows)
    _, cache = model.run_with_cache(rows, names_filter="blocks.1.hook_mlp_out")
    torch.testing.assert_close(store["blocks.1.hook_mlp_out"][:], cache["blocks.1.hook_mlp_out"], atol=1e-5, rtol=1e-5)
    assert main([*argv[:5], "blocks.1.hook_mlp_ot", *argv[6:]]) == 2
    assert "blocks.1.hook_mlp_out" in capsys.readouterr().err  # the suggestion
