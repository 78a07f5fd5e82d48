#!/usr/bin/env bash
# A venv with llama-cpp-python's own OpenAI server (bench only; never a project dependency).
#
# Usage: bench/lcp_server.sh     # prints the venv's python
# It installs `llama-cpp-python[server]` at the project's version from the project's wheelhouse
# (the same llama.cpp build our server uses) into bench/.work/lcp-venv (git-ignored).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.work/lcp-venv"
wheels="${WHEELHOUSE:-$HOME/.cache/adapter-chat/wheels/llama-cpp-python-0.3.36-nollamafile}"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install -q --find-links "$wheels" 'llama-cpp-python[server]==0.3.36' >&2
"$venv/bin/python" -c "import llama_cpp.server" && echo "$venv/bin/python"
