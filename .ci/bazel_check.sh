#!/usr/bin/env bash
# Checks that the root BUILD file loads and that its targets resolve, offline.
#
# @rules_python is replaced by the local stand-in in bazel/rules_python_stub,
# so no network access is needed. Prints the targets per rule kind and fails
# if Bazel reports an error or if a test has no py_test target.
#
# Usage: bash .ci/bazel_check.sh
# Environment: BAZEL (default: bazel), BAZEL_OUTPUT_USER_ROOT (default: a
# per-user directory under ${TMPDIR:-/tmp}, reused across runs).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
root="$PWD"

bazel="${BAZEL:-bazel}"
if ! command -v "${bazel}" >/dev/null 2>&1; then
  echo "error: '${bazel}' not found. Install Bazel, e.g. 'apt-get install bazel-bootstrap'" \
    "(Debian/Ubuntu), or set BAZEL to a Bazel binary." >&2
  exit 1
fi

# A dedicated output root keeps this check independent of $HOME (which may be
# unset or read-only on CI machines) and of any other Bazel workspace's server.
output_user_root="${BAZEL_OUTPUT_USER_ROOT:-${TMPDIR:-/tmp}/s2s_tf_bazel_$(id -u)}"
mkdir -p "${output_user_root}"

startup_opts=(--output_user_root="${output_user_root}" --nohome_rc)
query_opts=(
  --override_repository=rules_python="${root}/bazel/rules_python_stub"
  # The stand-in's own BUILD files are not part of this project's package.
  --deleted_packages=bazel/rules_python_stub,bazel/rules_python_stub/python
  --noshow_progress
)

cleanup() {
  "${bazel}" "${startup_opts[@]}" shutdown >/dev/null 2>&1 || true
}
trap cleanup EXIT

bq() {
  "${bazel}" "${startup_opts[@]}" query "${query_opts[@]}" "$@"
}

echo "Bazel: $("${bazel}" "${startup_opts[@]}" --version 2>/dev/null || echo unknown)"
start=$(date +%s)

all_targets="$(bq '//...')"
rules="$(bq 'kind("py_(library|binary|test) rule", //...)' --output=label_kind | sort)"
# Labels in deps, srcs and data must resolve. Bazel's query treats a label
# that no rule declares as a source file and does not check that the file
# exists, so both are checked here. (`deps(//...)` would also load Bazel's
# implicit test and toolchain dependencies, whose repositories need network
# access.)
errors=0
while read -r label; do
  [[ -n "${label}" ]] || continue
  echo "error: ${label} is used in deps but is not a target" >&2
  errors=1
done <<<"$(bq 'kind("source file", labels(deps, //...))')"
while read -r label; do
  [[ -n "${label}" ]] || continue
  if [[ ! -e "${label#//:}" ]]; then
    echo "error: ${label} is used in srcs or data but does not exist" >&2
    errors=1
  fi
done <<<"$(bq 'kind("source file", labels(srcs, //...) + labels(data, //...))')"

n_lib=$(grep -c "^py_library rule " <<<"${rules}" || true)
n_bin=$(grep -c "^py_binary rule " <<<"${rules}" || true)
n_test=$(grep -c "^py_test rule " <<<"${rules}" || true)

echo "py_test targets:"
grep "^py_test rule " <<<"${rules}" | sed 's/^py_test rule /  /'

# Every tests/*_test.py must have a py_test target of the same name.
for f in tests/*_test.py; do
  name="$(basename "${f}" .py)"
  if ! grep -qx "py_test rule //:${name}" <<<"${rules}"; then
    echo "error: no py_test target //:${name} for ${f}" >&2
    errors=1
  fi
done

total=$(grep -c . <<<"${all_targets}" || true)
summary="${total} targets (${n_lib} py_library, ${n_bin} py_binary, ${n_test} py_test)"
if ((errors)); then
  echo "FAILED: ${summary}" >&2
  exit 1
fi
echo "OK: ${summary} in $(($(date +%s) - start))s"
