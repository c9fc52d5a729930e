"""Published figures of the GPUs and links ``dtlab plan --gpu`` knows: none of them is measured
here, each carries its source.

- ``peak``: dense tensor-core FLOP/s by dtype, the vendor's datasheet (the peak MFU is quoted
  against);
- ``mamf``: the maximum achievable matmul FLOP/s in BF16, measured by others with the MAMF finder
  of Stas Bekman's *Machine Learning Engineering* (compute/accelerator/README.md, "Maximum
  Achievable FLOPS"): a large GEMM's ceiling, well below the datasheet's;
- ``hbm``: memory bandwidth (bytes/s) and size; ``nvlink``: bytes/s one direction per GPU;
  ``sms``: streaming multiprocessors (the wave quantisation of a GEMM's tiles);
- ``nic``: bytes/s one direction per GPU between nodes, for the cluster this GPU usually comes in.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from dtlab.errors import UsageError

GB = 1e9


@dataclass(frozen=True, eq=False)      # hashed by identity: a cache key for the layer costs
class Gpu:
    name: str
    peak: dict            # dtype -> dense FLOP/s
    mamf: float           # achievable BF16 matmul FLOP/s
    hbm_bytes_per_s: float
    memory: float         # bytes
    nvlink: float         # bytes/s one direction, per GPU
    sms: int
    nic: float            # bytes/s one direction, per GPU, between nodes (the usual node)
    source: str


GPUS = {
    "H100": Gpu("H100 SXM 80GB", {"bf16": 989.4e12, "fp16": 989.4e12, "fp8": 1978.9e12,
                                  "tf32": 494.7e12},
                mamf=794.5e12, hbm_bytes_per_s=3.35e12, memory=80 * GB, nvlink=450 * GB,
                sms=132, nic=50 * GB,
                source="NVIDIA H100 Tensor Core GPU datasheet (SXM: 989.4 TFLOP/s dense BF16, "
                       "3.35 TB/s HBM3, NVLink 900 GB/s both directions); MAMF 794.5 TFLOP/s "
                       "BF16 from ML Engineering's accelerator table; 400 Gb/s a GPU between "
                       "nodes (ConnectX-7 NDR, or AWS p5's 3200 Gb/s EFA for 8 GPUs). The "
                       "Ultra-Scale Playbook's cluster (the measured sweep) is taken to be such "
                       "nodes: NVLink/NVSwitch inside, 3200 Gb/s a node between nodes, an "
                       "assumption (its figures were not found in a citable source here)"),
    "A100": Gpu("A100 SXM 80GB", {"bf16": 312e12, "fp16": 312e12, "tf32": 156e12},
                mamf=271e12, hbm_bytes_per_s=2.039e12, memory=80 * GB, nvlink=300 * GB,
                sms=108, nic=25 * GB,
                source="NVIDIA A100 Tensor Core GPU datasheet (SXM 80GB: 312 TFLOP/s dense "
                       "BF16, 2,039 GB/s HBM2e, NVLink 600 GB/s both directions); MAMF 271 "
                       "TFLOP/s BF16 from ML Engineering's accelerator table; 200 Gb/s HDR "
                       "InfiniBand a GPU (DGX A100 datasheet)"),
}

# The H200 is the H100's compute with more and faster memory
GPUS["H200"] = replace(
    GPUS["H100"], name="H200 SXM 141GB", hbm_bytes_per_s=4.8e12, memory=141 * GB,
    source="NVIDIA H200 Tensor Core GPU datasheet (SXM: 989 TFLOP/s dense BF16, 4.8 TB/s "
           "HBM3e, 141 GB, NVLink 900 GB/s both directions); MAMF taken as the H100's (the same "
           "GH100 compute; not measured for the H200)")


def gpu(name: str) -> Gpu:
    """The GPU called ``name`` (H100, H200, A100; case and an -SXM suffix ignored)."""
    key = name.upper().replace("-SXM", "").replace(" SXM", "").strip()
    if key not in GPUS:
        raise UsageError(f"--gpu {name!r}: unknown GPU; known: {', '.join(GPUS)}")
    return GPUS[key]
