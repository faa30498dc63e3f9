"""Which (family, feature) cells of the README support table a test run has shown to work.

A test says what it checks with `@pytest.mark.support(family, feature)` (several marks allowed;
family "*" means every family whose models the test actually drew or built). Families a test
really exercised are recorded by tests/models.py (`note_family`), so a hypothesis test tagged
with four families but whose examples drew only two is credited for those two: the table never
claims a family the run did not touch. A test that records no family (it builds its models some
other way) is credited for its explicit families.

With FXHOOK_SUPPORT_JSON=path set, conftest writes the per-test records and the resulting cells
there at the end of the session; scripts/support_table.py turns them into the README table.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

FEATURES: tuple[str, ...] = ("hooks", "exact", "processing", "generate", "compile")
ENV_VAR = "FXHOOK_SUPPORT_JSON"

_seen: set[str] = set()


def note_family(family: str) -> None:
    """Called by the model builders: the running test exercised `family`."""
    _seen.add(family)


def reset_seen() -> None:
    _seen.clear()


def seen() -> set[str]:
    return set(_seen)


@dataclass
class Record:
    nodeid: str
    tags: list[tuple[str, str]]  # (family or "*", feature) from the marks
    seen: set[str] = field(default_factory=set)
    outcome: str = "passed"  # "passed" | "failed" | "skipped"

    def credited(self) -> list[tuple[str, str]]:
        """(family, feature) cells this test speaks for."""
        cells = []
        for family, feature in self.tags:
            if family == "*":
                cells += [(f, feature) for f in sorted(self.seen)]
            elif not self.seen or family in self.seen:
                cells.append((family, feature))
        return cells


def cells(records: list[Record]) -> dict[str, dict[str, str]]:
    """family -> feature -> "pass" (every crediting test passed), "fail" (one failed) or "skipped"."""
    table: dict[str, dict[str, str]] = {}
    rank = {"pass": 0, "skipped": 1, "fail": 2}
    for record in records:
        status = {"passed": "pass", "failed": "fail"}.get(record.outcome, "skipped")
        for family, feature in record.credited():
            row = table.setdefault(family, {})
            previous = row.get(feature)
            row[feature] = status if previous is None else max(previous, status, key=rank.__getitem__)
    return table


def write(path: str | os.PathLike, records: list[Record]) -> None:
    data = {
        "features": list(FEATURES),
        "tests": [{"nodeid": r.nodeid, "outcome": r.outcome, "tags": r.tags, "seen": sorted(r.seen),
                   "credited": r.credited()} for r in records],
        "cells": cells(records),
    }
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
