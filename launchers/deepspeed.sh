#!/usr/bin/env bash
# Run a lab with DeepSpeed's own launcher (`deepspeed`), on this machine or on the hosts of a
# hostfile. The lab must accept --local_rank (deepspeed_zero does).
#
#   launchers/deepspeed.sh [LAB] [lab flags...]
#   NUM_GPUS=2 launchers/deepspeed.sh deepspeed_zero --config ds_zero3
#   HOSTFILE=hosts INCLUDE='node1:0,1@node2' launchers/deepspeed.sh deepspeed_zero
#   HOSTFILE=hosts NO_SSH=1 NODE_RANK=1 MASTER_ADDR=node1 launchers/deepspeed.sh deepspeed_zero
#
# Variables:
#   LAB          lab to run when not given as the first argument (default: deepspeed_zero)
#   NUM_GPUS     processes on this machine when there is no hostfile (default: 2)
#   HOSTFILE     `host slots=N` lines (check it first: dtlab doctor --hostfile F); with it the lab
#                flags must be plain words (letters, digits, _ @ % + = : , . / -): DeepSpeed
#                writes them unquoted into the command pdsh runs on every node
#   INCLUDE      hosts/slots to use, NAME[:SLOT[,SLOT]][@NAME...]  (not with EXCLUDE)
#   EXCLUDE      hosts/slots to leave out, same syntax
#   NO_SSH=1     per-node mode: run this script on every node yourself (or through srun) with
#                NODE_RANK (this node's index in the hostfile) and MASTER_ADDR (the first host)
#   NO_SSH_CHECK=1  skip DeepSpeed's passwordless-ssh test of the first host (with a hostfile
#                DeepSpeed runs `ssh HOST hostname` first, even for localhost)
#   MASTER_ADDR  address of the first host (default: DeepSpeed asks it over ssh, `hostname -I`)
#   MASTER_PORT  rendezvous port (default 29500)
#   PYTHON       the Python with dtlab installed (default: .venv/bin/python if present)
set -euo pipefail
source "$(dirname "$0")/common.sh"
dtlab_resolve_lab deepspeed_zero "$@"
[[ $shift_args -eq 1 ]] && shift
die() { echo "deepspeed.sh: $*" >&2; exit 2; }
deepspeed="$(dirname "$PYTHON")/deepspeed"
[[ -x "$deepspeed" ]] || die "no deepspeed launcher next to $PYTHON; pip install -c constraints.txt -e '.[deepspeed]'"
args=(--master_port "${MASTER_PORT:-29500}")
[[ "${MASTER_PORT:-29500}" =~ ^[0-9]+$ ]] || die "MASTER_PORT must be a number, got '$MASTER_PORT'"
[[ -n "${INCLUDE:-}" && -n "${EXCLUDE:-}" ]] && die "INCLUDE and EXCLUDE cannot be used together (DeepSpeed refuses both)"
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || die "HOSTFILE '$HOSTFILE' not found (DeepSpeed would silently run on this machine only)"
  HOSTFILE="$(realpath "$HOSTFILE")"   # resolved here: the launch runs from the repository root
  args+=(--hostfile "$HOSTFILE")
  [[ -n "${INCLUDE:-}" ]] && args+=(--include "$INCLUDE")
  [[ -n "${EXCLUDE:-}" ]] && args+=(--exclude "$EXCLUDE")
else
  [[ -n "${INCLUDE:-}${EXCLUDE:-}" ]] && die "INCLUDE/EXCLUDE need a HOSTFILE"
  [[ "${NUM_GPUS:-2}" =~ ^[1-9][0-9]*$ ]] || die "NUM_GPUS must be a positive integer, got '${NUM_GPUS}'"
  args+=(--num_gpus "${NUM_GPUS:-2}")
fi
if [[ "${NO_SSH:-0}" == 1 ]]; then
  [[ -n "${HOSTFILE:-}" ]] || die "NO_SSH=1 needs a HOSTFILE listing every node"
  [[ "${NODE_RANK:-}" =~ ^[0-9]+$ ]] || die "NO_SSH=1 needs NODE_RANK (this node's line in the hostfile, from 0)"
  [[ -n "${MASTER_ADDR:-}" ]] || die "NO_SSH=1 needs MASTER_ADDR (the first host of the hostfile)"
  args+=(--no_ssh --node_rank "$NODE_RANK")
fi
# Every name DeepSpeed will hand to ssh or pdsh is checked first, with the doctor's parser: a
# host like `-oProxyCommand=...` would otherwise run a command through DeepSpeed's own ssh test.
check=(--include "${INCLUDE:-}" --exclude "${EXCLUDE:-}" --master-addr "${MASTER_ADDR:-}")
[[ -n "${HOSTFILE:-}" ]] && check+=(--hostfile "$HOSTFILE")
# With a hostfile (and ssh) DeepSpeed writes `cd <folder>; <python> ... <lab flags>` into the
# one command string pdsh hands every node's shell, unquoted: `--out 'x;id'` would run `id`.
if [[ -n "${HOSTFILE:-}" && "${NO_SSH:-0}" != 1 ]]; then
  check+=(--cwd "$here" --python "$PYTHON" -- "$@")
fi
(cd "$here" && "$PYTHON" -m dtlab.doctor.hostfile "${check[@]}") || exit 2
# Without it DeepSpeed asks the first host for its address over ssh (`ssh HOST hostname -I`).
[[ -n "${MASTER_ADDR:-}" ]] && args+=(--master_addr "$MASTER_ADDR")
[[ "${NO_SSH_CHECK:-0}" == 1 ]] && args+=(--no_ssh_check)
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
cd "$here"
exec "$deepspeed" "${args[@]}" --module "labs.$lab" "$@"
