"""The direct logit attribution of examples/direct_logit_attribution.py, compiled, timed against eager.

    python examples/compiled_analysis.py

`model.compile()` (or `from_pretrained(..., compile=True)`) runs every graph through
torch.compile: the first run of each hook set compiles it (tens of seconds on a CPU), later runs
reuse the compiled code. The cached activations, and so the attributions, are the same.
"""
from __future__ import annotations

import statistics
import time

from fxhook import HookedTransformer

from direct_logit_attribution import ANSWER, PROMPT, WRONG, attribute, load_model  # examples/, beside this file


def timed(fn, repeats: int) -> tuple[float, dict]:
    """Median seconds of `repeats` calls, and the last result."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(model: HookedTransformer | None = None, prompt: str = PROMPT, answer: str = ANSWER, wrong: str = WRONG,
         repeats: int = 5) -> dict:
    model = model or load_model()
    analysis = lambda: attribute(model, prompt, answer, wrong)  # noqa: E731
    was_compiled = model.is_compiled
    model.compile(False)
    analysis()  # warm-up: builds the graph variant for this hook set
    eager_s, eager = timed(analysis, repeats)

    model.compile()
    try:
        start = time.perf_counter()
        analysis()  # the first compiled run compiles
        compile_s = time.perf_counter() - start
        compiled_s, compiled = timed(analysis, repeats)
    finally:
        model.compile(was_compiled)
    difference = (compiled["attributions"] - eager["attributions"]).abs().max().item()
    top = eager["labels"][int(eager["attributions"].abs().argmax())]
    print(f"direct logit attribution of {answer!r} vs {wrong!r} after {prompt!r} (top part: {top})")
    print(f"  eager     {1000 * eager_s:8.1f} ms a run")
    print(f"  compiled  {1000 * compiled_s:8.1f} ms a run ({eager_s / compiled_s:.2f}x eager), after "
          f"{compile_s:.1f} s compiling")
    print(f"  largest difference between the attributions: {difference:.1e}")
    return {"eager_s": eager_s, "compiled_s": compiled_s, "compile_s": compile_s, "max_difference": difference,
            "eager": eager, "compiled": compiled}


if __name__ == "__main__":
    main()
