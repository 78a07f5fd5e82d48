#!/usr/bin/env bash
# Debian's chromium, driven by Playwright in tests/test_playground.py (never `playwright install`:
# the tests launch /usr/bin/chromium). Idempotent: returns at once when it is already installed,
# and runs `apt-get update` only when the package lists do not know chromium yet.
set -euo pipefail
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
if ! apt-cache show chromium >/dev/null 2>&1 || [ -z "$(apt-cache policy chromium | awk '/Candidate:/ {print $2}' | grep -v '(none)')" ]; then
  $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-liberation >/dev/null
/usr/bin/chromium --version
