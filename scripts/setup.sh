#!/usr/bin/env bash
# Sets up everything CMAPKD needs on a fresh Debian machine, idempotently:
#   1. the Debian packages the embedded default's data is made from (needs root; otherwise it
#      stops and prints the exact command to run);
#   2. a virtual environment in .venv with the pinned Python dependencies of requirements.lock
#      and the cmapkd package itself (editable).
# A second run with nothing changed installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

# --- 1. Debian packages -------------------------------------------------------------------
# fonts-noto-color-emoji: the emoji artwork; unicode-data: emoji names/groups (emoji-test.txt);
# dataset-fashion-mnist: the out-of-domain zero-shot set.
APT_PACKAGES=(fonts-noto-color-emoji unicode-data dataset-fashion-mnist)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$pkg")
  fi
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: these Debian packages are missing: ${missing[*]}" >&2
    echo "setup: not running as root, so install them first with:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
fi

# --- 2. Python environment ----------------------------------------------------------------
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1; then PY="$cand"; break; fi
  done
fi
if [ -z "$PY" ] || ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "setup: Python >= 3.11 is needed (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $("$PY" --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.cmapkd-installed
UV_VERSION=0.13.9
want=$( (cat requirements.lock pyproject.toml; echo "uv $UV_VERSION") | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing pinned Python dependencies (first run: several GB, about a minute)"
  # torch and torchvision are pinned together in the lock (PyPI CUDA builds; they run on CPU too).
  # uv (from PyPI, pinned) installs the same pinned lock as pip would, downloading in parallel:
  # 38-50 s for a fresh .venv against pip's 2 min 45 s on the 2-core machine (README "Known limits"). pip stays the
  # fallback where uv cannot be installed.
  pip_install() { .venv/bin/python -m pip install --quiet --disable-pip-version-check "$@"; }
  if pip_install "uv==$UV_VERSION" 2>/dev/null && [ -x .venv/bin/uv ]; then
    # uv's download cache sits inside .venv (same file system: files are hard-linked, not copied)
    # and is removed afterwards, so the environment's ~6 GB are not stored twice
    export UV_CACHE_DIR="$PWD/.venv/.uv-cache"
    .venv/bin/uv pip install --quiet --python .venv/bin/python -r requirements.lock
    .venv/bin/uv pip install --quiet --python .venv/bin/python --no-deps -e .
    rm -rf "$UV_CACHE_DIR"
  else
    echo "setup: uv $UV_VERSION could not be installed; installing with pip (slower)"
    pip_install -r requirements.lock
    pip_install --no-deps -e .
  fi
  echo "$want" > "$stamp"
else
  echo "setup: environment up to date (.venv)"
fi
