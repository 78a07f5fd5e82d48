"""Publishing faults: a publisher killed at every step and at random moments, a full disk during a
publish, a byte flipped in a published adapter, and a rollback under load, against a running server.

The publisher is always the real code: `publish.publish_version` in a child process, or the real
`python -m trainer train`. Step boundaries come from `publish.PUBLISH_STEPS`; a child installs
`publish.set_fault_hook` with a hook that SIGKILLs its own process at one step (the hook is inert
unless installed, and nothing but these children installs it). Random kills come from outside
(SIGKILL at a random delay). After every kill: no partial version is visible (every manifest has
its weights with the matching sha256, the server refuses nothing and lists exactly the complete
versions), the current version is served, and the next publish succeeds and is served.

`RELIABILITY_PUBLISH_KILLS` sets the number of random kills of the slow loop (default 24).
"""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from adapter_chat import publish, registry
from adapter_chat.gguf_info import BaseModelInfo
from tests.conftest import ROOT, ServerProcess, chat_body, make_lora_file, publish_lora
from tests.reliability import db_rows, record
from tests.smallfs import fill, small_filesystem
from tests.tinymodel import make_tiny_llama

URL = "/v1/chat/completions"
STEPS = publish.PUBLISH_STEPS

# A child process: install a hook that logs every step (and SIGKILLs itself at one), then run the
# real publishing code: `publish_version` once or in a loop, or the trainer's CLI.
CHILD = r"""
import json, os, signal, sys, time
from pathlib import Path
from adapter_chat import publish, registry
spec = json.loads(sys.argv[1])
fd = os.open(spec["steplog"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
def hook(step):
    os.write(fd, (step + "\n").encode())
    if step == spec.get("crash_at"):
        os.kill(os.getpid(), signal.SIGKILL)
publish.set_fault_hook(hook)
if spec["mode"] == "trainer":
    from trainer.__main__ import main
    sys.exit(main(spec["argv"]))
def publish_one():
    return publish.publish_version(Path(spec["adapters_dir"]), spec["name"], Path(spec["src"]),
                                    base_model_sha256=spec["sha"], architecture="llama", rank=spec["rank"],
                                    alpha=float(spec["rank"]), keep=spec["keep"]).version
if spec["mode"] == "once":
    publish_one()
    sys.exit(0)
t = time.monotonic(); publish_one(); print("calibrated", time.monotonic() - t, flush=True)
while True:
    os.write(fd, b"begin\n")
    print("go", flush=True)
    v = publish_one()
    print("done", v, flush=True)
    time.sleep(0.005)
"""


def child_env() -> dict[str, str]:
    """The children's environment; passive OpenMP waits, as the servers here (see test_adversarial)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}


def child(spec: dict[str, Any], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], env=child_env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def last_step(steplog: Path) -> str:
    lines = steplog.read_text().split() if steplog.exists() else []
    return lines[-1] if lines else "(before any step)"


# ---------------------------------------------------------------------------------------------
# what a reader sees


def disk_state(adapters: Path, name: str) -> tuple[set[int], int | None, list[tuple[str, str]]]:
    """(complete versions, current version, problems): problems are versions with a manifest that
    does not match its weights, i.e. a partial version a reader could see."""
    scan = registry.scan(adapters)
    folder = str(adapters / name)
    problems = [(p, r) for p, r in scan.skipped if p.startswith(folder + os.sep)]
    entry = scan.adapters.get(name)
    return (set(entry.versions) if entry else set()), (entry.current if entry else None), problems


def leftovers(adapters: Path, name: str) -> list[str]:
    """Files that are neither a complete version's, nor CURRENT, nor the lock."""
    versions, _, _ = disk_state(adapters, name)
    allowed = {"CURRENT", ".lock"} | {f"v{v}.gguf" for v in versions} | {f"v{v}.json" for v in versions}
    return sorted(set(os.listdir(adapters / name)) - allowed)


def served(srv: ServerProcess, model: str) -> httpx.Response:
    with srv.http(timeout=60) as http:
        return http.post(URL, json=chat_body("Say hi.", model=model, max_tokens=1))


