#!/usr/bin/env bash
# The GPU checks in one command, for a machine with one CUDA GPU (docs/scaling.md):
#   1. tests/test_cuda.py: CPU/GPU logits parity, bf16 attention inputs, the trainer compiled in bf16;
#   2. GPT-2-124M-sized training throughput and MFU: compiled at batch 16 and 64, and eager;
#   3. the WebText pipeline's own stages (ingest, BPE, tokenize, train, evaluate) on the GPU,
#      for a wall-clock budget, without MLflow (which a bare GPU image may not have).
#
#   bash benchmarks/gpu_checks.sh [TEXT_FILE] [SECONDS]    # default: ../shared/data/wikitext-2-valid.txt, 120
#
# Each check has its own time limit, so one that hangs does not take the others with it.
set -u
here="$(cd "$(dirname "$0")/.." && pwd)"
text="${1:-$here/../shared/data/wikitext-2-valid.txt}"
seconds="${2:-120}"
python="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
cd "$here"

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "error: $python sees no CUDA GPU (a CPU-only torch, or no GPU on this machine); run the GPU checks on a" \
         "machine with an NVIDIA GPU and a CUDA build of torch" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda, "|", torch.cuda.get_device_name())'
lscpu | sed -n 's/^Model name: *//p'
status=0
run() { echo; echo "\$ $*"; timeout 300 "$@" || { echo "exit $?"; status=1; }; }
run "$python" -m pytest -q --noconftest -p no:cacheprovider tests/test_cuda.py
run "$python" benchmarks/gpu_train.py --device cuda
run "$python" benchmarks/gpu_train.py --device cuda --batch 64 --steps 20
run "$python" benchmarks/gpu_train.py --device cuda --no-compile --steps 20
run "$python" benchmarks/webtext_bpb.py --source "$text" --seconds "$seconds" --no-tracking --set train.device=cuda
exit $status
