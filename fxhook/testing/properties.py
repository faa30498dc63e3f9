"""Every property of fxhook.testing run on one model under a time budget, as `fxhook verify` does.

Each property draws inputs with hypothesis (derandomised unless a seed is given) and calls its
assertion; on a failure hypothesis shrinks the input, and the smallest failing input it found is
reported with its first diverging hook. The budget is shared out as the run goes: a property may
use the time left divided by the properties left (its first example always runs), and shrinking a
failure may use twice its share.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from hypothesis import HealthCheck, Phase, Verbosity, given, seed as hypothesis_seed, settings, strategies as st
from torch import nn

from fxhook.model import HookedTransformer
from fxhook.testing import strategies as fst
from fxhook.testing.assertions import Check, PropertyFailure, assert_compiled_matches, assert_generation_matches, \
    assert_matches_hf
from fxhook.testing.consistency import assert_hooks_consistent


@dataclass
class PropertyResult:
    """What a property did: examples tried, the worst difference seen, the verdict and, when it fails,
    the shrunk counterexample and the first diverging hook."""

    name: str
    tried: int = 0
    worst: float | None = None
    verdict: str = "not run"  # "holds", "FAILS", "not run"
    counterexample: str | None = None
    first_diverging_hook: str | None = None
    message: str | None = None
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Property:
    name: str
    strategy: Callable[[HookedTransformer], st.SearchStrategy]
    check: Callable[[HookedTransformer, nn.Module, tuple], list[Check]]


def _inputs(model: HookedTransformer, max_batch: int = 3, max_length: int = 12) -> st.SearchStrategy:
    ids = fst.token_batches(model, max_batch=max_batch, max_length=max_length)
    return ids | fst.text_batches(model, max_batch=max_batch, max_length=max_length) if model.tokenizer else ids


PROPERTIES = (
    Property("matches_hf", lambda m: st.tuples(_inputs(m)),
             lambda m, hf, args: assert_matches_hf(m, hf, args[0])),
    Property("hooks_consistent", lambda m: st.tuples(_inputs(m), fst.ablations(m)),
             lambda m, hf, args: assert_hooks_consistent(m, args[0], hf_model=hf, ablate=args[1])),
    Property("generation_matches", lambda m: st.tuples(_inputs(m, 2, 8), st.integers(1, 4)),
             lambda m, hf, args: assert_generation_matches(m, hf, args[0], max_new_tokens=args[1])),
    Property("compiled_matches", lambda m: st.tuples(_inputs(m, 2, 8), fst.hook_sets(m)),
             lambda m, hf, args: assert_compiled_matches(m, args[0], names=args[1])),
)
NAMES = tuple(p.name for p in PROPERTIES)


def _describe(args: tuple) -> str:
    return ", ".join(repr(a) for a in args)


def run_property(prop: Property, model: HookedTransformer, hf_model: nn.Module, share_s: float, examples: int,
                 seed: int | None = None) -> PropertyResult:
    """Run one property for at most `share_s` seconds of examples (twice that with shrinking)."""
    result = PropertyResult(prop.name)
    start = time.monotonic()
    failures: list[tuple[tuple, BaseException]] = []  # in the order hypothesis found them: the last is the smallest

    def spent(limit: float) -> bool:
        return result.tried > 0 and time.monotonic() - start > limit

    @settings(max_examples=examples, deadline=None, database=None, derandomize=seed is None,
              suppress_health_check=list(HealthCheck), phases=(Phase.explicit, Phase.generate, Phase.shrink),
              report_multiple_bugs=False, verbosity=Verbosity.quiet, print_blob=False)
    @given(prop.strategy(model))
    def check(args: tuple) -> None:
        if spent(2 * share_s if failures else share_s):
            return  # the budget is spent: the remaining draws (and shrinks) pass untried
        result.tried += 1
        try:
            checks = prop.check(model, hf_model, args)
        except BaseException as err:  # noqa: BLE001 - an error in the model is a failure too
            if isinstance(err, KeyboardInterrupt):
                raise
            failures.append((args, err))
            worst = err.worst if isinstance(err, PropertyFailure) else float("inf")
            result.worst = worst if result.worst is None else max(result.worst, worst)
            raise
        worst = max((c.worst for c in checks), default=0.0)
        result.worst = worst if result.worst is None else max(result.worst, worst)

    if seed is not None:
        check = hypothesis_seed(seed)(check)
    try:
        check()
    except BaseException as err:  # noqa: BLE001 - hypothesis's own reports (flaky replays) included
        if isinstance(err, KeyboardInterrupt):
            raise
        if not failures:
            failures.append(((), err))
    result.seconds = time.monotonic() - start
    if failures:
        args, err = failures[-1]
        result.verdict = "FAILS"
        result.counterexample = _describe(args)
        result.message = str(err) if isinstance(err, PropertyFailure) else f"{type(err).__name__}: {err}"
        if isinstance(err, PropertyFailure) and err.divergence is not None:
            result.first_diverging_hook = err.divergence.hook
    elif result.tried:
        result.verdict = "holds"
    return result


def run_properties(model: HookedTransformer, hf_model: nn.Module, budget_s: float = 60.0, examples: int = 20,
                   names: tuple[str, ...] = NAMES[:3], seed: int | None = None,
                   progress: Callable[[PropertyResult], None] | None = None) -> list[PropertyResult]:
    """Run the named properties (default: all but compiled_matches, whose compilation takes minutes on a
    CPU) in order within budget_s seconds, at most `examples` examples each."""
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        raise ValueError(f"unknown properties {unknown}: choose from {list(NAMES)}")
    if budget_s <= 0 or examples < 1:
        raise ValueError(f"need a positive budget and at least 1 example, got {budget_s} s and {examples}")
    chosen = [p for p in PROPERTIES if p.name in names]
    deadline = time.monotonic() + budget_s
    results = []
    with torch.no_grad():
        for index, prop in enumerate(chosen):
            share = max(0.0, deadline - time.monotonic()) / (len(chosen) - index)
            results.append(run_property(prop, model, hf_model, share, examples, seed))
            if progress is not None:
                progress(results[-1])
    return results
