#!/usr/bin/env bash
# bench/compare.py on one GPU with a dummy-weight Qwen3-VL-8B (bench/README.md, "On a GPU").
#
#   bash bench/gpu_compare.sh NAME [compare.py options...]
#
# Writes Qwen3-VL-8B's config, the dev tokenizer and processor (no weights) unless
# MODEL_DIR holds a model, starts vLLM on it with dummy weights and caches off, waits for
# it, then runs compare.py against it. Needs a GPU build of vLLM, transformers and this
# package importable by $PYTHON. VLLM (default `vllm`) is the command that runs vLLM's CLI;
# GPU_MEMORY_UTILIZATION (default 0.5) leaves room for the two transformers seed systems,
# which load the same 8B shapes with random weights on the same card. ENGINE_ARGS: more
# `vllm serve` flags, word-split (e.g. "--max-num-seqs 128": fewer CUDA graphs to capture).
set -euo pipefail
name=${1:?usage: bench/gpu_compare.sh NAME [compare.py options...]}
shift
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VLLM=${VLLM:-vllm}
port=${ENGINE_PORT:-8000}
model=${MODEL_DIR:-/tmp/scanner-bench/qwen3-vl-8b}
log=${ENGINE_LOG:-/tmp/scanner-bench/vllm.log}
mkdir -p "$(dirname "$log")"
[ -f "$model/config.json" ] || $PYTHON -m scanner_gateway make-dev-model "$model" --preset qwen3-vl-8b

# product_scan's pixel budget, applied by vLLM to the raw photos of the 12 MP view.
budget=$($PYTHON - <<'EOF'
import json
from scanner_gateway.config import default_prompts_dir
from scanner_gateway.scan.tasks import TaskRegistry
b = TaskRegistry.load(default_prompts_dir()).get("product_scan").budget
print(json.dumps({"size": {"longest_edge": b.max_pixels, "shortest_edge": b.min_pixels}}))
EOF
)
# shellcheck disable=SC2086  # VLLM may be "python3 -m vllm.entrypoints.cli.main"; ENGINE_ARGS splits
$VLLM serve "$model" --load-format dummy --dtype bfloat16 --served-model-name scanner-dev --port "$port" \
  --max-model-len 8192 --gpu-memory-utilization "${GPU_MEMORY_UTILIZATION:-0.5}" \
  --limit-mm-per-prompt '{"image":{"count":4,"width":1120,"height":1120},"video":0}' \
  --structured-outputs-config '{"backend":"guidance","disable_any_whitespace":true}' \
  --generation-config vllm --scheduling-policy priority --mm-processor-kwargs "$budget" \
  --no-enable-prefix-caching --mm-processor-cache-gb 0 ${ENGINE_ARGS:-} >"$log" 2>&1 &
engine=$!
trap 'kill $engine 2>/dev/null || true' EXIT
started=$SECONDS
until curl -sf "http://127.0.0.1:$port/health" >/dev/null; do
  if ! kill -0 $engine 2>/dev/null; then
    echo "vLLM exited during start-up; the end of $log:" >&2
    tail -40 "$log" >&2
    exit 1
  fi
  if ((SECONDS - started > ${ENGINE_START_TIMEOUT_S:-900})); then
    echo "vLLM not healthy after ${ENGINE_START_TIMEOUT_S:-900} s; the end of $log:" >&2
    tail -40 "$log" >&2
    exit 1
  fi
  sleep 2
done
echo "vLLM healthy after $((SECONDS - started)) s (log: $log)"
$PYTHON bench/compare.py --engine-url "http://127.0.0.1:$port" --engine-has-budget --model "$model" \
  --out "$name" "$@"
