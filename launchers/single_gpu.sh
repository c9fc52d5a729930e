#!/usr/bin/env bash
# Run one lab on one device: one GPU when CUDA is present, else the CPU.
#
#   launchers/single_gpu.sh [LAB] [lab flags...]
#
# Variables:
#   LAB      lab to run when not given as the first argument (default: baseline)
#   GPU      which GPU to use (sets CUDA_VISIBLE_DEVICES; default: the first)
#   PYTHON   the Python with dtlab installed (default: .venv/bin/python if present, else python3)
set -euo pipefail
source "$(dirname "$0")/common.sh"
dtlab_resolve_lab baseline "$@"
[[ $shift_args -eq 1 ]] && shift
[[ -n "${GPU:-}" ]] && export CUDA_VISIBLE_DEVICES="$GPU"
cd "$here"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 -m "labs.$lab" "$@"
