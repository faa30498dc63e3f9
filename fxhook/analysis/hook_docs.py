"""A one-line meaning and the axes of every hook point, by TransformerLens name (for listings).

Derived from the hook-name schema (fxhook/core/hook_names.py), the one table of hook kinds.
"""
from __future__ import annotations

from fxhook.core.hook_names import BY_GENERIC_NAME, describe, generic_name

# name with the block index replaced by L -> (axes, meaning)
HOOK_DOCS: dict[str, tuple[str, str]] = {name: (kind.axes, kind.meaning) for name, kind in BY_GENERIC_NAME.items()}

__all__ = ["HOOK_DOCS", "describe", "generic_name"]
