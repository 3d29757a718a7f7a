#!/usr/bin/env bash
# Every GPU check of pdmer in one short device session ("Scale out and speed up", part 4).
#
#   bash benchmarks/gpu_checks.sh --fetch-wheels   # here, once: the packages the GPU image lacks, into .whl/
#   bash benchmarks/gpu_checks.sh                  # on the GPU machine (device tool: carry [".whl"])
#
# The GPU image has Python 3.12 with torch, torchaudio, numpy, scipy, safetensors, tensorboard,
# matplotlib, tqdm, PyYAML and pytest (with xdist); .whl/ adds omegaconf, nnAudio (the exact CQT), soundfile and what
# soundfile needs. On the GPU it runs, each step under its own time limit so that one that hangs
# leaves the others' results:
#   1. the CUDA tests (tests/test_batched_tasks.py: batched against one-by-one meta-gradients on the
#      GPU, adaptation in eval mode against the CPU, a tiny meta-training run end to end, plain and
#      batched in bf16; tests/test_cli.py: the device checks);
#   2. benchmarks/run.py --device cuda --size paper, fp32 and bf16, tasks batched in chunks of 4
#      and one by one (the meta-batch target: <= 0.8 s, <= 16 GiB);
#   3. the same at the small size (prediction and calibration figures).
# Everything lands in $OUT (default ./gpu-out): logs, the benchmark JSON files (copy them to
# benchmarks/results/ and run `python benchmarks/run.py --readme` to put them in the README).
# Budget: about 8 minutes in all; the device tool allows 10 per command.
set -u -o pipefail
cd "$(dirname "$0")/.."
WHEELS=(omegaconf==2.4.0 soundfile==0.14.0 cffi==2.1.1 pycparser==3.12 nnAudio==0.3.4)

if [ "${1:-}" = "--fetch-wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    exit $?
fi

OUT="${OUT:-gpu-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing .whl/ failed"; exit 1; }
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH=".:${PYTHONPATH:-}"
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
} 2>&1 | tee "$OUT/env.txt"
status=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s): $*"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    [ "$rc" = 0 ] || status=1
}
step tests 150 python3 -m pytest -p no:cacheprovider -n 0 -q -rs tests/test_batched_tasks.py tests/test_cli.py
step bench-paper 270 python3 benchmarks/run.py --device cuda --size paper --precision fp32 bf16 --task-chunk 4 \
    --repeats 3 --out "$OUT/cuda-paper.json"
step bench-small 90 python3 benchmarks/run.py --device cuda --size small --repeats 3 --out "$OUT/cuda-small.json"
exit $status
