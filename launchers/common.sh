# Sourced by the launchers: find the repository, its Python, and the lab to run.
# After `dtlab_resolve_lab DEFAULT "$@"`, $lab holds the lab and $shift_args says whether the
# first argument was the lab's name (the caller then runs `shift`).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$([ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3)}"
# A bare name (python3, or an activated virtual environment's python) becomes its full path, so
# the deepspeed and accelerate launchers are found beside the interpreter that has dtlab.
if [[ "$PYTHON" != */* ]]; then
  resolved="$(command -v "$PYTHON" || true)"
  [[ -n "$resolved" ]] || { echo "$(basename "$0"): PYTHON '$PYTHON' not found" >&2; exit 2; }
  PYTHON="$resolved"
fi

# Is $1 a lab? The registry says (`dtlab list --names`), not the files in labs/.
dtlab_is_lab() {
  [[ "$1" =~ ^[a-z_0-9]+$ ]] && (cd "$here" && "$PYTHON" -m dtlab list --names) | grep -x "$1" >/dev/null
}

dtlab_resolve_lab() {
  local default="$1"; shift
  lab="${LAB:-$default}"; shift_args=0
  if [[ $# -gt 0 && "$1" != -* ]]; then lab="$1"; shift_args=1; fi
  if ! dtlab_is_lab "$lab"; then
    echo "$(basename "$0"): unknown lab '$lab'; see 'dtlab list'" >&2; exit 2
  fi
}
