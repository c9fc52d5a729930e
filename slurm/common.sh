# Sourced by the sbatch scripts (from the repository, since Slurm runs a copy of the script).
# Sets: root, PYTHON, lab, head (first node of the allocation), MASTER_PORT, NPROC_PER_NODE,
# NNODES; shifts nothing: the caller passes "$@" on to the lab after its name.
dtlab_slurm_fail() { echo "$(basename "${SLURM_JOB_NAME:-sbatch}"): $*" >&2; exit 2; }

[[ -n "${SLURM_JOB_ID:-}" ]] || dtlab_slurm_fail "run this through sbatch (no SLURM_JOB_ID)"
root="${DTLAB_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
[[ -f "$root/dtlab/cli.py" ]] || dtlab_slurm_fail "no dtlab checkout at '$root'; submit from the \
repository root or set DTLAB_ROOT"
cd "$root"
PYTHON="${PYTHON:-$([ -x "$root/.venv/bin/python" ] && echo "$root/.venv/bin/python" || echo python3)}"
# A bare name (python3, or an activated virtual environment's python) becomes its full path, so
# the deepspeed and accelerate launchers are found beside the interpreter that has dtlab.
resolved="$(command -v "$PYTHON" || true)"
[[ -n "$resolved" ]] || dtlab_slurm_fail "PYTHON '$PYTHON' not found"
[[ "$PYTHON" == */* ]] || PYTHON="$resolved"
lab="${1:-}"
# The registry says which labs exist (`dtlab list --names`), not the files in labs/.
[[ "$lab" =~ ^[a-z_0-9]+$ ]] && "$PYTHON" -m dtlab list --names | grep -x "$lab" >/dev/null || \
  dtlab_slurm_fail "first argument must be a lab (see 'dtlab list'), got '$lab'"
NPROC_PER_NODE="${NPROC_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}"
[[ "$NPROC_PER_NODE" =~ ^[1-9][0-9]*$ ]] || dtlab_slurm_fail "NPROC_PER_NODE must be a positive \
integer, got '$NPROC_PER_NODE'"
NNODES="$SLURM_JOB_NUM_NODES"
# Node order = node rank: the first host of the allocation is rank 0's and the rendezvous point.
head="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
# The head's name goes to torchrun, DeepSpeed or accelerate as the rendezvous address: the
# doctor's parser checks it first, like every host name a launcher hands on.
"$PYTHON" -m dtlab.doctor.hostfile --master-addr "$head" || exit 2
# A port per job, so two jobs sharing a node do not collide.
MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
echo "dtlab on slurm: job $SLURM_JOB_ID, $NNODES node(s) [$(scontrol show hostnames \
"$SLURM_JOB_NODELIST" | paste -sd ' ')] x $NPROC_PER_NODE process(es), lab $lab, head $head:$MASTER_PORT"
