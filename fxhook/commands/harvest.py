"""`fxhook harvest MODEL --data FILE --hooks NAMES --out DIR`: store activations on disk (fxhook.store)."""
from __future__ import annotations

import argparse
import os

NAME = "harvest"
HELP = "run MODEL over a text file and store hook activations as sharded safetensors"
DESCRIPTION = """Run MODEL over the text of --data (a .txt file, a document a line, or a .jsonl file) packed into
rows of --seq-len tokens, and write the activations of --hooks to --out as safetensors shards plus a
manifest. Run the same command again to resume an interrupted harvest. Under torchrun each process
harvests its share of the rows (torchrun --nproc-per-node N -m fxhook harvest ...).
Read the result with fxhook.store.ActivationStore(OUT)."""


def _torchrun_device() -> str | None:
    """Under torchrun with GPUs, each process uses the GPU of its local rank; otherwise the usual default."""
    import torch

    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and torch.cuda.is_available():
        return f"cuda:{int(local_rank) % torch.cuda.device_count()}"
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="the text: a .txt file (a document a line) or a .jsonl file (see --text-column)")
    parser.add_argument("--hooks", required=True, metavar="NAMES",
                        help='comma-separated hook names, e.g. "blocks.3.hook_resid_post,blocks.3.mlp.hook_post" '
                             "(fxhook hooks MODEL lists them)")
    parser.add_argument("--out", required=True, metavar="DIR", help="the store's folder (new, or one to resume)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per row, BOS included (default 128)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass (default 8)")
    parser.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens (whole rows)")
    parser.add_argument("--store-dtype", default=None,
                        help="dtype the activations are stored in (default: the model's, see --dtype)")
    parser.add_argument("--shard-size", type=int, default=None, metavar="ROWS",
                        help="rows per shard file (default: about 256 MiB of activations a shard)")
    parser.add_argument("--text-column", default="text", help='the text field of .jsonl objects (default "text")')
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(device=_torchrun_device())


def run(model, args) -> int:
    from fxhook.cli import CliError
    from fxhook.store import ActivationStore, harvest

    hooks = [h.strip() for h in args.hooks.split(",") if h.strip()]
    if not os.path.isfile(args.data):
        raise CliError(f"--data {args.data!r} is not a file: give a .txt or .jsonl file")
    try:
        folder = harvest(model, args.data, hooks, args.out, seq_len=args.seq_len, batch_size=args.batch_size,
                         max_tokens=args.max_tokens, dtype=args.store_dtype, shard_size=args.shard_size,
                         text_column=args.text_column, progress=not args.no_progress)
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, KeyError) as err:
        if args.debug:
            raise
        raise CliError(str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err))
    if int(os.environ.get("RANK", "0")) == 0:
        store = ActivationStore(folder)
        print(f"Wrote {len(store)} rows of {store.seq_len} tokens ({store.manifest['total_tokens']} tokens), hooks "
              f"{', '.join(store.hooks)}, in {len(store.manifest['shards'])} shards to {folder}")
    return 0
