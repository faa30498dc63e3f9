"""The `fxhook` command: look inside a language model from the shell.

    fxhook hooks smollm2                     # hook points, shapes, what each one is
    fxhook run smollm2 "The capital of France is"
    fxhook plot smollm2 "The capital of France is" --corrupted "The capital of Italy is"
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

MODEL_HELP = ('"smollm2" (the packaged SmolLM2-135M-Instruct, works offline), a local folder (written by '
              'save_pretrained, or holding one .gguf file), or a Hugging Face hub name such as "gpt2"')
EPILOG = f"""MODEL is {MODEL_HELP}.

examples:
  fxhook hooks smollm2                          list hook points (block 0 stands for every block)
  fxhook hooks smollm2 --filter attn --all      every attention hook of every block
  fxhook run smollm2 "The capital of France is" --top-k 5
  fxhook run smollm2 "The capital of France is" --answer Paris
  fxhook plot smollm2 "The capital of France is" --corrupted "The capital of Italy is" --out pics/

Run "fxhook COMMAND --help" for a command's options."""


class CliError(Exception):
    """A mistake in the command line: printed as one line, exit status 2."""


# ------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fxhook", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Look inside a Hugging Face language model, with TransformerLens's hook names.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=description,
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  epilog=f"MODEL is {MODEL_HELP}.")
        sub.add_argument("model", metavar="MODEL", help="which model (see below)")
        sub.add_argument("--no-processing", action="store_true",
                         help="keep the checkpoint's weights (default: fold norms and centre, as TransformerLens)")
        sub.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16 or float64")
        sub.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
        sub.add_argument("--layers", type=int, default=None, metavar="N", help="keep only the first N blocks")
        sub.add_argument("--no-bos", action="store_true", help="do not prepend a BOS token to the prompt")
        sub.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        return sub

    hooks = command("hooks", "list the hook points, their shapes and what each one is",
                    "List every hook point of MODEL with its shape (for a short prompt) and meaning.")
    hooks.add_argument("--prompt", default="Hello world", help="the prompt whose shapes are shown")
    hooks.add_argument("--filter", default=None, metavar="TEXT", help="only hook names containing TEXT")
    hooks.add_argument("--all", action="store_true", help="every block's hooks (default: block 0 only)")

    run = command("run", "run a prompt and show the most likely next tokens",
                  "Run PROMPT through MODEL and show the top next tokens with their probabilities.")
    run.add_argument("prompt", metavar="PROMPT", help="the text to continue")
    run.add_argument("--top-k", type=int, default=10, help="how many next tokens to show (default 10)")
    run.add_argument("--answer", default=None, help="also show the rank and probability of this answer")

    plot = command("plot", "save pictures for a prompt (attention, logit lens, patching)",
                   "Save PNG pictures for PROMPT: attention patterns of chosen heads, the logit lens, and\n"
                   "(with --corrupted) an activation-patching heatmap of the residual stream.")
    plot.add_argument("prompt", metavar="PROMPT", help="the (clean) prompt")
    plot.add_argument("--out", default="fxhook-pictures", help="folder for the pictures (default fxhook-pictures)")
    plot.add_argument("--heads", default=None, metavar="LIST",
                      help='heads to draw, e.g. "L3H1,5.2" (default: the first heads of the last layer)')
    plot.add_argument("--answer", default=None,
                      help="the expected next token, a leading space added (default: the model's top one)")
    plot.add_argument("--corrupted", default=None, metavar="PROMPT",
                      help="a prompt of the same length that should not give the answer: adds a patching heatmap")
    plot.add_argument("--wrong", default=None,
                      help="the token the corrupted prompt leads to (default: its top prediction)")
    plot.add_argument("--html", action="store_true", help="also write interactive HTML (plotly)")
    for module in command_modules():
        module.add_arguments(command(module.NAME, module.HELP, module.DESCRIPTION))
    return parser


# Commands that live in their own modules (fxhook/commands/): each has NAME, HELP, DESCRIPTION,
# add_arguments(parser) and run(model, args) -> int | None (the exit status; None: 0).
COMMAND_MODULES: tuple[str, ...] = ("fxhook.commands.harvest", "fxhook.commands.verify")


