#!/usr/bin/env bash
# Stop the local Slurm cluster that up.sh started: every daemon by its pid file, never by name,
# so nothing else on the machine is touched; munged only if up.sh started it (a munged that was
# already running serves others). Safe to run when nothing is up.
set -uo pipefail
RUN=/run/dtlab-slurm
MARK="# written by dtlab slurm/local/up.sh"
pids=()
files=("$RUN"/slurmd.n1.pid "$RUN"/slurmd.n2.pid "$RUN"/slurmctld.pid)
[[ -f "$RUN/munged.ours" ]] && files+=(/run/munge/munged.pid)
for f in "${files[@]}"; do
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
rm -f "$RUN/munged.ours"
# the n1/n2 names it added to /etc/hosts go too (written in place: /etc/hosts may be a mount)
if grep -q "$MARK" /etc/hosts 2>/dev/null; then
  kept="$(grep -v "$MARK" /etc/hosts)"; printf '%s\n' "$kept" > /etc/hosts
fi
echo "slurm cluster down (${#pids[@]} daemon(s) stopped)"
