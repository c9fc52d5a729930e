# Sourced by the launchers: find the repository, its Python, and the lab to run.
# After `dtlab_resolve_lab DEFAULT "$@"`, $lab holds the lab and $shift_args says whether the
# first argument was the lab's name (the caller then runs `shift`).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$([ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3)}"

dtlab_resolve_lab() {
  local default="$1"; shift
  lab="${LAB:-$default}"; shift_args=0
  if [[ $# -gt 0 && "$1" != -* ]]; then lab="$1"; shift_args=1; fi
  if [[ ! "$lab" =~ ^[a-z_0-9]+$ ]] || [[ ! -f "$here/labs/$lab.py" ]]; then
    echo "$(basename "$0"): unknown lab '$lab'; see 'dtlab list'" >&2; exit 2
  fi
}
