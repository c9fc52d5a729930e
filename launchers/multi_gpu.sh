#!/usr/bin/env bash
# Run one lab on every GPU of this machine (one process per GPU) with torchrun, or on NPROC CPU
# processes (gloo) when there is no GPU.
#
#   launchers/multi_gpu.sh [LAB] [lab flags...]
#
# Variables:
#   LAB      lab to run when not given as the first argument (default: ddp)
#   NPROC    processes (default: the number of GPUs nvidia-smi lists, or 2 without GPUs)
#   PYTHON   the Python with dtlab installed (default: .venv/bin/python if present, else python3)
set -euo pipefail
source "$(dirname "$0")/common.sh"
dtlab_resolve_lab ddp "$@"
[[ $shift_args -eq 1 ]] && shift
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$( (command -v nvidia-smi >/dev/null && nvidia-smi -L 2>/dev/null | grep -c '^GPU') || true)
  [[ "${NPROC:-0}" -ge 1 ]] || NPROC=2
fi
if [[ ! "$NPROC" =~ ^[1-9][0-9]*$ ]]; then
  echo "multi_gpu.sh: NPROC must be a positive integer, got '$NPROC'" >&2; exit 2
fi
# Share the cores between ranks instead of letting each start a full thread pool.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}"
cd "$here"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m "labs.$lab" "$@"
