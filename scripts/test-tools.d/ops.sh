#!/usr/bin/env bash
# Tools for tests/test_ops.py (the deploy/ checks), installed into .venv/bin, idempotently:
#
#   promtool, prometheus  unpacked from Debian's `prometheus` package (`apt-get download` +
#                         `dpkg-deb -x`: the binaries only, so no daemon is installed or started)
#   dclint                from npm: a Docker Compose linter that ships the compose-spec JSON schema
#   kubectl kustomize     checked, not installed: renders the deploy/k8s-postgresql overlay
#
# The Python side (kubernetes-validate with its offline schemas, jsonschema, PyYAML) is in the
# `test` extra of pyproject.toml. Fast when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN="$PWD/.venv/bin"
DCLINT_VERSION=3.1.0
[ -x "$BIN/python" ] || { echo "ops.sh: $BIN/python is missing: run 'make setup' first" >&2; exit 1; }

if ! { "$BIN/promtool" --version && "$BIN/prometheus" --version; } >/dev/null 2>&1; then
  tmp="$(mktemp -d)" && chmod 755 "$tmp"   # readable by apt's download user
  trap 'rm -rf "$tmp"' EXIT
  # apt-get download needs package lists; fetch them once if this machine has none yet
  (cd "$tmp" && apt-get download prometheus) || { apt-get update -qq && (cd "$tmp" && apt-get download prometheus); }
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  install -m 0755 "$tmp/root/usr/bin/promtool" "$tmp/root/usr/bin/prometheus" "$BIN/"
  echo "ops.sh: installed $("$BIN/promtool" --version 2>&1 | head -1)"
fi

if [ "$("$BIN/dclint" --version 2>/dev/null || true)" != "$DCLINT_VERSION" ]; then
  command -v npm >/dev/null || { echo "ops.sh: npm is needed for dclint (apt-get install npm)" >&2; exit 1; }
  npm install --silent --no-audit --no-fund --prefix "$PWD/.venv/node" "dclint@$DCLINT_VERSION"
  ln -sf ../node/node_modules/.bin/dclint "$BIN/dclint"
  echo "ops.sh: installed dclint $("$BIN/dclint" --version)"
fi

# kubectl's built-in kustomize renders deploy/k8s-postgresql (an overlay) for tests/test_ops.py;
# it comes with the machine image (google-cloud-sdk), it is not installed from here
if ! kubectl kustomize --help >/dev/null 2>&1; then
  echo "ops.sh: WARNING: kubectl with kustomize is missing; the deploy/k8s-postgresql tests will fail" >&2
fi
