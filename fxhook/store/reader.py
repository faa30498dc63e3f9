"""Reading a store written by `harvest`, lazily: shards are memory-mapped (safetensors `safe_open`) and
only the rows asked for are read, so a store far larger than memory can be trained on.

    store = ActivationStore("acts/")
    len(store)                                   # rows
    store[3]                                     # {hook: [seq_len, ...], "tokens": [seq_len]}
    store["blocks.0.hook_resid_post"][10:20]     # [10, seq_len, d_model]
    for batch in store.batches(32, hooks=["blocks.0.hook_resid_post"], seed=0): ...
    loader = torch.utils.data.DataLoader(store.dataset(), batch_size=32, shuffle=True)
"""
from __future__ import annotations

import bisect
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from fxhook.store import manifest as mf


class ActivationStore:
    """A finished store: its manifest, and its shards opened on first use (per process)."""

    def __init__(self, out_dir: str | os.PathLike):
        self.folder = Path(out_dir).expanduser()
        manifest = mf.read_manifest(self.folder) if self.folder.is_dir() else None
        if manifest is None:
            raise FileNotFoundError(f"{str(self.folder)!r} is not an activation store (no {mf.MANIFEST}): write one "
                                    "with fxhook.store.harvest")
        if not manifest["complete"]:
            raise ValueError(f"the store in {str(self.folder)!r} is incomplete (its harvest was interrupted): run the "
                             "same harvest again to finish it")
        self.manifest = manifest
        self.hooks: list[str] = list(manifest["identity"]["hooks"])
        self.seq_len: int = manifest["identity"]["seq_len"]
        self.dtype: torch.dtype = getattr(torch, manifest["identity"]["dtype"])
        self._files = [self.folder / shard["file"] for shard in manifest["shards"]]
        self._starts = [0]
        for shard in manifest["shards"]:
            self._starts.append(self._starts[-1] + shard["rows"])
        self._handles: dict[int, Any] = {}
        self._pid = os.getpid()

    # ------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self._starts[-1]

    @property
    def keys(self) -> list[str]:
        """The hooks and the rows' token ids ("tokens")."""
        return [*self.hooks, mf.TOKENS_KEY]

    def shape(self, key: str) -> tuple[int, ...]:
        """The whole store's shape for `key`: [rows, ...]."""
        self._check_key(key)
        row = [self.seq_len] if key == mf.TOKENS_KEY else self.manifest["row_shapes"][key]
        return (len(self), *row)

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.folder)!r}: {len(self)} rows of {self.seq_len} tokens, hooks {self.hooks})"

    def _check_key(self, key: str) -> None:
        if key not in self.keys:
            raise KeyError(f"{key!r} is not in this store: it holds {self.keys}")

    def _handle(self, shard: int):
        from safetensors import safe_open

        if self._pid != os.getpid():  # a DataLoader worker: memory maps are not shared across a fork
            self._handles, self._pid = {}, os.getpid()
        if shard not in self._handles:
            self._handles[shard] = safe_open(str(self._files[shard]), framework="pt")
        return self._handles[shard]

    def __getstate__(self) -> dict:  # pickled into DataLoader workers without open files
        return {**self.__dict__, "_handles": {}}

    # ------------------------------------------------------------ reading
    def read(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of `key`, reading only those rows from disk."""
        self._check_key(key)
        parts = []
        shard = bisect.bisect_right(self._starts, start) - 1
        while start < stop:
            first, end = self._starts[shard], self._starts[shard + 1]
            take = min(stop, end)
            parts.append(self._handle(shard).get_slice(key)[start - first:take - first])
            start, shard = take, shard + 1
        if not parts:
            return torch.empty((0, *self.shape(key)[1:]), dtype=torch.long if key == mf.TOKENS_KEY else self.dtype)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def rows(self, indices: Sequence[int], keys: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """The rows `indices` (in that order) of each of `keys` (default: every hook and the tokens)."""
        keys = list(keys) if keys is not None else self.keys
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if index.numel() and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"row indices must be in [0, {len(self)}), got {index.min()}..{index.max()}")
        unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
        runs = _runs(unique.tolist())  # consecutive rows are read in one slice
        out = {}
        for key in keys:
            self._check_key(key)
            pieces = [self.read(key, first, last + 1) for first, last in runs]
            out[key] = (torch.cat(pieces) if pieces else self.read(key, 0, 0))[inverse]
        return out

    def __getitem__(self, item):
        """store[i]: row i of every key ({key: [seq_len, ...]}); store[hook]: a lazy column, sliced by rows."""
        if isinstance(item, str):
            self._check_key(item)
            return StoreColumn(self, item)
        if isinstance(item, int) and not isinstance(item, bool):
            row = item + len(self) if item < 0 else item
            if not 0 <= row < len(self):
                raise IndexError(f"row {item} is out of range for a store of {len(self)} rows")
            return {key: self.read(key, row, row + 1)[0] for key in self.keys}
        raise TypeError(f"index a store with a row number or a key ({self.keys}), got {type(item).__name__}")

    # ------------------------------------------------------------ training
    def batches(self, batch_size: int, hooks: Sequence[str] | None = None, shuffle: bool = True,
                seed: int | None = None, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch of {key: [batch, seq_len, ...]} batches (`hooks` and "tokens"), every row exactly once:
        in order, or in the random order that `seed` fixes. Only each batch's rows are read."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        keys = [*(hooks if hooks is not None else self.hooks), mf.TOKENS_KEY]
        for key in keys:
            self._check_key(key)
        if shuffle:
            fresh = int.from_bytes(os.urandom(8), "little") >> 1  # no seed: a new order, global RNGs untouched
            generator = torch.Generator().manual_seed(seed if seed is not None else fresh)
            order = torch.randperm(len(self), generator=generator)
        else:
            order = torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            chosen = order[start:start + batch_size]
            if drop_last and len(chosen) < batch_size:
                return
            yield self.rows(chosen.tolist(), keys) if shuffle else \
                {key: self.read(key, start, start + len(chosen)) for key in keys}

    def dataset(self, hooks: Sequence[str] | None = None) -> "StoreDataset":
        """A torch map-style Dataset of rows ({key: [seq_len, ...]}), for torch.utils.data.DataLoader."""
        return StoreDataset(self, hooks)


def _runs(sorted_rows: list[int]) -> list[tuple[int, int]]:
    """[(first, last)] of the runs of consecutive numbers in `sorted_rows`."""
    runs: list[tuple[int, int]] = []
    for row in sorted_rows:
        if runs and runs[-1][1] == row - 1:
            runs[-1] = (runs[-1][0], row)
        else:
            runs.append((row, row))
    return runs


class StoreColumn:
    """One key of a store, read lazily: `column[a:b]`, `column[i]`, `column.shape`, `len(column)`."""

    def __init__(self, store: ActivationStore, key: str):
        self.store, self.key = store, key

    @property
    def shape(self) -> tuple[int, ...]:
        return self.store.shape(self.key)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, item) -> torch.Tensor:
        n = len(self.store)
        if isinstance(item, slice):
            start, stop, step = item.indices(n)
            if step == 1:
                return self.store.read(self.key, start, max(start, stop))
            return self.store.rows(list(range(start, stop, step)), [self.key])[self.key]
        if isinstance(item, int) and not isinstance(item, bool):
            row = item + n if item < 0 else item
            if not 0 <= row < n:
                raise IndexError(f"row {item} is out of range for a store of {n} rows")
            return self.store.read(self.key, row, row + 1)[0]
        raise TypeError(f"a store column is indexed by a row number or a slice, got {type(item).__name__}")


class StoreDataset(torch.utils.data.Dataset):
    """Rows of a store as a map-style Dataset: item i is {key: [seq_len, ...]} for the chosen hooks and tokens."""

    def __init__(self, store: ActivationStore, hooks: Sequence[str] | None = None):
        self.store = store
        self.keys = [*(hooks if hooks is not None else store.hooks), mf.TOKENS_KEY]
        for key in self.keys:
            store._check_key(key)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: value[0] for key, value in self.store.rows([index], self.keys).items()}
