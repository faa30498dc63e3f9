"""Harvesting activations to disk: `harvest(model, data, hooks, out_dir, seq_len=..., batch_size=...)`.

The rows (packed text, fxhook/store/data.py) are numbered from 0 and shard i holds rows
[i * shard_size, (i + 1) * shard_size): the layout depends on nothing but the call, so a resumed run,
and a run spread over torch.distributed ranks (shard i belongs to rank i % world_size), write the same
shards as one uninterrupted process. A shard is written under a temporary name by a writer thread
(the model computes the next shard meanwhile) and renamed when complete, so a killed run leaves only
whole shards; running the same call again checks the finished shards' tokens against the data and
computes the rest.
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
from importlib import metadata
from itertools import islice
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from tqdm.auto import tqdm

from fxhook.core.hook_names import layer_of
from fxhook.runtime.loading import resolve_dtype
from fxhook.runtime.saving import config_hash, weights_hash
from fxhook.store import manifest as mf
from fxhook.store.data import check_tokenizer, describe_source, iter_documents, packed_rows

DEFAULT_SHARD_BYTES = 256 << 20  # a default shard holds about this much activation data
QUEUE_DEPTH = 2  # finished shards waiting for the writer: bounds memory to a few shards


# --------------------------------------------------------------------------- checks
def _checked_hooks(model, hooks: Sequence[str]) -> list[str]:
    if isinstance(hooks, str):
        hooks = [hooks]
    hooks = list(hooks)
    if not hooks or not all(isinstance(h, str) for h in hooks):
        raise TypeError(f"hooks must be a non-empty list of hook names, got {hooks!r}")
    repeated = sorted({h for h in hooks if hooks.count(h) > 1})
    if repeated:
        raise ValueError(f"hooks names {repeated} more than once: list each hook once")
    if mf.TOKENS_KEY in hooks:
        raise ValueError(f"{mf.TOKENS_KEY!r} is where a store keeps the rows' token ids, not a hook name")
    model.hook_registry.select(hooks)  # an unknown name fails here, with suggestions
    return hooks


def _positive(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def stop_layer(hooks: Sequence[str]) -> int | None:
    """The stop_at_layer that still computes every hook in `hooks`: one past the last block they name (the
    last block's: n_layers, so no final norm nor unembedding), 0 for embedding hooks only, None (run to the
    end) when a hook is after the blocks (ln_final)."""
    last = -1
    for name in hooks:
        layer = layer_of(name)
        if layer is None:
            if not name.startswith(("hook_embed", "hook_pos_embed", "hook_tokens")):
                return None  # after the blocks
            continue
        last = max(last, layer)
    return last + 1


# --------------------------------------------------------------------------- computing
def activations(model, tokens: torch.Tensor, hooks: Sequence[str], stop: int | None) -> dict[str, torch.Tensor]:
    """The hooks' activations for `tokens` [batch, seq_len], computing nothing past block `stop`."""
    device = model.cfg.device
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(device), names_filter=list(hooks), stop_at_layer=stop,
                                        return_type=None)
    return {name: cache[name] for name in hooks}


