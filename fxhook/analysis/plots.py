"""Pictures: attention patterns, the logit lens, patching heatmaps. PNG through matplotlib (drawn
on an Agg canvas: no window, no change to the user's pyplot backend) and, with html=True,
interactive HTML through plotly (self-contained: opens offline).

Each `plot_*` writes `path` (a .png) and, with html=True, the same name with .html, and returns
the paths written.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:
    from fxhook.analysis.cache import ActivationCache
    from fxhook.model import HookedTransformer


def _figure(width: float, height: float):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("pictures need matplotlib: pip install 'fxhook[analysis]' (or matplotlib)") from err
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plotly():
    try:
        import plotly.graph_objects as go
    except ImportError as err:  # pragma: no cover
        raise ImportError("html=True needs plotly: pip install 'fxhook[analysis]' (or plotly)") from err
    return go


def _label(token: str, width: int = 10) -> str:
    """A token as a readable tick label: whitespace made visible, long ones cut."""
    text = token.replace("\n", "\\n").replace("\t", "\\t")
    return text if len(text) <= width else text[: width - 1] + "…"


def _write(fig, path: str | Path, html_fig=None) -> list[Path]:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"the picture is written as PNG: give a path ending in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")  # titles and labels are never cut off
    written = [path]
    if html_fig is not None:
        html_path = path.with_suffix(".html")
        html_fig.write_html(html_path, include_plotlyjs=True)
        written.append(html_path)
    return written


# ------------------------------------------------------------------ attention
def plot_attention_patterns(cache: ActivationCache, heads: Sequence[tuple[int, int]], str_tokens: Sequence[str],
                            path: str | Path, batch: int = 0, html: bool = False) -> list[Path]:
    """One heatmap per (layer, head): query position (rows) attends to key position (columns)."""
    if not heads:
        raise ValueError("name at least one (layer, head) to draw")
    n_layers, n_heads = cache.model.cfg.n_layers, cache.model.cfg.n_heads
    bad = [(l, h) for l, h in heads if not (0 <= l < n_layers and 0 <= h < n_heads)]
    if bad:
        raise ValueError(f"no such heads {bad}: layers are 0..{n_layers - 1}, heads 0..{n_heads - 1}")
    patterns = []
    for layer, head in heads:
        pattern = cache["pattern", layer]  # [b, head, q, k] (or [head, q, k] without batch)
        patterns.append((pattern[batch] if cache.has_batch_dim else pattern)[head].detach().float().cpu())
    n_pos = patterns[0].shape[-1]
    if len(str_tokens) != n_pos:
        raise ValueError(f"{len(str_tokens)} token labels for {n_pos} positions")
    labels = [_label(t) for t in str_tokens]
    cols = min(len(heads), 4)
    rows = -(-len(heads) // cols)
    side = 1.2 + 0.35 * n_pos
    fig = _figure(cols * side + 1, rows * side + 0.6)
    for i, ((layer, head), pattern) in enumerate(zip(heads, patterns)):
        ax = fig.add_subplot(rows, cols, i + 1)
        image = ax.imshow(pattern.numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"L{layer}H{head}")
        ax.set_xticks(range(n_pos), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n_pos), labels, fontsize=7)
        ax.set_xlabel("key (attended to)", fontsize=8)
        ax.set_ylabel("query", fontsize=8)
    fig.colorbar(image, ax=fig.axes, shrink=0.6, label="attention")
    html_fig = None
    if html:
        go = _plotly()
        from plotly.subplots import make_subplots

        html_fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"L{l}H{h}" for l, h in heads])
        positions = [f"{i}:{t}" for i, t in enumerate(labels)]
        for i, pattern in enumerate(patterns):
            html_fig.add_trace(go.Heatmap(z=pattern.numpy(), x=positions, y=positions, zmin=0, zmax=1,
                                          colorscale="Blues", showscale=i == 0,
                                          hovertemplate="query %{y}<br>key %{x}<br>%{z:.3f}<extra></extra>"),
                               row=i // cols + 1, col=i % cols + 1)
        html_fig.update_yaxes(autorange="reversed")
        html_fig.update_layout(title="Attention patterns")
    return _write(fig, path, html_fig)


# ------------------------------------------------------------------ logit lens
@dataclass
class LogitLens:
    """What the unembedding reads from the residual stream at each layer (rows) and position."""

    labels: list[str]  # rows: "0_pre" ... "final_post"
    top_tokens: list[list[str]]  # [rows][pos]: the most likely next token
    top_probs: torch.Tensor  # [rows, pos]: its probability
    answer_probs: torch.Tensor | None  # [rows, pos]: the probability of `answer`, if given


def logit_lens(model: HookedTransformer, cache: ActivationCache, batch: int = 0,
               answer: str | int | None = None) -> LogitLens:
    """accumulated_resid through the final norm (recomputed per layer) and the unembedding."""
    resid, labels = cache.accumulated_resid(apply_ln=True, return_labels=True)  # [rows, (b,) pos, d_model]
    if cache.has_batch_dim:
        resid = resid[:, batch]
    with torch.no_grad():
        probs = (resid @ model.W_U + model.b_U).float().softmax(dim=-1)  # [rows, pos, d_vocab]
    top_probs, top_ids = probs.max(dim=-1)
    top_tokens = [[model.to_string(int(t)) for t in row] for row in top_ids]
    answer_probs = None
    if answer is not None:
        token = model.to_single_token(answer) if isinstance(answer, str) else int(answer)
        answer_probs = probs[..., token]
    return LogitLens(labels, top_tokens, top_probs.cpu(), None if answer_probs is None else answer_probs.cpu())


def plot_logit_lens(model: HookedTransformer, cache: ActivationCache, str_tokens: Sequence[str], path: str | Path,
                    batch: int = 0, answer: str | int | None = None, html: bool = False) -> list[Path]:
    """Heatmap of the logit lens: each cell names the top next token at that layer and position,
    coloured by its probability (or by the probability of `answer`, when given)."""
    lens = logit_lens(model, cache, batch, answer)
    values = lens.answer_probs if lens.answer_probs is not None else lens.top_probs
    n_rows, n_pos = values.shape
    if len(str_tokens) != n_pos:
        raise ValueError(f"{len(str_tokens)} token labels for {n_pos} positions")
    if answer is not None:
        what = f"P({(model.to_string(int(answer)) if not isinstance(answer, str) else answer)!r})"
    else:
        what = "P(top token)"
    fig = _figure(1.5 + 0.9 * n_pos, 1.0 + 0.28 * n_rows)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(values.numpy(), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for r in range(n_rows):
        for c in range(n_pos):
            ax.text(c, r, _label(lens.top_tokens[r][c], 8), ha="center", va="center", fontsize=6,
                    color="white" if values[r, c] < 0.6 else "black")
    ax.set_xticks(range(n_pos), [_label(t) for t in str_tokens], rotation=90, fontsize=7)
    ax.set_yticks(range(n_rows), lens.labels, fontsize=7)
    ax.set_xlabel("position (predicting the next token)")
    ax.set_title(f"Logit lens: top next token per layer, colour {what}")
    fig.colorbar(image, ax=ax, label=what)
    html_fig = None
    if html:
        go = _plotly()
        x = [f"{i}:{_label(t)}" for i, t in enumerate(str_tokens)]
        html_fig = go.Figure(go.Heatmap(z=values.numpy(), x=x, y=lens.labels, zmin=0, zmax=1, colorscale="Viridis",
                                        text=lens.top_tokens, texttemplate="%{text}",
                                        hovertemplate="%{y} at %{x}<br>top: %{text}<br>" + what +
                                        " %{z:.3f}<extra></extra>"))
        html_fig.update_yaxes(autorange="reversed")
        html_fig.update_layout(title=f"Logit lens ({what})")
    return _write(fig, path, html_fig)


# ------------------------------------------------------------------ patching
def plot_patching(results: torch.Tensor, path: str | Path, x_labels: Sequence[str] | None = None,
                  y_labels: Sequence[str] | None = None, title: str = "Activation patching",
                  x_title: str = "position", y_title: str = "layer", html: bool = False) -> list[Path]:
    """Heatmap of a [rows, cols] patching result (e.g. [layer, pos]); the colour scale is centred on 0."""
    values = results.detach().float().cpu()
    if values.ndim == 1:
        values = values[None]
    if values.ndim != 2:
        raise ValueError(f"plot_patching draws a [rows, cols] tensor, got shape {tuple(results.shape)}: index "
                         "the other axes first (e.g. results[0] for the first patch type)")
    n_rows, n_cols = values.shape
    x_labels = [_label(t) for t in x_labels] if x_labels is not None else [str(i) for i in range(n_cols)]
    y_labels = list(y_labels) if y_labels is not None else [str(i) for i in range(n_rows)]
    if len(x_labels) != n_cols or len(y_labels) != n_rows:
        raise ValueError(f"labels ({len(y_labels)} rows, {len(x_labels)} columns) do not fit the "
                         f"results ({n_rows} x {n_cols})")
    bound = float(values.abs().max()) or 1.0
    fig = _figure(2.0 + 0.5 * n_cols, 1.2 + 0.25 * n_rows)
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(values.numpy(), cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto")
    ax.set_xticks(range(n_cols), x_labels, rotation=90, fontsize=7)
    ax.set_yticks(range(n_rows), y_labels, fontsize=7)
    ax.set_xlabel(x_title)
    ax.set_ylabel(y_title)
    width_chars = max(20, int(fig.get_size_inches()[0] * 72 / 6.5))  # what fits at 9 pt, about 6.5 pt a character
    ax.set_title(textwrap.fill(title, width_chars), fontsize=9, wrap=True)  # wrapped, never clipped
    fig.colorbar(image, ax=ax, label="metric")
    html_fig = None
    if html:
        go = _plotly()
        x = [f"{i}:{t}" for i, t in enumerate(x_labels)]
        html_fig = go.Figure(go.Heatmap(z=values.numpy(), x=x, y=y_labels, zmid=0, colorscale="RdBu",
                                        hovertemplate=f"{y_title} %{{y}}<br>{x_title} %{{x}}<br>"
                                        "%{z:.4f}<extra></extra>"))
        html_fig.update_yaxes(autorange="reversed")
        html_fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title)
    return _write(fig, path, html_fig)
