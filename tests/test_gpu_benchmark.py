"""benchmarks/gpu.py keeps working without a GPU: its --dry-run runs every section on the CPU at tiny sizes."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")  # the dry run's correctness dtypes
CORRECTNESS = ("fxhook eager logits vs HF", "fxhook compiled logits vs eager", "greedy tokens == HF (3)")
PROCESSED = "processed: compiled logits vs eager"  # the speed section's model (neutral ops removed)
INFO = ("forward: compiled / HF eager", "forward: compiled / HF compiled", "run_with_cache: compiled / HF eager",
        "decode batch 2: compiled step / HF static compiled", "1B batch 1: HF static compiled fraction")
GOALS = ("run_with_cache: compiled / HF compiled forward", "decode batch 1: compiled step / HF static compiled",
         "1B batch 1: fraction of bandwidth limit")


def _table(stdout: str) -> dict[str, list[str]]:
    """check -> [section, value, goal, result] for every table row the script printed."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split(" | ")]
        if line.startswith("| ") and len(cells) == 5 and cells[1] != "check":
            rows[cells[1]] = [cells[0], *cells[2:]]
    return rows


def test_dry_run_prints_every_row():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--dry-run"], capture_output=True,
                          text=True, timeout=400, env=env, cwd=ROOT)
    rows = _table(done.stdout)
    report = done.stdout[-3000:] + done.stderr[-3000:]
    correct = [f"{d}: {c}" for d in DTYPES for c in CORRECTNESS] + [PROCESSED]
    expected = correct + list(INFO) + list(GOALS)
    assert sorted(rows) == sorted(expected), report
    for check in correct:
        assert rows[check][3] == "ok", (check, rows[check])  # fxhook == HF in fp32 and bf16, eager and compiled
    for check in GOALS:
        assert rows[check][3] in ("PASS", "MISS") and rows[check][2], (check, rows[check])  # a ratio, its goal
    for check in INFO:
        assert rows[check][3] == "info" and rows[check][1][0].isdigit(), (check, rows[check])
    assert done.returncode == 0, report
