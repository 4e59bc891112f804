#!/bin/bash
# The GPU tests, then the GPU figures the open issues ask for, most wanted first, inside one time budget
# (SUITE_SECONDS, default 540: one device call is at most 10 minutes). A step that would outrun the
# budget is cut to what is left, and a step with under 20 s left is skipped with a message.
# Usage: bash benchmarks/gpu_suite.sh [OUT_DIR]   (JSON lines are appended under benchmarks/results/
# and copied to OUT_DIR, default $OUT, after every step, so a call stopped at its limit keeps what ran).
# SUITE_PARTS (default "tests quality speed") chooses the parts, in that order:
#   tests    the CUDA tests (tiny random models);
#   quality  issue 23's figures at QUALITY_BITS counted bits on SmolLM2 (default 4.25 2.5 2.25 3.25), full
#            WikiText-2 test and Shakespeare with KL: anybit's recipe with 64 block-tuning steps (about
#            110 s and 50 s of evaluation on an H200), then 248 end-to-end steps on 128 windows
#            (`anybit tune --device cuda`, about 140 s); needs the SmolLM2 model in ANYBIT_CACHE (see
#            data/README.md; 94 MB, more than one call carries: send it in two parts);
#   speed    the kernel and decode figures of issues 6 and 7 (random weights, no model file).
# Needs torch with CUDA, triton, transformers, gguf, and anybit importable (pip install -e . or
# PYTHONPATH=src). On a copied tree (a lent machine) set ANYBIT_COMMIT so the records name the code's commit.
set -u
out=${1:-${OUT:-/tmp/anybit-gpu}}
parts=" ${SUITE_PARTS:-tests quality speed} "
work=${SUITE_WORK:-/tmp/anybit-gpu-work}
mkdir -p "$out" "$work"
cd "$(dirname "$0")"
export PYTHONPATH=../src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
deadline=$((SECONDS + ${SUITE_SECONDS:-540}))
stamp=$(mktemp) # results files changed after it are this suite's (a lent machine returns only a few files)

step() { # step MAX_SECONDS COMMAND...
  local limit=$1 left=$((deadline - SECONDS))
  shift
  if ((left < 20)); then
    echo "!! out of time, skipped: $*"
    return 1
  fi
  ((limit > left)) && limit=$left
  echo "== [${SECONDS} s] $* (at most ${limit} s)"
  timeout --kill-after=10 "$limit" "$@"
  local rc=$?
  ((rc)) && echo "!! failed or stopped (exit $rc): $*"
  find results -name '*.jsonl' -newer "$stamp" -exec cp {} "$out"/ \;  # only what this suite wrote
  return $rc
}

if [[ $parts == *" tests "* ]]; then
  python -c "import pytest" 2>/dev/null || echo "!! pytest is not installed here: the GPU tests will not run"
  step 240 python -m pytest -q -p no:cacheprovider ../tests/test_cuda.py ../tests/test_kernels.py
fi

if [[ $parts == *" quality "* ]]; then
  if python -c "from anybit.model.loading import resolve_spec; resolve_spec('smollm2-135m')" 2>/dev/null; then
    f32=(--device cuda --dtype float32)
    for bits in ${QUALITY_BITS:-4.25 2.5 2.25 3.25}; do  # 3.25 last: measured on 2026-12-04
      name="anybit_${bits}_tune_steps=64"
      step 240 python reference_figures.py --configs "anybit:${bits}:tune_steps=64" --nsamples 32 \
        --fisher-nsamples 8 --calib-dtype float32 "${f32[@]}" --keep "$work" --results quality_gpu \
        --datasets wikitext2,shakespeare --kl || continue
      step 150 python -m anybit.cli tune "$work/$name" --out "$work/$name-e2e248" --steps 248 --nsamples 128 \
        --device cuda --force || continue
      step 90 python reference_figures.py --configs "" --dirs "$work/$name-e2e248" "${f32[@]}" \
        --results quality_gpu --datasets wikitext2,shakespeare --kl
    done
  else
    echo "!! SmolLM2 not in ANYBIT_CACHE: the quality figures are skipped"
  fi
fi

if [[ $parts == *" speed "* ]]; then
  # Issue 7's speed target (K = 8 under 5 % of decode time on the large model), in its best form: graphs,
  # compensation on the second stream, against the same stream.
  step 150 python decode_speed.py --shape llama-7b --bits 3 --dec 0,8 --overlap 0,1 --cuda-graph
  step 90 python dec_speed.py --ks 0,8,32
  # Issue 6's targets: the 3-bit product against fp16, and decoding at fp16 speed.
  step 90 python kernel_speed.py --bits 2,3,4
  step 90 python decode_speed.py --shape smollm2-135m --bits 3 --dec 0,8 --overlap 0,1 --cuda-graph
  step 60 python kernel_speed.py --bits 3 --batch 512
  step 120 python decode_speed.py --shape llama-7b --bits 3 --dec 0,4,16,32,64 --cuda-graph
fi
echo "== done in ${SECONDS} s"
