#!/usr/bin/env bash
# Sets up the machine, then runs the test suite against the *installed* package
# (not the source tree): pytest runs with --import-mode=importlib from the venv's
# own entry point, so `import s2s_tf` resolves to site-packages, and
# tests/package_test.py checks that it does.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${S2S_VENV:-.venv}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
export S2S_TF_EXPECT_INSTALLED=1
# One pytest worker per core (pytest-xdist), each test class whole on one worker (its
# setUpClass runs once): most tests spend their time in single-threaded tracing and
# subprocess start-up.
parallel=0
"$VENV/bin/pytest" -p no:cacheprovider -n auto --dist loadscope -m "not serial" tests "$@" \
  || parallel=$?
# pytest's 5: no test selected in this part (e.g. -k naming only a serial test).
[ "$parallel" -eq 0 ] || [ "$parallel" -eq 5 ] || exit "$parallel"
# Then the tests that measure the machine (peak memory), with nothing else running.
serial=0
"$VENV/bin/pytest" -p no:cacheprovider -m serial tests "$@" || serial=$?
if [ "$serial" -eq 5 ] && [ "$parallel" -eq 0 ]; then
  exit 0
fi
exit "$serial"
