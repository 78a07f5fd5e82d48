#!/usr/bin/env bash
# Installs the outside tools some tests drive (a browser, promtool, schema checkers).
# Each script in scripts/test-tools.d/ installs one tool, idempotently and quickly when it is
# already there; `make test` runs them all before pytest. A test whose tool is missing fails
# (it never skips), so a broken install shows up in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob
for step in scripts/test-tools.d/*.sh; do
  bash "$step"
done
