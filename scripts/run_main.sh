#!/usr/bin/env bash
# The main job on the embedded default data (Fashion-MNIST, offline): sets up the
# machine, then trains the classifiers, the S2SNet autoencoder (stages 1 and 2),
# evaluates its robustness, writes the report and exports the defended SavedModel.
# A rerun reuses finished stages; pass --fresh to start again. Extra arguments go
# to the binary (see `--helpfull`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${S2S_VENV:-.venv}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$VENV/bin/s2s_pipeline" --dataset=fashion_mnist --workdir="${S2S_WORKDIR:-workdir/fmnist}" "$@"
