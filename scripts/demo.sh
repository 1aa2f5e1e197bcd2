#!/usr/bin/env bash
# Sets up a fresh machine and runs the whole pipeline on Fashion-MNIST (CPU).
# Extra arguments go to vqvae2_jax.main, e.g. --mode=vqvae.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh
WORKDIR=${WORKDIR:-workdir/fashion_mnist}
exec .venv/bin/python -m vqvae2_jax.main --config=configs/fashion_mnist.py \
  --workdir="$WORKDIR" --mode=all "$@"