def command_modules() -> list:
    import importlib

    return [importlib.import_module(name) for name in COMMAND_MODULES]


def parse_heads(text: str) -> list[tuple[int, int]]:
    """"L3H1,5.2" -> [(3, 1), (5, 2)]."""
    heads = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"(?:L(\d+)H(\d+))|(?:(\d+)[.:](\d+))", part, flags=re.IGNORECASE)
        if not match:
            raise CliError(f'cannot read head {part!r}: write "L3H1" or "3.1" (layer 3, head 1), comma-separated')
        numbers = [int(g) for g in match.groups() if g is not None]
        heads.append((numbers[0], numbers[1]))
    if not heads:
        raise CliError("--heads is empty: give e.g. \"L3H1,5.2\"")
    return heads


# ------------------------------------------------------------------ model
def load_model(args):
    from fxhook import HookedTransformer

    name = args.model
    looks_like_path = name.startswith((".", "/", "~")) or name.count("/") > 1  # hub names have one "/"
    path = Path(name).expanduser()
    if looks_like_path and not path.exists():
        raise CliError(f"no such folder {name!r}: MODEL is {MODEL_HELP}")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    _quiet_gguf_progress()
    load = HookedTransformer.from_pretrained_no_processing if args.no_processing else \
        HookedTransformer.from_pretrained
    try:
        model = load(str(path) if path.exists() else name, dtype=args.dtype, device=args.device,
                     first_n_layers=args.layers)
    except Exception as err:  # loading can fail in many libraries' ways: report it in one line
        if args.debug:
            raise
        raise CliError(f"cannot load model {name!r}: {err} (MODEL is {MODEL_HELP}; --debug shows the traceback)")
    return model


def _quiet_gguf_progress() -> None:
    """transformers' GGUF loader draws its own tqdm bar (SmolLM2): keep the terminal for ours."""
    try:
        from functools import partial

        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from tqdm.auto import tqdm
    except ImportError:
        return
    gguf_utils.tqdm = partial(tqdm, disable=True)


def tokens_for(model, prompt: str, args) -> torch.Tensor:
    if model.tokenizer is None:
        raise CliError(f"{args.model} has no tokenizer, so it cannot read text: use a folder that holds one")
    return model.to_tokens(prompt, prepend_bos=False if args.no_bos else None)


def single_token(model, text: str, what: str) -> int:
    """The token of an answer; a leading space is added, as test_prompt does (" Paris", not "Paris")."""
    text = text if text.startswith(" ") else " " + text
    try:
        return model.to_single_token(text)
    except Exception as err:
        raise CliError(f"{what} {text!r} must be one token ({err}); try it with a leading space, e.g. ' Paris'")


# ------------------------------------------------------------------ commands
def cmd_hooks(model, args) -> None:
    from fxhook.core.hook_names import describe, layer_of

    cfg = model.cfg
    if model.tokenizer is not None:
        tokens = tokens_for(model, args.prompt, args)
    else:
        tokens = torch.arange(4, device=cfg.device)[None] % cfg.d_vocab
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
    kv = f" ({cfg.n_key_value_heads} key/value)" if cfg.n_key_value_heads else ""
    print(f"{cfg.model_name}: {cfg.n_layers} blocks, d_model {cfg.d_model}, {cfg.n_heads} heads{kv} of "
          f"d_head {cfg.d_head}, d_mlp {cfg.d_mlp}, vocabulary {cfg.d_vocab}")
    print(f"Shapes for one prompt of {tokens.shape[-1]} tokens (batch 1, pos {tokens.shape[-1]}).\n")
    names = [n for n in model.hook_dict if args.filter is None or args.filter in n]
    if not args.all:
        names = [n for n in names if layer_of(n) in (None, 0)]
    if not names:
        raise CliError(f"no hook name contains {args.filter!r}: try --filter attn, --filter mlp or --filter resid")
    width = max(len(n) for n in names)
    for name in names:
        axes, meaning = describe(name)
        shape = "x".join(str(s) for s in cache[name].shape) if name in cache else "-"
        print(f"{name:<{width}}  {shape:<16} [{axes}]  {meaning}" if axes else f"{name:<{width}}  {shape}")
    if not args.all and cfg.n_layers > 1:
        print(f"\nBlocks 1..{cfg.n_layers - 1} have the same hooks as block 0 (--all lists them). "
              "Use these names with run_with_cache / run_with_hooks.")


