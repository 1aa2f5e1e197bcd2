#!/usr/bin/env bash
# Installs everything vqvae2_jax needs into .venv (idempotent): Debian's
# Fashion-MNIST files where apt is available, then the package and its test
# extras. Source it or run it; later runs only check what is there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else return 1; fi
}

# The embedded default dataset: Debian ships Fashion-MNIST's original files.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  echo "Installing Debian's dataset-fashion-mnist ..."
  as_root apt-get update -qq && as_root apt-get install -y -qq dataset-fashion-mnist >/dev/null \
    || echo "WARNING: could not install dataset-fashion-mnist; see README (data)." >&2
fi

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
    echo "Installing python3-venv ..."
    as_root apt-get update -qq && as_root apt-get install -y -qq python3-venv >/dev/null
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
  fi
fi

stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "Installing vqvae2_jax and its dependencies into $VENV ..."
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
