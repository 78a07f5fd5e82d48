#!/usr/bin/env bash
# lm-evaluation-harness for tests/test_lm_eval.py, in its own venv (.venv/tools/lm-eval), so its
# heavy dependencies (datasets, pyarrow, scikit-learn, ...) never touch the project's environment.
# The test runs `lm_eval` against a real server with the `local-completions` model and the
# `remote` tokenizer backend (this server's /tokenize, /detokenize, /tokenizer_info): no model hub.
# Idempotent; fast when the pinned version is already installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
LM_EVAL_VERSION=0.4.13
VENV="$PWD/.venv/tools/lm-eval"
[ -x "$PWD/.venv/bin/python" ] || { echo "lm-eval.sh: .venv is missing: run 'make setup' first" >&2; exit 1; }
if [ "$("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("lm_eval"))' 2>/dev/null || true)" != "$LM_EVAL_VERSION" ]; then
  rm -rf "$VENV"
  "$PWD/.venv/bin/python" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "lm-eval[api]==$LM_EVAL_VERSION"
  echo "lm-eval.sh: installed lm-eval $LM_EVAL_VERSION in $VENV"
fi
