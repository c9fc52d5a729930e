"""The incidents: each breaks the incident cluster one way, shows the symptom a user would see,
reads its own cause back to tell whether it is fixed, and says what would have found it fastest
and how it is fixed.

Every incident is a class with:

    symptom        what `start` prints: only what a user would see
    files          what the learner gets in the incident's folder besides hostfile and launch.sh
    break_it(ctx)  breaks the cluster (or the learner's files) one way
    restored(ctx, output)  reads the cause back: (True, what was seen) once it is fixed where it
                   lives; ``output`` is what the job printed
    fastest        the command that finds the cause, and what it says
    cause, fix     what `give-up` explains
    reference_fix(ctx)  what a learner who found it does (the tests run it)

``ctx`` (runner.Context) holds the cluster, the folder and ``in_node`` (a command run inside a
node, as ``dtlab cluster exec`` runs it).
"""
from __future__ import annotations

import re
from pathlib import Path

# The cluster every incident runs on: two nodes, inc2 named like a cloud VM's interface (ens5),
# inc2 a container-like node with Docker's 64 MiB /dev/shm, 100 Mbit/s links.
CLUSTER = dict(name="inc", subnet="10.81.0.0/24", nodes=2, ifnames=("eth0", "ens5"),
               shm={"inc2": "64m"}, rate="100mbit")
MASTER = "10.81.0.11"   # inc1's address: where the ranks meet
PORT = 29500

# The team's job: DeepSpeed ZeRO-1 on the toy model, one rank a node. {deepspeed} and {python}
# are filled with this installation's programs (quoted).
DEEPSPEED_JOB = """#!/usr/bin/env bash
# Our training job: DeepSpeed ZeRO-1 on the toy model, one rank on each host of ./hostfile.
set -euo pipefail
cd "$(dirname "$0")"
MASTER_ADDR={master}
MASTER_PORT={port}
export OMP_NUM_THREADS=1
exec {deepspeed} --hostfile hostfile --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \\
  {program} --steps 4 --out run --timeout 10
"""
ZERO1 = "--module labs.deepspeed_zero --config ds_zero1"


class Incident:
    name = ""
    title = ""
    symptom = ""
    tools = ""
    files: dict = {}
    program = ZERO1
    hosts = ("inc1", "inc2")   # where the job's ranks run: the original world

    def job(self) -> str:
        return DEEPSPEED_JOB.replace("{program}", self.program)

    def break_it(self, ctx) -> None:
        """Break the cluster; nothing to do where the learner's files carry the fault."""

    def restored(self, ctx, output: str) -> tuple[bool, str]:
        raise NotImplementedError

    def reference_fix(self, ctx) -> None:
        raise NotImplementedError


class WrongInterface(Incident):
    name = "wrong-interface"
    title = "a socket interface in .deepspeed_env that one node lacks"
    symptom = ("DeepSpeed dies on one node a few seconds after the launch, and the other node "
               "waits until its timeout. It ran last week on the old machines.")
    tools = "dtlab doctor --hostfile hostfile; dtlab cluster status --name inc"
    files = {".deepspeed_env": "GLOO_SOCKET_IFNAME=eth0\n"}
    fastest = ("dtlab doctor --hostfile hostfile: its interfaces check says "
               "GLOO_SOCKET_IFNAME=eth0 (from .deepspeed_env) names no interface of inc2")
    cause = ("./.deepspeed_env sets GLOO_SOCKET_IFNAME=eth0, and DeepSpeed exports it to every "
             "node. inc2's interface is ens5 (as on many cloud VMs), so gloo on inc2 finds no "
             "device named eth0 and its rank dies; inc1 waits for it until the timeout.")
    fix = ("Remove the line (gloo then takes the address the node's host name resolves to), or "
           "name an interface every node has. Run `bash launch.sh` again.")

    def restored(self, ctx, output):
        from dtlab.doctor.diagnose import matching_interfaces
        env = ctx.deepspeed_env()
        for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            if var not in env:
                continue
            for node in ctx.nodes():
                names = ctx.interfaces(node)
                if not matching_interfaces(var, env[var], names):
                    return False, (f"{var}={env[var]} (.deepspeed_env) names no interface of "
                                   f"{node.name} ({', '.join(sorted(names))})")
        set_ = [f"{k}={env[k]}" for k in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if k in env]
        return True, ("the interface variables match an interface on every node: "
                      + ", ".join(set_) if set_ else "no interface variable is exported; gloo "
                      "takes each node's own address")

    def reference_fix(self, ctx):
        (ctx.work / ".deepspeed_env").unlink()


