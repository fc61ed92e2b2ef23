#!/usr/bin/env bash
# Issue 16's measurements on the lent H200 (docs/benchmarks.md "GPU path on the H200"), in parts:
#   device run, carry [".whl"]: bash benchmarks/h200_issue16.sh tests       the GPU tests of the path
#   device run, carry [".whl"]: bash benchmarks/h200_issue16.sh path        those, the kernel, pipeline capacity
#   device run, carry [".whl"]: bash benchmarks/h200_issue16.sh reference   the PyTorch reference on the GPU path
#   device run, carry [".whl"]: bash benchmarks/h200_issue16.sh layouts     its forward alone in NCHW and channels-last
#   device run, carry [".whl"]: bash benchmarks/h200_issue16.sh all         the three, in one call of about 8 minutes
#   device run, carry [".whl"]: bash benchmarks/h200_issue16.sh profile     where the pipelines hold the GIL
#   device run, carry [".whl"]: bash benchmarks/h200_issue16.sh variants    kernel store and block variants, Python's
#                                                                           own switch interval
#   device run, carry [".whl"]: bash benchmarks/h200_issue16.sh diagnose    the bare loop beside the pipeline, and a
#                                                                           native py-spy profile of where it waits
#   device run, carry [".whl"]: bash benchmarks/h200_issue16.sh fused       the GPU-decoding path beside the bare
#                                                                           loop, batches in flight, a profile
# Several parts may be given, run in turn.
# .whl holds nvidia-nvimgcodec-cu13 and nvidia-nvjpeg (the machine has no nvImageCodec), pycocotools for the
# eval tests (the machine's Python is 3.12), and py-spy for `profile`, which writes $OUT/gil-*.txt (py-spy's raw
# folded stacks of the GIL holder); fill it with
#   python3 -m pip download --no-deps -d .whl nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43 py-spy==0.4.3
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux_2_17_x86_64 -d .whl pycocotools==2.0.11
# (.whl is not committed: add it to .git/info/exclude). Each step has its own
# time limit so that one slow step cannot take the others' output with it; the log is $OUT/h200.log.
set -uo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit
export PYTHONPATH=/tmp/site LD_LIBRARY_PATH=/tmp/site/nvidia/cu13/lib:${LD_LIBRARY_PATH:-}
log=${OUT:-/tmp}/h200.log
step() { local limit=$1; shift; echo "=== $* (limit ${limit}s)" | tee -a "$log"; timeout "$limit" "$@" 2>&1 | tee -a "$log"; echo "=== rc ${PIPESTATUS[0]}" | tee -a "$log"; }
cap="python3 -m benchmarks.pipeline_capacity"
nvidia-smi --query-gpu=name,driver_version --format=csv | tee -a "$log"
tests() {
    step 150 python3 -m pytest -q -m gpu tests/test_gpu_preprocess.py tests/test_gpu_path.py tests/test_gpu_decode.py \
        tests/test_pipeline.py tests/test_eval.py
}
path() {
    tests
    step 60 python3 -m benchmarks.preprocess_bench --gpu
    step 100 $cap --gpu --decode gpu --batch 8 --in-flight 3 --images 4096 --outputs top100
    step 60 $cap --gpu --decode gpu --batch 8 --in-flight 3 --images 2048 --outputs raw
    step 45 $cap --gpu --decode gpu --batch 1 --in-flight 1 --images 512 --outputs top100
    step 60 $cap --gpu --decode cpu --batch 8 --in-flight 3 --images 2048
    step 60 $cap --batch 8 --in-flight 3 --images 1024
    step 90 python3 -m benchmarks.preprocess_bench --files 512 --repeat 3
}
weights() { [ -f /tmp/w.safetensors ] || step 60 python3 -m weights.extract --random-init r50_dc5 --seed 0 -o /tmp/w.safetensors; }
layouts() { weights; step 240 python3 -m benchmarks.torch_gpu_layouts --weights /tmp/w.safetensors --modes fp16,compile-fp16-graphs; }
reference() {
    weights
    step 200 python3 -m runtime.bench --pipeline synthetic:1024 --torch-weights /tmp/w.safetensors \
        --torch-modes compile-fp16-graphs --batch 4 --preprocess gpu --decode gpu --in-flight 3
}
profile() {
    for decode in gpu cpu; do
        step 90 /tmp/site/bin/py-spy record --gil --threads --nonblocking -r 400 -f raw -o "${OUT:-/tmp}/gil-$decode.txt" \
            -- $cap --gpu --decode $decode --batch 8 --in-flight 3 --images 4096 --outputs top100
    done
}
variants() {
    step 150 python3 -m benchmarks.preprocess_bench --kernel-variants PAIRED=0,STREAM_STORES=0 PAIRED=1 BLOCK_Y=4 \
        BLOCK_Y=16 MIN_BLOCKS=4 MIN_BLOCKS=16 --rounds 2
    step 60 $cap --gpu --decode cpu --batch 8 --in-flight 3 --images 2048 --repeat 3 --switch-interval 0.005
}
diagnose() {  # the bare loop beside the pipeline on the same machine, and where the decode thread waits
    step 80 python3 -m benchmarks.gpu_decode_bench --images 512
    step 45 python3 -m benchmarks.preprocess_bench --gpu
    step 45 $cap --gpu --decode gpu --batch 8 --in-flight 3 --images 2048 --outputs top100 --repeat 3
    step 45 $cap --gpu --decode cpu --batch 8 --in-flight 3 --images 2048 --repeat 3
    step 60 /tmp/site/bin/py-spy record --idle --native --threads -r 100 -f raw -o "${OUT:-/tmp}/idle-gpu.txt" \
        -- $cap --gpu --decode gpu --batch 8 --in-flight 3 --images 2048 --outputs top100
}
fused() {  # the GPU-decoding path (one thread decodes, preprocesses and starts each batch) beside the bare loop
    tests
    step 80 python3 -m benchmarks.gpu_decode_bench --images 512
    for n in 2 3; do
        step 60 $cap --gpu --decode gpu --batch 8 --in-flight $n --images 4096 --outputs top100 --repeat 5
    done
    step 45 $cap --gpu --decode cpu --batch 8 --in-flight 3 --images 2048 --repeat 3
    step 60 $cap --gpu --decode gpu --batch 32 --in-flight 2 --images 4096 --outputs top100 --repeat 3
    step 60 /tmp/site/bin/py-spy record --idle --native --threads -r 100 -f raw -o "${OUT:-/tmp}/idle-fused.txt" \
        -- $cap --gpu --decode gpu --batch 8 --in-flight 3 --images 2048 --outputs top100 --repeat 3
}
for part in "${@:-path}"; do
    case $part in
    tests | path | profile | layouts | reference | variants | diagnose | fused) $part ;;
    all) path; layouts; reference ;;
    *) echo "usage: bash benchmarks/h200_issue16.sh [tests|path|profile|layouts|reference|variants|diagnose|fused|all]..." >&2; exit 2 ;;
    esac
done
