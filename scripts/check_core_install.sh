#!/usr/bin/env bash
# bash scripts/check_core_install.sh      (run by .ci/run after the test suite)
# A plain install works: a fresh venv with `pip install -e .` and no extras (the CPU torch
# first, as scripts/setup_venv.sh does) runs the whole tiny pipeline on a local Ray. A core
# dependency that only an extra pulls in (as accelerate once was) fails here.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
work=$(mktemp -d /tmp/cpift-core-XXXX)
trap 'rm -rf "$work"' EXIT
export CPIFT_VENV="$work/venv"
bash "$root/scripts/setup_venv.sh"          # no extras
if "$CPIFT_VENV/bin/python" -c "import mergekit" 2>/dev/null; then
  echo "check_core_install: an extra leaked into the plain venv" >&2; exit 1
fi
cd "$work"
export RAY_TMPDIR="$work/ray"
mkdir -p "$RAY_TMPDIR"
start=$(date +%s)
"$CPIFT_VENV/bin/cpift" run --preset tiny --quiet runs_dir="$work/runs" \
  train.max_steps=2 train.save_every=1 grouping.tau=0.04
test -f "$work/runs/tiny/report/report.md"
if [ -n "$(ls -A "$RAY_TMPDIR")" ]; then  # a finished run removes its local Ray's dir
  echo "check_core_install: the local Ray's dir outlived the run: $(ls -A "$RAY_TMPDIR")" >&2
  exit 1
fi
echo "check_core_install: the tiny pipeline ran on the core dependencies alone in" \
     "$(( $(date +%s) - start )) s"
