#!/usr/bin/env bash
# bash scripts/setup_venv.sh [EXTRAS]   e.g. `bash scripts/setup_venv.sh test`
# Creates the project's virtual environment ($CPIFT_VENV, default .venv) if missing and installs
# cpift-dist into it (editable) with the given extras. Where no CUDA device is present, the CPU
# build of PyTorch is installed first, so that the torch range in pyproject.toml does not pull
# a multi-GB CUDA build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${CPIFT_VENV:-$root/.venv}
extras=${1:-}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv" >&2
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" >&2 || true
fi
pip_install() { "$venv/bin/python" -m pip install -q "$@" 2>&1 | grep -v "is ignored" >&2 || true; }

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: CUDA device found: torch comes from the dependency range" >&2
  else
    echo "setup: no CUDA device: installing the CPU build of torch 2.13.0" >&2
    pip_install "torch==2.13.0"
  fi
fi
spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
pip_install -e "$spec"
"$venv/bin/python" -c "import cpift_dist, torch" || { echo "setup: install failed" >&2; exit 1; }
