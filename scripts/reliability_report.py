"""Produce docs/reliability.md: run the adversarial suite, the kill -9 loop, a bounded soak and
pip-audit, and write their figures.

    .venv/bin/python scripts/reliability_report.py --soak-seconds 300 --kill-cycles 10

Steps (each figure in the page comes from one of them):
1. `pytest tests/test_adversarial.py` (the default-run cases) with RELIABILITY_FIGURES set, so each
   test writes its figures (tests/reliability.py `record`);
2. `pytest -m slow tests/test_kill.py` with RELIABILITY_KILL_CYCLES (skip with --kill-cycles 0);
3. `bench/soak.py --seconds N` against its own real server (skip with --soak-seconds 0);
4. `pip-audit` on the project's virtualenv.
Every server started here runs with OMP_WAIT_POLICY=PASSIVE (see the page for why); pass
--omp-active to measure with llama.cpp's default spinning threads instead.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def run(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[int, str, float]:
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        out, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = f"{e.stdout or ''}{e.stderr or ''}\nTIMEOUT after {timeout:.0f}s", -1
    return rc, out if isinstance(out, str) else out.decode(errors="replace"), time.monotonic() - t0


def summary_line(out: str) -> str:
    lines = [ln for ln in out.splitlines() if re.search(r"\b(passed|failed|error|xfailed|skipped)\b", ln)
             and " in " in ln]
    return lines[-1].strip("= ") if lines else "(no pytest summary)"


def durations(out: str) -> list[str]:
    block, on = [], False
    for ln in out.splitlines():
        if "slowest" in ln and "durations" in ln:
            on = True
            continue
        if on:
            if not ln.strip() or ln.startswith("("):
                break
            block.append(ln.strip())
    return block


def g(fig: dict[str, Any], *keys: str, default: Any = "n/a") -> Any:
    cur: Any = fig
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return default
        cur = cur[k]
    return cur


def render(fig: dict[str, Any], meta: dict[str, Any]) -> str:
    soak = meta.get("soak") or {}
    k9 = fig.get("kill9_loop", {})
    rows = [
        ("Bad input", f"{g(fig, 'malformed', 'tried')} malformed bodies tried; {g(fig, 'malformed', '5xx')} answered 5xx, "
                      f"{g(fig, 'malformed', 'non_4xx')} not 4xx; {g(fig, 'malformed', 'crashes')} crashes; greedy canary "
                      "byte-identical before and after (asserted)"),
        ("Auth", f"{g(fig, 'auth', 'routes_needing_key')} routes need a key; {g(fig, 'auth', 'requests_tried')} path/Host/"
                 f"credential variants tried without a valid key; {g(fig, 'auth', 'bypasses')} got through; "
                 f"DB file modes {g(fig, 'auth', 'db_modes')}"),
        ("Adapter names", f"{g(fig, 'escape', 'names')} escaping/look-alike names ({g(fig, 'escape', 'requests')} requests, "
                          f"as model and as per-request adapter); {g(fig, 'escape', 'non_4xx')} not 4xx; "
                          f"{g(fig, 'escape', 'files_opened_outside')} files opened outside the adapters dir (inotify)"),
        ("Crafted adapters", f"{g(fig, 'crafted_adapters', 'crafted')} crafted GGUF files published through hot reload; "
                             f"{g(fig, 'crafted_adapters', 'refused')} refused, {g(fig, 'crafted_adapters', 'served')} "
                             f"served, {g(fig, 'crafted_adapters', 'crashes')} server crashes"),
        ("Unknown models", f"{g(fig, 'unknown_models', 'requests')} requests for unknown names: metric series "
                           f"{g(fig, 'unknown_models', 'series_before')} -> {g(fig, 'unknown_models', 'series_after')}, "
                           f"server RSS {g(fig, 'unknown_models', 'rss_kb_before')} -> "
                           f"{g(fig, 'unknown_models', 'rss_kb_after')} kB"),
        ("Overload", f"{g(fig, 'overload', 'requests')} requests at 10x capacity ({g(fig, 'overload', 'capacity')}): "
                     f"{g(fig, 'overload', 'rejected')} got 429 + Retry-After, reject latency p50 "
                     f"{g(fig, 'overload', 'reject_p50_s')} s / p99 {g(fig, 'overload', 'reject_p99_s')} s; "
                     f"{g(fig, 'overload', 'admitted_failures')} of {g(fig, 'overload', 'admitted')} admitted failed"),
        ("Disconnects", f"{g(fig, 'disconnect', 'samples')} disconnects (mid-stream, non-streaming, queued): "
                        f"disconnect-to-stop median {g(fig, 'disconnect', 'stop_median_s')} s, p99 "
                        f"{g(fig, 'disconnect', 'stop_p99_s')} s; every row `client_disconnected`"),
        ("SIGTERM", f"{g(fig, 'sigterm', 'drained')} of {g(fig, 'sigterm', 'in_flight')} in-flight requests drained "
                    f"(2 streaming, 2 not), rows committed `completed`: {g(fig, 'sigterm', 'rows_completed')}; new "
                    f"connections refused: {g(fig, 'sigterm', 'refused_new')}; exit code {g(fig, 'sigterm', 'exit_code')}"),
        ("kill -9 + restart", f"row left `in_progress` is `{g(fig, 'kill9_restart', 'row_status_after_restart')}` after "
                              f"restart; integrity_check {g(fig, 'kill9_restart', 'integrity')}"),
        ("Ledger", f"{g(fig, 'ledger', 'requests')} mixed requests ({g(fig, 'ledger', 'rows_expected')} should be logged): "
                   f"{g(fig, 'ledger', 'mismatches')} mismatches (missing {g(fig, 'ledger', 'missing')}, extra "
                   f"{g(fig, 'ledger', 'extra')}, wrong id/status {g(fig, 'ledger', 'wrong')})"),
        ("kill -9 loop (slow)", f"{k9.get('cycles', 'not run')} cycles, {k9.get('acknowledged', 'n/a')} acknowledged "
                                f"requests: {k9.get('corrupt_dbs', 'n/a')} corrupt DBs, {k9.get('lost_rows', 'n/a')} lost "
                                f"rows, {k9.get('acknowledged_not_completed', 'n/a')} answered but not `completed`, "
                                f"{k9.get('in_progress_after_restart', 'n/a')} left `in_progress` after restart"),
        ("Soak", f"{soak.get('seconds', 'not run')} s, {soak.get('concurrency', 'n/a')} clients, "
                 f"{soak.get('requests', 'n/a')} requests: {soak.get('crashes', 'n/a')} crashes, {soak.get('5xx', 'n/a')} "
                 f"5xx, {soak.get('stream_error_events', 'n/a')} stream error events, {soak.get('transport_errors', 'n/a')} "
                 f"transport errors; latency p50 {soak.get('latency_p50_s', 'n/a')} s / p99 "
                 f"{soak.get('latency_p99_s', 'n/a')} s; RSS after warm-up {soak.get('rss_kb_after_warmup', 'n/a')} kB, "
                 f"end {soak.get('rss_kb_end', 'n/a')} kB (drift {soak.get('rss_drift_kb', 'n/a')} kB); rows left "
                 f"in_progress {soak.get('rows_in_progress_after', 'n/a')}, answered ids missing from the log "
                 f"{soak.get('acknowledged_ids_missing_in_log', 'n/a')}"),
    ]
    table = "\n".join(f"| {a} | {b} |" for a, b in rows)
    reasons = g(fig, "crafted_adapters", "reasons", default={})
    reasons_md = "\n".join(f"| `{k}` | {v} |" for k, v in sorted(reasons.items())) if reasons else "| n/a | |"
    return f"""# Reliability

