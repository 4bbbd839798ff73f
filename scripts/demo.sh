#!/usr/bin/env bash
# README quick-start command 1: set up the environment, then distill a 4-step TDM student from the toy digits
# teacher on the CPU (teacher trained once and cached; figure + metrics JSON in demo-output/). Arguments go to
# `python -m tdm_core.demo` (e.g. --output DIR, --iterations N).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m tdm_core.demo "$@"