def shard_activations(model, tokens: torch.Tensor, hooks: Sequence[str], stop: int | None, batch_size: int,
                      dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every hook's activations [rows, ...] of one shard's `tokens` [rows, seq_len], on the CPU in `dtype`,
    computed `batch_size` rows at a time."""
    out: dict[str, torch.Tensor] = {}
    rows = tokens.shape[0]
    for start in range(0, rows, batch_size):
        batch = activations(model, tokens[start:start + batch_size], hooks, stop)
        for name, value in batch.items():
            if name not in out:
                out[name] = torch.empty((rows, *value.shape[1:]), dtype=dtype)
            out[name][start:start + value.shape[0]].copy_(value)
    return out


# --------------------------------------------------------------------------- writing
class ShardWriter:
    """Writes shards on a thread of its own, from a bounded queue: the model computes while the disk writes."""

    def __init__(self, folder: Path, depth: int = QUEUE_DEPTH):
        self.folder = folder
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="fxhook-shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    write_shard(self.folder, *item)
                except BaseException as err:  # noqa: BLE001 - handed to the main thread
                    self.error = err

    def put(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        self._raise()
        self.queue.put((index, tensors))

    def close(self, check: bool = True) -> None:
        """Write what is queued and stop; `check`: raise a writing error (off while another error propagates)."""
        self.queue.put(None)
        self.thread.join()
        if check:
            self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise RuntimeError(f"writing a shard failed: {self.error}") from self.error


def write_shard(folder: Path, index: int, tensors: dict[str, torch.Tensor]) -> None:
    """Shard `index` under a temporary name, flushed to disk, then renamed: it appears whole or not at all."""
    from safetensors.torch import save_file

    tmp = folder / mf.temporary_name(index)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"shard": str(index)})
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, folder / mf.shard_name(index))


def _stored_tokens(folder: Path, index: int) -> torch.Tensor:
    from safetensors import safe_open

    with safe_open(str(folder / mf.shard_name(index)), framework="pt") as f:
        return f.get_tensor(mf.TOKENS_KEY)


# --------------------------------------------------------------------------- distributed
@contextlib.contextmanager
def distributed() -> Iterator[tuple[int, int]]:
    """(rank, world size): torch.distributed's when the caller initialised it; initialised here from
    torchrun's environment (WORLD_SIZE > 1; nccl with GPUs, else gloo) and torn down afterwards; else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size()
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "MASTER_ADDR" in os.environ and dist.is_available():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        try:
            yield dist.get_rank(), dist.get_world_size()
        finally:
            dist.destroy_process_group()
        return
    yield 0, 1


def _on_rank0_then_share(rank: int, world: int, fn) -> Any:
    """Run `fn` on rank 0; every rank gets its result, or raises its error (no rank is left at a barrier)."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as err:  # noqa: BLE001 - re-raised below, on every rank
            error = err
    if world > 1:
        import torch.distributed as dist

        box = [None if error is None else f"{type(error).__name__}: {error}", result]
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        dist.broadcast_object_list(box, src=0, device=device)
        message, result = box
        if message is not None and error is None:
            raise RuntimeError(f"rank 0 refused the harvest: {message}")
    if error is not None:
        raise error
    return result


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


# --------------------------------------------------------------------------- the harvest
def harvest(model, data, hooks: Sequence[str], out_dir: str | os.PathLike, *, seq_len: int, batch_size: int,
            max_tokens: int | None = None, dtype: torch.dtype | str | None = None, shard_size: int | None = None,
            text_column: str = "text", progress: bool = True) -> Path:
    """Run `model` over `data` and store the activations of `hooks` in `out_dir`; returns the folder.

    data: a list of strings, a local .txt (a document a line) or .jsonl file (`text_column` of each
    object), or a datasets.Dataset; packed into rows of `seq_len` tokens (TransformerLens's
    tokenize_and_concatenate, BOS per row). batch_size: rows per forward pass. max_tokens: stop after
    this many tokens (whole rows). dtype: how activations are stored (default: the model's).
    shard_size: rows per shard file (default: about 256 MiB of activations a shard). text_column: the
    field of .jsonl objects and dataset rows holding the text. progress: show a progress bar.

    Re-running the same call on the same out_dir resumes a killed run; a store made by another call
    is refused. Under torch.distributed (or torchrun) each rank computes its share of the shards.
    Read the store with `fxhook.store.ActivationStore(out_dir)`.
    """
    hooks = _checked_hooks(model, hooks)
    _positive("seq_len", seq_len)
    _positive("batch_size", batch_size)
    _positive("max_tokens", max_tokens, allow_none=True)
    _positive("shard_size", shard_size, allow_none=True)
    if seq_len > model.cfg.n_ctx:
        raise ValueError(f"seq_len={seq_len} is longer than the model's context ({model.cfg.n_ctx} tokens)")
    max_rows = None if max_tokens is None else max_tokens // seq_len
    if max_rows == 0:
        raise ValueError(f"max_tokens={max_tokens} is less than one row of seq_len={seq_len} tokens")
    check_tokenizer(model.tokenizer)
    store_dtype = resolve_dtype(dtype) or model.cfg.dtype
    source = describe_source(data, text_column)
    stop = stop_layer(hooks)
    probe = activations(model, torch.full((1, seq_len), model.tokenizer.bos_token_id), hooks, stop)
    row_shapes = {name: list(value.shape[1:]) for name, value in probe.items()}
    if shard_size is None:
        row_bytes = sum(v[0].numel() for v in probe.values()) * store_dtype.itemsize
        shard_size = max(1, DEFAULT_SHARD_BYTES // row_bytes)
        shard_size = shard_size // batch_size * batch_size or shard_size
    identity = {"model": {"config_hash": config_hash(model.cfg), "weights_hash": weights_hash(model)},
                "hooks": hooks, "seq_len": seq_len, "batch_size": batch_size, "shard_size": shard_size,
                "max_tokens": max_tokens, "dtype": str(store_dtype).removeprefix("torch."), "data": source}
    folder = Path(out_dir).expanduser()
    with distributed() as (rank, world):
        def start() -> None:
            if mf.check_resumable(folder, identity) is None:
                folder.mkdir(parents=True, exist_ok=True)
                mf.write_json_atomically(folder / mf.MANIFEST, _manifest(model, identity, row_shapes, complete=False))

        _on_rank0_then_share(rank, world, start)
        n_rows = _harvest_shards(model, data, text_column, hooks, stop, folder, identity, store_dtype, max_rows,
                                 rank, world, progress)
        _barrier(world)
        _on_rank0_then_share(rank, world, lambda: _finish(model, folder, identity, row_shapes, n_rows))
    return folder


def _harvest_shards(model, data, text_column: str, hooks: list[str], stop: int | None, folder: Path,
                    identity: dict, dtype: torch.dtype, max_rows: int | None, rank: int, world: int,
                    progress: bool) -> int:
    """Compute and write this rank's missing shards; returns the number of rows in the whole store."""
    seq_len, batch_size, shard_size = identity["seq_len"], identity["batch_size"], identity["shard_size"]
    mine = lambda index: index % world == rank  # noqa: E731
    finished = mf.finished_shards(folder)
    mf.remove_partial(folder, mine)
    rows = packed_rows(iter_documents(data, text_column), model.tokenizer, seq_len)
    if max_rows is not None:
        rows = islice(rows, max_rows)
    n_rows = 0
    bar = tqdm(total=None if max_rows is None else -(-max_rows // world) * seq_len, unit="tok", unit_scale=True,
               disable=not progress or rank != 0, desc=f"harvest{f' (rank 0 of {world})' if world > 1 else ''}")
    writer = ShardWriter(folder)
    try:
        for index, shard_rows in enumerate(prefetched(_batched(rows, shard_size))):
            n_rows += len(shard_rows)
            if not mine(index):
                continue
            tokens = torch.stack(shard_rows)
            if index in finished:
                if not torch.equal(_stored_tokens(folder, index), tokens):
                    raise ValueError(f"{mf.shard_name(index)} in {str(folder)!r} holds other tokens than the data "
                                     "gives now: the data changed since the store was made; use another out_dir")
                continue
            acts = shard_activations(model, tokens, hooks, stop, batch_size, dtype)
            writer.put(index, {**acts, mf.TOKENS_KEY: tokens})
            bar.update(tokens.numel())
            bar.set_postfix(rows=bar.n // seq_len, refresh=False)
    except BaseException:
        writer.close(check=False)  # the shards computed so far are still written whole: a resume keeps them
        raise
    else:
        writer.close()
    finally:
        bar.close()
    if n_rows == 0:
        raise ValueError(f"the data gives no row of seq_len={seq_len} tokens: give more text or a smaller seq_len")
    return n_rows


def _batched(rows: Iterator[torch.Tensor], size: int) -> Iterator[list[torch.Tensor]]:
    while chunk := list(islice(rows, size)):
        yield chunk


def prefetched(items: Iterator[Any], depth: int = QUEUE_DEPTH) -> Iterator[Any]:
    """`items` produced on a thread of their own, at most `depth` ahead: tokenizing the next shard's text
    overlaps the model's work on this one. The producer's errors are raised here, in order."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((done, None))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer
            buffer.put((done, err))

    thread = threading.Thread(target=produce, name="fxhook-harvest-rows", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if item is done:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()


def _manifest(model, identity: dict, row_shapes: dict, complete: bool, shards: list | None = None,
              n_rows: int = 0) -> dict:
    try:
        version = metadata.version("fxhook")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"format_version": mf.FORMAT_VERSION, "fxhook_version": version, "complete": complete,
            "model_name": model.cfg.model_name, "identity": identity, "row_shapes": row_shapes,
            "tokens_key": mf.TOKENS_KEY, "rows_per_shard": identity["shard_size"], "shards": shards or [], "n_rows": n_rows,
            "total_tokens": n_rows * identity["seq_len"]}


def _finish(model, folder: Path, identity: dict, row_shapes: dict, n_rows: int) -> None:
    """Rank 0, after every rank's shards are written: check they are all there, then the final manifest."""
    shard_size = identity["shard_size"]
    n_shards = -(-n_rows // shard_size)
    missing = sorted(set(range(n_shards)) - mf.finished_shards(folder))
    if missing:
        raise RuntimeError(f"shards {missing} of {str(folder)!r} are missing after the harvest (a rank failed?): "
                           "run the same harvest again to complete the store")
    shards = [{"file": mf.shard_name(i), "rows": min(shard_size, n_rows - i * shard_size)} for i in range(n_shards)]
    mf.write_json_atomically(folder / mf.MANIFEST, _manifest(model, identity, row_shapes, True, shards, n_rows))
