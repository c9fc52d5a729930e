"""The small runs behind answers of docs/questions.md that no other record holds, as one record:
the memory estimates the answers quote (``dtlab memory ... --json``), torch.multiprocessing under
the file_system sharing strategy, the fp16 loss scaler with master weights and with injected
overflows (ours and torch's GradScaler on the same settings), and DeepSpeed's ``ds_report``.

    python -m dtlab.docsgen.records.question_runs --json docs/reference/questions.json

Each entry keeps the command exactly as the page quotes it (``command``) and what the answer
reads of its output; the lab runs are tiny, one process, a few seconds each.
"""
from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

from dtlab.docsgen.records.lab_runs import memory_estimate, new_record, run_one, write_record
from dtlab.launch import sessions
from dtlab.report import records

# (name, the `dtlab memory` flags): each run with --json, kept whole
MEMORY = [
    ("memory-7b", ["--params", "7B"]),
    ("memory-65b-v100", ["--params", "65B", "--layers", "80", "--hidden", "8192", "--heads", "64",
                         "--ffn", "22016", "--vocab", "32000", "--seq", "2048", "--gpus-per-node",
                         "4", "--gpu-mem", "32", "--cpu-mem", "512"]),
    ("memory-7b-8gpus", ["--params", "7B", "--gpus-per-node", "8"]),
    ("memory-7b-z3-offload", ["--params", "7B", "--zero", "3", "--offload", "optimizer"]),
]
# (name, lab, processes, flags): `dtlab run LAB --nproc N FLAGS`
LABS = [
    ("mp-file-system", "torch_multiprocessing", 1, ["--sharing-strategy", "file_system"]),
    ("mp-file-descriptor", "torch_multiprocessing", 1, ["--sharing-strategy", "file_descriptor"]),
    ("amp-master-weights", "amp", 1, ["--master-weights", "--inject-overflow-at", "3"]),
    ("amp-scaler-own", "amp", 1, ["--inject-overflow-at", "2,5,6", "--growth-interval", "3",
                                  "--steps", "14"]),
    ("amp-scaler-torch", "amp", 1, ["--inject-overflow-at", "2,5,6", "--growth-interval", "3",
                                    "--steps", "14", "--scaler", "torch"]),
]
KEEP = ("lab", "variant", "world_size", "preset", "steps", "batch_size", "n_params", "baseline",
        "time", "comm", "memory", "extra", "ok")
OP = re.compile(r"^(\w+) \.+ \[(\w+)\] \.+ \[(\w+)\]$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def ds_report() -> dict:
    """DeepSpeed's op report: each op installed (pre-built) and compatible (can be JIT-built)."""
    exe = shutil.which("ds_report") or str(Path(sys.executable).with_name("ds_report"))
    p = sessions.run([exe], capture_output=True, text=True, timeout=300)
    text = ANSI.sub("", p.stdout + p.stderr)
    ops, env = {}, {}
    for line in text.splitlines():
        line = line.strip()
        if m := OP.match(line):
            ops[m.group(1)] = {"installed": m.group(2) == "YES", "compatible": m.group(3) == "OKAY"}
        elif m := re.match(r"^(torch version|deepspeed info) \.+ (.+)$", line):
            env[m.group(1)] = m.group(2).strip()
    warnings = [ln.split("[WARNING]", 1)[1].strip() for ln in text.splitlines()
                if "[WARNING]" in ln and "async_io" in ln]
    return {"command": "ds_report", "exit": p.returncode, "ops": ops, "env": env,
            "warnings": warnings}


def make_parser():
    p = records.record_tool_parser("python -m dtlab.docsgen.records.question_runs",
                                   __doc__.splitlines()[0])
    p.add_argument("--work", default="runs/docs/questions", help="where the runs write")
    return p


def main(argv=None) -> int:
    a = make_parser().parse_args(argv)
    work = Path(a.work)
    rec = new_record("the runs behind answers of docs/questions.md that no other record holds "
                   "(python -m dtlab.docsgen.records.question_runs)")
    t0 = time.perf_counter()
    for name, flags in MEMORY:
        print(f"{name}", flush=True)
        rec["runs"][name] = memory_estimate(flags)
    for name, lab, nproc, flags in LABS:
        print(f"{name}", flush=True)
        rec["runs"][name] = run_one(name, lab, nproc, flags, work, keep=KEEP, timeout=600)
    print("ds_report", flush=True)
    rec["runs"]["ds-report"] = ds_report()
    write_record(a.json, rec, t0)
    print(f"wrote {a.json} ({len(rec['runs'])} entries, {rec['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
