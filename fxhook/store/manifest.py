"""A store's manifest (manifest.json) and its shard files' names.

The manifest is written when a harvest starts (complete: false) and replaced when it ends (complete:
true, with the shard list, shapes and token count), each time atomically (a temporary file, then
os.replace). Its `identity` says what the store was made from; a resume must match it exactly.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
TOKENS_KEY = "tokens"  # the rows' token ids, [rows, seq_len], in every shard
_SHARD = re.compile(r"shard-(\d{5,})\.safetensors")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def temporary_name(index: int) -> str:
    """Where shard `index` is written before it is renamed: never read, removed on a resume."""
    return f".{shard_name(index)}.partial-{os.getpid()}"


def finished_shards(folder: Path) -> set[int]:
    return {int(m.group(1)) for m in (_SHARD.fullmatch(p.name) for p in folder.iterdir()) if m}


def remove_partial(folder: Path, owned: "callable") -> None:
    """Delete the temporary files of killed runs, for the shards `owned(index)` says are this process's."""
    pattern = re.compile(r"\.shard-(\d{5,})\.safetensors\.partial-\d+")
    for path in folder.iterdir():
        match = pattern.fullmatch(path.name)
        if match and owned(int(match.group(1))):
            path.unlink(missing_ok=True)


def write_json_atomically(path: Path, value: Mapping[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has store format {manifest.get('format_version')!r}; this fxhook reads format "
                         f"{FORMAT_VERSION}")
    return manifest


def check_resumable(folder: Path, identity: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest of the store in `folder` if it was made by the same call; None for a new store; an error
    naming what differs for a store made otherwise, or a folder that holds something else."""
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise NotADirectoryError(f"out_dir {str(folder)!r} is a file: give a folder for the store")
    manifest = read_manifest(folder)
    if manifest is None:
        others = [p.name for p in folder.iterdir()]
        if others:
            raise FileExistsError(f"out_dir {str(folder)!r} holds files but no {MANIFEST} ({', '.join(others[:5])}"
                                  f"{', ...' if len(others) > 5 else ''}): it is not an fxhook store; give an "
                                  "empty or new folder")
        return None
    stored = manifest["identity"]
    differences = [key for key in sorted(set(stored) | set(identity)) if stored.get(key) != identity.get(key)]
    if differences:
        detail = "; ".join(f"{key}: the store has {_short(stored.get(key))}, this call {_short(identity.get(key))}"
                           for key in differences)
        raise ValueError(f"out_dir {str(folder)!r} holds a store made with a different {', '.join(differences)} "
                         f"({detail}); it is never appended to: use another out_dir, or delete this one")
    return manifest


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 120 else text[:117] + "..."
