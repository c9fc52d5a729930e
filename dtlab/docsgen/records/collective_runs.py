"""Record the shared-memory and hierarchical all-reduces against gloo, and our DDP over shared
memory against torch's; draw and tabulate them.

    python -m dtlab.docsgen.records.collective_runs --json docs/reference/faster-collectives.json \\
        --img docs/img --docs docs

Three measurements, each by the project's own benchmark commands (one record, one date):
- ``dtlab bench comm --nproc 2,4`` on this host: gloo, our shared-memory all-reduce (copy and
  in place) and DeepSpeed's CPU shared-memory op, 4 KiB to 64 MiB;
- ``dtlab bench comm --nnodes 2 --nproc 2`` on the namespace cluster ``main`` (brought up by
  ``slurm/local/up.sh``) with its inter-node links shaped to 1gbit for the run and put back
  after: flat gloo, our flat ring and the hierarchical all-reduce;
- ``dtlab bench ddp --nproc 2 --preset small``: torch DDP, ours over the ring, the library and
  shared memory, and the no-communication floor.
Writes the tables between ``<!-- commexp:NAME -->`` markers in docs/communication.md and
docs/ddp.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from dtlab.launch import sessions
from dtlab.cluster.netns import Cluster
from dtlab.measure.run_record import atomic_write_text
from dtlab.report import records

SIZES = "4KiB,16KiB,64KiB,256KiB,1MiB,4MiB,16MiB,64MiB"
HOST = ["bench", "comm", "--nproc", "2,4", "--impl", "library,shm,shm-inplace,deepspeed-shm",
        "--sizes", SIZES, "--iters", "20"]
CROSS = ["bench", "comm", "--nnodes", "2", "--nproc", "2", "--cluster", "main", "--impl",
         "library,ring,hier", "--sizes", "4KiB,256KiB,4MiB,16MiB,64MiB", "--iters", "5",
         "--warmup", "1"]
RATE = "1gbit"
DDP = ["bench", "ddp", "--nproc", "2", "--preset", "small", "--steps", "30", "--repeats", "3"]
PAGES = ("communication.md", "ddp.md", "questions.md")


def dtlab(args: list[str], timeout: float = 1800) -> None:
    print("$ dtlab " + " ".join(args), flush=True)
    p = sessions.run([sys.executable, "-m", "dtlab", *args], timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"dtlab {' '.join(args)} failed (exit {p.returncode})")


def cluster_rate() -> str:
    return Cluster.load("main").rate or "unshaped"


PARTS = ("host", "cross", "ddp")


def measure(tmp: Path, parts) -> dict:
    R = {}
    if "host" in parts:
        dtlab([*HOST, "--json", str(tmp / "host.json")])
        R["host"] = {"command": "dtlab " + " ".join(HOST),
                     **json.loads((tmp / "host.json").read_text())}
    if "cross" in parts:
        before = cluster_rate()
        dtlab(["cluster", "up", "--nodes", "2", "--slurm", "--inter-node", RATE])
        try:
            dtlab([*CROSS, "--json", str(tmp / "cross.json")])
        finally:
            dtlab(["cluster", "up", "--nodes", "2", "--slurm", "--inter-node", before])
        R["cross"] = {"command": "dtlab " + " ".join(CROSS), "rate": RATE,
                      **json.loads((tmp / "cross.json").read_text())}
    if "ddp" in parts:
        dtlab([*DDP, "--out", str(tmp / "ddp")])
        R["ddp"] = {"command": "dtlab " + " ".join(DDP),
                    **json.loads((tmp / "ddp" / "summary.json").read_text())}
    return R


def _by(rows, **match):
    return {(r["world_size"], r["bytes"]): r for r in rows
            if all(r[k] == v for k, v in match.items())}


def _size(n: int) -> str:
    return f"{n // 2**20} MiB" if n >= 2**20 else f"{n // 2**10} KiB"


def _opt(command: str, flag: str) -> str:
    words = command.split()
    return words[words.index(flag) + 1]


def _fit(R: dict, part: str, impl: str, world: int) -> dict:
    return next(f for f in R[part]["alpha_beta"] if f["impl"] == impl and f["world_size"] == world)


def tables(R: dict) -> dict[str, str]:
    src = (f"record `docs/reference/faster-collectives.json` (`python -m dtlab.docsgen.records.collective_runs`, "
           f"{R['date']}, {R['machine']['cores']} CPU cores, torch {R['machine']['torch']})")
    out = {}
    rows = R["host"]["rows"]
    impls = [("library", "gloo"), ("shm", "shm"), ("shm-inplace", "shm in place"),
             ("deepspeed-shm", "DeepSpeed shm")]
    by = {i: _by(rows, impl=i) for i, _ in impls}
    t = ["| ranks | size | " + " | ".join(f"{n} ms | busbw" + (" | vs gloo" if i != "library"
                                                                 else "") for i, n in impls) + " |",
         "|---|---|" + "---|" * (3 * len(impls) - 1)]
    for key in sorted(by["library"]):
        cells = []
        for i, _ in impls:
            r = by[i][key]
            cells += [f"{r['time_s_median'] * 1e3:.3f}", f"{r['busbw_GBps']:.3f}"]
            if i != "library":
                cells.append(f"{r['busbw_vs_library']:.2f}x")
        t.append(f"| {key[0]} | {_size(key[1])} | " + " | ".join(cells) + " |")
    fits = "; ".join(
        f"{w} ranks: " + ", ".join(
            f"{n} {_fit(R, 'host', i, w)['alpha_s'] * 1e6:.0f} us / "
            f"{_fit(R, 'host', i, w)['busbw_limit_GBps']:.2f} GB/s" for i, n in impls)
        for w in sorted({r["world_size"] for r in rows}))
    ours = [r for r in rows if r["impl"] in ("shm", "shm-inplace")]
    worst = min(ours, key=lambda r: r["busbw_vs_library"])
    out["host"] = "\n".join(t) + (
        f"\n\nbusbw in GB/s, {_opt(R['host']['command'], '--iters')} timed calls a row; "
        f"`{R['host']['command']}`; {src}. "
        f"Every result exact: {all(r['ok'] for r in rows)}. Fitted alpha / bus-bandwidth limit: "
        f"{fits}. Lowest ratio of ours to gloo over all sizes and both world sizes: "
        f"{worst['busbw_vs_library']:.2f}x ({worst['impl']}, {worst['world_size']} ranks, "
        f"{_size(worst['bytes'])}).")
    rows = R["cross"]["rows"]
    lib, ring, hier = (_by(rows, impl=i) for i in ("library", "ring", "hier"))
    rate = 1e9 / 8  # bytes/s of the shaped link, each direction
    t = ["| size | flat gloo ms | our flat ring ms | hier ms | busbw gloo | busbw hier | "
         "hier vs gloo | link bytes flat / hier | theory ms flat / hier |",
         "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted(lib):
        s = key[1]
        t.append(f"| {_size(s)} | {lib[key]['time_s_median'] * 1e3:.1f} | "
                 f"{ring[key]['time_s_median'] * 1e3:.1f} | "
                 f"{hier[key]['time_s_median'] * 1e3:.1f} | {lib[key]['busbw_GBps']:.3f} | "
                 f"{hier[key]['busbw_GBps']:.3f} | {hier[key]['busbw_vs_library']:.2f}x | "
                 f"1.5 S / S | {1.5 * s / rate * 1e3:.0f} / {s / rate * 1e3:.0f} |")
    out["cross"] = "\n".join(t) + (
        f"\n\n2 nodes x 2 ranks of the namespace cluster, inter-node links shaped with tbf "
        f"{R['cross']['rate']} (theory columns: the link bytes at 10^9/8 bytes/s, no latency); "
        f"`{R['cross']['command']}`; {src}. Every result exact: "
        f"{all(r['ok'] for r in rows)}.")
    big = max(lib)
    out["q22"] = (
        f"Reducing inside each node first halves what crosses the link from 1.5 S to S (2 nodes "
        f"x 2 ranks): over {R['cross']['rate']}, a {_size(big[1])} all-reduce took "
        f"{lib[big]['time_s_median'] * 1e3:.0f} ms flat (gloo) and "
        f"{hier[big]['time_s_median'] * 1e3:.0f} ms hierarchical, "
        f"{hier[big]['busbw_vs_library']:.2f}x, theory 1.5x "
        "([communication.md](communication.md#across-nodes-the-hierarchical-all-reduce)).")
    d = R["ddp"]
    med, ratio = d["step_s_median"], d["ratio_vs_torch"]
    removed = d.get("comm_overhead_removed") or {}
    names = {"torch": "torch DDP", "own-ring": "ours, our ring", "own-library":
             "ours, library all-reduce", "own-shm": "ours, shared memory in place",
             "no-comm floor": "the same work, no communication"}
    t = ["| variant | median step ms | vs torch DDP | of torch's time above the floor, saved |",
         "|---|---|---|---|"]
    for v, name in names.items():
        share = removed.get(v)
        t.append(f"| {name} | {med[v] * 1e3:.2f} | {ratio[v]:.2f}x | "
                 f"{'-' if share is None else f'{share:.0%}'} |")
    out["ddp"] = "\n".join(t) + (
        f"\n\n`{d['command']}` (medians of {d['repeats']} rounds, variants in turn); {src}.")
    return out


def render_docs(R: dict, docs: Path) -> list[str]:
    return records.fill_marked_tables(docs, PAGES, "commexp", tables(R))


def make_parser() -> argparse.ArgumentParser:
    p = records.record_tool_parser("python -m dtlab.docsgen.records.collective_runs", __doc__.splitlines()[0])
    p.add_argument("--parts", default=",".join(PARTS),
                   help=f"measure only these of {','.join(PARTS)} and keep the rest of --json "
                        "(the record then says which part was measured when)")
    return p


def main(argv=None) -> int:
    p = make_parser()
    a = p.parse_args(argv)
    parts = [x for x in a.parts.split(",") if x]
    if not parts or set(parts) - set(PARTS):
        p.error(f"--parts: choose from {', '.join(PARTS)}, got {a.parts!r}")
    if a.redraw:
        R = json.loads(Path(a.json).read_text())
    else:
        tmp = Path(tempfile.mkdtemp(prefix="dtlab-commexp-"))
        old = json.loads(Path(a.json).read_text()) if set(parts) != set(PARTS) else {}
        date = time.strftime("%Y-%m-%d")
        R = {**old, "what": "shared-memory and hierarchical all-reduce, DDP over shared memory "
                            "(python -m dtlab.docsgen.records.collective_runs)", "date": old.get("date", date),
             "machine": records.machine(),
             **{k: {**v, "date": date} for k, v in measure(tmp, parts).items()}}
        atomic_write_text(Path(a.json), json.dumps(R, indent=1) + "\n")
        print(f"wrote {a.json}")
        if a.img:
            img = Path(a.img)
            img.mkdir(parents=True, exist_ok=True)
            for part, name in (("host", "comm-shm.png"), ("cross", "comm-hier.png")):
                if part in parts:
                    shutil.copyfile(tmp / f"{part}.png", img / name)
    if a.docs:
        print(f"tables written in: {', '.join(render_docs(R, Path(a.docs))) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
