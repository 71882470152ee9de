#!/usr/bin/env bash
# bash scripts/test.sh [PYTEST ARGS]
# The README's test command: sets up .venv with the test extras, then runs the whole suite on
# CPU (tiny models, real local Ray, every test under a timeout).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup_venv.sh" test
venv=${CPIFT_VENV:-$root/.venv}
cd "$root"
export RAY_TMPDIR=${RAY_TMPDIR:-$(mktemp -d /tmp/cpift-ray-XXXX)}
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
