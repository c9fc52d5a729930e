#!/usr/bin/env bash
# The GPU checks, as one script for a machine with CUDA: the gpu-marked tests and the GPU
# variants of the labs (NCCL, nn.DataParallel on CUDA, AMP fp16 with torch's GradScaler, bf16,
# MFU), summarised in one JSON record (docs/reference/gpu.json holds the last one).
#
#   OUT=/tmp/gpu tests/gpu/check.sh        # figures in $OUT/gpu.json, pytest's output beside it
#
# PYTHON picks the interpreter (default python3). Runs go to $RUNS, which must be empty or
# absent (default: a new folder from mktemp -d), so the record holds only this check's runs.
# The exit status is pytest's, or 1 when pytest passed and a lab run did not.
set -u
out=${OUT:-gpu-out}
if [[ -n ${RUNS:-} ]]; then
  runs=$RUNS
  if [[ -e $runs && -n $(ls -A "$runs") ]]; then
    echo "check.sh: RUNS=$runs is not empty; give an empty or new folder" >&2; exit 2
  fi
  mkdir -p "$runs"
else
  runs=$(mktemp -d "${TMPDIR:-/tmp}/dtlab-gpu-runs.XXXXXX") || exit 2
fi
py=${PYTHON:-$(command -v python3)}
export PYTHON=$py   # the launchers find accelerate next to it
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 DTLAB_CACHE=$runs/cache

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$runs/gpu.txt" \
    || { echo "check.sh: no nvidia-smi: this machine has no NVIDIA GPU"; exit 2; }
cat "$runs/gpu.txt"

run() {  # run NAME LAB ARGS...: one lab run, its summary kept in $runs/NAME
    local name=$1; shift
    local t0=$SECONDS
    timeout 300 "$py" -m dtlab run "$@" --out "$runs/$name" > "$runs/$name.log" 2>&1
    local rc=$?
    echo "$rc" > "$runs/$name.rc"
    echo "$name: exit $rc in $((SECONDS - t0)) s"
}
run ddp-nccl ddp --nproc 1 --backend nccl --steps 10
run dataparallel-cuda dataparallel --impl torch --replicas 1 --steps 5
run amp-fp16-torch amp --nproc 1 --dtype fp16 --scaler torch --steps 20
run amp-fp16-own amp --nproc 1 --dtype fp16 --steps 20
run amp-bf16 amp --nproc 1 --dtype bf16 --steps 20
run baseline-small baseline --preset small --steps 20 --no-baseline
run baseline-gpt2 baseline --preset gpt2-124m --steps 10 --no-baseline
run baseline-gpt2-recompute baseline --preset gpt2-124m --steps 10 --no-baseline --recompute full

timeout 420 "$py" -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
    tests/test_data_parallel_labs.py tests/test_distributed.py tests/test_launchers.py \
    > "$out/pytest-gpu.txt" 2>&1
pytest_rc=$?
echo "pytest -m gpu: exit $pytest_rc"
tail -5 "$out/pytest-gpu.txt"

"$py" - "$runs" "$out/gpu.json" "$pytest_rc" <<'EOF'
import json, os, sys, time
from pathlib import Path
runs, dest, pytest_rc = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
import torch
# published peaks (NVIDIA H200 SXM datasheet, dense): fp32 67, bf16/fp16 tensor cores 989 TFLOP/s
PUBLISHED = {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12}
rec = {"what": "GPU checks (tests/gpu/check.sh)", "date": time.strftime("%Y-%m-%d"),
       "gpu": (runs / "gpu.txt").read_text().strip(), "torch": torch.__version__,
       "cuda": torch.version.cuda, "published_peaks_flops": PUBLISHED,
       "published_source": "NVIDIA H200 Tensor Core GPU datasheet (SXM, dense)",
       "pytest_gpu_exit": pytest_rc, "runs": {}}
for log in sorted(runs.glob("*.log")):
    name = log.stem
    f = runs / name / "summary.json"
    rc = int((runs / f"{name}.rc").read_text())
    if rc != 0 or not f.is_file():
        rec["runs"][name] = {"ok": False, "exit": rc, "log_tail": log.read_text()[-1500:]}
        continue
    s = json.loads(f.read_text())
    fl = s.get("flops", {})
    r = {k: s.get(k) for k in ("lab", "variant", "world_size", "backend", "device", "dtype",
                                "preset", "steps", "ok")}
    r["baseline"] = {k: s["baseline"].get(k) for k in ("max_rel_loss_diff",
                                                       "max_abs_param_diff", "ok", "note")}
    r["step_s_median"] = s["time"]["step_s_median"]
    r["tokens_per_s"] = s["time"]["tokens_per_s"]
    r["flops"] = {k: v for k, v in fl.items() if not isinstance(v, (list, dict))}
    achieved = fl.get("achieved_flops_per_s") or (
        fl.get("model_flops_per_step", 0) / s["time"]["step_s_median"]
        if fl.get("model_flops_per_step") else None)
    if achieved:
        r["achieved_flops_per_s"] = achieved
        r["mfu_published_peak"] = achieved / PUBLISHED.get(s.get("dtype", "fp32"), 67e12)
    r["activations_peak"] = s["memory"]["per_rank"][0].get("activations_peak")
    r["peak_memory"] = s["memory"]["per_rank"][0].get("peak")
    r["exit"] = rc
    rec["runs"][name] = r
rec["ok"] = pytest_rc == 0 and all(r.get("ok") for r in rec["runs"].values())
dest.write_text(json.dumps(rec, indent=1) + "\n")
print(json.dumps({n: (r.get("ok"), r.get("variant"), r.get("step_s_median"),
                      r.get("mfu_published_peak")) for n, r in rec["runs"].items()}, indent=1))
EOF
[[ $pytest_rc -ne 0 ]] && exit "$pytest_rc"
"$py" -c 'import json, sys; sys.exit(0 if json.load(open(sys.argv[1]))["ok"] else 1)' "$out/gpu.json"
