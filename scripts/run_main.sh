#!/usr/bin/env bash
# The main job on the embedded default data (Fashion-MNIST, offline): sets up the
# machine, then builds the S2SNet-defended model and runs it on a batch.
# Extra arguments are passed to the binary (see `--helpfull`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${S2S_VENV:-.venv}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$VENV/bin/s2s_demo" --dataset=fashion_mnist --workdir="${S2S_WORKDIR:-workdir/demo}" "$@"
