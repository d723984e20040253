#!/usr/bin/env bash
# Starts TACO-DiT. First run installs everything into .venv.
#   bash run.sh [ComfyUI flags]              one process (GPU, or --cpu)
#   bash run.sh --nproc N [flags]            N ranks on this host under torchrun (one GPU each)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
nproc=1
if [ "${1:-}" = "--nproc" ]; then nproc="$2"; shift 2; fi
if [ "$nproc" -gt 1 ] && command -v nvidia-smi >/dev/null 2>&1; then
  bash scripts/setup_env.sh multigpu
else
  bash scripts/setup_env.sh runtime
fi
if [ "$nproc" -gt 1 ]; then
  exec .venv/bin/python -m torch.distributed.run --standalone --nproc_per_node="$nproc" main.py "$@"
fi
exec .venv/bin/python main.py "$@"
