"""The tiny job of ``dtlab doctor --collective``: every rank joins, all-reduces and broadcasts a
known tensor, checks the result and times an all-reduce; rank 0 says who got how far.

Started the way the real job will be (DeepSpeed's launcher over pdsh, or torchrun on every
node), it goes through the same steps as training and stops at the first that fails, with a
short timeout, reporting each rank's progress to the rendezvous store:

    store       the rank reached MASTER_ADDR:MASTER_PORT (else: a wrong address, a blocked port,
                a host that cannot route there)
    group       the process group formed (else: the ranks reach the master but not each other:
                the interface gloo/NCCL picked, or a blocked port range)
    collective  the all-reduce and the broadcast gave the right numbers
    bandwidth   an 8 MiB all-reduce, timed: bus bandwidth between the hosts

Rank 0 prints one line ``DTLAB-COLLECTIVE {json}`` with every rank's host, phase, error and the
bandwidth; a rank that cannot reach the store prints ``DTLAB-COLLECTIVE-RANK {json}`` itself.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import sys
import threading
import time

PHASES = ("started", "store", "group", "collective", "bandwidth")


def _say(tag: str, payload: dict) -> None:
    print(f"{tag} {json.dumps(payload)}", flush=True)


def bus_bandwidth(dist, torch, dev, world: int) -> dict:
    """An 8 MiB all-reduce, the median of three: bus bandwidth (ring model) between ranks."""
    buf = torch.ones(2 * 2**20, device=dev)  # 8 MiB of fp32
    dist.all_reduce(buf)
    times = []
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    t = sorted(times)[1]
    busbw = buf.numel() * 4 / t * 2 * (world - 1) / world / 1e9 if world > 1 else None
    return {"busbw_GBps": busbw, "allreduce_8MiB_s": t}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dtlab.doctor.collective_check")
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("--backend", default=None)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)  # DeepSpeed's launcher passes it
    a = p.parse_args(argv)
    t_start = time.time()
    import torch  # start-up: after the flags are read; rank 0's deadline counts this import
    import torch.distributed as dist
    env = os.environ
    rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1"))
    addr, port = env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500"))
    host = socket.gethostname()
    timeout = datetime.timedelta(seconds=a.timeout)
    me = {"rank": rank, "host": host, "phase": "started", "error": None}
    # torchrun's agent already serves a store on MASTER_PORT; DeepSpeed's launcher does not
    agent_store = env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    try:
        store = dist.TCPStore(addr, port, world, is_master=(rank == 0 and not agent_store),
                              timeout=timeout, wait_for_workers=False)
    except Exception as e:  # noqa: BLE001  (any failure here is the finding)
        me.update(error=f"cannot reach the rendezvous store {addr}:{port}: "
                        f"{str(e).strip().splitlines()[0][:200]}")
        _say("DTLAB-COLLECTIVE-RANK", me)
        return 1
    store = dist.PrefixStore("dtlab-collective", store)

    def phase(name: str, error: str | None = None, **extra) -> None:
        me.update(phase=name, error=error, **extra)
        store.set(f"rank/{rank}", json.dumps(me))

    phase("store")
    backend = a.backend or ("nccl" if torch.cuda.is_available() else "gloo")

    def steps() -> None:
        try:
            dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank,
                                    world_size=world, timeout=timeout)
            dist.barrier()
            phase("group")
            dev = torch.device(f"cuda:{int(env.get('LOCAL_RANK', 0))}") if backend == "nccl" \
                else torch.device("cpu")
            x = torch.full((1024,), float(rank + 1), device=dev)
            dist.all_reduce(x)
            want = world * (world + 1) / 2
            y = torch.full((1024,), 7.0 if rank == 0 else 0.0, device=dev)
            dist.broadcast(y, src=0)
            ok = bool((x == want).all()) and bool((y == 7.0).all())
            phase("collective", None if ok else f"wrong result: all_reduce gave {x[0].item()}, "
                  f"expected {want}; broadcast gave {y[0].item()}, expected 7")
            if ok:
                phase("bandwidth", **bus_bandwidth(dist, torch, dev, world))
        except Exception as e:  # noqa: BLE001
            phase(me["phase"], f"{type(e).__name__}: {str(e).strip().splitlines()[0][:240]}")

    # in a thread, so that a connection stuck past the timeout (dropped SYNs are retried for
    # minutes) still ends this rank's report on time
    worker = threading.Thread(target=steps, daemon=True)
    worker.start()
    worker.join(2 * a.timeout)
    if worker.is_alive():
        phase(me["phase"], f"no progress past phase {me['phase']!r} within {2 * a.timeout:g} s")
    if rank == 0:  # until every rank has had its own 2 x timeout, and a little more
        deadline = t_start + 2 * a.timeout + 5
        ranks = {}
        while time.time() < deadline:
            for r in range(world):
                if r not in ranks or ranks[r]["phase"] not in ("bandwidth",) and \
                        not ranks[r]["error"]:
                    try:
                        if store.check([f"rank/{r}"]):
                            ranks[r] = json.loads(store.get(f"rank/{r}"))
                    except Exception:  # noqa: BLE001
                        pass
            done = [r for r in ranks if ranks[r]["phase"] == "bandwidth" or ranks[r]["error"]]
            if len(done) == world:
                break
            time.sleep(0.2)
        _say("DTLAB-COLLECTIVE", {"world": world, "backend": backend, "master": f"{addr}:{port}",
                                  "ranks": [ranks.get(r, {"rank": r, "phase": None,
                                                          "error": "never reached the store"})
                                            for r in range(world)]})
        store.set("done", "1")
    else:  # stay until rank 0 has spoken: a launcher stops a node's ranks when one exits
        try:
            store.wait(["done"], datetime.timedelta(seconds=2 * a.timeout))
        except Exception:  # noqa: BLE001  (rank 0 is gone or never came)
            pass
    if not worker.is_alive():  # a group stuck in C++ is left to os._exit
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
    sys.stdout.flush()
    os._exit(0 if me["phase"] == "bandwidth" else 1)


if __name__ == "__main__":
    sys.exit(main())