class EphemeralFirewall(Incident):
    name = "ephemeral-firewall"
    title = "a firewall on the first node dropping connections to its ephemeral ports"
    symptom = ("The job hangs at start: both nodes launch, DeepSpeed prints its banner, no step "
               "is ever printed, and it ends with a timeout. ssh to both nodes works, and the "
               "master port is open.")
    tools = "dtlab doctor --hostfile hostfile; dtlab cluster exec NODE -- nft list ruleset"
    fastest = ("dtlab doctor --hostfile hostfile: its ports check says inc2 cannot connect to "
               "inc1's ephemeral ports (32768-60999), where gloo's pairs listen")
    cause = ("inc1 has an nftables rule dropping new TCP connections to ports 32768-60999 (a "
             "hardening script's). The rendezvous on port 29500 works, but every gloo pair "
             "listens on an ephemeral port, so inc2 never connects to rank 0 and both wait.")
    fix = ("Remove the rule on inc1 (dtlab cluster exec --name inc inc1 -- nft delete table inet "
           "dtlab), or allow the ports between the nodes. Run `bash launch.sh` again.")

    def break_it(self, ctx):
        from dtlab.cluster import netns
        netns.firewall(ctx.cluster.name, "inc1", "32768-60999")

    def restored(self, ctx, output):
        for node in ctx.nodes():
            rules = ctx.in_node(node, ["nft", "list", "ruleset"]).stdout
            if re.search(r"\b(drop|reject)\b", rules):
                return False, f"{node.name} still drops or rejects connections (nft list ruleset)"
        return True, "no node drops or rejects TCP connections (nft list ruleset on each)"

    def reference_fix(self, ctx):
        ctx.in_node(ctx.cluster.find("inc1"), ["nft", "delete", "table", "inet", "dtlab"])


def _tbf_rates(text: str) -> list[float]:
    """bits/s of every tbf in `tc qdisc show` output."""
    unit = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}
    return [float(v) * unit[u] for v, u in re.findall(r"tbf .*?rate (\d+(?:\.\d+)?)([KMG]?)bit",
                                                      text)]


class SlowLink(Incident):
    name = "slow-link"
    title = "one node's link throttled to a tenth: a straggler"
    symptom = ("Every step takes several times longer than it did yesterday. Nothing fails, "
               "no error is printed, the loss is as before.")
    tools = "dtlab doctor --hostfile hostfile; dtlab bench comm; dtlab profile"
    fastest = ("dtlab doctor --hostfile hostfile: its straggler preflight times every node's "
               "link and names inc2, about ten times slower than the median of the others")
    cause = ("inc2's link is shaped to 10 Mbit/s (a tenth of the others' 100 Mbit/s: a bad "
             "cable, a port that negotiated down). Every all-reduce waits for the slowest link, "
             "so the whole job runs at inc2's speed.")
    fix = ("Give inc2's link its rate back on both ends (the root namespace's veth and the "
           "node's interface): tc qdisc replace dev <dev> root tbf rate 100mbit burst 128k "
           "latency 50ms. Run `bash launch.sh` again.")

    def break_it(self, ctx):
        from dtlab.cluster import netns
        netns._shape(ctx.cluster, ctx.cluster.find("inc2"), "10mbit")

    def restored(self, ctx, output):
        want = 100e6
        for node in ctx.nodes():
            for text in ctx.link_qdiscs(node):
                rates = _tbf_rates(text)
                if not rates or min(rates) < want * 0.99:
                    return False, f"{node.name}'s link is still slower than the others'"
        return True, "every node's link carries 100 Mbit/s both ways (tc qdisc show)"

    def reference_fix(self, ctx):
        from dtlab.cluster import netns
        netns._shape(ctx.cluster, ctx.cluster.find("inc2"), CLUSTER["rate"])


