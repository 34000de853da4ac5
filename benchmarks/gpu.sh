#!/usr/bin/env bash
# GPU runners: the same correctness suite and benchmarks against the CUDA build of vLLM,
# on both model runners. On V1 the numbers are fastpath's patch; on V2 target_token_ids maps
# onto upstream's own prompt_logprob_token_ids, so upstream's implementation is measured
# and checked bitwise beside ours. Real checkpoints: FASTPATH_BENCH_OPT125M / _8B / _70B.
#   bash benchmarks/gpu.sh [NAME]      (runs saved as NAME-v1 and NAME-v2; default gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "benchmarks/gpu.sh: skipped: no CUDA device on this machine (run it on a GPU runner)"
    exit 0
fi
name="${1:-gpu}"
mkdir -p reports/gpu
for runner in 0 1; do
    tag="v$((runner + 1))"
    echo "== VLLM_USE_V2_MODEL_RUNNER=$runner ($tag): correctness"
    VLLM_USE_V2_MODEL_RUNNER=$runner pytest -q -m correctness tests/
    echo "== VLLM_USE_V2_MODEL_RUNNER=$runner ($tag): benchmarks"
    VLLM_USE_V2_MODEL_RUNNER=$runner pytest -q benchmarks/ \
        --benchmark-save="$name-$tag" --benchmark-json="reports/gpu/$name-$tag.json"
done
fastpath report "reports/gpu/$name-v1.json" "reports/gpu/$name-v2.json" --out reports/gpu
# What the exactness promise needs on this GPU (docs/exactness.md, "On a GPU"): which schedule
# changes move bits on a batched engine, without and with vLLM's batch-invariant kernels
# (each report also carries the workers' lm_head probe and kernels).
for invariant in 0 1; do
    echo "== schedule changes, VLLM_BATCH_INVARIANT=$invariant"
    VLLM_BATCH_INVARIANT=$invariant python benchmarks/schedule_bits.py \
        --json "reports/gpu/$name-schedule-bits-batch-invariant$invariant.json"
done
