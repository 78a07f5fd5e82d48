#!/usr/bin/env bash
# PostgreSQL for the conversation-log tests on a real server (tests/postgres.py starts one per
# session in a temporary data directory, on a free port, as the `postgres` user when run as root).
# Installs Debian's `postgresql` package when no server binaries are on the machine; the package's
# own cluster is not started (policy-rc.d), the tests never use it. Fast when already installed.
set -euo pipefail
if compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "postgresql.sh: PostgreSQL server binaries are missing; install Debian's postgresql package" >&2
  exit 1
fi
policy=/usr/sbin/policy-rc.d
had_policy=0; [ -e "$policy" ] && had_policy=1
[ "$had_policy" = 1 ] || { printf '#!/bin/sh\nexit 101\n' > "$policy"; chmod 755 "$policy"; }
trap '[ "$had_policy" = 1 ] || rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends postgresql >/dev/null \
  || { apt-get update -qq && apt-get install -y -qq --no-install-recommends postgresql >/dev/null; }
echo "postgresql.sh: installed $(ls -d /usr/lib/postgresql/*/bin | tail -1)"
