#!/usr/bin/env bash
# Sets up the environment (idempotent) and runs the full test suite against a real ComfyUI, plus ruff.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k sampler`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "test.sh: pytest collected no tests — treating as a failure" >&2
  exit 1
fi
exit "$status"
