"""The memory estimates docs/memory.md quotes, as one record: the ``dtlab memory --json`` output of
each command the page shows (7B with LLaMA-7B's widths beside DeepSpeed's estimators on 1 x 4,
1 x 8 and 2 x 8 GPUs; 65B on four 32 GB GPUs), and the activation check: the bytes autograd saves
in a real forward pass of ToyGPT (counted with ``saved_tensors_hooks``) beside the estimate.

    python -m dtlab.docsgen.records.memory_cases --json docs/reference/memory.json

Pure arithmetic and two small forward passes: seconds.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from dtlab.docsgen.records.lab_runs import write_record
from dtlab.report import records

ROOT = Path(__file__).resolve().parents[3]
LLAMA7 = ["--params", "7B", "--layers", "32", "--hidden", "4096", "--heads", "32", "--ffn",
          "11008", "--vocab", "32000", "--seq", "4096"]
LLAMA65 = ["--params", "65B", "--layers", "80", "--hidden", "8192", "--heads", "64", "--ffn",
           "22016", "--vocab", "32000", "--seq", "2048"]
# name -> the flags of `dtlab memory` (the record adds --json)
CASES = {
    "7b-1x8": [*LLAMA7, "--gpus-per-node", "8", "--compare-deepspeed"],
    "7b-1x4": [*LLAMA7, "--gpus-per-node", "4", "--compare-deepspeed"],
    "7b-2x8": [*LLAMA7, "--nodes", "2", "--gpus-per-node", "8", "--compare-deepspeed"],
    "65b-4x32": [*LLAMA65, "--gpus-per-node", "4", "--gpu-mem", "32", "--cpu-mem", "512",
                 "--compare-deepspeed"],
}
ACTIVATIONS = [("tiny", 1), ("tiny", 16), ("small", 1), ("small", 16)]


def estimate(flags: list[str]) -> dict:
    p = subprocess.run([sys.executable, "-m", "dtlab", "memory", *flags, "--json"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    if p.returncode != 0:
        raise SystemExit(f"memory_cases: dtlab memory {' '.join(flags)} failed:\n"
                         f"{p.stderr[-2000:]}")
    return json.loads(p.stdout[p.stdout.index("{"):])


def activations(preset: str, batch: int) -> dict:
    """The bytes autograd saves in one forward (and the loss) of the lab model, and the estimate."""
    import torch  # the record tool's parser should not need it

    from dtlab.measure.memory_meter import ActivationMeter
    from dtlab.plan.memory_estimate import Arch, Setup, activation_detail
    from dtlab.train.data import ARITH_VOCAB
    from dtlab.train.model import ToyGPT, build_model, config_from_preset, loss_fn
    cfg = config_from_preset(preset, vocab_size=len(ARITH_VOCAB))
    torch.manual_seed(0)
    x, y = (torch.randint(0, cfg.vocab_size, (batch, cfg.seq_len)) for _ in range(2))
    model = build_model(cfg)
    meter = ActivationMeter()
    with meter.measure(model.parameters()):
        loss = loss_fn(model(x), y)
    loss.backward()
    s = Setup(params=ToyGPT.count_params(cfg), precision="fp32", batch=batch,
              arch=Arch(cfg.n_layer, cfg.d_model, cfg.n_head, cfg.d_ff, cfg.vocab_size,
                        cfg.seq_len), seq_len=cfg.seq_len)
    return {"preset": preset, "batch": batch, "seq_len": cfg.seq_len,
            "vocab_size": cfg.vocab_size, "saved_by_autograd": meter.last,
            "estimate": activation_detail(s, "none")["forward"]}


def make_parser():
    return records.record_tool_parser("python -m dtlab.docsgen.records.memory_cases",
                                      __doc__.splitlines()[0])


def main(argv=None) -> int:
    a = make_parser().parse_args(argv)
    t0 = time.perf_counter()
    rec = {"what": "the memory estimates docs/memory.md quotes "
                   "(python -m dtlab.docsgen.records.memory_cases)",
           "date": time.strftime("%Y-%m-%d"), "machine": records.machine(),
           "estimates": {name: {"command": "dtlab memory " + " ".join(flags),
                                **estimate(flags)} for name, flags in CASES.items()},
           "activations": [activations(pr, b) for pr, b in ACTIVATIONS]}
    write_record(a.json, rec, t0)
    print(f"wrote {a.json} ({len(CASES)} estimates, {len(ACTIVATIONS)} activation counts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
