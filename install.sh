#!/usr/bin/env bash
# Set up soupjax on a fresh machine: Debian's Fashion-MNIST (the offline default data set), a virtual
# environment in .venv with the pinned requirements, and soupjax itself (editable).
#   bash install.sh          runtime only
#   bash install.sh --test   plus the test extras (pytest, torch, torchvision, timm)
set -euo pipefail
cd "$(dirname "$0")"

if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ]; then
  if command -v apt-get >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update
    $SUDO apt-get install -y dataset-fashion-mnist
  else
    echo "install.sh: Debian's dataset-fashion-mnist is needed for the offline default data set" >&2
    echo "            (or point the config at another TFDS data set)" >&2
  fi
fi

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c "import ensurepip, venv" >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  # Debian/Ubuntu ship venv's pip bootstrap separately.
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y python3-venv
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# No wheel cache: the test extras pull a CUDA build of torch (about 5.5 GB installed), and a cached copy of
# every wheel beside the installed one nearly doubles the disk the install needs at its peak.
export PIP_NO_CACHE_DIR=1
.venv/bin/python -m pip install --quiet --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install --quiet -r requirements-test.txt
else
  .venv/bin/python -m pip install --quiet -r requirements.txt
fi
.venv/bin/python -m pip install --quiet --no-deps -e .
echo "install.sh: ready (.venv)"
