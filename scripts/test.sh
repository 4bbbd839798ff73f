#!/usr/bin/env bash
# Sets up the environment (idempotent), runs ruff, then the full test suite against a real ComfyUI:
#   1. ComfyUI 0.3.75 (.comfyui/, or your own checkout in TDM_COMFYUI_DIR),
#   2. upstream ComfyUI (.comfyui-upstream/ComfyUI), where set-up unpacked the shared snapshot (developer machines
#      and CI; a user's clone has none, and then only the first run happens).
# Prints each run's ComfyUI version and pytest summary; fails if either run fails.
# Extra arguments go to both pytest runs (e.g. `bash scripts/test.sh -k sampler`).
set -euo pipefail
cd "$(dirname "$0")/.."
started=$SECONDS
bash scripts/setup.sh
.venv/bin/ruff check .
setup_line="test.sh: set-up and ruff took $((SECONDS - started)) s"

version_of() { sed -n 's/.*"\(.*\)".*/\1/p' "$1/comfyui_version.py"; }
runtimes=("$(realpath "${TDM_COMFYUI_DIR:-.comfyui}")")
if [ -f .comfyui-upstream/ComfyUI/comfyui_version.py ]; then
  upstream=$(realpath .comfyui-upstream/ComfyUI)
  [ "$upstream" = "${runtimes[0]}" ] || runtimes+=("$upstream")
fi

# Parallel workers (pytest-xdist), each test file on one worker (its module fixtures are built once), and the cores
# shared out among them (tests/conftest.py: one thread per worker on a 2-core machine). Measured on 2 cores, ComfyUI
# 0.3.75 with a cold toy cache: 226 s in 2 workers of 1 thread, where one process of 2 threads took 675-855 s (the
# tiny models' many small ops pay for every extra thread, and a server's threads fought the test process's).
# TDM_TEST_WORKERS=1 runs them in one process, as plain `pytest` does.
cores=$(nproc 2>/dev/null || echo 2)
workers=${TDM_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}
parallel=()
if [ "$workers" -gt 1 ]; then parallel=(-n "$workers" --dist loadfile); fi

# The minutes-long student-vs-teacher check (tests/test_sdxl_flux_quality.py) runs on the last, newest, runtime only.
export TDM_QUALITY_COMFYUI="${runtimes[-1]}"

summaries=()
failed=0
for tree in "${runtimes[@]}"; do
  label="ComfyUI $(version_of "$tree")"
  echo "test.sh: $label ($tree)"
  log=$(mktemp)
  run_started=$SECONDS
  set +e
  TDM_COMFYUI_DIR="$tree" .venv/bin/python -m pytest "${parallel[@]}" "$@" 2>&1 | tee "$log"
  status=${PIPESTATUS[0]}
  set -e
  # pytest's last line is its summary ("N passed, M skipped in 312.4s"), with or without -q.
  summary=$(grep -E " in [0-9.]+s" "$log" | tail -n 1 | sed 's/^=* *//; s/ *=*$//' || true)
  rm -f "$log"
  if [ "$status" -eq 5 ]; then
    summary="collected no tests (treated as a failure)"
    status=1
  fi
  [ "$status" -eq 0 ] || failed=1
  summaries+=("$label: ${summary:-no summary} (exit $status, $((SECONDS - run_started)) s wall)")
done

echo "$setup_line"
for line in "${summaries[@]}"; do echo "test.sh: $line"; done
echo "test.sh: $((SECONDS - started)) s in all"
exit "$failed"
