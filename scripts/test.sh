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
# two workers (pytest-xdist): the suite waits on Ray, DeepSpeed and subprocesses more than it
# computes; the Ray tests stay together on one (tests/conftest.py). CPIFT_TEST_WORKERS=0: none.
workers=${CPIFT_TEST_WORKERS:-2}
xdist=()
[ "$workers" != 0 ] && xdist=(-n "$workers" --dist loadgroup)
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "${xdist[@]}" "$@"
