#!/usr/bin/env bash
# bash scripts/test.sh [PYTEST ARGS]
# The README's test command: sets up .venv with the test extras, then runs the whole suite on
# CPU (tiny models, real local Ray, every test under a timeout).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_venv.sh" test
venv=${CPIFT_VENV:-$root/.venv}
cd "$root"
if [ -z "${RAY_TMPDIR:-}" ]; then  # the suite's Ray sessions and logs, removed afterwards
  RAY_TMPDIR=$(mktemp -d /tmp/cpift-ray-XXXX)
  export RAY_TMPDIR
  trap 'rm -rf "$RAY_TMPDIR"' EXIT  # the script still exits with pytest's status
fi
"$venv/bin/python" -m pytest -q -p no:cacheprovider --durations=25 "$@"
