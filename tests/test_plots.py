"""Pictures: PNG (and HTML) files written and non-empty; the logit lens's last row is the model's
own prediction; bad arguments are refused with a reason."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from fxhook import HookedTransformer
from fxhook.analysis import patching, plots
from fxhook.models_offline import gpt2_tokenizer

PROMPT = "The capital of France is"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run():
    torch.manual_seed(1)
    hf = GPT2LMHeadModel(GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=50257, n_positions=64)).eval()
    model = HookedTransformer.from_pretrained(hf_model=hf, tokenizer=gpt2_tokenizer())
    with torch.no_grad():
        logits, cache = model.run_with_cache(PROMPT)
    return model, logits, cache, model.to_str_tokens(PROMPT)


def is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_attention_patterns(run, tmp_path):
    model, _, cache, str_tokens = run
    written = plots.plot_attention_patterns(cache, [(0, 1), (2, 3)], str_tokens, tmp_path / "att.png", html=True)
    assert [p.name for p in written] == ["att.png", "att.html"]
    assert is_png(written[0])
    assert "plotly" in written[1].read_text()[:200000].lower()
    with pytest.raises(ValueError, match="no such heads"):
        plots.plot_attention_patterns(cache, [(3, 0)], str_tokens, tmp_path / "x.png")
    with pytest.raises(ValueError, match="token labels"):
        plots.plot_attention_patterns(cache, [(0, 0)], str_tokens[1:], tmp_path / "x.png")
    with pytest.raises(ValueError, match="ending in .png"):
        plots.plot_attention_patterns(cache, [(0, 0)], str_tokens, tmp_path / "x.jpg")


def test_logit_lens(run, tmp_path):
    model, logits, cache, str_tokens = run
    lens = plots.logit_lens(model, cache, answer=" Paris")
    assert lens.labels == ["0_pre", "1_pre", "2_pre", "final_post"]
    probs = logits[0].softmax(-1)
    assert lens.top_tokens[-1] == [model.to_string(t) for t in probs.argmax(-1)]
    assert torch.allclose(lens.top_probs[-1], probs.max(-1).values, atol=1e-5)
    assert torch.allclose(lens.answer_probs[-1], probs[:, model.to_single_token(" Paris")], atol=1e-6)
    written = plots.plot_logit_lens(model, cache, str_tokens, tmp_path / "lens.png", answer=" Paris")
    assert written == [tmp_path / "lens.png"] and is_png(written[0])


def test_patching_heatmap(run, tmp_path):
    model, _, cache, str_tokens = run
    metric = lambda logits: logits[0, -1, 3] - logits[0, -1, 4]  # noqa: E731
    results = patching.get_act_patch_resid_pre(model, model.to_tokens("The capital of Spain is"), cache, metric)
    written = plots.plot_patching(results, tmp_path / "sub" / "patch.png", x_labels=str_tokens, html=True)
    assert is_png(written[0]) and written[1].stat().st_size > 1000
    with pytest.raises(ValueError, match="rows, cols"):
        plots.plot_patching(torch.zeros(2, 3, 4), tmp_path / "p.png")
    with pytest.raises(ValueError, match="do not fit"):
        plots.plot_patching(results, tmp_path / "p.png", x_labels=str_tokens[:2])


def test_a_long_patching_title_is_wrapped_inside_the_picture(run, tmp_path, monkeypatch):
    drawn = []
    real_write = plots._write

    def keep_figure(fig, path, html_fig=None):
        drawn.append(fig)
        return real_write(fig, path, html_fig)
    monkeypatch.setattr(plots, "_write", keep_figure)
    title = "resid_pre: logit(' Paris') - logit(' Rome'); clean 6.21, corrupted -3.70, and a little more text"
    plots.plot_patching(torch.randn(3, 4), tmp_path / "narrow.png", title=title)
    fig = drawn[0]
    fig.canvas.draw()
    text = fig.axes[0].title
    assert "\n" in text.get_text() and text.get_text().replace("\n", " ") == title
    box, page = text.get_window_extent(), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and box.y1 <= page.y1  # nothing cut at either edge
