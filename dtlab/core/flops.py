"""Model FLOPs per training step, counted and from the formula, and utilisation (MFU).

- counted: ``torch.utils.flop_counter.FlopCounterMode`` around one forward, loss and backward of
  the whole model on the whole global batch, run on the meta device (shapes only: no memory, no
  time), so every strategy reports the same model FLOPs whatever it splits;
- formula: 6 x (non-embedding parameters) x tokens + 12 x layers x hidden x sequence x tokens
  (the attention score and value products, forward and backward; Kaplan et al. 2020, PaLM's
  appendix); the embedding lookups are not matrix products;
- peak: measured on this device with a square fp32 matmul microbenchmark (best of several), or
  given with DTLAB_PEAK_FLOPS (FLOP/s per device). On the CPU the device is the whole CPU (all its
  cores, shared by the ranks); on CUDA each rank has one GPU. No table of vendor peaks is used,
  so MFU cannot silently exceed 100% on a device the table gets wrong;
- MFU = counted model FLOPs per step / step time / (devices x peak).
"""
from __future__ import annotations

import os
import time

import torch


def counted_flops_per_step(cfg, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from dtlab.core.model import ToyGPT, loss_fn
    with torch.device("meta"):
        model = ToyGPT(cfg)
    x = torch.zeros(batch, cfg.seq_len, dtype=torch.long, device="meta")
    with FlopCounterMode(display=False) as counter:
        loss_fn(model(x), x).backward()
    return int(counter.get_total_flops())


def formula_flops_per_step(cfg, batch: int) -> int:
    from dtlab.core.model import ToyGPT
    tokens = batch * cfg.seq_len
    embedding = cfg.vocab_size * cfg.d_model + cfg.seq_len * cfg.d_model
    n = ToyGPT.count_params(cfg) - embedding
    return int(6 * n * tokens + 12 * cfg.n_layer * cfg.d_model * cfg.seq_len * tokens)


def measure_peak_flops(device: torch.device) -> tuple[float, str]:
    """FLOP/s of one device: DTLAB_PEAK_FLOPS, else the best of a few fp32 matmuls."""
    given = os.environ.get("DTLAB_PEAK_FLOPS")
    if given:
        return float(given), "DTLAB_PEAK_FLOPS"
    n = 2048 if device.type == "cuda" else 512
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)  # the device is the whole CPU
    try:
        a = torch.randn(n, n, device=device)
        b = torch.randn(n, n, device=device)
        best = float("inf")
        for _ in range(8):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return 2 * n**3 / best, f"fp32 {n}x{n} matmul, best of 8, {os.cpu_count()} threads" \
        if device.type == "cpu" else f"fp32 {n}x{n} matmul, best of 8"


def flops_record(cfg, batch: int, step_s: float, world: int, device: torch.device) -> dict:
    counted = counted_flops_per_step(cfg, batch)
    formula = formula_flops_per_step(cfg, batch)
    peak, how = measure_peak_flops(device)
    devices = world if device.type == "cuda" else 1
    achieved = counted / step_s
    return {"model_flops_per_step": counted, "formula_flops_per_step": formula,
            "formula_over_counted": formula / counted, "achieved_flops_per_s": achieved,
            "peak_flops_per_s_per_device": peak, "peak_method": how, "devices": devices,
            "mfu": achieved / (devices * peak)}


class UtilisationSampler:
    """Samples this process's device utilisation every ``interval`` seconds in a thread: the GPU's
    (NVML through torch.cuda.utilization) on CUDA, else the CPU time this process used per wall
    second (1.0 = one core busy). ``summary()`` gives the mean, the max and the samples' count."""

    def __init__(self, device: torch.device, interval: float = 0.2):
        import threading
        self.device, self.interval = device, interval
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _read(self):
        if self.device.type == "cuda":
            try:
                return float(torch.cuda.utilization(self.device)) / 100
            except Exception:  # no NVML (pynvml) on this machine
                return None
        return time.process_time()

    def _run(self):
        last_wall, last = time.perf_counter(), self._read()
        while not self._stop.wait(self.interval):
            now_wall, now = time.perf_counter(), self._read()
            if now is None:
                return
            if self.device.type == "cuda":
                self.samples.append(now)
            else:
                self.samples.append((now - last) / (now_wall - last_wall))
            last_wall, last = now_wall, now

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def summary(self) -> dict:
        what = "gpu_utilisation" if self.device.type == "cuda" else "cpu_cores_busy"
        if not self.samples:
            return {"what": what, "samples": 0}
        out = {"what": what, "samples": len(self.samples),
               "mean": sum(self.samples) / len(self.samples), "max": max(self.samples)}
        if self.device.type == "cuda":
            out["gpu_name"] = torch.cuda.get_device_name(self.device)
        return out
