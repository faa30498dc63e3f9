"""TransformerLens's `train`: next-token training of a HookedTransformer on a dataset of token rows.

`from fxhook.train import HookedTransformerTrainConfig, train` where a notebook used
`transformer_lens.train`: the same config fields and defaults, the same optimiser, schedule, data order
(seeded shuffling), printing, checkpointing and step counting, so the same model, data and seed give
TransformerLens's losses. Differences, all on bad input or failure: the config is checked when it is
made (TransformerLens fails later, or silently ignores e.g. save_every without save_dir), the dataset's
first row is checked before any weight changes, and if training raises, the model's weights are put back
as they were before the call (an interrupt, Ctrl-C, keeps the progress made).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from fxhook.model import HookedTransformer
from fxhook.utils import get_device, is_library_available

OPTIMIZER_NAMES = ("Adam", "AdamW", "SGD")


@dataclass
class HookedTransformerTrainConfig:
    """Training hyperparameters (TransformerLens's fields and defaults).

    Args:
        num_epochs: passes over the dataset.
        batch_size: rows per step.
        lr: learning rate.
        seed: torch seed set at the start (it fixes the data order).
        momentum: SGD momentum.
        max_grad_norm: clip the global gradient norm to this (None: no clipping).
        weight_decay: None: Adam without decay; a value: AdamW (or SGD's weight decay).
        optimizer_name: "Adam", "AdamW" or "SGD" ("Adam" and "AdamW" both mean AdamW when weight_decay is set).
        device: where to train (None: fxhook.utils.get_device()).
        warmup_steps: linear learning-rate warm-up from 0 over this many steps (0: none).
        save_every: save model.state_dict() to save_dir every this many steps of an epoch.
        save_dir: folder for checkpoints (model_{step}.pt).
        wandb: log to Weights and Biases (needs the wandb package).
        wandb_project_name: its project (None: "easy-transformer").
        print_every: print the loss every this many steps (None: never).
        max_steps: end each epoch after step index max_steps (so max_steps + 1 steps, as TransformerLens).
    """

    num_epochs: int
    batch_size: int
    lr: float = 1e-3
    seed: int = 0
    momentum: float = 0.0
    max_grad_norm: Optional[float] = None
    weight_decay: Optional[float] = None
    optimizer_name: str = "Adam"
    device: Optional[Union[str, torch.device]] = None
    warmup_steps: int = 0
    save_every: Optional[int] = None
    save_dir: Optional[str] = None
    wandb: bool = False
    wandb_project_name: Optional[str] = None
    print_every: Optional[int] = 50
    max_steps: Optional[int] = None

    def __post_init__(self) -> None:
        for name in ("num_epochs", "batch_size"):
            _check_int(name, getattr(self, name), minimum=1)
        for name, minimum in (("save_every", 1), ("print_every", 1), ("max_steps", 0)):
            if getattr(self, name) is not None:
                _check_int(name, getattr(self, name), minimum=minimum)
        _check_int("warmup_steps", self.warmup_steps, minimum=0)
        if self.optimizer_name not in OPTIMIZER_NAMES:
            raise ValueError(f"Optimizer {self.optimizer_name!r} not supported: choose one of {OPTIMIZER_NAMES}")
        if self.save_every is not None and self.save_dir is None:
            raise ValueError("save_every is set but save_dir is None: give save_dir (where checkpoints go), "
                             "or leave save_every None")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or None; got {self.max_grad_norm}")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")


def train(
    model: HookedTransformer,
    config: HookedTransformerTrainConfig,
    dataset: Dataset,
) -> HookedTransformer:
    """Train `model` on `dataset` (rows {"tokens": [pos] token ids}) to predict each next token; returns
    the model, trained in place.

    As TransformerLens: torch.manual_seed(config.seed), then batches drawn in seeded random order, the
    loss of `model(tokens, return_type="loss")` minimised by the configured optimiser, and per epoch at most
    max_steps + 1 steps. fxhook's graphs are captured in eval mode (no dropout), so unlike TransformerLens
    the model is not switched to training mode: the computation is the same either way.
    """
    if not isinstance(config, HookedTransformerTrainConfig):
        raise TypeError(f"config must be a HookedTransformerTrainConfig; got {type(config).__name__}")
    config = dataclasses.replace(config)  # the caller's config stays as it was
    _check_dataset(dataset, model.cfg.n_ctx)
    wandb = _start_wandb(config) if config.wandb else None
    if config.device is None:
        config.device = get_device()

    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    model.to(config.device)  # before the optimiser is made, so it holds the parameters that train
    torch.manual_seed(config.seed)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = _make_optimizer(parameters, config)
    scheduler = None
    if config.warmup_steps > 0:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_lambda=lambda step: min(1.0, step / config.warmup_steps))
    data_loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True)

    try:
        _run_epochs(model, config, data_loader, optimizer, scheduler, wandb)
    except Exception:
        _restore(model, before)
        raise
    return model


def _run_epochs(model, config: HookedTransformerTrainConfig, data_loader: DataLoader,
                optimizer: torch.optim.Optimizer, scheduler, wandb) -> None:
    parameters = [p for p in model.parameters() if p.requires_grad]
    for epoch in tqdm(range(1, config.num_epochs + 1)):
        samples = 0
        for step, batch in tqdm(enumerate(data_loader)):
            tokens = batch["tokens"].to(config.device)  # [batch, pos]
            loss = model(tokens, return_type="loss")
            loss.backward()
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            optimizer.zero_grad()
            samples += tokens.shape[0]
            if wandb is not None:
                wandb.log({"train_loss": loss.item(), "samples": samples, "epoch": epoch})
            if config.print_every is not None and step % config.print_every == 0:
                print(f"Epoch {epoch} Samples {samples} Step {step} Loss {loss.item()}")
            if config.save_every is not None and step % config.save_every == 0:
                torch.save(model.state_dict(), f"{config.save_dir}/model_{step}.pt")
            if config.max_steps is not None and step >= config.max_steps:
                break


def _make_optimizer(parameters: list, config: HookedTransformerTrainConfig) -> torch.optim.Optimizer:
    """TransformerLens's choice: Adam (AdamW once weight_decay is set, for either Adam name), or SGD."""
    if config.optimizer_name in ("Adam", "AdamW"):
        if config.weight_decay is not None:
            return torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
        return torch.optim.Adam(parameters, lr=config.lr)
    return torch.optim.SGD(parameters, lr=config.lr, momentum=config.momentum,
                           weight_decay=config.weight_decay if config.weight_decay is not None else 0.0)


def _start_wandb(config: HookedTransformerTrainConfig):
    if not is_library_available("wandb"):
        raise ImportError("config.wandb=True but the wandb package is not installed: `pip install wandb`, "
                          "or set wandb=False")
    import wandb

    if config.wandb_project_name is None:
        config.wandb_project_name = "easy-transformer"
    wandb.init(project=config.wandb_project_name, config=vars(config))
    return wandb


def _check_dataset(dataset: Any, n_ctx: int) -> None:
    """The dataset must give {"tokens": 1-D integer tensor of at most n_ctx} rows; checked on row 0."""
    try:
        size = len(dataset)
    except TypeError:
        raise TypeError(f"dataset must be a map-style dataset with a length; got {type(dataset).__name__}") from None
    if size == 0:
        raise ValueError("dataset is empty: nothing to train on")
    row = dataset[0]
    if not isinstance(row, dict) or "tokens" not in row:
        raise ValueError("dataset rows must be dicts with a 'tokens' entry (e.g. from "
                         f"fxhook.utils.tokenize_and_concatenate); row 0 is {type(row).__name__}"
                         + (f" with keys {sorted(row)}" if isinstance(row, dict) else ""))
    tokens = torch.as_tensor(row["tokens"])
    if tokens.ndim != 1 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"each row's 'tokens' must be a 1-D tensor of token ids; row 0 has shape "
                         f"{tuple(tokens.shape)} and dtype {tokens.dtype}")
    if not 2 <= tokens.shape[0] <= n_ctx:
        raise ValueError(f"each row needs 2 to n_ctx={n_ctx} tokens to train on; row 0 has {tokens.shape[0]}")


@torch.no_grad()
def _restore(model, before: dict[str, torch.Tensor]) -> None:
    """Put the parameters' values back and drop their gradients (training failed part-way)."""
    for name, p in model.named_parameters():
        p.copy_(before[name].to(p.device))
        p.grad = None
