#!/usr/bin/env bash
# bench/compare.py on one GPU with a dummy-weight Qwen3-VL-8B (bench/README.md, "On a GPU").
#
#   bash bench/gpu_compare.sh NAME [compare.py options...]
#
# Writes Qwen3-VL-8B's config, the dev tokenizer and processor (no weights) unless
# MODEL_DIR holds a model; compare.py then starts vLLM on it as for every run (the
# gateway's flags, the task's budget, caches off) plus dummy weights. Needs a GPU build of
# vLLM, transformers and this package importable by $PYTHON. GPU_MEMORY_UTILIZATION
# (default 0.5) leaves room for the two transformers seed systems, which load the same 8B
# shapes with random weights on the same card; ENGINE_ARGS adds `vllm serve` flags (e.g.
# "--max-num-seqs 128": fewer CUDA graphs to capture).
set -euo pipefail
name=${1:?usage: bench/gpu_compare.sh NAME [compare.py options...]}
shift
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
model=${MODEL_DIR:-/tmp/scanner-bench/qwen3-vl-8b}
[ -f "$model/config.json" ] || $PYTHON -m scanner_gateway make-dev-model "$model" --preset qwen3-vl-8b
exec $PYTHON -m bench.compare --model "$model" --out "$name" \
  --engine-args "--load-format dummy --gpu-memory-utilization ${GPU_MEMORY_UTILIZATION:-0.5} ${ENGINE_ARGS:-}" "$@"
