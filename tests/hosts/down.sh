#!/usr/bin/env bash
# Stop the sshd that tests/hosts/up.sh started (by its pid file).
RUN=/run/dtlab-sshd
if [[ -f "$RUN/sshd.pid" ]] && kill -0 "$(cat "$RUN/sshd.pid")" 2>/dev/null; then
  kill "$(cat "$RUN/sshd.pid")" && echo "test hosts down"
fi