def server_view(srv: ServerProcess, name: str) -> tuple[set[int], dict[str, str]]:
    """Versions of `name` the server lists, and what it refused for `name`."""
    with srv.http(timeout=60) as http:
        models = {m["id"] for m in http.get("/v1/models").json()["data"]}
        refused = http.get("/v1/adapters").json()["refused"]
    versions = {int(m.split("@")[1]) for m in models if m.startswith(f"{name}@")}
    return versions, {k: v for k, v in refused.items() if name in k}


def wait_converged(srv: ServerProcess, name: str, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until the server lists exactly the complete versions on disk and serves the current one."""
    deadline = time.monotonic() + timeout
    t0 = time.monotonic()
    while True:
        versions, current, problems = disk_state(srv.adapters_dir, name)
        seen, refused = server_view(srv, name)
        r = served(srv, name)
        ok = (seen == versions and r.status_code == 200 and r.headers["x-adapters"] == f"{name}@{current}:1")
        if ok or time.monotonic() > deadline:
            return {"ok": ok, "seconds": time.monotonic() - t0, "versions": versions, "current": current,
                    "problems": problems, "server_versions": seen, "refused": refused, "status": r.status_code,
                    "x_adapters": r.headers.get("x-adapters")}
        time.sleep(0.1)


class Traffic:
    """Requests for one adapter, back to back, in a thread: every one must be answered 200."""

    def __init__(self, srv: ServerProcess, model: str) -> None:
        self.srv, self.model = srv, model
        self.codes: Counter[int] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.srv.http(timeout=60) as http:
            while not self._stop.is_set():
                try:
                    r = http.post(URL, json=chat_body("Say hi.", model=self.model, max_tokens=2))
                    self.codes[r.status_code] += 1
                    if r.status_code != 200:
                        self.failures.append(f"{r.status_code} {r.text[:200]}")
                except httpx.HTTPError as e:
                    self.codes[-1] += 1
                    self.failures.append(repr(e))
                time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)


@pytest.fixture
def fresh(fresh_passive_server) -> Any:
    return fresh_passive_server


@pytest.fixture(scope="module")
def lora_src(tmp_path_factory: pytest.TempPathFactory, base_info: BaseModelInfo) -> Path:
    """A real LoRA for the served base (about 10 MB): what the children publish."""
    return make_lora_file(tmp_path_factory.mktemp("lora-src") / "src.gguf", base_info, seed=61)


def pub(adapters: Path, name: str, base: BaseModelInfo, *, seed: int, tmp: Path, keep: int = 5) -> int:
    """Publish a fresh random LoRA as the next version of `name` (in this process); its number."""
    src = make_lora_file(tmp / f"{name}-{seed}.gguf", base, seed=seed)
    return publish.publish_version(adapters, name, src, base_model_sha256=base.sha256, architecture=base.architecture,
                                    rank=8, alpha=8.0, keep=keep).version


def spec_for(srv: ServerProcess, name: str, src: Path, base: BaseModelInfo, steplog: Path, **kw: Any) -> dict:
    return {"mode": "once", "adapters_dir": str(srv.adapters_dir), "name": name, "src": str(src),
            "sha": base.sha256, "rank": 8, "keep": 2, "steplog": str(steplog), **kw}


# ---------------------------------------------------------------------------------------------
# 1. a publisher killed between each step of the protocol


def expected_after_kill(step: str, before: set[int], old_current: int, new: int, keep: int) -> tuple[set[int], int]:
    """The complete versions and the current one a crash right after `step` must leave."""
    i = STEPS.index(step)
    versions = set(before)
    if i >= STEPS.index("manifest_renamed"):
        versions.add(new)
    current = new if i >= STEPS.index("current_renamed") else old_current
    if step == "pruning":  # the oldest version's manifest is gone, its weights not yet
        versions.discard(min(before))
    if step == "done":
        versions = set(sorted(versions)[-keep:]) | {new}
    return versions, current


def test_publish_killed_at_every_step_leaves_a_complete_version_served(fresh, base_info, lora_src, tmp_path) -> None:
    srv = fresh(parallel=2)
    name = "pub"
    for seed in (1, 2):
        publish_lora(srv.adapters_dir, name, base_info, seed=seed, tmp=tmp_path)
    assert wait_converged(srv, name)["ok"]
    traffic = Traffic(srv, name)
    outcomes: dict[str, dict[str, Any]] = {}
    try:
        for step in STEPS:
            before, old_current, _ = disk_state(srv.adapters_dir, name)
            new = max(before) + 1
            steplog = tmp_path / f"steps-{step}.log"
            proc = child(spec_for(srv, name, lora_src, base_info, steplog, crash_at=step))
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == -signal.SIGKILL, (step, proc.returncode, err[-2000:])
            assert last_step(steplog) == step
            versions, current, problems = disk_state(srv.adapters_dir, name)
            want_versions, want_current = expected_after_kill(step, before, old_current, new, keep=2)
            view = wait_converged(srv, name)
            # the next publish succeeds, cleans what the killed one left, and is served
            after = pub(srv.adapters_dir, name, base_info, seed=100 + len(outcomes), tmp=tmp_path, keep=2)
            left = leftovers(srv.adapters_dir, name)
            view_next = wait_converged(srv, name)
            outcomes[step] = {"versions": sorted(versions), "current": current, "problems": problems,
                              "server_ok": view["ok"], "refused": view["refused"], "next_version": after,
                              "next_served": view_next["ok"], "leftovers_after_next": left}
            assert not problems, (step, problems)
            assert (versions, current) == (want_versions, want_current), (step, versions, current)
            assert view["ok"] and not view["refused"], (step, view)
            assert after == (new + 1 if new in want_versions else new), (step, after)
            assert view_next["ok"] and view_next["current"] == after and not left, (step, view_next, left)
    finally:
        traffic.stop()
    record("publish_step_kills", {
        "kills": len(outcomes), "steps": list(STEPS),
        "partial_visible": sum(bool(o["problems"]) for o in outcomes.values()),
        "server_refusals": sum(bool(o["refused"]) for o in outcomes.values()),
        "next_publish_ok": sum(o["next_served"] for o in outcomes.values()),
        "requests": sum(traffic.codes.values()), "failed_requests": len(traffic.failures),
    })
    assert not traffic.failures, traffic.failures[:5]
    assert srv.proc.poll() is None


# ---------------------------------------------------------------------------------------------
# 2. a publisher killed at random moments (a few here, RELIABILITY_PUBLISH_KILLS in the slow run)


def random_kill_loop(srv: ServerProcess, base: BaseModelInfo, src: Path, tmp: Path, kills: int,
                     rng: random.Random) -> dict[str, Any]:
    name = "rnd"
    pub(srv.adapters_dir, name, base, seed=3, tmp=tmp, keep=3)
    assert wait_converged(srv, name)["ok"]
    traffic = Traffic(srv, name)
    landed: Counter[str] = Counter()
    bad: list[Any] = []
    partial = refusals = next_ok = 0
    try:
        for k in range(kills):
            steplog = tmp / f"random-{k}.log"
            _, old_current, _ = disk_state(srv.adapters_dir, name)
            proc = child(spec_for(srv, name, src, base, steplog, mode="loop", keep=3))
            assert proc.stdout is not None
            first = proc.stdout.readline().split()
            assert first and first[0] == "calibrated", (first, proc.stderr.read() if proc.poll() is not None else "")
            duration = float(first[1])
            for _ in range(rng.randint(0, 2)):  # let a few publishes complete first, sometimes
                assert proc.stdout.readline().startswith("go")
                assert proc.stdout.readline().startswith("done")
            assert proc.stdout.readline().startswith("go")
            time.sleep(rng.uniform(0, 1.3 * duration))
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            proc.stdout.close()
            proc.stderr.close()
            landed[last_step(steplog)] += 1
            _, current, problems = disk_state(srv.adapters_dir, name)
            view = wait_converged(srv, name)
            partial += bool(problems)
            refusals += bool(view["refused"])
            if problems or not view["ok"] or view["refused"] or current is None or current < old_current:
                bad.append((k, last_step(steplog), problems, view))
            # the next publish succeeds and is served
            after = pub(srv.adapters_dir, name, base, seed=200 + k, tmp=tmp, keep=3)
            view_next = wait_converged(srv, name)
            next_ok += bool(view_next["ok"] and view_next["current"] == after)
            if not (view_next["ok"] and view_next["current"] == after):
                bad.append((k, "next publish", view_next))
    finally:
        traffic.stop()
    return {"kills": kills, "landed_after": dict(sorted(landed.items())), "partial_visible": partial,
            "server_refusals": refusals, "next_publish_ok": next_ok, "requests": sum(traffic.codes.values()),
            "failed_requests": len(traffic.failures), "bad": bad[:5], "failures": traffic.failures[:5]}


def test_publish_killed_at_random_moments(fresh, base_info, lora_src, tmp_path) -> None:
    srv = fresh(parallel=2)
    fig = random_kill_loop(srv, base_info, lora_src, tmp_path, kills=4, rng=random.Random(11))
    record("publish_random_kills", fig)
    assert not fig["bad"] and not fig["failures"], fig
    assert fig["next_publish_ok"] == fig["kills"]


@pytest.mark.slow
def test_publish_killed_at_random_moments_many(fresh, base_info, lora_src, tmp_path) -> None:
    kills = int(os.environ.get("RELIABILITY_PUBLISH_KILLS", "24"))
    srv = fresh(parallel=2)
    fig = random_kill_loop(srv, base_info, lora_src, tmp_path, kills=kills, rng=random.Random(12))
    record("publish_random_kills_slow", fig)
    assert not fig["bad"] and not fig["failures"], fig
    assert fig["next_publish_ok"] == kills


# ---------------------------------------------------------------------------------------------
# 3. the real trainer CLI killed during its publish stage and at random moments


TRAINER_TOML = """
base_model = "tiny.gguf"
logs = ["conversations.sqlite3"]
adapters_dir = "adapters"
cache_dir = "cache"

[adapters.cto]
jsonl = ["cto.jsonl"]
keep = 2
train = { lr = 1e-2, val_fraction = 0.2 }
gate = { min_items = 8, min_val_items = 2, sample_prompts = 1, max_tokens = 8 }
"""
TRAIN_ARGV = ["train", "--config", "trainer.toml", "--force", "--progress", "none"]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_trainer_nightly import load_generator

    root = tmp_path_factory.mktemp("trainer-kills")
    make_tiny_llama(root / "tiny.gguf")
    load_generator().write_jsonl(root / "cto.jsonl", 16, seed=1)
    (root / "trainer.toml").write_text(TRAINER_TOML, encoding="utf-8")
    return root


def trainer(world: Path, *, crash_at: str | None = None, steplog: Path | None = None) -> subprocess.Popen[str]:
    spec = {"mode": "trainer", "argv": TRAIN_ARGV, "crash_at": crash_at, "steplog": str(steplog or world / "steps.log")}
    return child(spec, cwd=world)


def check_trainer_world(world: Path, base: BaseModelInfo) -> dict[str, Any]:
    versions, current, problems = disk_state(world / "adapters", "cto")
    loadable = None
    if current is not None:
        ref = registry.resolve(world / "adapters", "cto")
        loadable = registry.validate_lora_file(ref.path, base).rank > 0
    return {"versions": versions, "current": current, "problems": problems, "loadable": loadable}


def trainer_kill_cycle(world: Path, base: BaseModelInfo, steplog: Path, *, crash_at: str | None = None,
                       delay: float | None = None) -> dict[str, Any]:
    before = check_trainer_world(world, base)
    db = world / "conversations.sqlite3"
    last_id = db_rows(db, "SELECT max(id) AS id FROM trainer_runs")[0]["id"] or 0 if db.exists() else 0
    proc = trainer(world, crash_at=crash_at, steplog=steplog)
    if delay is not None:
        try:
            proc.wait(delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    killed = proc.returncode == -signal.SIGKILL
    landed = last_step(steplog) if killed else "(finished before the kill)"
    state = check_trainer_world(world, base)
    # the next run (the plain CLI) publishes, and marks the killed run interrupted
    nxt = subprocess.run([sys.executable, "-m", "trainer", *TRAIN_ARGV], check=False, cwd=world, capture_output=True, text=True,
                         env=child_env(), timeout=300)
    after = check_trainer_world(world, base)
    rows = db_rows(db, "SELECT id, status, version, reason FROM trainer_runs ORDER BY id")
    statuses = [r["status"] for r in rows]
    # the killed process's row, if it lived long enough to write one (the last row is the next run's)
    killed_rows = [r for r in rows[:-1] if r["id"] > last_id]
    return {"killed": killed, "landed": landed, "before": before, "state": state, "next_rc": nxt.returncode,
            "next_out": nxt.stdout[-300:] + nxt.stderr[-300:], "after": after, "running_rows": statuses.count("running"),
            "killed_row": killed_rows[0] if killed and killed_rows else None, "rc": proc.returncode, "err": err[-500:]}


PUBLISHED_STEPS = ("current_renamed", "pruning", "done")  # killed here, the new version is current


def check_killed_row(c: dict[str, Any]) -> list[str]:
    """The killed run's row, as the next run left it: `published` with the version it made current
    when the kill came after CURRENT was renamed, else `interrupted`."""
    row = c["killed_row"]
    if not c["killed"] or row is None:
        return []
    if c["landed"] in PUBLISHED_STEPS:
        if row["status"] != "published" or row["version"] != c["state"]["current"]:
            return [f"killed after publishing v{c['state']['current']}, but its run row says {dict(row)}"]
    elif row["status"] != "interrupted":
        return [f"killed at {c['landed']}, but its run row says {dict(row)}"]
    return []


def check_cycle(c: dict[str, Any]) -> list[str]:
    """What went wrong in one kill cycle (empty when nothing did)."""
    problems = []
    if c["state"]["problems"] or c["after"]["problems"]:
        problems.append(f"partial version visible: {c['state']['problems'] or c['after']['problems']}")
    if c["state"]["current"] is not None and not c["state"]["loadable"]:
        problems.append("current version not loadable")
    if c["before"]["current"] is not None and c["state"]["current"] is None:
        problems.append("the kill left no current version")
    if c["next_rc"] != 0 or c["after"]["current"] is None or c["after"]["current"] <= (c["state"]["current"] or 0):
        problems.append(f"the next run did not publish: rc {c['next_rc']} {c['next_out']}")
    if c["running_rows"]:
        problems.append(f"{c['running_rows']} trainer_runs rows left 'running'")
    return problems + check_killed_row(c)


def trainer_step_kills(world: Path, tmp: Path, steps: tuple[str, ...], key: str) -> None:
    base = BaseModelInfo.load(world / "tiny.gguf")
    cycles, bad = [], {}
    for step in steps:
        c = trainer_kill_cycle(world, base, tmp / f"t-{step}.log", crash_at=step)
        cycles.append(c)
        if not c["killed"] or c["landed"] != step:
            bad[step] = f"not killed at {step}: rc {c['rc']} landed {c['landed']} {c['err']}"
        elif problems := check_cycle(c):
            bad[step] = problems
    record(key, {"kills": sum(c["killed"] for c in cycles), "steps": list(steps),
                 "partial_visible": sum(bool(c["state"]["problems"]) for c in cycles),
                 "next_run_published": sum(c["next_rc"] == 0 for c in cycles), "bad": bad})
    assert not bad, bad


def test_trainer_cli_killed_at_publish_steps(tiny_world: Path, tmp_path: Path) -> None:
    """Three representative steps here (weights without manifest, complete but not current, current);
    every step in the slow run."""
    trainer_step_kills(tiny_world, tmp_path, ("weights_renamed", "manifest_renamed", "current_renamed"),
                       "trainer_step_kills")


@pytest.mark.slow
def test_trainer_cli_killed_at_each_publish_step(tiny_world: Path, tmp_path: Path) -> None:
    trainer_step_kills(tiny_world, tmp_path, STEPS, "trainer_step_kills_slow")


def trainer_random_kills(world: Path, tmp: Path, kills: int, rng: random.Random) -> dict[str, Any]:
    """SIGKILL `python -m trainer train` at random moments until `kills` runs were really killed (a
    run that finished before its kill is not counted)."""
    base = BaseModelInfo.load(world / "tiny.gguf")
    t0 = time.monotonic()
    first = trainer(world, steplog=tmp / "calibrate.log")
    first.communicate(timeout=300)
    run_s = time.monotonic() - t0
    landed: Counter[str] = Counter()
    bad = []
    attempts = killed = 0
    while killed < kills and attempts < 3 * kills:
        c = trainer_kill_cycle(world, base, tmp / f"r-{attempts}.log", delay=rng.uniform(0.05, 0.9 * run_s))
        attempts += 1
        killed += c["killed"]
        landed[c["landed"] if c["landed"] in STEPS or not c["killed"] else "before publishing"] += 1
        if problems := check_cycle(c):
            bad.append((attempts, c["landed"], problems))
    return {"kills": killed, "attempts": attempts, "run_seconds": round(run_s, 2),
            "landed_after": dict(sorted(landed.items())), "bad": bad[:5]}


def test_trainer_cli_killed_at_random_moments(tiny_world: Path, tmp_path: Path) -> None:
    fig = trainer_random_kills(tiny_world, tmp_path, kills=3, rng=random.Random(21))
    record("trainer_random_kills", fig)
    assert not fig["bad"] and fig["kills"] == 3, fig


@pytest.mark.slow
def test_trainer_cli_killed_at_random_moments_many(tiny_world: Path, tmp_path: Path) -> None:
    fig = trainer_random_kills(tiny_world, tmp_path, kills=int(os.environ.get("RELIABILITY_PUBLISH_KILLS", "24")),
                               rng=random.Random(22))
    record("trainer_random_kills_slow", fig)
    assert not fig["bad"] and fig["kills"] == int(os.environ.get("RELIABILITY_PUBLISH_KILLS", "24")), fig


# ---------------------------------------------------------------------------------------------
# 4. a full disk during a publish


def test_disk_full_during_publish_aborts_and_the_old_version_keeps_serving(fresh, base_info, lora_src, tmp_path,
                                                                          tiny_world) -> None:
    size = lora_src.stat().st_size
    page = os.sysconf("SC_PAGE_SIZE")
    weights_pages = -(-size // page) * page
    cases = {  # free space left before the publish -> the step the publish must fail after
        "weights": (size // 2, "weights_tmp_partial"),
        "manifest": (weights_pages, "weights_renamed"),
        "current": (weights_pages + page, "manifest_renamed"),
    }
    outcomes: dict[str, Any] = {}
    with small_filesystem(tmp_path / "fs", 3 * size) as fs:
        srv = fresh(adapters_dir=fs / "adapters", parallel=2)
        try:
            name = "full"
            publish_lora(srv.adapters_dir, name, base_info, seed=7, tmp=tmp_path)
            assert wait_converged(srv, name)["ok"]
            traffic = Traffic(srv, name)
            try:
                for case, (leave, fail_after) in cases.items():
                    before = sorted(os.listdir(srv.adapters_dir / name))
                    _, current_before, _ = disk_state(srv.adapters_dir, name)
                    filler = fill(fs / "filler", leave=leave)
                    steps: list[str] = []
                    publish.set_fault_hook(steps.append)
                    try:
                        with pytest.raises(OSError) as err:
                            publish.publish_version(srv.adapters_dir, name, lora_src, base_model_sha256=base_info.sha256,
                                                     architecture="llama", rank=8, alpha=8.0)
                    finally:
                        publish.set_fault_hook(None)
                    after = sorted(os.listdir(srv.adapters_dir / name))
                    view = wait_converged(srv, name)
                    outcomes[case] = {"errno": errno.errorcode.get(err.value.errno, err.value.errno),
                                      "failed_after": steps[-1] if steps else None, "folder_unchanged": after == before,
                                      "served": view["x_adapters"], "server_ok": view["ok"], "refused": view["refused"]}
                    assert err.value.errno == errno.ENOSPC, err.value
                    assert steps and steps[-1] == fail_after, (case, steps)
                    assert after == before, (case, before, after)  # no trace of the failed version
                    assert view["ok"] and view["current"] == current_before and not view["refused"], (case, view)
                    # space freed: the next publish succeeds and is served
                    filler.unlink()
                    v = pub(srv.adapters_dir, name, base_info, seed=70 + len(outcomes), tmp=tmp_path, keep=1)
                    view = wait_converged(srv, name)
                    outcomes[case]["next_publish_served"] = view["ok"] and view["current"] == v
                    assert outcomes[case]["next_publish_served"], (case, view)
            finally:
                traffic.stop()
            # the trainer: a publish on a full disk is a failed run, exit 1, and the old version stays
            tiny_adapters = fs / "tiny-adapters"
            env = child_env()
            argv = [sys.executable, "-m", "trainer", *TRAIN_ARGV, "--adapters-dir", str(tiny_adapters)]
            assert subprocess.run(argv, check=False, cwd=tiny_world, env=env, capture_output=True, timeout=300).returncode == 0
            filler = fill(fs / "filler", leave=0)
            p = subprocess.run(argv, check=False, cwd=tiny_world, env=env, capture_output=True, text=True, timeout=300)
            last = db_rows(tiny_world / "conversations.sqlite3",
                           "SELECT status, reason FROM trainer_runs ORDER BY id DESC LIMIT 1")[0]
            outcomes["trainer"] = {"exit": p.returncode, "status": last["status"], "reason": (last["reason"] or "")[:120],
                                   "current": registry.current_version(tiny_adapters, "cto"),
                                   "leftovers": leftovers(tiny_adapters, "cto")}
            filler.unlink()
            assert p.returncode == 1, p.stdout + p.stderr
            assert last["status"] == "failed" and "No space left" in last["reason"], dict(last)
            assert outcomes["trainer"]["current"] == 1 and not outcomes["trainer"]["leftovers"], outcomes["trainer"]
        finally:
            srv.stop()
    record("publish_disk_full", {**outcomes, "requests": sum(traffic.codes.values()),
                                 "failed_requests": len(traffic.failures)})
    assert not traffic.failures, traffic.failures[:5]


# ---------------------------------------------------------------------------------------------
# 5. a byte flipped in a published adapter


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_flipped_byte_is_refused_on_checksum_and_the_previous_version_serves(fresh, base_info, tmp_path) -> None:
    srv = fresh(parallel=2)
    name = "flip"
    publish_lora(srv.adapters_dir, name, base_info, seed=81, tmp=tmp_path)
    assert wait_converged(srv, name)["ok"]
    traffic = Traffic(srv, name)
    results: dict[str, Any] = {}
    try:
        for i, where in enumerate(("magic", "metadata", "tensor data", "last byte")):
            v = pub(srv.adapters_dir, name, base_info, seed=82 + i, tmp=tmp_path, keep=10)
            assert wait_converged(srv, name)["current"] == v  # served (and so loaded) before the flip
            path = srv.adapters_dir / name / f"v{v}.gguf"
            size = path.stat().st_size
            offset = {"magic": 2, "metadata": 40, "tensor data": size // 2, "last byte": size - 1}[where]
            flip_byte(path, offset)
            t0 = time.monotonic()
            view = wait_converged(srv, name)
            versions, _, _ = disk_state(srv.adapters_dir, name)
            reason = next((r for k, r in view["refused"].items() if k.endswith(f"v{v}.json")), "")
            pinned = served(srv, f"{name}@{v}").status_code
            results[where] = {"version": v, "offset": offset, "refused_in_s": round(time.monotonic() - t0, 2),
                              "reason": reason, "now_serving": view["x_adapters"], "pinned_status": pinned}
            assert view["ok"] and v not in versions, (where, view)
            assert view["current"] == 1, (where, view)  # the previous good version
            assert "sha256 mismatch" in reason, (where, view["refused"])
            assert pinned == 404, (where, pinned)
    finally:
        traffic.stop()
    record("byte_flips", {"flips": len(results), "refused": sum("sha256" in r["reason"] for r in results.values()),
                          "served_after_flip": sum(r["pinned_status"] == 200 for r in results.values()),
                          "details": results, "requests": sum(traffic.codes.values()),
                          "failed_requests": len(traffic.failures)})
    assert not traffic.failures, traffic.failures[:5]
    assert srv.proc.poll() is None


def test_flipped_byte_with_the_mtime_kept_is_refused_when_the_version_is_loaded_again(fresh, base_info,
                                                                                     tmp_path) -> None:
    srv = fresh(parallel=1, max_loaded_adapters=1)
    publish_lora(srv.adapters_dir, "keep-a", base_info, seed=91, tmp=tmp_path)
    publish_lora(srv.adapters_dir, "keep-b", base_info, seed=92, tmp=tmp_path)
    assert wait_converged(srv, "keep-b")["ok"] and wait_converged(srv, "keep-a")["ok"]  # a is loaded
    path = srv.adapters_dir / "keep-a" / "v1.gguf"
    st = path.stat()
    flip_byte(path, st.st_size // 2)  # tensor data: llama.cpp loads it without complaint
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    time.sleep(1.0)  # a few watch intervals
    assert served(srv, "keep-b").status_code == 200  # evicts keep-a (max_loaded_adapters=1)
    r = served(srv, "keep-a")  # loaded again from the flipped file
    assert r.status_code == 404, (r.status_code, r.text[:300])


# ---------------------------------------------------------------------------------------------
# 6. rollback under load


def stream_answer(srv: ServerProcess, model: str, started: threading.Event, out: dict[str, Any]) -> None:
    body = chat_body("Write a long story about a lighthouse keeper and the sea, with many details.",
                     model=model, max_tokens=160, stream=True)
    text = []
    try:
        with srv.http(timeout=120) as http, http.stream("POST", URL, json=body) as r:
            out["status"], out["adapters"] = r.status_code, r.headers.get("x-adapters")
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                        text.append(chunk["choices"][0]["delta"]["content"])
                        started.set()
                out["last"] = line or out.get("last")
    except httpx.HTTPError as e:
        out["error"] = repr(e)
    started.set()
    out["text"], out["ended"] = "".join(text), time.monotonic()


def test_rollback_takes_effect_within_seconds_and_requests_in_flight_finish_on_their_version(fresh, base_info,
                                                                                             tmp_path) -> None:
    interval = 2.0  # the default CHAT_ADAPTER_WATCH_INTERVAL_S
    srv = fresh(parallel=4, adapter_watch_interval_s=interval)
    name = "roll"
    publish_lora(srv.adapters_dir, name, base_info, seed=95, tmp=tmp_path)
    publish_lora(srv.adapters_dir, name, base_info, seed=96, tmp=tmp_path)
    assert wait_converged(srv, name)["current"] == 2
    refs = {}
    for v in (1, 2):
        out: dict[str, Any] = {}
        stream_answer(srv, f"{name}@{v}", threading.Event(), out)
        refs[v] = out["text"]
    assert refs[1] != refs[2]

    polls: list[tuple[float, int, str | None]] = []
    stop = threading.Event()

    def poll() -> None:
        with srv.http(timeout=60) as http:
            while not stop.is_set():
                try:
                    r = http.post(URL, json=chat_body("Say hi.", model=name, max_tokens=1))
                    polls.append((time.monotonic(), r.status_code, r.headers.get("x-adapters")))
                except httpx.HTTPError as e:
                    polls.append((time.monotonic(), -1, repr(e)))
                time.sleep(0.05)

    in_flight = [({}, threading.Event()) for _ in range(3)]
    threads = [threading.Thread(target=stream_answer, args=(srv, name, ev, out)) for out, ev in in_flight]
    poller = threading.Thread(target=poll)
    for t in threads:
        t.start()
    for _, ev in in_flight:
        assert ev.wait(60)
    poller.start()
    p = subprocess.run([sys.executable, "-m", "trainer", "rollback", name, "--adapters-dir", str(srv.adapters_dir)],
                       check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=child_env())
    t_rolled = time.monotonic()
    assert p.returncode == 0 and f"{name}: current version 2 -> 1" in p.stdout, p.stdout + p.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not any(t > t_rolled and a == f"{name}@1:1" for t, _, a in polls):
        time.sleep(0.05)
    for t in threads:
        t.join(120)
    stop.set()
    poller.join(60)
    switch = next((t - t_rolled for t, _, a in polls if t > t_rolled and a == f"{name}@1:1"), None)
    after_switch = [a for t, _, a in polls if switch is not None and t > t_rolled + switch]
    after = {}
    stream_answer(srv, name, threading.Event(), after)
    record("rollback", {
        "watch_interval_s": interval, "switch_s": None if switch is None else round(switch, 2),
        "in_flight": len(in_flight), "in_flight_ok": sum(o.get("status") == 200 and o.get("last") == "data: [DONE]"
                                                          and o["text"] == refs[2] for o, _ in in_flight),
        "in_flight_finished_after_rollback": sum(o["ended"] > t_rolled for o, _ in in_flight),
        "concurrent_requests": len(polls), "concurrent_failed": sum(c != 200 for _, c, _ in polls),
    })
    assert switch is not None and switch < 2 * interval + 2, switch
    for out, _ in in_flight:
        assert out.get("status") == 200 and out["adapters"] == f"{name}@2:1", out
        assert out.get("last") == "data: [DONE]" and out["text"] == refs[2]  # finished on the version it started on
    assert all(o["ended"] > t_rolled for o, _ in in_flight), "the rollback did not happen while they were in flight"
    assert all(c == 200 for _, c, _ in polls), [p for p in polls if p[1] != 200][:5]
    assert all(a == f"{name}@1:1" for a in after_switch), after_switch[:5]  # no flapping back
    assert after["adapters"] == f"{name}@1:1" and after["text"] == refs[1]
