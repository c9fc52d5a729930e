#!/usr/bin/env bash
# Run a lab through `accelerate launch` with one of launchers/configs/accelerate_*.yaml.
#
#   launchers/accelerate.sh CONFIG [lab flags...]
#   launchers/accelerate.sh multi_cpu --steps 20 --accum 2
#
# CONFIG: single | multi_cpu | multi_gpu | deepspeed | fsdp (or a path to a YAML file).
# Variables:
#   LAB      the lab to run (default: accelerate_lab)
#   NPROC    processes, overriding the config's num_processes
#   PYTHON   the Python with dtlab installed (default: .venv/bin/python if present, else python3)
# On a machine without CUDA only single and multi_cpu can run (accelerate 1.15 uses its DeepSpeed
# and FSDP plugins on accelerators only); multi_cpu exports ACCELERATE_USE_CPU=1 (docs/launch.md).
set -euo pipefail
source "$(dirname "$0")/common.sh"
usage="usage: launchers/accelerate.sh single|multi_cpu|multi_gpu|deepspeed|fsdp|FILE.yaml [lab flags]"
[[ $# -ge 1 ]] || { echo "$usage" >&2; exit 2; }
config="$1"; shift
case "$config" in
  single|multi_cpu|multi_gpu|deepspeed|fsdp) file="$here/launchers/configs/accelerate_$config.yaml" ;;
  *.yaml|*.yml) file="$config" ;;
  *) echo "accelerate.sh: unknown config '$config'; $usage" >&2; exit 2 ;;
esac
[[ -f "$file" ]] || { echo "accelerate.sh: config file '$file' not found" >&2; exit 2; }
file="$(realpath "$file")"   # resolved here: the launch runs from the repository root
LAB="${LAB:-accelerate_lab}"
dtlab_resolve_lab accelerate_lab
(cd "$here" && "$PYTHON" -m dtlab.doctor.config_check accelerate "$file") || exit 2
accelerate="$(dirname "$PYTHON")/accelerate"
[[ -x "$accelerate" ]] || { echo "accelerate.sh: no accelerate next to $PYTHON; pip install -c \
constraints.txt -e '.[accelerate]'" >&2; exit 2; }
has_cuda="$("$PYTHON" -c 'import torch; print(int(torch.cuda.is_available()))')"
if [[ "$has_cuda" == 0 ]]; then
  case "$config" in
    multi_gpu|deepspeed|fsdp)
      echo "accelerate.sh: config '$config' needs GPUs (none here); on the CPU use multi_cpu" >&2
      exit 2 ;;
  esac
  export ACCELERATE_USE_CPU=1   # the processes build a gloo group on the CPU
fi
extra=()
if [[ -n "${NPROC:-}" ]]; then
  [[ "$NPROC" =~ ^[1-9][0-9]*$ ]] || { echo "accelerate.sh: NPROC must be a positive integer, got '$NPROC'" >&2; exit 2; }
  extra+=(--num_processes "$NPROC")
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$here"
exec "$accelerate" launch --config_file "$file" "${extra[@]}" -m "labs.$lab" "$@"