TRAIN_PY = '''"""Our training script: DDP (labs/ddp.py, the own implementation) on the toy model, plus a
line of logging added last week: the mean gradient norm over the ranks, printed by rank 0."""
import sys

import torch
import torch.distributed as dist

from dtlab import registry
from dtlab.harness import run_lab
from labs import ddp


class LoggedDDP(ddp.OwnDDP):
    def after_backward(self):
        super().after_backward()
        if self.rt.rank == 0:  # only rank 0 prints
            norm = torch.cat([p.grad.flatten() for p in self.model.parameters()]).norm()
            dist.all_reduce(norm)
            print(f"step {self.current_step}: mean gradient norm "
                  f"{norm.item() / self.rt.world_size:.4f}", flush=True)


def make_strategy(rt, settings, args):
    return LoggedDDP(rt, settings, args.bucket_mb)


if __name__ == "__main__":
    sys.exit(run_lab(registry.get("ddp"), ddp.make_parser(), make_strategy,
                     check_args=ddp.check_args))
'''
TRAIN_BUG = '''        if self.rt.rank == 0:  # only rank 0 prints
            norm = torch.cat([p.grad.flatten() for p in self.model.parameters()]).norm()
            dist.all_reduce(norm)
            print('''
TRAIN_FIXED = '''        norm = torch.cat([p.grad.flatten() for p in self.model.parameters()]).norm()
        dist.all_reduce(norm)  # every rank: a collective all of them issue
        if self.rt.rank == 0:  # only rank 0 prints
            print('''


class RankBranch(Incident):
    name = "rank-branch"
    title = "a collective inside `if rank == 0:` in the training script"
    symptom = ("Since last week's change to train.py the job no longer finishes: it stops in its "
               "first step and ends with a timeout or a gloo error.")
    tools = "dtlab debug hang run; run/flight/; dtlab doctor --hostfile hostfile"
    files = {"train.py": TRAIN_PY}
    program = "--no_local_rank train.py"
    fastest = ("dtlab debug hang run (the flight records the ranks left): op #1 of group "
               "world was issued from different lines, rank 0's from train.py, rank 1's from "
               "the loop's loss average")
    cause = ("train.py's LoggedDDP.after_backward calls dist.all_reduce inside `if "
             "self.rt.rank == 0:`. Rank 0 issues one more collective than rank 1, so the ranks' "
             "collectives pair up wrongly (rank 1's loss average meets rank 0's norm) and the "
             "job waits forever for a partner.")
    fix = ("Let every rank compute the norm and all-reduce it, and only print under `if "
           "rank == 0`. Run `bash launch.sh` again.")

    def job(self) -> str:
        return super().job().replace("--steps 4", "--impl own --steps 4")

    def restored(self, ctx, output):
        from dtlab.reliability import flight
        run = ctx.work / "run"
        dumps = flight.postmortem(run)
        if len(dumps) < 2:
            return False, "the run left no flight records of both ranks to compare"
        rep = flight.desync_report(dumps, len(dumps))
        if rep.get("mismatches") or rep.get("behind"):
            return False, "the ranks still issue different collectives"
        counts = sorted({len(d["entries"]) for d in dumps.values()})
        return True, (f"every rank issued the same collectives in the same order (flight "
                      f"records of ranks {', '.join(map(str, sorted(dumps)))}: {counts[0]} ops)")

    def reference_fix(self, ctx):
        f = ctx.work / "train.py"
        f.write_text(f.read_text().replace(TRAIN_BUG, TRAIN_FIXED))


SHM_JOB = """#!/usr/bin/env bash
# Our training job: DDP on the toy model, two ranks on each node: shared memory between the ranks
# of a node, a ring between the nodes (the hierarchical all-reduce).
set -euo pipefail
cd "$(dirname "$0")"
export OMP_NUM_THREADS=1
exec {python} -m dtlab run ddp --cluster inc --nnodes 2 --nproc 2 --impl own --allreduce hier \\
  --steps 4 --out run --timeout 10
"""
STALE = "/dev/shm/torch_4242_1873625981_0"   # what a crashed job's ranks left
SHM_NEED = 32 * 2**20


