#!/usr/bin/env bash
# Bring up a real two-node Slurm cluster on this one host, for the `slurm` tests and to practise:
# nodes n1 and n2 are two slurmd daemons on 127.0.0.1 (ports 17001, 17002) under one slurmctld.
#
#   sudo slurm/local/up.sh        # installs Debian's slurm + munge if missing, starts, waits idle
#   slurm/local/down.sh           # stops the daemons by their pid files
#
# Variables:
#   DTLAB_SLURM_CPUS   CPUs each node declares (default 2: enough for 2 tasks a node)
#   DTLAB_SLURM_WAIT   seconds to wait for both nodes to go idle (default 60)
# Needs root (daemons, /etc/slurm, /etc/hosts). Written for Debian 12 (slurm-wlm 22.05).
set -euo pipefail
CPUS="${DTLAB_SLURM_CPUS:-2}"
WAIT="${DTLAB_SLURM_WAIT:-60}"
RUN=/run/dtlab-slurm
LOG=/var/log/dtlab-slurm
CONF=/etc/slurm/slurm.conf
MARK="# written by dtlab slurm/local/up.sh"

die() { echo "slurm/local/up.sh: $*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "needs root (it starts daemons and edits /etc/hosts); run it with sudo"
[[ "$CPUS" =~ ^[1-9][0-9]*$ ]] || die "DTLAB_SLURM_CPUS must be a positive integer, got '$CPUS'"
[[ "$WAIT" =~ ^[1-9][0-9]*$ ]] || die "DTLAB_SLURM_WAIT must be a positive integer, got '$WAIT'"

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || \
   ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  echo "installing slurmctld slurmd slurm-client munge (Debian packages)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    slurmctld slurmd slurm-client munge >/dev/null || die "apt-get install failed"
fi

# Torchrun's c10d rendezvous connects to the first node by name: n1 and n2 must resolve, to
# this machine. A real host of that name would get the jobs' traffic: refuse, do not take it.
for n in n1 n2; do
  addr="$(getent hosts "$n" | awk '{print $1; exit}' || true)"
  if [[ -z "$addr" ]]; then
    echo "127.0.0.1 $n   $MARK" >> /etc/hosts
  elif [[ "$addr" != "127.0.0.1" ]] && ! grep -q "^127.0.0.1 $n   $MARK" /etc/hosts; then
    die "the host name $n already resolves to $addr here (a real host?); the local cluster \
needs n1 and n2 for itself: remove that entry or bring the cluster up on another machine"
  fi
done

if [[ -f "$CONF" ]] && ! grep -q "^$MARK" "$CONF"; then
  die "$CONF exists and was not written by this script; move it away first"
fi
mkdir -p "$RUN" "$LOG" /var/spool/dtlab-slurmctld /var/spool/slurmd.n1 /var/spool/slurmd.n2
cat > "$CONF" <<CONF
$MARK
ClusterName=dtlab
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=16817
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/dtlab-slurmctld
SlurmdSpoolDir=/var/spool/slurmd.%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=n1 NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=30 State=UP OverSubscribe=FORCE
CONF

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# munge: its key comes with the package; the daemon runs as user munge.
install -d -o munge -g munge -m 0755 /run/munge
if ! alive /run/munge/munged.pid; then
  runuser -u munge -- /usr/sbin/munged || die "munged did not start"
  touch "$RUN/munged.ours"   # down.sh stops munged only when this script started it
fi
alive "$RUN/slurmctld.pid" || /usr/sbin/slurmctld -f "$CONF" || die "slurmctld did not start (see $LOG/slurmctld.log)"
for n in n1 n2; do
  alive "$RUN/slurmd.$n.pid" || /usr/sbin/slurmd -f "$CONF" -N "$n" || die "slurmd -N $n did not start (see $LOG/slurmd.$n.log)"
done

deadline=$((SECONDS + WAIT))
until [[ "$(sinfo -h -N -o '%N %T' 2>/dev/null | awk '$2 == "idle"' | wc -l)" -eq 2 ]]; do
  if (( SECONDS >= deadline )); then
    sinfo -N >&2 || true
    die "nodes n1, n2 not idle after $WAIT s; logs in $LOG"
  fi
  sleep 0.5
done
echo "slurm cluster up: nodes n1 n2 idle (config $CONF, logs $LOG)"
