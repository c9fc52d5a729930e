#!/usr/bin/env bash
# Two ssh "hosts" on this machine for the doctor tests and the DeepSpeed multi-host launch:
# dthost1 (127.0.0.2) and dthost2 (127.0.0.3), served by one sshd listening on both loopback
# addresses, reachable as root with a key and known host keys, like a small cluster with
# passwordless ssh. dthost-down (127.0.0.4) resolves but nothing listens there.
#
#   sudo tests/hosts/up.sh      # installs openssh-server, openssh-client, pdsh if missing
#   tests/hosts/down.sh
set -euo pipefail
die() { echo "tests/hosts/up.sh: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "needs root (sshd, /etc/hosts)"
MARK="# dtlab test hosts"
RUN=/run/dtlab-sshd
if ! command -v sshd >/dev/null && [[ ! -x /usr/sbin/sshd ]] || ! command -v pdsh >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    openssh-server openssh-client pdsh >/dev/null || die "apt-get install failed"
fi
grep -q "dthost1" /etc/hosts || cat >> /etc/hosts <<HOSTS
127.0.0.2 dthost1   $MARK
127.0.0.3 dthost2   $MARK
127.0.0.4 dthost-down   $MARK
HOSTS
ssh-keygen -A >/dev/null
mkdir -p "$RUN" /run/sshd ~/.ssh && chmod 700 ~/.ssh
[[ -f ~/.ssh/id_ed25519 ]] || ssh-keygen -q -t ed25519 -N "" -f ~/.ssh/id_ed25519
touch ~/.ssh/authorized_keys && chmod 600 ~/.ssh/authorized_keys
grep -qF "$(cat ~/.ssh/id_ed25519.pub)" ~/.ssh/authorized_keys || cat ~/.ssh/id_ed25519.pub >> ~/.ssh/authorized_keys
cat > "$RUN/sshd_config" <<CONF
ListenAddress 127.0.0.2
ListenAddress 127.0.0.3
Port 22
PidFile $RUN/sshd.pid
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AcceptEnv LANG LC_*
Subsystem sftp internal-sftp
CONF
if ! { [[ -f "$RUN/sshd.pid" ]] && kill -0 "$(cat "$RUN/sshd.pid")" 2>/dev/null; }; then
  /usr/sbin/sshd -f "$RUN/sshd_config" || die "sshd did not start"
fi
for _ in $(seq 1 50); do
  ssh-keyscan -T 2 127.0.0.2 >/dev/null 2>&1 && break; sleep 0.1
done
touch ~/.ssh/known_hosts
for h in dthost1 dthost2 127.0.0.2 127.0.0.3; do
  ssh-keygen -R "$h" >/dev/null 2>&1 || true
  ssh-keyscan -T 5 "$h" 2>/dev/null >> ~/.ssh/known_hosts
done
for h in dthost1 dthost2; do
  ssh -o BatchMode=yes -o ConnectTimeout=5 "$h" true || die "ssh $h does not work"
done
echo "test hosts up: dthost1 (127.0.0.2), dthost2 (127.0.0.3) over ssh; pdsh $(command -v pdsh)"
