#!/usr/bin/env bash
# Stop the local Slurm cluster that up.sh started: every daemon by its pid file, never by name,
# so nothing else on the machine is touched. Safe to run when nothing is up.
set -uo pipefail
RUN=/run/dtlab-slurm
pids=()
for f in "$RUN"/slurmd.n1.pid "$RUN"/slurmd.n2.pid "$RUN"/slurmctld.pid /run/munge/munged.pid; do
  [[ -f "$f" ]] || continue
  pid="$(cat "$f")"
  if kill -0 "$pid" 2>/dev/null; then kill "$pid" && pids+=("$pid"); fi
done
for _ in $(seq 1 50); do           # up to 10 s for them to exit
  left=0
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && left=1; done
  (( left )) || break
  sleep 0.2
done
for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && kill -9 "$pid"; done
echo "slurm cluster down (${#pids[@]} daemon(s) stopped)"
