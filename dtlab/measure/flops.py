"""Model FLOPs per training step, counted and from the formula, and utilisation (MFU).

- counted: ``torch.utils.flop_counter.FlopCounterMode`` around one forward, loss and backward of
  the whole model on the whole global batch, run on the meta device (shapes only: no memory, no
  time), so every strategy reports the same model FLOPs whatever it splits;
- formula: 6 x (non-embedding parameters) x tokens + 12 x layers x hidden x sequence x tokens
  (the attention score and value products, forward and backward; Kaplan et al. 2020, PaLM's
  appendix); the embedding lookups are not matrix products;
- peak: the peak of the dtype the run computes in (fp32, or bf16/fp16 under autocast): a GPU's
  published dense peak for that dtype where the device is in PUBLISHED_PEAKS (the vendor's
  datasheet, cited there), DTLAB_PEAK_FLOPS (FLOP/s per device) where given, and otherwise the
  best of a sweep of matmul shapes in that dtype measured here (a CPU has no datasheet figure
  this code can know; the record's ``peak_source`` says which one was used);
- achievable: the best FLOP/s of the same sweep of matmul shapes (square and transformer-like,
  not one), reported beside MFU as its own ratio, ``of_matmul_peak``: how close the run came to
  what this device's matmuls reach in practice. On the CPU the device is the whole CPU (all its
  cores, shared by the ranks); on CUDA each rank has one GPU;
- MFU = counted model FLOPs per step / step time / (devices x peak).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch


# Dense peak FLOP/s per GPU by compute dtype, from the vendors' datasheets (published figures,
# not measured here): NVIDIA A100 Tensor Core GPU datasheet (SXM); NVIDIA H100 Tensor Core GPU
# datasheet (SXM); NVIDIA H200 Tensor Core GPU datasheet (SXM). Matched on the device's name.
PUBLISHED_PEAKS = {
    "A100": ({"fp32": 19.5e12, "tf32": 156e12, "bf16": 312e12, "fp16": 312e12},
             "NVIDIA A100 Tensor Core GPU datasheet (SXM, dense)"),
    "H100": ({"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
             "NVIDIA H100 Tensor Core GPU datasheet (SXM, dense)"),
    "H200": ({"fp32": 67e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12},
             "NVIDIA H200 Tensor Core GPU datasheet (SXM, dense)"),
}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (m, k, n): squares and the shapes a transformer's linears have (tokens x d x 4d and back)
SWEEP_CPU = ((256, 256, 256), (512, 512, 512), (1024, 1024, 1024), (2048, 512, 2048),
             (512, 2048, 512), (4096, 256, 1024))
SWEEP_CUDA = ((1024, 1024, 1024), (4096, 4096, 4096), (8192, 8192, 8192), (16384, 4096, 16384),
              (4096, 16384, 4096), (8192, 1024, 4096))


def matmul_sweep(device: torch.device, dtype: str = "fp32", repeats: int = 3,
                 budget_s: float = 2.0) -> list[dict]:
    """FLOP/s of ``a @ b`` for the shapes of the sweep in ``dtype`` (best of ``repeats`` after a
    warm-up call); on the CPU with every core, the device being the whole CPU. A shape that
    would take the sweep past ``budget_s`` at the best rate so far is left out (fp16 matmuls are
    emulated on most CPUs, a thousand times slower), so every run can afford the sweep."""
    shapes = SWEEP_CUDA if device.type == "cuda" else SWEEP_CPU
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    rows, start = [], time.perf_counter()
    try:
        for m, k, n in shapes:
            if rows and 2 * m * k * n * (repeats + 1) / max(r["flops_per_s"] for r in rows) \
                    > budget_s - (time.perf_counter() - start):
                continue
            a = torch.randn(m, k, device=device).to(TORCH_DTYPES[dtype])
            b = torch.randn(k, n, device=device).to(TORCH_DTYPES[dtype])
            best = float("inf")
            for i in range(repeats + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                a @ b
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i:  # the first call warms up
                    best = min(best, time.perf_counter() - t0)
            rows.append({"m": m, "k": k, "n": n, "flops_per_s": 2 * m * k * n / best})
    finally:
        torch.set_num_threads(threads)
    return rows


def cached_sweep(device: torch.device, dtype: str) -> tuple[list[dict], str]:
    """The matmul sweep of this device and dtype, measured once per machine, thread count and
    torch version and kept in ~/.cache/dtlab/matmul-sweep.json (DTLAB_CACHE moves it), with the
    date it was measured: every run's record carries it without paying for it again."""
    import json
    import socket

    from dtlab.measure.run_record import atomic_write_text
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = f"{socket.gethostname()}|{name}|{dtype}|{os.cpu_count()}|{torch.__version__}"
    path = Path(os.environ.get("DTLAB_CACHE", Path.home() / ".cache" / "dtlab")) / \
        "matmul-sweep.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if key not in known:
        known[key] = {"date": time.strftime("%Y-%m-%d %H:%M"),
                      "sweep": matmul_sweep(device, dtype)}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, json.dumps(known, indent=1) + "\n")
        except OSError:
            pass  # a read-only home: measured again next time
    return known[key]["sweep"], known[key]["date"]


def published_peak(device: torch.device, dtype: str) -> tuple[float, str] | None:
    """(FLOP/s, source) of a GPU whose name PUBLISHED_PEAKS knows, for ``dtype``; else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (peaks, source) in PUBLISHED_PEAKS.items():
        if key in name and dtype in peaks:
            return peaks[dtype], f"published: {source}, {dtype}"
    return None


def measure_peak_flops(device: torch.device, dtype: str = "fp32",
                       sweep: list[dict] | None = None) -> tuple[float, str]:
    """(FLOP/s of one device in ``dtype``, where it comes from): a published peak, else
    DTLAB_PEAK_FLOPS, else the best of the matmul sweep (``sweep``, or one measured now)."""
    known = published_peak(device, dtype)
    if known:
        return known
    given = os.environ.get("DTLAB_PEAK_FLOPS")
    if given:
        return float(given), "DTLAB_PEAK_FLOPS"
    sweep = sweep or matmul_sweep(device, dtype)
    return max(r["flops_per_s"] for r in sweep), \
        f"measured: best {dtype} matmul of a {len(sweep)}-shape sweep (no published peak for " \
        f"this device)"


def flops_record(counted: int, formula: int, step_s: float, world: int, device: torch.device,
                 dtype: str = "fp32") -> dict:
    """MFU and the rest from a step's model FLOPs (``counted`` by FlopCounterMode, beside the
    6N + attention ``formula``: dtlab.train.model.counted_flops_per_step and its formula)."""
    dtype = dtype.split("-")[0] if dtype.split("-")[0] in TORCH_DTYPES else "fp32"  # fp16-master
    sweep, measured = cached_sweep(device, dtype)
    matmul_peak = max(r["flops_per_s"] for r in sweep)
    peak, how = measure_peak_flops(device, dtype, sweep)
    devices = world if device.type == "cuda" else 1
    achieved = counted / step_s
    return {"model_flops_per_step": counted, "formula_flops_per_step": formula,
            "formula_over_counted": formula / counted, "achieved_flops_per_s": achieved,
            "dtype": dtype, "peak_flops_per_s_per_device": peak, "peak_source": how,
            "devices": devices, "mfu": achieved / (devices * peak),
            "matmul_peak_flops_per_s_per_device": matmul_peak, "matmul_sweep": sweep,
            "matmul_sweep_measured": measured,
            "of_matmul_peak": achieved / (devices * matmul_peak)}


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