def cmd_run(model, args) -> None:
    tokens = tokens_for(model, args.prompt, args)
    with torch.no_grad():
        probs = model(tokens)[0, -1].float().softmax(dim=-1)
    if args.answer is None:  # test_prompt prints the tokenized prompt itself
        print(f"Prompt tokens: {model.to_str_tokens(tokens[0])}")
    print(f"Top {args.top_k} next tokens:")
    values, ids = probs.topk(min(args.top_k, probs.shape[-1]))
    for rank, (p, t) in enumerate(zip(values, ids)):
        print(f"  {rank:>3}. {model.to_string(t)!r:<20} {p.item():7.2%}")
    if args.answer is not None:
        from fxhook.utils import test_prompt

        print()
        test_prompt(args.prompt, args.answer, model, prepend_bos=False if args.no_bos else None, top_k=0)


def cmd_plot(model, args) -> None:
    from fxhook.analysis import patching, plots

    cfg = model.cfg
    heads = args.head_list or [(cfg.n_layers - 1, h) for h in range(min(cfg.n_heads, 4))]
    bad = [f"L{l}H{h}" for l, h in heads if not (0 <= l < cfg.n_layers and 0 <= h < cfg.n_heads)]
    if bad:
        raise CliError(f"no such heads {bad}: layers are 0..{cfg.n_layers - 1}, heads 0..{cfg.n_heads - 1}")
    tokens = tokens_for(model, args.prompt, args)
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
    answer = single_token(model, args.answer, "--answer") if args.answer else int(logits[0, -1].argmax())
    str_tokens = model.to_str_tokens(tokens[0])
    out = Path(args.out)
    written = plots.plot_attention_patterns(cache, heads, str_tokens, out / "attention.png", html=args.html)
    written += plots.plot_logit_lens(model, cache, str_tokens, out / "logit_lens.png", answer=answer,
                                     html=args.html)
    if args.corrupted is not None:
        corrupted = tokens_for(model, args.corrupted, args)
        if corrupted.shape != tokens.shape:
            raise CliError(f"--corrupted has {corrupted.shape[-1]} tokens but PROMPT has {tokens.shape[-1]}: "
                           "patching needs prompts of the same length")
        with torch.no_grad():
            corrupted_logits = model(corrupted)
        wrong = single_token(model, args.wrong, "--wrong") if args.wrong else int(corrupted_logits[0, -1].argmax())
        if wrong == answer:
            raise CliError(f"both prompts lead to {model.to_string(answer)!r}: pass --answer and --wrong to "
                           "choose the two tokens the patching metric compares")
        metric = lambda l: l[0, -1, answer] - l[0, -1, wrong]  # noqa: E731
        results = patching.get_act_patch_resid_pre(model, corrupted, cache, metric, progress=True)
        title = (f"Patching resid_pre: logit({model.to_string(answer)!r}) - logit({model.to_string(wrong)!r}); "
                 f"clean {metric(logits).item():.2f}, corrupted {metric(corrupted_logits).item():.2f}")
        written += plots.plot_patching(results, out / "patching_resid_pre.png", x_labels=str_tokens, title=title,
                                       html=args.html)
    print("Wrote:")
    for path in written:
        print(f"  {path}")


COMMANDS = {"hooks": cmd_hooks, "run": cmd_run, "plot": cmd_plot}


def check_arguments(args) -> None:
    """What can be checked before loading the model (which can take a minute)."""
    if args.layers is not None and args.layers < 1:
        raise CliError(f"--layers must be at least 1, got {args.layers}")
    if getattr(args, "top_k", 1) < 1:
        raise CliError(f"--top-k must be at least 1, got {args.top_k}")
    heads = getattr(args, "heads", None)
    args.head_list = parse_heads(heads) if heads is not None else None


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `fxhook` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_arguments(args)
        model = load_model(args)
        if args.command in COMMANDS:
            COMMANDS[args.command](model, args)
            return 0
        module = next(m for m in command_modules() if m.NAME == args.command)
        status = module.run(model, args)
        return 0 if status is None else int(status)
    except CliError as err:
        print(f"fxhook {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
