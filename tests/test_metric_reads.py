"""Which logits a patching metric reads: the last position only, or more (analysis/metric_reads.py).

A wrong "last only" would give a sweep's metric NaN where it reads (caught, then recomputed), so the
probe must say "last only" for the usual logit-difference metrics and no for every metric that reads an
earlier position, with or without a gradient there."""
from __future__ import annotations

import pytest
import torch

from fxhook.analysis.metric_reads import reads_last_position_only


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))


LAST_ONLY = {
    "logit difference": lambda x: x[0, -1, 3] - x[0, -1, 4],
    "batch mean of a difference": lambda x: (x[:, -1, 3] - x[:, -1, 4]).mean(),
    "log-probability over the vocabulary": lambda x: x[:, -1].log_softmax(-1)[:, 2].sum(),
    "a branch on the last position": lambda x: x[0, -1, 1] if x[0, -1, 1] > -100 else x[0, -1, 2],
}

READS_MORE = {
    "every position": lambda x: x[0, :, 3].sum(),
    "the first position": lambda x: x[0, 0, 3] - x[0, -1, 4],
    "position -2": lambda x: x[:, -2, 3].mean(),
    "argmax over positions (no gradient there)": lambda x: x[0, :, 3].argmax().float() + x[0, -1, 3],
    "a count by comparison (no gradient there)": lambda x: (x[0, :, 3] > 0).float().sum() + x[0, -1, 3],
    "max over positions": lambda x: x[0, :, 3].max(),
    "nan-ignoring sum": lambda x: torch.nansum(x[0, :, 3]),
    "no gradient at all": lambda x: (x[0, -1].argmax() == 3).float(),
    "a Python float": lambda x: float(x[0, -1, 3]),
    "not a scalar": lambda x: x[:, -1, 3],
    "raises": lambda x: x[7, -1, 3],
}


@pytest.mark.parametrize("name", sorted(LAST_ONLY))
def test_last_position_metrics(logits, name):
    assert reads_last_position_only(LAST_ONLY[name], logits)


@pytest.mark.parametrize("name", sorted(READS_MORE))
def test_metrics_reading_more(logits, name):
    assert not reads_last_position_only(READS_MORE[name], logits)


def test_one_position_or_non_finite(logits):
    """Nothing to save with one position; a metric already NaN on the corrupted logits cannot be probed."""
    assert not reads_last_position_only(LAST_ONLY["logit difference"], logits[:, -1:])
    nan_last = logits.clone()
    nan_last[0, -1, 3] = float("nan")
    assert not reads_last_position_only(LAST_ONLY["logit difference"], nan_last)
