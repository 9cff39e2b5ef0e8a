#!/usr/bin/env bash
# The robust job on the embedded default data (Fashion-MNIST, offline): sets up the machine,
# then trains the classifier, the paper's S2SNet (stages 1 and 2), an adversarial S2SNet (stage 2
# against the soft-routing surrogate attack, in front of the same frozen classifier) and an
# adversarially trained classifier (Madry's PGD training, same attack and budget); evaluates all
# four with the standard attack preset (every threat model that applies, per-example worst case,
# 500 test examples); exports the adversarial S2SNet; and writes the README table to
# <workdir>/robust_table.md. Its training budget is its own (the main job's is cut to fit 20
# minutes). A rerun reuses finished parts; pass --fresh to start again. Extra
# arguments go to the binary (see `--helpfull`), e.g. --train_eps=4/255.
# The training budget ramps up over the first 200 steps (a third of the adversarial stage 2):
# measured better for the adversarial S2SNet and no worse for the Madry classifier (README,
# "A ramp of the training budget"); pass --train_eps_ramp_steps=0 for none.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${S2S_VENV:-.venv}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$VENV/bin/s2s_pipeline" --dataset=fashion_mnist \
  --workdir="${S2S_WORKDIR:-workdir/fmnist_robust}" \
  --robust --attack_preset=standard --transfer_classifier= \
  --classifier_steps=1200 --stage1_steps=800 --bn_recalibration_batches=100 \
  --train_eps_ramp_steps=200 "$@"
