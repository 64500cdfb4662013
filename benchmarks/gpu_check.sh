#!/usr/bin/env bash
# This project's checks on a CUDA GPU, in one run of under 5 minutes: the GPU tests (captured steps
# equal eager ones, kill -9 and resume, memory over 100 trials, an out-of-memory trial), then one
# table of figures (benchmarks/gpu_check.py says which). Needs only the repository and MNIST files:
#
#     bash benchmarks/gpu_check.sh DIR        # DIR/MNIST/raw holds MNIST's four files (or fewer digits)
#
# Where NVIDIA's Multi-Process Service (MPS) is installed, it also measures 2 and 4 workers with an
# MPS daemon of its own (in /tmp, stopped at the end), since without MPS the GPU runs one process's
# kernels at a time.
set -uo pipefail
cd "$(dirname "$0")/.."
data_dir=${1:?usage: bash benchmarks/gpu_check.sh DIR (DIR/MNIST/raw holds MNIST's files)}
python=${PYTHON:-python3}

echo "== GPU tests"
timeout 180 "$python" -m pytest -q -p no:cacheprovider -s tests/test_gpu.py 2>&1 | grep -E "passed|failed|skipped|Error|assert|GPU memory" | tail -n 20

echo "== figures"
timeout 240 "$python" benchmarks/gpu_check.py --data-dir "$data_dir"

if command -v nvidia-cuda-mps-control >/dev/null; then
    echo "== workers under MPS"
    export CUDA_MPS_PIPE_DIRECTORY=/tmp/gpu-check-mps CUDA_MPS_LOG_DIRECTORY=/tmp/gpu-check-mps-log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if nvidia-cuda-mps-control -d; then
        timeout 120 "$python" benchmarks/gpu_check.py --data-dir "$data_dir" --skip speed studies \
            --workers 2 4 --label " (MPS)" | tail -n 2
        echo quit | nvidia-cuda-mps-control
    fi
fi
