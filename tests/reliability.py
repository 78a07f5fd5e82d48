"""Helpers shared by the reliability tests and tools: figures, raw HTTP, RSS, metric series, inotify.

`record(key, value)` merges a figure into the JSON file named by `$RELIABILITY_FIGURES` (when set),
which `scripts/reliability_report.py` turns into docs/reliability.md. Without the variable it does
nothing, so the tests run the same either way.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import sqlite3
import struct
import time
from pathlib import Path
from typing import Any

import httpx


def record(key: str, value: Any) -> None:
    path = os.environ.get("RELIABILITY_FIGURES")
    if not path:
        return
    p = Path(path)
    data = json.loads(p.read_text()) if p.exists() and p.stat().st_size else {}
    data[key] = value
    p.write_text(json.dumps(data, indent=2, sort_keys=True))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[k]


def raw_http(port: int, request: bytes, *, timeout: float = 30.0) -> tuple[int, dict[str, str], bytes]:
    """Send bytes exactly as given (no client-side path normalisation); return status, headers, body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data:
                head, _, body = data.partition(b"\r\n\r\n")
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if length is not None and len(body) >= length:
                    break
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and len(lines[0].split()) > 1 else 0
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def metric_series(url: str, headers: dict[str, str] | None = None) -> int:
    text = httpx.get(f"{url}/metrics", timeout=60, headers=headers or {}).text
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))


def db_rows(db: Path, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def wait_final(db: Path, ids: list[str], timeout: float = 30.0) -> dict[str, sqlite3.Row]:
    """Rows for `ids` once none is still in_progress (or at the timeout)."""
    deadline = time.monotonic() + timeout
    rows: dict[str, sqlite3.Row] = {}
    while time.monotonic() < deadline:
        marks = ",".join("?" * len(ids))
        rows = {r["id"]: r for r in db_rows(db, f"SELECT * FROM exchanges WHERE id IN ({marks})", tuple(ids))}
        if len(rows) == len(ids) and all(r["status"] != "in_progress" for r in rows.values()):
            break
        time.sleep(0.05)
    return rows


class OpenWatch:
    """inotify on folders: did anything open or read a file in them? (no strace, no monkeypatching)"""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, folders: list[Path]) -> None:
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        for folder in folders:
            wd = self._libc.inotify_add_watch(self.fd, str(folder).encode(), self.IN_OPEN | self.IN_ACCESS)
            if wd < 0:
                raise OSError(ctypes.get_errno(), f"inotify_add_watch {folder}")

    def events(self) -> list[str]:
        out = []
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return out
        i = 0
        while i + 16 <= len(data):
            _wd, mask, _cookie, length = struct.unpack_from("iIII", data, i)
            name = data[i + 16:i + 16 + length].rstrip(b"\0").decode(errors="replace")
            out.append(f"{name or '.'}:{mask:#x}")
            i += 16 + length
        return out

    def close(self) -> None:
        os.close(self.fd)