class FullShm(Incident):
    name = "shm-full"
    title = "/dev/shm on one node filled by a crashed job's segments"
    symptom = ("The job dies at its first step: the two ranks on one node never reach the "
               "training loop, the other node reports a lost connection. It ran yesterday, "
               "before last night's crash.")
    tools = ("dtlab doctor --hostfile hostfile; dtlab cluster exec --name inc NODE -- df -h "
             "/dev/shm")
    fastest = ("dtlab doctor --hostfile hostfile: its shm check says inc2's /dev/shm has "
               "(almost) no space free")
    cause = ("inc2 is a container-like node with Docker's 64 MiB /dev/shm, and a job that "
             "crashed last night left a 64 MiB segment there (torch_4242_...). The hierarchical "
             "all-reduce maps its buckets in /dev/shm; on inc2 the first touch of a page past "
             "the full tmpfs kills the ranks with SIGBUS.")
    fix = ("Remove the stale segment (dtlab cluster exec --name inc inc2 -- rm "
           f"{STALE}) after making sure no job uses it, or give the node a larger /dev/shm. Run "
           "`bash launch.sh` again.")

    hosts = ("inc1", "inc1", "inc2", "inc2")

    def job(self) -> str:
        return SHM_JOB

    def break_it(self, ctx):
        node = ctx.cluster.find("inc2")
        fill = f"head -c $((64 * 1024 * 1024 - 16 * 1024)) /dev/zero > {STALE}"
        ctx.must(node, ["sh", "-c", fill])

    def restored(self, ctx, output):
        for node in ctx.nodes():
            p = ctx.in_node(node, ["df", "-B1", "--output=size,avail", "/dev/shm"])
            size, free = (int(t) for t in p.stdout.split()[-2:])
            if free < SHM_NEED:
                return False, f"{node.name}'s /dev/shm is still too full"
        return True, "every node's /dev/shm has at least 32 MiB free (df /dev/shm on each)"

    def reference_fix(self, ctx):
        ctx.in_node(ctx.cluster.find("inc2"), ["rm", "-f", STALE])


class UnreachableMaster(Incident):
    name = "unreachable-master"
    title = "a master address the other nodes cannot reach"
    symptom = ("The job hangs at start on the second node and ends with a timeout there; the "
               "first node starts its rank and waits. launch.sh was copied from the team's "
               "Docker setup.")
    tools = ("dtlab doctor --hostfile hostfile --master-addr ADDR; dtlab cluster exec --name inc "
             "inc1 -- ip -4 addr")
    fastest = ("dtlab doctor --hostfile hostfile --master-addr 172.17.0.1 (the address "
               "launch.sh gives): its master check says the address is on Docker's default "
               "bridge and inc2 cannot reach it")
    cause = ("launch.sh sets MASTER_ADDR=172.17.0.1, the address of inc1's docker0 bridge. It is "
             "an address of inc1, so rank 0 listens there, but it is private to that host: inc2 "
             "has no route to it and waits.")
    fix = ("Set MASTER_ADDR to inc1's address on the nodes' network (10.81.0.11, or the name "
           "inc1), or drop it and let DeepSpeed ask the first host. Run `bash launch.sh` again.")

    def job(self) -> str:
        return super().job().replace("MASTER_ADDR={master}", "MASTER_ADDR=172.17.0.1")

    def break_it(self, ctx):
        node = ctx.cluster.find("inc1")
        ctx.must(node, ["ip", "link", "add", "docker0", "type", "bridge"])  # as Docker makes it
        ctx.must(node, ["ip", "addr", "add", "172.17.0.1/16", "dev", "docker0"])
        ctx.must(node, ["ip", "link", "set", "docker0", "up"])

    def restored(self, ctx, output):
        used = re.findall(r"--master_addr=(\S+)", output)
        if not used:
            return False, "the job's output does not say which master address it used"
        addr = used[-1]
        ok = addr in (MASTER, "inc1")
        return ok, (f"the ranks met at {addr}, inc1's address on the nodes' network" if ok
                    else "the ranks still meet at an address not every node reaches")

    def reference_fix(self, ctx):
        f = ctx.work / "launch.sh"
        f.write_text(f.read_text().replace("MASTER_ADDR=172.17.0.1", f"MASTER_ADDR={MASTER}"))


INCIDENTS = {i.name: i for i in (WrongInterface(), EphemeralFirewall(), SlowLink(),
                                 RankBranch(), FullShm(), UnreachableMaster())}


def write_files(incident: Incident, work: Path, deepspeed: str, python: str) -> list[str]:
    """The learner's folder: hostfile, launch.sh and the incident's own files."""
    import shlex
    work.mkdir(parents=True, exist_ok=True)
    files = {"hostfile": "inc1 slots=1\ninc2 slots=1\n",
             "launch.sh": incident.job().replace("{deepspeed}", shlex.quote(deepspeed))
             .replace("{python}", shlex.quote(python)).replace("{master}", MASTER)
             .replace("{port}", str(PORT)), **incident.files}
    for name, text in files.items():
        (work / name).write_text(text)
    (work / "launch.sh").chmod(0o755)
    return sorted(files)
