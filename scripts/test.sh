#!/usr/bin/env bash
# The project's test command (the README's and CI's): set up, lint, type-check, test.
#
#   bash scripts/test.sh               # everything
#   bash scripts/test.sh tests/unit    # extra arguments go to pytest instead of "tests"
#
# Each stage runs even if an earlier one failed, so one run reports every problem; the
# script exits non-zero if any stage failed. A pytest run that collects no test at all
# (exit code 5) counts as a failure: CI must never pass on an empty suite.
set -uo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python}"

bash scripts/setup.sh || { echo "test: setup failed" >&2; exit 1; }

failed=()
stage() {
  local name="$1"
  shift
  echo "test: == $name: $*"
  local start=$SECONDS
  "$@"
  local rc=$?
  if ((rc == 5)) && [[ "$name" == pytest ]]; then
    echo "test: pytest collected no tests (exit 5): the suite must not be empty" >&2
  fi
  if ((rc != 0)); then
    failed+=("$name (exit $rc)")
  fi
  echo "test: == $name: exit $rc in $((SECONDS - start)) s"
}

stage "ruff check" "$PY" -m ruff check .
stage "ruff format" "$PY" -m ruff format --check .
stage "mypy" "$PY" -m mypy
if (($#)); then
  stage pytest "$PY" -m pytest -q "$@"
else
  stage pytest "$PY" -m pytest -q tests
fi

if ((${#failed[@]})); then
  echo "test: FAILED: ${failed[*]}" >&2
  exit 1
fi
echo "test: all stages passed"
