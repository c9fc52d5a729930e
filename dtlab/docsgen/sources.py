"""Where the published figures of docs/ come from: a figure that is not ours (a datasheet's peak,
a link's line rate, a library's default, a paper's measurement) is written
``<!--pub:KEY-->figure<!--/pub-->`` with KEY one of SOURCES, and ``dtlab docs check`` fails on
an unknown KEY. The page names the source in words as well; this table holds its address."""
from __future__ import annotations

# key: (what it is, where to read it)
SOURCES: dict[str, tuple[str, str]] = {
    "nvidia-h100": ("NVIDIA H100 Tensor Core GPU datasheet",
                    "https://www.nvidia.com/en-us/data-center/h100/"),
    "nvidia-h200": ("NVIDIA H200 Tensor Core GPU datasheet",
                    "https://www.nvidia.com/en-us/data-center/h200/"),
    "nvidia-a100": ("NVIDIA A100 Tensor Core GPU datasheet",
                    "https://www.nvidia.com/en-us/data-center/a100/"),
    "dgx-a100": ("NVIDIA DGX A100 datasheet",
                 "https://www.nvidia.com/en-us/data-center/dgx-a100/"),
    "torch-ddp": ("PyTorch DistributedDataParallel documentation",
                  "https://pytorch.org/docs/stable/generated/"
                  "torch.nn.parallel.DistributedDataParallel.html"),
    "ml-engineering": ("Stas Bekman, Machine Learning Engineering (accelerators, network)",
                       "https://github.com/stas00/ml-engineering"),
    "nccl-tests": ("NVIDIA nccl-tests, PERFORMANCE.md (algorithm and bus bandwidth)",
                   "https://github.com/NVIDIA/nccl-tests/blob/master/doc/PERFORMANCE.md"),
    "ultrascale-playbook": ("Hugging Face, The Ultra-Scale Playbook",
                            "https://huggingface.co/spaces/nanotron/ultrascale-playbook"),
    "zero-paper": ("Rajbhandari et al., ZeRO: Memory Optimizations Toward Training Trillion "
                   "Parameter Models (2020)", "https://arxiv.org/abs/1910.02054"),
    "ethernet": ("IEEE 802.3 line rates (1, 10, 100, 400 GbE)",
                 "https://standards.ieee.org/ieee/802.3/"),
    "aws-p5": ("Amazon EC2 P5 instances (8 H100 GPUs, 3200 Gbps of EFA networking an instance)",
               "https://aws.amazon.com/ec2/instance-types/p5/"),
    "docker-run": ("Docker CLI reference, docker container run (--shm-size: the size of "
                   "/dev/shm, 64 MB when unset)",
                   "https://docs.docker.com/reference/cli/docker/container/run/"),
    "alaya-nccl-tests": ("Alaya NeW, NCCL-tests in practice (reference busbw of all_reduce_perf "
                         "on 8x H100 SXM)",
                         "https://docs.alayanew.com/en/docs/tech-blog/2026-05-06-nccl-tests"),
    "colossalai-tp": ("Colossal-AI documentation, paradigms of parallelism (1D, 2D, 2.5D and 3D "
                      "tensor parallelism)",
                      "https://colossalai.org/docs/concepts/paradigms_of_parallelism/"),
    "torch-dataparallel": ("PyTorch source, torch/nn/parallel/data_parallel.py (nn.DataParallel's "
                           "balance check and device checks)",
                           "https://github.com/pytorch/pytorch/blob/main/torch/nn/parallel/"
                           "data_parallel.py"),
    "infiniband": ("InfiniBand Trade Association, line rates (HDR 200 Gb/s, NDR 400 Gb/s)",
                   "https://www.infinibandta.org/"),
    "qlora-paper": ("Dettmers et al., QLoRA: Efficient Finetuning of Quantized LLMs (2023): a "
                    "65B model fine-tuned on one 48 GB GPU",
                    "https://arxiv.org/abs/2305.14314"),
}
