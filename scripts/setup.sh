#!/usr/bin/env bash
# Sets up a fresh machine for s2s_tf; safe to run again (every step is idempotent).
#
#   - the Debian package dataset-fashion-mnist (the embedded default data, offline);
#   - a virtual environment ($S2S_VENV, default .venv) with s2s_tf installed from this
#     checkout (a regular, non-editable install) plus its test tools;
#   - CleverHans 4 and tensorflow-serving-api with --no-deps: their metadata pins
#     versions of TensorFlow-era packages that must not replace ours (the serving
#     protos are only used to write and check TF Serving's request/warm-up files).
#
# TensorFlow comes from an extra: S2S_TF_EXTRA=cpu (default, tensorflow-cpu) or
# S2S_TF_EXTRA=gpu (tensorflow[and-cuda], for machines with NVIDIA GPUs).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${S2S_VENV:-.venv}"
EXTRA="${S2S_TF_EXTRA:-cpu}"
FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist

if [ ! -f "$FASHION_MNIST_DIR/t10k-images-idx3-ubyte.gz" ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; fi
  echo "Installing the Debian package dataset-fashion-mnist ..."
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "Creating the virtual environment $VENV ..."
  python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --quiet)
"${PIP[@]}" install --upgrade pip
echo "Installing s2s_tf[$EXTRA,test] from $(pwd) ..."
# --force-reinstall of s2s_tf alone so a second run picks up changed sources; setuptools
# reuses ./build, which would carry modules that no longer exist into the wheel.
rm -rf build
"${PIP[@]}" install ".[$EXTRA,test]"
"${PIP[@]}" install --no-deps --force-reinstall .
"${PIP[@]}" install --no-deps cleverhans==4.0.0 tensorflow-serving-api==2.21.0
echo "Set up: $VENV ($("$VENV/bin/python" -c 'import tensorflow as tf; print("tensorflow", tf.__version__)' 2>/dev/null))"