Produced by `{meta['command']}` on {meta['date']} (git {meta['commit']}); do not edit by hand.
Machine: {meta['machine']}. The machine was shared with other engineers' benchmarks while this ran.

## Figures

| area | result |
|---|---|
{table}

The soak ran for {soak.get('seconds', 'n/a')} s, **not** 30 minutes: a 30-minute soak did not fit this session. Run
`.venv/bin/python bench/soak.py --seconds 1800` for the real one. Soak outcome counts:
`{json.dumps(soak.get('outcomes', {}))}`.

## How each figure is measured

- **Bad input** (`test_malformed_bodies_are_all_4xx_and_the_canary_is_unchanged`): a generated table of
  broken JSON (every truncation of a valid body, single quotes, trailing commas, form bodies, bad UTF-8,
  raw NUL), wrong types and out-of-range values for every field, unknown roles, empty messages,
  `NaN`/`Infinity`/`1e999` in every numeric field, huge integers, 100,000-deep nesting (body, messages,
  an unknown field), lone surrogates, NUL in names, `<|im_start|>` as a model and as a role, 1,000 stop
  strings, 4,097 messages and three oversized bodies (413). Every answer must be 4xx with OpenAI's error
  body; a greedy canary must answer byte-identically before and after. Hostile but *valid* content
  (special-token text typed by a user, NUL, lone surrogates) is served as plain text and logged
  (`test_hostile_but_valid_content_is_served_as_text`). A body trickling in over 15 s and one abandoned
  half way hold up nobody (`test_slow_sender_does_not_block_others`). A prompt over the context is a JSON
  400 before any SSE byte, streaming or not.
