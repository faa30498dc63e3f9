"""Property checks that a loaded model equals its Hugging Face original, for a user's own tests.

    from fxhook.testing import assert_matches_hf, strategies

Strategies (hypothesis) draw inputs for a model: `strategies.token_batches`, `text_batches`,
`hook_sets`, `ablations`, `generation_settings`. Assertions raise `PropertyFailure` (an
AssertionError naming the worst difference, the input and the first diverging hook) and return
the checks they made. `run_properties` runs them all under a time budget (the `fxhook verify`
command). Tolerances follow the dtype and the depth (`tolerance`). Needs hypothesis.
"""
from fxhook.testing import strategies
from fxhook.testing.assertions import Check, PropertyFailure, assert_compiled_matches, assert_generation_matches, \
    assert_matches_hf
from fxhook.testing.compare import Difference, Divergence
from fxhook.testing.consistency import assert_hooks_consistent
from fxhook.testing.strategies import GenerationSettings, TokenBatch
from fxhook.testing.tolerance import tolerance

__all__ = ["Check", "Difference", "Divergence", "GenerationSettings", "PropertyFailure", "TokenBatch",
           "assert_compiled_matches", "assert_generation_matches", "assert_hooks_consistent", "assert_matches_hf",
           "strategies", "tolerance"]
