#!/bin/sh
# The compose stack's scheduler: runs `python -m trainer nightly` every day at NIGHTLY_AT (HH:MM
# in the container's time zone: UTC unless TZ is set), forever. A trainer exit code is logged,
# never fatal: 75 means another run holds the lock, and a failed run is retried the next night.
# SIGTERM (docker compose stop / down) is passed on to a run in progress, which then records
# `interrupted` and publishes nothing (docs/trainer.md, "Stopping").
set -u
at="${NIGHTLY_AT:-02:30}"
config="${TRAINER_CONFIG:-/app/trainer.toml}"
case "$at" in
  [01][0-9]:[0-5][0-9] | 2[0-3]:[0-5][0-9]) ;;
  *) echo "nightly-loop: NIGHTLY_AT must be HH:MM between 00:00 and 23:59, got '$at'" >&2; exit 2 ;;
esac

child=
stop() {
  if [ -n "$child" ]; then
    kill -TERM "$child" 2>/dev/null
    wait "$child"
  fi
  exit 143
}
trap stop TERM INT

while :; do
  now=$(date +%s)
  next=$(date -d "today $at" +%s)
  [ "$next" -gt "$now" ] || next=$(date -d "tomorrow $at" +%s)
  echo "nightly-loop: next trainer run at $(date -d "@$next" '+%Y-%m-%d %H:%M %Z')"
  # children run in the background so that a signal reaches the trap at once
  sleep $((next - now)) &
  child=$!
  wait "$child"
  child=
  python -m trainer nightly --config "$config" --progress lines &
  child=$!
  wait "$child"
  code=$?
  child=
  echo "nightly-loop: trainer exited with $code"
done