- **Auth**: the suite builds the app with `create_app(Settings(...))`, walks `app.routes` and fails on a
  handler without `opt={{"auth": ...}}` (Litestar's generated OPTIONS handlers aside: they are probed on
  the wire). With keys configured, every non-public route x 18 path variants (`//v1/models`, trailing
  slash, `%2F`/`%2f`, `/./`, `/x/../`, `%00`, case, `;params`) x 4 Host headers x 5 bad credentials is
  sent raw over a socket (no client-side normalisation); any 2xx or 5xx fails. The key never appears in
  the server log; CORS sends no `Access-Control-Allow-Origin` by default; `allowed_hosts` refuses an odd
  Host even with the key; the SQLite file and its `-wal`/`-shm` are 0600.
- **Adapter names**: a real, valid adapter is published *outside* the adapters dir; {g(fig, 'escape', 'names')}
  names (`../`, absolute paths, `%2F`, backslashes, NUL, 10 KB, Unicode look-alikes and digits, URLs,
  `file://`, `.bin`/`.pt`, `@01`) are sent as `model` and as per-request `adapters`; inotify watches the
  outside folders for any open or read.
- **Crafted adapters**: published with `registry.publish_version` into a running server's adapters dir
  (the real hot-reload path); reasons given by the server:

| crafted file | refused because |
|---|---|
{reasons_md}

- **Disconnects**: time from the client leaving to the log row's `finished_at` (`client_disconnected`);
  queued requests that leave before their turn are logged with 0 completion tokens.
- **Overload**: 40 concurrent requests against `parallel=2, queue_max=2`.
- **SIGTERM**: 4 requests in flight (2 streaming) when SIGTERM arrives.
- **Ledger**: 60 concurrent requests (5 models, streaming or not, early leavers, invalid ones, a
  `log = false` route), each with a unique `user`; the database must hold exactly one row per request
  that should be logged, with the id the client saw and the right status, and nothing else.
- **kill -9 loop** (`make test-slow`): start on one DB, mixed load, `kill -9` at a random moment, check
  `PRAGMA integrity_check` and that every answered request id has a row, restart, repeat.

## Bugs found and fixed

| failing case | bug | fix |
|---|---|---|
| malformed `model: "style-a@²"` | 500: `int('²')` raised a plain ValueError past the registry's errors; `style-a@١` (Arabic digit) silently served v1 | `registry.parse_ref` takes ASCII digits only |
| escape name `style-a@01` | served version 1 under a second spelling | no leading zeros in `name@N` |
| malformed `deep-array`, `deep-object`, `deep-messages` | 500: `RecursionError` escaped `json.loads` | `_parse` answers 400 "nested too deeply" |
| hostile content `"\\ud800"` | the log writer thread died on a lone surrogate (UnicodeEncodeError); **every later row was lost** while the server kept answering | surrogates become U+FFFD before SQLite; the writer survives any exception |
| slow sender abandoning its body | logged as `ERROR HTTP 500` | logged at info, no error |
| SIGTERM with streams in flight | sse-starlette cut every stream at once (no `[DONE]`, row not completed) | 25 s shutdown grace for SSE responses, inside uvicorn's 30 s drain |

## Found here, outside the files this work may change

1. **Exit code after SIGTERM** (found here, fixed by another engineer in 8fe22b0, `server/__main__.py`):
   uvicorn re-raises the captured SIGTERM after draining, so the process ended with -15; a SIGTERM
   handler that exits 0 fixes it. The SIGTERM test asserts exit 0 (measured above:
   {g(fig, 'sigterm', 'exit_code')}).
2. **llama.cpp's OpenMP threads spin (engine).** With `n_threads` equal to the cores and any other
   CPU load, `llama_decode` slowed ~100x here: first request 47.8 s vs 0.3 s, four concurrent 32-token
   requests 101.9 s vs 1.3 s (same machine, minutes apart; `OMP_WAIT_POLICY=PASSIVE` or `n_threads=1`
   gives the fast numbers). `/ready` kept answering "ready" because steps still finished, just slowly.
   Every server this suite starts sets `OMP_WAIT_POLICY=PASSIVE`. Proposed patch, top of
   `server/engine.py`, before `import llama_cpp` (libgomp reads it when it loads):

   ```python
   import os
   os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning workers collapse on a shared CPU
   ```
   (measure tokens/s on a quiet machine with bench/bench_serve.py before and after).
