#!/bin/bash
# The GPU tests, then every GPU figure the open issues ask for, in one run on a CUDA machine (10-20 minutes
# on an H100; the figures in RESULTS.md came from these commands run piecewise).
# Usage: bash benchmarks/gpu_suite.sh [OUT_DIR]   (JSON lines are appended under benchmarks/results/
# and copied to OUT_DIR, default $OUT). Needs torch with CUDA, triton, transformers, and anybit
# importable (pip install -e . or PYTHONPATH=src); the quantize-time step also needs the SmolLM2 model
# in ANYBIT_CACHE (see data/README.md) and is skipped with a message when it is missing.
set -u
out=${1:-${OUT:-/tmp/anybit-gpu}}
mkdir -p "$out"
cd "$(dirname "$0")"
export PYTHONPATH=../src${PYTHONPATH:+:$PYTHONPATH}
run() { echo "== $*"; timeout 900 python "$@" || echo "!! failed: $*"; }
(cd .. && timeout 600 python -m pytest -q tests/test_kernels.py tests/test_cuda.py tests/test_dec.py) || echo "!! GPU tests failed"
run kernel_speed.py --bits 2,3,4
run kernel_speed.py --bits 3 --batch 512
run dec_speed.py --ks 0,4,8,16,32,64
run decode_speed.py --shape llama-7b --bits 3 --dec 0,4,8,16,32,64 --overlap 0,1
run decode_speed.py --shape smollm2-135m --bits 3 --dec 0,8,32
run decode_speed.py --shape llama-7b --bits 3 --dec 0,8,32 --overlap 0,1 --cuda-graph
run decode_speed.py --shape smollm2-135m --bits 3 --dec 0,8 --overlap 0,1 --cuda-graph
if python -c "from anybit.model.loading import resolve_spec; resolve_spec('smollm2-135m')" 2>/dev/null; then
  run reference_figures.py --configs anybit:3.25,squeezellm3,claq:3.25,slim:3,skim:3.25 --nsamples 32 \
    --fisher-nsamples 8 --device cuda --dtype float16 --calib-dtype float16 --results recipes_gpu
else
  echo "!! SmolLM2 not in ANYBIT_CACHE: quantize times on the GPU skipped"
fi
cp results/*.jsonl "$out"/
