#!/usr/bin/env bash
# bash scripts/demo.sh [cpift demo ARGS]
# The README's main command: sets up .venv, then runs the main job on the embedded default
# (a private local Ray on 127.0.0.1, CPU, the bundled small model and tasks). Output: runs/demo.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_venv.sh"
venv=${CPIFT_VENV:-$root/.venv}
cd "$root"
exec "$venv/bin/cpift" demo "$@"