3. **A `kill -9` can still drop an answered request's final status.** The log row is written by a
   queue-fed thread; `finish()` is queued before the last bytes go out but not awaited, so a `kill -9`
   in the few milliseconds between the answer and the commit leaves the row `in_progress`, marked
   `interrupted` at the next start (the row and messages are kept; the answer text is not). The loop
   above did not hit it in {k9.get('cycles', 'n/a')} cycles. Fix if it matters: await
   `ConversationLog.flush()` (or a per-row event) in `ChatService.run` before the final chunk / body
   (one fsync of latency per request).
4. **`allowed_hosts` compares the whole Host header, port included** (Litestar): `CHAT_ALLOWED_HOSTS=
   example.com` refuses clients that send `Host: example.com:8000`. Documented behaviour of Litestar;
   the README should say "host[:port] as the client sends it".

## Dependency audit (`pip-audit`)

```
{meta['audit']}
```

## Test runtimes

Default run (`pytest tests/test_adversarial.py`): {meta['adv_summary']} ({meta['adv_seconds']:.0f} s wall).
Slowest:

```
{chr(10).join(meta['adv_durations'][:12])}
```

Slow run (`pytest -m slow tests/test_kill.py`, {meta['kill_cycles']} cycles): {meta['kill_summary']}.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--soak-seconds", type=float, default=300)
    p.add_argument("--soak-concurrency", type=int, default=8)
    p.add_argument("--kill-cycles", type=int, default=10)
    p.add_argument("--omp-active", action="store_true", help="leave OMP_WAIT_POLICY unset")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "reliability.md")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="reliability-") as tmp:
        figures = Path(tmp) / "figures.json"
        env = {**os.environ, "RELIABILITY_FIGURES": str(figures), "RELIABILITY_KILL_CYCLES": str(args.kill_cycles)}
        if not args.omp_active:
            env["OMP_WAIT_POLICY"] = "PASSIVE"
        meta: dict[str, Any] = {
            "command": "python " + " ".join(["scripts/reliability_report.py", *(argv or sys.argv[1:])]),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                     text=True).stdout.strip(),
            "machine": f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start",
            "kill_cycles": args.kill_cycles,
        }
        print("1/4 adversarial suite", flush=True)
        rc, out, secs = run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=15",
                             "tests/test_adversarial.py"], env, 3600)
        meta.update(adv_summary=summary_line(out), adv_seconds=secs, adv_durations=durations(out))
        print("   ", meta["adv_summary"], flush=True)
        meta["kill_summary"] = "not run"
        if args.kill_cycles > 0:
            print("2/4 kill -9 loop", flush=True)
            rc, out, secs = run([PY, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow",
                                 "tests/test_kill.py"], env, 3600)
            meta["kill_summary"] = f"{summary_line(out)} ({secs:.0f} s wall)"
            print("   ", meta["kill_summary"], flush=True)
        if args.soak_seconds > 0:
            print(f"3/4 soak {args.soak_seconds:.0f} s", flush=True)
            soak_json = Path(tmp) / "soak.json"
            rc, out, _ = run([PY, "bench/soak.py", "--seconds", str(args.soak_seconds), "--concurrency",
                              str(args.soak_concurrency), "--json", str(soak_json)], env, args.soak_seconds + 900)
            meta["soak"] = json.loads(soak_json.read_text()) if soak_json.exists() else {"error": out[-500:]}
            print("    exit", rc, flush=True)
        print("4/4 pip-audit", flush=True)
        audit = Path(PY).with_name("pip-audit")
        if audit.exists():
            rc, out, _ = run([str(audit), "--progress-spinner", "off"], env, 600)
            skipped = out.count("could not be audited")
            note = (f"\n# {skipped} packages skipped: the vulnerability service (PyPI JSON API) was not reachable "
                    "from this machine, so 'No known vulnerabilities found' covers nothing. Re-run with network "
                    "access." if skipped else "")
            meta["audit"] = f"$ pip-audit   (exit {rc})\n{out.strip()}{note}"
        else:
            meta["audit"] = "pip-audit is not installed: .venv/bin/pip install pip-audit"
        fig = json.loads(figures.read_text()) if figures.exists() else {}
    args.out.write_text(render(fig, meta))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
