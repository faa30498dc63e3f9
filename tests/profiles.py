"""Hypothesis example counts that follow the profile (tests/conftest.py): a test asks for n
examples under `ci`, and gets ten times as many under `thorough`."""
from hypothesis import settings

_CI_EXAMPLES = 6  # the `ci` profile's max_examples


def examples(n: int) -> int:
    """n examples under the ci profile, scaled by the loaded profile's size."""
    return max(1, n * settings.default.max_examples // _CI_EXAMPLES)
