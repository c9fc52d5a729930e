"""Run records (``summary.json`` and ``steps.jsonl``) and the comparison with the baseline.

summary.json fields (stable; tools and tests read them):
    lab, variant, world_size, backend, device, dtype, preset, steps, seed,
    losses            loss of the whole global batch at every step, as seen on rank 0
    baseline          {max_abs_loss_diff, max_rel_loss_diff, max_abs_param_diff, tolerance, ok}
    time              {step_s_median, tokens_per_s, wall_s}
    comm              {bytes_per_step, calls_per_step, by_op: {op: {calls, bytes, sent_bytes}},
                       per_rank: [bytes_per_step of each rank]}
    memory            {per_rank: [{params, grads, optimizer, activations_peak, peak}]}  (bytes)
    extra             lab-specific figures (extra.checkpoint: resumed_from, restart_count, ...)
    params_sha256     SHA-256 of the full final parameters in name order (bitwise equality)
    hosts             the host name each rank ran on (a cluster node's name on the cluster)
    nonfinite         only when a loss or parameter is NaN or infinite: where it first was
    failure           only when a collective failed: kind, op, site, step, silent_ranks, ...
    ok                the verdict: baseline.ok is not false and the lab's own checks passed
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path

import torch

SUMMARY_FIELDS = ("lab", "variant", "world_size", "backend", "device", "dtype", "preset", "steps",
                  "seed", "losses", "baseline", "time", "comm", "memory", "extra", "ok")

# fp32 strategies: losses within 1e-5 relative, parameters within 1e-4 absolute.
FP32_TOLERANCE = {"loss_rel": 1e-5, "param_abs": 1e-4}


def build_summary(strategy, losses: list[float], baseline: dict, *, ok: bool, time=None,
                  comm=None, memory=None, flops=None, params_sha256=None, failure=None) -> dict:
    """The run record of a finished (or failed: ``failure``) run; what describes the run comes
    from the strategy and its settings, the measured parts from the caller."""
    rt, s = strategy.rt, strategy.settings
    summary = {
        "lab": strategy.lab, "variant": strategy.variant, "world_size": rt.world_size,
        "backend": rt.backend, "device": str(rt.device), "dtype": strategy.dtype,
        "preset": s.preset, "steps": s.steps, "seed": s.seed, "batch_size": s.batch_size,
        "seq_len": s.model.seq_len, "recompute": s.model.recompute,
        "n_params": strategy.num_params(), "losses": losses,
        "baseline": baseline, "time": time, "comm": comm, "memory": memory, "flops": flops,
        "extra": strategy.extra, "params_sha256": params_sha256, "ok": ok}
    if failure is not None:
        summary["failure"] = failure
    return summary


def params_digest(params: dict[str, torch.Tensor] | None) -> str | None:
    """SHA-256 over the full parameters in name order: equal digests mean bitwise-equal models."""
    if params is None:
        return None
    h = hashlib.sha256()
    for name in sorted(params):
        t = params[name].detach().cpu().contiguous()
        h.update(name.encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, fsync it, rename it over ``path`` and fsync
    the folder: readers never see half a file, and a crash leaves the old one or the new one.
    The file keeps the mode (and, written by root, the owner) of the one it replaces; a new
    file is 0644, whoever writes it (a page ``sudo dtlab docs refresh`` rewrote stays readable)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        before = os.stat(path)
    except FileNotFoundError:
        before = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o644 if before is None else before.st_mode & 0o7777)
            if before is not None and os.geteuid() == 0:
                os.fchown(f.fileno(), before.st_uid, before.st_gid)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _strict(x):
    """A value JSON can hold without extensions: NaN and infinities become None (the record's
    ``nonfinite`` field says where they were)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return x


def write_record(out: Path, summary: dict, steps: list[dict]) -> None:
    missing = [k for k in SUMMARY_FIELDS if k not in summary]
    if missing:
        raise KeyError(f"run record is missing fields {missing}")
    atomic_write_text(out / "steps.jsonl", "".join(json.dumps(_strict(s), allow_nan=False) + "\n"
                                                   for s in steps))
    atomic_write_text(out / "summary.json",
                      json.dumps(_strict(summary), indent=2, allow_nan=False) + "\n")


def read_summary(out: Path) -> dict:
    return json.loads((Path(out) / "summary.json").read_text())


def first_nonfinite(losses: list[float], params: dict[str, torch.Tensor] | None) -> dict | None:
    """Where a run stopped being a number: the first step whose loss is NaN or infinite, and the
    first parameter (in name order) holding one; None when everything is finite."""
    step = next((k for k, x in enumerate(losses) if not math.isfinite(x)), None)
    param = next((n for n in sorted(params or {})
                  if not bool(torch.isfinite(params[n].detach().float()).all())), None)
    if step is None and param is None:
        return None
    return {"first_step": step, "loss": None if step is None else repr(losses[step]),
            "first_param": param}


