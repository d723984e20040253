#!/usr/bin/env bash
# Creates .venv at the repository root and installs what the project needs, once.
# Usage: scripts/setup_env.sh [runtime|test|multigpu]
# A stamp file (hash of the requirement files) makes later calls a no-op.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
kind="${1:-runtime}"
case "$kind" in
  runtime) req=requirements.txt ;;
  test) req=requirements-test.txt ;;
  multigpu) req=requirements_taco_dit.txt ;;
  *) echo "setup_env.sh: unknown kind '$kind' (runtime|test|multigpu)" >&2; exit 2 ;;
esac
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($py --version)"
  "$py" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
stamp=".venv/.taco-stamp-$kind"
want="$(cat requirements*.txt | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # Prefer a CPU build that lies on this machine's disk (no multi-GB CUDA download on CPU boxes).
  pyver="$(.venv/bin/python -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  local_whl="$(ls /opt/wheels/torch-*+cpu-"$pyver"-*.whl 2>/dev/null | sort -V | tail -n1 || true)"
  if [ -n "$local_whl" ]; then
    echo "[setup] installing torch from $local_whl"
    .venv/bin/python -m pip install -q "$local_whl"
  else
    echo "[setup] installing torch from PyPI"
    .venv/bin/python -m pip install -q "torch>=2.4"
  fi
fi
echo "[setup] installing $req"
.venv/bin/python -m pip install -q -r "$req" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
.venv/bin/python -m pip install -q --no-deps open-clip-torch  # CLIP's BPE vocab file; its torchvision dep breaks our torch
if [ "$kind" = multigpu ] && [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
  # cuDNN's frontend for wave_attention, without the CuTe DSL it lists (~100 MB, for Python engines we do not use;
  # the frontend was measured without it): see requirements_taco_dit.txt
  .venv/bin/python -m pip install -q --no-deps "nvidia-cudnn-frontend>=1.32,<2" || echo "[setup] nvidia-cudnn-frontend not installed"
fi
.venv/bin/python -c "import torch, aiohttp, safetensors, transformers" 
echo "$want" > "$stamp"
