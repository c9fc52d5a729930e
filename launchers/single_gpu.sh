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
here="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$([ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3)}"
lab="${LAB:-baseline}"
if [[ $# -gt 0 && "$1" != -* ]]; then lab="$1"; shift; fi
if [[ ! "$lab" =~ ^[a-z_0-9]+$ ]] || [[ ! -f "$here/labs/$lab.py" ]]; then
  echo "single_gpu.sh: unknown lab '$lab'; see 'dtlab list'" >&2; exit 2
fi
[[ -n "${GPU:-}" ]] && export CUDA_VISIBLE_DEVICES="$GPU"
cd "$here"
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node=1 -m "labs.$lab" "$@"
