"""The dataparallel lab's library variant (``python -m labs.dataparallel --impl torch``):
nn.DataParallel itself over CUDA devices 0..R-1, on the same model, data and optimizer, and the
check of the wrapper's ``module.`` prefix that both variants run (``save_load_demo``). Kept
apart so that labs/dataparallel.py reads as the same steps written out."""
from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from dtlab.train.loop import Strategy
from dtlab.train.model import ToyGPT


def save_load_demo(model: nn.Module) -> dict:
    """Save through the DataParallel wrapper and load into a plain model, three ways."""
    wrapped = nn.DataParallel(model, device_ids=[model.layers[0].tok.weight.device.index]
                              if model.layers[0].tok.weight.is_cuda else [])
    ref = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    out = {}
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "ckpt.pt"
        torch.save(wrapped.state_dict(), f)          # keys: "module.layers.0.tok.weight", ...
        sd = torch.load(f, map_location="cpu", weights_only=True)
        plain = ToyGPT(model.cfg)
        try:
            plain.load_state_dict(sd)
            out["load_prefixed_into_plain"] = {"ok": False, "error": "unexpectedly loaded"}
        except RuntimeError as e:
            out["load_prefixed_into_plain"] = {
                "ok": True, "first_key": next(iter(sd)),
                "error": " ".join(str(e).split())[:160] + " ... (fails, as expected)"}
        consume_prefix_in_state_dict_if_present(sd, "module.")
        plain.load_state_dict(sd)
        out["strip_prefix_then_load"] = {"ok": _equal(plain, ref)}
        torch.save(wrapped.module.state_dict(), f)   # the better habit: save the inner module
        plain2 = ToyGPT(model.cfg)
        plain2.load_state_dict(torch.load(f, map_location="cpu", weights_only=True))
        out["save_inner_module"] = {"ok": _equal(plain2, ref)}
    return out


def _equal(m: nn.Module, ref: dict) -> bool:
    return all(torch.equal(v.cpu(), ref[k]) for k, v in m.state_dict().items())


class TorchDataParallel(Strategy):
    """nn.DataParallel over CUDA devices 0..R-1."""

    name, variant = "dataparallel", "torch"
    save_load_demo = staticmethod(save_load_demo)  # what labs/dataparallel.py reaches it by

    def __init__(self, rt, settings, replicas: int):
        super().__init__(rt, settings)
        self.n = replicas

    def build(self) -> None:
        super().build()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            self.model = nn.DataParallel(self.model, device_ids=list(range(self.n)))
        self.extra["warnings"] = [str(w.message) for w in caught]

    def close(self) -> None:
        self.extra["replica_bytes"] = [
            {"replica": i, "device": f"cuda:{i}",
             "total": int(torch.cuda.max_memory_allocated(i))} for i in range(self.n)]
        self.extra["save_load"] = save_load_demo(self.model.module)
        self.checks_ok = all(v["ok"] for v in self.extra["save_load"].values())
        super().close()
