"""The pipeline: every graph fxhook runs, built from one capture by a declared list of passes.

    capture (markers, opaque attention[, opaque KV ops])
      -> passes, in the order the lists below declare, each checked against its contract
      -> a runnable graph with HookPoints

The runtime asks for graphs by spec (`GraphSpec`, `DecodeKind`) through these functions and never
assembles passes itself. See docs/architecture.md.
"""
from fxhook.pipeline.build import (build_decode, build_decode_step, build_forward, build_regions, cache_passes,
                                   capture_decode, capture_forward, decode_passes, forward_passes)
from fxhook.passes.expose_activations import ACTIVATION_NAMES
from fxhook.pipeline.contracts import Pass, PassContractError, form_of, run_passes
from fxhook.pipeline.specs import DecodeKind, GraphSpec

__all__ = ["ACTIVATION_NAMES", "GraphSpec", "DecodeKind", "Pass", "PassContractError", "form_of", "run_passes", "capture_forward",
           "capture_decode", "forward_passes", "build_forward", "cache_passes", "build_decode_step", "decode_passes",
           "build_decode", "build_regions"]
