#!/usr/bin/env bash
# Real-browser check of workflows/*.json (separate from the pytest suite; about a minute on 2 CPU cores once
# installed): a live ComfyUI serves its real frontend (comfyui-frontend-package), Debian's headless Chromium driven
# by playwright-core loads every workflow, checks for the missing-nodes dialog, load alerts and uncreated nodes,
# clicks Queue, and keeps screenshots in test-artifacts/browser/; workflows/<name>.jpg thumbnails are rewritten from
# the loaded graphs. A copy of one workflow with an unknown node type must be flagged on every run (a dialog in
# frontend 1.32, a toast in 1.49). Runs against ComfyUI 0.3.75 and, where set-up unpacked it, upstream ComfyUI.
#
# Installs what is missing (idempotent): Debian's `chromium` (apt-get), playwright-core from npm into .browser/
# (never a downloaded browser), the Python environment (scripts/setup.sh). Needs Node.js 20+.
# Arguments go to tests/browser/run_browser_check.py (--no-thumbnails, --only NAME, --workflows DIR), except a first
# --no-setup, which skips scripts/setup.sh (an environment that is already set up and must not be changed, e.g. a
# worktree sharing another checkout's .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

PLAYWRIGHT_CORE_VERSION="1.65.1"
CHROMIUM=${TDM_CHROMIUM:-/usr/bin/chromium}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x "$CHROMIUM" ]; then
  echo "browser_check: installing Debian's chromium"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

if ! command -v node >/dev/null; then
  echo "browser_check: installing Node.js (apt)"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null
fi
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  echo "browser_check: playwright-core $PLAYWRIGHT_CORE_VERSION needs Node.js 20+, found $(node --version)" >&2
  exit 1
fi

installed=$(node -p "try{require('./.browser/node_modules/playwright-core/package.json').version}catch{''}")
if [ "$installed" != "$PLAYWRIGHT_CORE_VERSION" ]; then
  echo "browser_check: installing playwright-core $PLAYWRIGHT_CORE_VERSION into .browser/"
  mkdir -p .browser
  printf '{"name": "tdm-browser-check", "private": true}\n' > .browser/package.json
  # playwright-core has no install script and downloads no browser; Debian's chromium is used.
  npm install --prefix .browser --no-audit --no-fund --silent --save-exact "playwright-core@$PLAYWRIGHT_CORE_VERSION"
fi

if [ "${1:-}" = "--no-setup" ]; then
  shift
else
  bash scripts/setup.sh >/dev/null
fi

# Both runtimes, as scripts/test.sh: ComfyUI 0.3.75 with frontend 1.32.9, then upstream with its own frontend (1.49.6)
# where set-up unpacked it.
runtimes=("$(realpath "${TDM_COMFYUI_DIR:-.comfyui}")")
if [ -f .comfyui-upstream/ComfyUI/comfyui_version.py ]; then
  upstream=$(realpath .comfyui-upstream/ComfyUI)
  [ "$upstream" = "${runtimes[0]}" ] || runtimes+=("$upstream")
fi
status=0
for tree in "${runtimes[@]}"; do
  set +e
  TDM_COMFYUI_DIR="$tree" TDM_CHROMIUM="$CHROMIUM" .venv/bin/python tests/browser/run_browser_check.py "$@"
  run_status=$?
  set -e
  [ "$run_status" -eq 0 ] || status=1
done
echo "browser_check: took $(( $(date +%s) - start ))s ($("$CHROMIUM" --version 2>/dev/null | head -1), playwright-core $PLAYWRIGHT_CORE_VERSION)"
exit "$status"