def describe_nonfinite(nf: dict) -> str:
    parts = []
    if nf["first_step"] is not None:
        parts.append(f"the loss is {nf['loss']} from step {nf['first_step']}")
    if nf["first_param"] is not None:
        parts.append(f"parameter {nf['first_param']} is not finite")
    return "; ".join(parts)


def compare(losses: list[float], params: dict[str, torch.Tensor], base_losses: list[float],
            base_params: dict[str, torch.Tensor], tolerance: dict) -> dict:
    """How far a run drifted from the baseline, and whether that is within ``tolerance``. A NaN
    or infinity anywhere (run or baseline, losses or parameters) makes the distance infinite and
    the verdict False: comparisons with NaN are all false, so a plain ``max`` or ``d > bound``
    would let a diverged run pass."""
    if len(losses) != len(base_losses):
        raise ValueError(f"run has {len(losses)} losses, baseline {len(base_losses)}")
    if set(params) != set(base_params):
        only_run = sorted(set(params) - set(base_params))[:3]
        only_base = sorted(set(base_params) - set(params))[:3]
        raise ValueError(f"parameter names differ from the baseline: run-only {only_run}, "
                         f"baseline-only {only_base}")
    inf = float("inf")
    abs_d = [abs(a - b) if math.isfinite(a) and math.isfinite(b) else inf
             for a, b in zip(losses, base_losses)]
    rel_d = [d / max(abs(b), 1e-12) if math.isfinite(d) else inf
             for d, b in zip(abs_d, base_losses)]
    pdiff, worst = 0.0, None
    for name in sorted(base_params):
        ref, got = base_params[name].float(), params[name].detach().to("cpu", torch.float32)
        if got.shape != ref.shape:
            raise ValueError(f"parameter {name}: shape {tuple(got.shape)} vs baseline "
                             f"{tuple(ref.shape)}")
        if not ref.numel():
            continue
        finite = bool(torch.isfinite(got).all()) and bool(torch.isfinite(ref).all())
        d = (got - ref).abs().max().item() if finite else inf
        if d > pdiff or (worst is None and d == inf):
            pdiff, worst = d, name
    max_abs, max_rel = max(abs_d, default=0.0), max(rel_d, default=0.0)
    ok = max_rel <= tolerance["loss_rel"] and pdiff <= tolerance["param_abs"]
    out = {"max_abs_loss_diff": max_abs, "max_rel_loss_diff": max_rel,
           "max_abs_param_diff": pdiff, "worst_param": worst, "tolerance": dict(tolerance),
           "ok": bool(ok)}
    for side, (ls, ps) in (("run", (losses, params)), ("baseline", (base_losses, base_params))):
        if (nf := first_nonfinite(ls, ps)) is not None:
            out["ok"] = False
            out.setdefault("nonfinite", {})[side] = nf
    return out


def verdict(baseline: dict, checks_ok: bool, nonfinite: dict | None) -> bool:
    """The run's verdict: no NaN or infinity anywhere, the baseline within tolerance (or not
    compared, or not comparable by design) and the lab's own checks passed."""
    return nonfinite is None and baseline.get("ok") is not False and bool(checks_ok)


def cache_dir() -> Path:
    return Path(os.environ.get("DTLAB_CACHE", Path.home() / ".cache" / "dtlab")) / "baseline"


def _code_fingerprint() -> str:
    """The baseline depends on the model, data and loop code too: a change to any of them must
    not be answered from an old cache entry."""
    h = hashlib.sha256()
    train = Path(__file__).parents[1] / "train"
    for name in ("model.py", "data.py", "loop.py", "settings.py", "layout.py"):
        h.update((train / name).read_bytes())
    return h.hexdigest()[:16]


def cache_key(settings: dict) -> str:
    blob = json.dumps({**settings, "torch": torch.__version__, "code": _code_fingerprint()},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def load_cached(key: str):
    f = cache_dir() / f"{key}.pt"
    if not f.is_file():
        return None
    try:
        d = torch.load(f, map_location="cpu", weights_only=True)
        return d["losses"], d["params"]
    except Exception:  # a corrupt cache entry is recomputed, never trusted
        return None


def store_cached(key: str, losses: list[float], params: dict[str, torch.Tensor]) -> None:
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{key}.")
    os.close(fd)
    try:
        torch.save({"losses": list(losses), "params": {k: v.cpu() for k, v in params.items()}}, tmp)
        os.replace(tmp, d / f"{key}.pt")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
