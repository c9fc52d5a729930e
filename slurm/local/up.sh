#!/usr/bin/env bash
# Bring up a real two-node Slurm cluster on this one host, for the `slurm` and `cluster` tests
# and to practise: nodes n1 and n2 are network namespaces (addresses 10.77.0.11, 10.77.0.12 on a
# bridge, host names n1, n2, an sshd each) with one slurmd inside each, under one slurmctld on
# the bridge's address (docs/cluster.md, docs/slurm.md).
#
#   sudo slurm/local/up.sh [dtlab cluster up flags, e.g. --inter-node 1gbit]
#   sudo slurm/local/down.sh
#
# Installs Debian's slurm, munge, openssh-server and nftables (`dtlab cluster firewall`) if missing. Needs root.
set -euo pipefail
die() { echo "slurm/local/up.sh: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "needs root (namespaces, daemons, /etc/hosts); run it with sudo"
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || \
   ! command -v sbatch >/dev/null || ! command -v munged >/dev/null || [[ ! -x /usr/sbin/sshd ]] || \
   ! command -v nft >/dev/null; then
  echo "installing slurmctld slurmd slurm-client munge openssh-server nftables (Debian packages)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client munge openssh-server openssh-client nftables >/dev/null \
    || die "apt-get install failed"
fi
root="$(cd "$(dirname "$0")/../.." && pwd)"
# The cluster needs the standard library only: any python3 runs it, before .venv exists.
cd "$root" && exec python3 -m dtlab cluster up --nodes 2 --slurm "$@"
