#!/usr/bin/env bash
# Issue 16's measurements on the lent H200 (docs/benchmarks.md "GPU path on the H200"), one device call per part:
#   device run, carry [".whl"]: bash benchmarks/h200_issue16.sh path        GPU tests, kernel, pipeline capacity
#   device run, carry [".whl"]: bash benchmarks/h200_issue16.sh reference   the PyTorch reference on the GPU path
#   device run, carry [".whl"]: bash benchmarks/h200_issue16.sh all         both, in one call of about 8 minutes
# .whl holds nvidia-nvimgcodec-cu13 and nvidia-nvjpeg (the machine has no nvImageCodec). Each step has its own
# time limit so that one slow step cannot take the others' output with it; the log is $OUT/h200.log.
set -uo pipefail
part=${1:-path}
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site LD_LIBRARY_PATH=/tmp/site/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
log=${OUT:-/tmp}/h200.log
step() { local limit=$1; shift; echo "=== $* (limit ${limit}s)" | tee -a "$log"; timeout "$limit" "$@" 2>&1 | tee -a "$log"; echo "=== rc ${PIPESTATUS[0]}" | tee -a "$log"; }
cap="python3 -m benchmarks.pipeline_capacity"
nvidia-smi --query-gpu=name,driver_version --format=csv | tee -a "$log"
path() {
    step 150 python3 -m pytest -q -m gpu tests/test_gpu_preprocess.py tests/test_gpu_path.py tests/test_gpu_decode.py tests/test_pipeline.py
    step 60 python3 -m benchmarks.preprocess_bench --gpu
    step 100 $cap --gpu --decode gpu --batch 8 --in-flight 3 --images 4096 --outputs top100
    step 60 $cap --gpu --decode gpu --batch 8 --in-flight 3 --images 2048 --outputs raw
    step 45 $cap --gpu --decode gpu --batch 1 --in-flight 1 --images 512 --outputs top100
    step 60 $cap --gpu --decode cpu --batch 8 --in-flight 3 --images 2048
    step 60 $cap --batch 8 --in-flight 3 --images 1024
    step 90 python3 -m benchmarks.preprocess_bench --files 512 --repeat 3
}
reference() {
    step 60 python3 -m weights.extract --random-init r50_dc5 --seed 0 -o /tmp/w.safetensors
    step 240 python3 -m benchmarks.torch_gpu_layouts --weights /tmp/w.safetensors --modes fp16,compile-fp16-graphs
    step 200 python3 -m runtime.bench --pipeline synthetic:512 --torch-weights /tmp/w.safetensors \
        --torch-modes compile-fp16-graphs --batch 4 --preprocess gpu --decode gpu --in-flight 3
}
case $part in
path) path ;;
reference) reference ;;
all) path; reference ;;
*) echo "usage: bash benchmarks/h200_issue16.sh path|reference|all" >&2; exit 2 ;;
esac
