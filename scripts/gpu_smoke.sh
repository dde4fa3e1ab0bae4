#!/usr/bin/env bash
# The prepared single-GPU check of issue 26 (benchmarks/gpu_smoke.py) on a lent device, with no network.
# The device lacks trl, datasets, deepspeed (and their missing needs): download their wheels here first, into the
# git-ignored .whl/ folder (commands: /work/.library/device/README.md, "a Python package missing there"), e.g.
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d .whl trl==1.16.0 deepspeed ...
# then run this with `.whl` carried:   bash scripts/gpu_smoke.sh   (writes benchmarks/results/gpu_smoke.json)
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
out="${OUT:-benchmarks/results}"
python3 benchmarks/gpu_smoke.py --out "$out/gpu_smoke.json" "$@" 2>&1 | tee "$out/gpu_smoke.log"
