#!/usr/bin/env bash
# Stop the local cluster that up.sh started: its daemons (by their pid files, never by name;
# munged only if up.sh started it), namespaces, links and /etc/hosts lines. Safe to run when
# nothing is up.
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root" && python3 -m dtlab cluster down "$@"
