"""Activation stores: harvest a model's activations to sharded safetensors files, read them back lazily.

    from fxhook.store import harvest, ActivationStore
    harvest(model, "corpus.jsonl", ["blocks.3.hook_resid_post"], "acts/", seq_len=128, batch_size=16)
    store = ActivationStore("acts/")
"""
from fxhook.store.harvesting import harvest
from fxhook.store.reader import ActivationStore, StoreColumn, StoreDataset

__all__ = ["harvest", "ActivationStore", "StoreColumn", "StoreDataset"]
