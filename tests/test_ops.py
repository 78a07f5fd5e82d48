"""Operations: the files in deploy/ checked with the tools their users run.

There is no Docker engine and no Kubernetes cluster here, so the stacks cannot be started; what
can be checked is checked with real tools from the package registries (installed by
scripts/test-tools.d/ops.sh; a missing tool fails these tests, it never skips them):

- the compose file against the compose-spec JSON schema (shipped by npm's dclint) and dclint's
  own rules; its wiring (volumes, image, config paths) and the nightly scheduler loop;
- prometheus.yml with `promtool check config`, and a real Prometheus (Debian's build) scraping a
  real server with that job's auth settings, answering every query of the Grafana dashboard;
- `promtool check metrics` on a real /metrics scrape taken after real traffic and a real
  nightly run, and every metric name the dashboard uses found in that scrape;
- the Kubernetes manifests against the Kubernetes JSON schemas (kubernetes-validate, offline,
  strict), and the replica / log / adapters design they encode.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import tomllib
import yaml

from adapter_chat import publish
from adapter_chat.chat_template import ChatTemplate
from adapter_chat.gguf_info import BaseModelInfo
from server.settings import Settings
from adapter_chat.store import ConversationLog
from tests.conftest import (
    PIRATE,
    SHARED_ROUTES,
    ServerProcess,
    chat_body,
    free_port,
    publish_lora,
    write_routes,
)
from trainer.config import parse_config
from trainer.dataset import read_log

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
PROMETHEUS_YML = COMPOSE_DIR / "prometheus" / "prometheus.yml"
DASHBOARD = COMPOSE_DIR / "grafana" / "dashboards" / "adapter-chat.json"
DATASOURCES = COMPOSE_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = COMPOSE_DIR / "grafana" / "provisioning" / "dashboards" / "adapter-chat.yaml"
K8S_DIR = ROOT / "deploy" / "k8s"
SETTINGS_VARS = {f"CHAT_{name.upper()}" for name in Settings.model_fields}

API_KEY = "ops-user-key"
METRICS_KEY = "ops-prometheus-key"


def tool(name: str) -> str:
    """A tool from scripts/test-tools.d/ops.sh (in the venv's bin) or PATH; fails when missing."""
    found = shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert found, f"{name} is not installed: run `bash scripts/test-tools.d/ops.sh` (`make test` does)"
    return found


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=kw.pop("timeout", 120), **kw)


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# ---------------------------------------------------------------------------------------------
# docker compose


_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\})")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable interpolation (`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `$$`)."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, default = m.group(1), m.group(2), m.group(3)
        value = env.get(name)
        if op == ":-" and not value:
            return default
        if op == "-" and value is None:
            return default
        return value or ""

    return _VAR.sub(sub, text)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as `docker compose config` sees it with an empty environment."""
    return yaml.safe_load(interpolate(COMPOSE_FILE.read_text(), {}))


def compose_schema() -> dict[str, Any]:
    dclint = Path(os.path.realpath(tool("dclint")))  # .../node_modules/dclint/bin/dclint.cjs
    schema = json.loads((dclint.parent.parent / "schemas" / "compose.schema.json").read_text())
    assert schema["title"] == "Compose Specification"
    return schema


def test_compose_file_matches_the_compose_spec_schema(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    validator = jsonschema.Draft7Validator(schema)  # the schema's own draft ("draft-07")
    for doc in (yaml.safe_load(COMPOSE_FILE.read_text()), compose):
        problems = [f"{e.json_path}: {e.message}" for e in validator.iter_errors(doc)]
        assert problems == []
    # the schema is strict enough to catch a typo
    typo = json.loads(json.dumps(compose))
    typo["services"]["server"]["volume"] = typo["services"]["server"].pop("volumes")
    assert list(validator.iter_errors(typo))


def test_dclint_finds_no_errors(tmp_path: Path) -> None:
    # dclint reads the file as written, so give it the interpolated text (as compose would)
    target = tmp_path / "compose.yaml"
    target.write_text(interpolate(COMPOSE_FILE.read_text(), {}))
    result = run([tool("dclint"), "--quiet", "--color", "false", str(target)])
    assert result.returncode == 0, result.stdout + result.stderr


def _bind_mounts(service: dict[str, Any]) -> list[tuple[str, str, bool]]:
    mounts = []
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        mounts.append((source, target, "ro" in mode))
    return mounts


def dockerfile_env() -> dict[str, str]:
    """The server's CHAT_* environment in the image (the ENV block that sets them; the build
    stages have ENV blocks of their own)."""
    text = (ROOT / "Dockerfile").read_text()
    blocks = [b.group(1) for b in re.finditer(r"^ENV (.*?)(?:\n(?!\s))", text, re.DOTALL | re.MULTILINE)]
    chat = [b for b in blocks if "CHAT_" in b]
    assert len(chat) == 1, "one ENV block sets the server's CHAT_* variables"
    return dict(re.findall(r"(\w+)=(\S+)", chat[0]))


def test_compose_stack_wiring(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"server", "trainer", "prometheus", "grafana"}
    server, trainer = services["server"], services["trainer"]
    assert server["image"] == trainer["image"]  # the trainer runs the server's image
    assert server["build"]["context"] == "../.." and (COMPOSE_DIR / "../.." / server["build"]["dockerfile"]).is_file()

    declared = set(compose["volumes"])
    mounts = {name: _bind_mounts(s) for name, s in services.items()}
    for name, ms in mounts.items():
        for source, _target, _ in ms:
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name}: bind mount source {source} is missing"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
    by_target = {name: {t: (s, ro) for s, t, ro in ms} for name, ms in mounts.items()}
    # adapters: the trainer writes, the server only reads; models and data are shared
    assert by_target["server"]["/app/adapters"] == ("adapters", True)
    assert by_target["trainer"]["/app/adapters"] == ("adapters", False)
    assert by_target["server"]["/app/data"] == by_target["trainer"]["/app/data"] == ("data", False)
    assert by_target["server"]["/app/models"][0] == by_target["trainer"]["/app/models"][0] == "models"

    # every CHAT_* variable the stack sets is a real setting
    assert {k for k in server["environment"] if k.startswith("CHAT_")} <= SETTINGS_VARS

    # the trainer: its loop script and config are the committed files, its checks disabled
    assert trainer["healthcheck"] == {"disable": True}
    assert trainer["command"] == ["sh", "/opt/adapter-chat/nightly-loop.sh"]
    assert by_target["trainer"]["/opt/adapter-chat/nightly-loop.sh"] == ("./nightly-loop.sh", True)
    assert by_target["trainer"][trainer["environment"]["TRAINER_CONFIG"]] == ("./trainer.toml", True)

    # Prometheus reads the committed config and the key file the entrypoint writes
    prom = services["prometheus"]
    assert by_target["prometheus"]["/etc/prometheus/prometheus.yml"] == ("./prometheus/prometheus.yml", True)
    job = yaml.safe_load(PROMETHEUS_YML.read_text())["scrape_configs"][0]
    assert "> " + job["authorization"]["credentials_file"] in prom["entrypoint"][2]
    assert job["static_configs"][0]["targets"] == ["server:8000"]  # the compose service name

    # Grafana: provisioning mounted where Grafana looks, dashboards where the provider points
    graf = services["grafana"]
    assert by_target["grafana"]["/etc/grafana/provisioning"] == ("./grafana/provisioning", True)
    provider = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]
    assert by_target["grafana"][provider["options"]["path"]] == ("./grafana/dashboards", True)
    home = graf["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"


def test_compose_trainer_config_matches_the_server_paths(compose: dict[str, Any]) -> None:
    """The trainer reads the log the server writes and publishes where the server looks."""
    from trainer.config import load_config

    cfg = load_config(COMPOSE_DIR / "trainer.toml")
    env = dockerfile_env()
    assert str(cfg.base_model) == env["CHAT_MODEL"]
    assert list(cfg.logs) == [env["CHAT_DB_PATH"]]
    assert cfg.runs_db is None  # the first log file: the server's /metrics shows the runs
    assert str(cfg.adapters_dir) == env["CHAT_ADAPTERS_DIR"]
    assert str(cfg.cache_dir).startswith("/app/data/")  # on the data volume
    assert [a.name for a in cfg.adapters] == ["house-style"]


def _fake_bin(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def test_nightly_loop_sleeps_until_the_configured_time_then_runs_the_trainer(tmp_path: Path) -> None:
    """The compose scheduler with stand-ins for `sleep` (records how long) and `python` (records
    its arguments, then stops the loop with SIGTERM as `docker compose stop` would)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_bin(bin_dir, "sleep", f'echo "$1" > {tmp_path}/slept\n')
    _fake_bin(bin_dir, "python", f'echo "$@" > {tmp_path}/ran\nkill -TERM $PPID\n')
    before = int(time.time())
    # a time of day about 12 hours away: the next one is unambiguous
    wake = (datetime.fromtimestamp(before, timezone.utc) + timedelta(hours=12)).replace(second=0, microsecond=0)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "NIGHTLY_AT": f"{wake:%H:%M}", "TZ": "UTC",
           "TRAINER_CONFIG": "/opt/adapter-chat/trainer.toml"}
    result = run(["sh", str(COMPOSE_DIR / "nightly-loop.sh")], env=env, timeout=30)
    after = int(time.time())
    assert result.returncode == 143, result.stderr  # stopped by the SIGTERM, as in `docker stop`
    slept = int((tmp_path / "slept").read_text())
    # it slept from its start until that time of day, then ran the trainer
    assert before + slept <= wake.timestamp() <= after + slept
    assert f"next trainer run at {wake:%Y-%m-%d %H:%M} UTC" in result.stdout
    assert (tmp_path / "ran").read_text().split() == [
        "-m", "trainer", "nightly", "--config", "/opt/adapter-chat/trainer.toml", "--progress", "lines"]


def test_nightly_loop_refuses_a_malformed_time() -> None:
    result = run(["sh", str(COMPOSE_DIR / "nightly-loop.sh")], env={"PATH": "/usr/bin:/bin", "NIGHTLY_AT": "25:00"})
    assert result.returncode == 2
    assert "NIGHTLY_AT must be HH:MM" in result.stderr


# ---------------------------------------------------------------------------------------------
# Prometheus config


def test_promtool_checks_the_prometheus_config(tmp_path: Path) -> None:
    promtool = tool("promtool")
    syntax = run([promtool, "check", "config", "--syntax-only", str(PROMETHEUS_YML)])
    assert syntax.returncode == 0, syntax.stdout + syntax.stderr
    # the full check also opens referenced files: point the key file at one that exists
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    key = tmp_path / "chat-metrics-key"
    key.write_text(METRICS_KEY)
    config["scrape_configs"][0]["authorization"]["credentials_file"] = str(key)
    full = tmp_path / "prometheus.yml"
    full.write_text(yaml.safe_dump(config))
    result = run([promtool, "check", "config", str(full)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_kubernetes_scrape_job_example(tmp_path: Path) -> None:
    """examples/prometheus-kubernetes-pods.yml. Debian's Prometheus is built without Kubernetes
    discovery, so promtool checks the job with static targets in place of `kubernetes_sd_configs`
    (the relabelling, regexes included, is checked as written); the discovery block itself is
    checked against the annotations the Deployment sets."""
    config = yaml.safe_load((K8S_DIR / "examples" / "prometheus-kubernetes-pods.yml").read_text())
    job = config["scrape_configs"][0]
    sd = job.pop("kubernetes_sd_configs")
    assert sd == [{"role": "pod", "namespaces": {"names": ["adapter-chat"]}}]
    job["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = run([tool("promtool"), "check", "config", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    annotations = k8s_resources()["Deployment/chat-server"]["spec"]["template"]["metadata"]["annotations"]
    used = {"prometheus.io/" + m.group(1)
            for r in job["relabel_configs"] for s in r["source_labels"]
            if (m := re.fullmatch(r"__meta_kubernetes_pod_annotation_prometheus_io_(\w+)", s))}
    assert used == set(annotations) == {"prometheus.io/scrape", "prometheus.io/path", "prometheus.io/port"}


# ---------------------------------------------------------------------------------------------
# A real server with real traffic, a real nightly run, and a real scrape


@dataclass
class OpsServer:
    proc: ServerProcess
    scrape: str


@pytest.fixture(scope="module")
def ops_server(tmp_path_factory: pytest.TempPathFactory, model_path: Path, base_info: BaseModelInfo) -> Iterator[OpsServer]:
    """A server whose /metrics needs a key (CHAT_METRICS_PUBLIC=false), after every kind of traffic
    the dashboard shows: prompt, finetuned and fallback paths, an unknown model, feedback both ways,
    a refused adapter, and a nightly run of the compose stack's trainer.toml against its log."""
    work = tmp_path_factory.mktemp("ops-server")
    adapters = work / "adapters"
    adapters.mkdir()
    publish_lora(adapters, "style-a", base_info, seed=1, tmp=work)
    # an adapter made for another base model: the server refuses it (adapter_load_failures_total)
    src = work / "broken.gguf"
    shutil.copy(adapters / "style-a" / "v1.gguf", src)
    publish.publish_version(adapters, "broken", src, base_model_sha256="0" * 64, base_model_name="other",
                             architecture=base_info.architecture, rank=8, alpha=8.0, metrics={})
    (work / "prompts").mkdir()
    write_routes(work / "prompts", SHARED_ROUTES, {"pirate.j2": PIRATE})
    proc = ServerProcess(work, model_path, adapters_dir=adapters, api_keys=[API_KEY, METRICS_KEY],
                         metrics_public="false", replica="ops-test")
    try:
        client = proc.client()
        ids = []
        for model in ("pirate", "styled", "fallback", "base"):
            r = client.chat.completions.create(**chat_body("Say hello.", model=model, max_tokens=8))
            ids.append(r.id)
        with proc.http(headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            assert http.post("/v1/chat/completions", json=chat_body(model="no-such-model")).status_code == 404
            for rid, rating in zip(ids, (1, -1, 0)):
                assert http.post("/v1/feedback", json={"response_id": rid, "rating": rating}).status_code == 200
        # the nightly job as the compose stack runs it, pointed at this server's files: too little
        # data, so the run records `skipped` in the log's trainer_runs (exit 0)
        nightly = run([sys.executable, "-m", "trainer", "nightly", "--config", str(COMPOSE_DIR / "trainer.toml"),
                       "--base-model", str(model_path), "--db", str(proc.db_path), "--adapters-dir", str(adapters),
                       "--cache-dir", str(work / "trainer-cache"), "--progress", "none"], cwd=ROOT, timeout=300)
        assert nightly.returncode == 0, nightly.stdout + nightly.stderr
        assert "skipped" in nightly.stdout
        scrape = httpx.get(f"{proc.url}/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"}, timeout=10)
        assert scrape.status_code == 200
        yield OpsServer(proc, scrape.text)
    finally:
        proc.stop()


def scraped_names(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_promtool_check_metrics_on_a_real_scrape(ops_server: OpsServer) -> None:
    result = run([tool("promtool"), "check", "metrics"], input=ops_server.scrape)
    assert result.returncode == 0, result.stdout + result.stderr
    names = scraped_names(ops_server.scrape)
    # the series the traffic above must have produced
    assert {"chat_requests_total", "chat_feedback_total", "chat_route_fallbacks_total", "adapter_load_failures_total",
            "trainer_last_run_status", "chat_request_duration_seconds_bucket"} <= names
    assert 'trainer_last_run_status{adapter="house-style",status="skipped"} 1.0' in ops_server.scrape
    # and why Prometheus needs the auth settings: without a key, /metrics is refused here
    assert httpx.get(f"{ops_server.proc.url}/metrics", timeout=10).status_code == 401


# ---------------------------------------------------------------------------------------------
# The Grafana dashboard


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))


GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "15s", "$route": ".*"}


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard (panels and variables), Grafana variables filled in."""
    exprs = [t["expr"] for p in all_panels(dashboard()["panels"]) for t in p.get("targets", [])]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+), *\w+\)", var["query"]["query"])
            assert m, var["query"]
            exprs.append(m.group(1))
    out = []
    for e in exprs:
        for k in sorted(GRAFANA_VARS, key=len, reverse=True):
            e = e.replace(k, GRAFANA_VARS[k])
        assert "$" not in e, f"unknown Grafana variable in {e}"
        out.append(e)
    return out


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
                "unless", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions, keywords, label
    names in grouping clauses or matchers, strings, numbers or durations."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])([A-Za-z_:][\w:]*)(\s*\()?", e):
        if m.group(2) or m.group(1).lower() in PROMQL_WORDS:
            continue
        names.add(m.group(1))
    return names


def test_promql_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, route) (rate(chat_request_duration_seconds_bucket'
            '{route=~"a|b", path!="x"}[5m]))) / on (route) group_left max(time() - up) > bool 0.5')
    assert promql_metric_names(expr) == {"chat_request_duration_seconds_bucket", "up"}


def test_dashboard_is_well_formed() -> None:
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    provisioned_uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["datasource"]["current"]["value"] == provisioned_uid
    ids = [p["id"] for p in all_panels(d["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    covered: set[tuple[int, int]] = set()
    for p in all_panels(d["panels"]):
        g = p["gridPos"]
        assert g["w"] >= 1 and g["h"] >= 1 and 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & covered, f"panel {p['title']!r} overlaps another"
        covered |= cells
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "table", "bargauge", "gauge", "barchart", "text"}, p["type"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert all(t["expr"].strip() for t in p["targets"]), p["title"]
    titles = " | ".join(p.get("title", "") for p in all_panels(d["panels"])).lower()
    for topic in ("requests/s by route and path", "latency", "tokens/s", "queue", "adapter version", "feedback",
                  "last nightly run per adapter"):
        assert topic in titles.replace("ratings", "feedback"), topic


def test_every_dashboard_metric_is_in_a_real_scrape(ops_server: OpsServer) -> None:
    used = set().union(*(promql_metric_names(e) for e in dashboard_queries()))
    assert {"chat_requests_total", "trainer_last_run_status", "chat_feedback_total"} <= used
    missing = used - scraped_names(ops_server.scrape)
    assert missing == set(), f"the dashboard uses metrics the server does not export: {sorted(missing)}"


# ---------------------------------------------------------------------------------------------
# A real Prometheus with the committed scrape job


class Prometheus:
    """Debian's `prometheus` on a loopback port with a config derived from the committed one."""

    def __init__(self, config: dict[str, Any], work: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._log = open(work / "prometheus.log", "wb")  # noqa: SIM115 (open while it runs)
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.log_path = work / "prometheus.log"

    def get(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.url}{path}", params=params, timeout=10)
        r.raise_for_status()
        return r.json()["data"]

    def wait_for(self, what: str, check: Any, timeout: float = 90) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                got = check()
            except httpx.HTTPError:
                got = None
            if got:
                return got
            time.sleep(0.5)
        raise AssertionError(f"Prometheus: {what} not reached:\n{self.log_path.read_text()[-3000:]}")

    def targets(self) -> dict[str, dict[str, Any]]:
        return {t["labels"]["job"]: t for t in self.get("/api/v1/targets")["activeTargets"]}

    def query(self, expr: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def test_prometheus_scrapes_with_the_committed_job_and_answers_every_dashboard_query(
    ops_server: OpsServer, server: ServerProcess, tmp_path: Path
) -> None:
    """The committed `adapter-chat` job, aimed at real servers: with the key in its file it scrapes
    a server whose /metrics is private; with an empty file (compose's default) a public one; and
    without the authorization block the private one refuses it. Then every dashboard query runs."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = "1s"
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "adapter-chat")
    key, empty = tmp_path / "key", tmp_path / "empty-key"
    key.write_text(METRICS_KEY)
    empty.write_text("")
    job["authorization"]["credentials_file"] = str(key)
    job["static_configs"] = [{"targets": [f"127.0.0.1:{ops_server.proc.port}"], "labels": {"service": "chat-server"}}]
    public = json.loads(json.dumps(job))
    public["job_name"] = "public-empty-key"
    public["authorization"]["credentials_file"] = str(empty)
    public["static_configs"] = [{"targets": [f"127.0.0.1:{server.port}"]}]
    no_auth = json.loads(json.dumps(job))
    no_auth["job_name"] = "no-key"
    del no_auth["authorization"]
    config["scrape_configs"] = [job, public, no_auth]

    prom = Prometheus(config, tmp_path)
    try:
        def settled() -> dict[str, dict[str, Any]] | None:
            t = prom.targets()
            done = len(t) == 3 and all(x["health"] != "unknown" for x in t.values())
            return t if done else None

        targets = prom.wait_for("all three targets scraped", settled)
        assert targets["adapter-chat"]["health"] == "up", targets["adapter-chat"]["lastError"]
        assert targets["public-empty-key"]["health"] == "up", targets["public-empty-key"]["lastError"]
        assert targets["no-key"]["health"] == "down" and "401" in targets["no-key"]["lastError"]
        # enough samples for rate() over the dashboard's windows
        prom.wait_for("3 scrapes", lambda: prom.query('count_over_time(up{job="adapter-chat"}[5m]) >= 3'))

        for expr in dashboard_queries():
            prom.query(expr)  # parses and evaluates (asserts status success)
        routes = {r["metric"]["route"] for r in prom.query(
            'sum by (route, path) (rate(chat_requests_total{job="adapter-chat"}[1m]))')}
        assert {"pirate", "styled", "fallback", "base"} <= routes
        runs = prom.query('max by (adapter, status) (trainer_last_run_status{job="adapter-chat"}) == 1')
        assert [(r["metric"]["adapter"], r["metric"]["status"]) for r in runs] == [("house-style", "skipped")]
    finally:
        prom.stop()


# ---------------------------------------------------------------------------------------------
# Kubernetes


def k8s_resources() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    out = {}
    for name in kustomization["resources"]:
        for doc in load_yaml_docs(K8S_DIR / name):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def test_kustomization_lists_every_manifest_and_the_image() -> None:
    kustomization = yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    images = {c["image"] for r in k8s_resources().values() for c in _pod_spec(r).get("containers", [])}
    assert images == {i["name"] for i in kustomization["images"]} == {"adapter-chat"}


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.utils.latest_version()])
def test_k8s_manifests_pass_the_schema(version: str) -> None:
    """Every manifest, the Secret example included, against the Kubernetes JSON schemas (strict:
    an unknown field is an error)."""
    files = [K8S_DIR / n for n in yaml.safe_load((K8S_DIR / "kustomization.yaml").read_text())["resources"]]
    files.append(K8S_DIR / "examples" / "secret.example.yaml")
    checked = 0
    for path in files:
        for doc in load_yaml_docs(path):
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{path.name}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
            checked += 1
    assert checked == 9
    # strict validation does catch a misspelt field
    bad = json.loads(json.dumps(k8s_resources()["Deployment/chat-server"]))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, version, strict=True)


def _pod_spec(resource: dict[str, Any]) -> dict[str, Any]:
    if resource["kind"] == "Deployment":
        return resource["spec"]["template"]["spec"]
    if resource["kind"] == "CronJob":
        return resource["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return {}


def _mounts(pod: dict[str, Any]) -> dict[str, tuple[str | None, bool]]:
    """mountPath -> (claim or configMap name, read-only)."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    out = {}
    for m in pod["containers"][0]["volumeMounts"]:
        v = volumes[m["name"]]
        source = (v.get("persistentVolumeClaim") or {}).get("claimName") or (v.get("configMap") or {}).get("name")
        out[m["mountPath"]] = (source, bool(m.get("readOnly")))
    return out


def container_env(pod: dict[str, Any], configmaps: dict[str, dict[str, Any]], pod_name: str) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom ConfigMaps, then `env` in
    order, with `$(VAR)` expanded from the variables defined before it."""
    c = pod["containers"][0]
    env: dict[str, str] = {}
    for src in c.get("envFrom", []):
        if "configMapRef" in src:
            env.update(configmaps[src["configMapRef"]["name"]]["data"])
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), e["value"])
        elif e["valueFrom"].get("fieldRef", {}).get("fieldPath") == "metadata.name":
            env[e["name"]] = pod_name
    return env


def test_k8s_server_and_trainer_share_adapters_one_way_and_logs_per_replica() -> None:
    res = k8s_resources()
    server, trainer = _pod_spec(res["Deployment/chat-server"]), _pod_spec(res["CronJob/chat-trainer"])
    s_mounts, t_mounts = _mounts(server), _mounts(trainer)
    assert s_mounts["/app/adapters"] == ("chat-adapters", True)  # the server only reads adapters
    assert t_mounts["/app/adapters"] == ("chat-adapters", False)  # the trainer is the one writer
    assert s_mounts["/app/data"] == t_mounts["/app/data"] == ("chat-data", False)
    assert {f"PersistentVolumeClaim/{c}" for c in ("chat-adapters", "chat-data")} <= set(res)

    probes = server["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
    assert server["enableServiceLinks"] is False  # a Service named chat-* would inject CHAT_* variables

    configmaps = {r["metadata"]["name"]: r for r in res.values() if r["kind"] == "ConfigMap"}
    env = container_env(server, configmaps, "chat-server-7d9f8b6c5d-x2x4q")
    assert {k for k in env if k.startswith("CHAT_")} <= SETTINGS_VARS
    secret = load_yaml_docs(K8S_DIR / "examples" / "secret.example.yaml")[0]
    assert set(secret["stringData"]) <= SETTINGS_VARS
    assert {"name": secret["metadata"]["name"]} == {"name": probes["envFrom"][1]["secretRef"]["name"]}
    assert env["CHAT_DB_PATH"] == "/app/data/conversations-chat-server-7d9f8b6c5d-x2x4q.sqlite3"
    assert env["CHAT_REPLICA"] == "chat-server-7d9f8b6c5d-x2x4q"

    # the CronJob runs the trainer on the ConfigMap's trainer.toml
    command = trainer["containers"][0]["command"]
    config_path = Path(command[command.index("--config") + 1])
    assert t_mounts[str(config_path.parent)] == ("chat-trainer-config", True)
    toml = configmaps["chat-trainer-config"]["data"][config_path.name]
    cfg = parse_config(tomllib.loads(toml), root=Path("/"))
    assert str(cfg.adapters_dir) == env["CHAT_ADAPTERS_DIR"] == "/app/adapters"
    assert str(cfg.base_model) == env["CHAT_MODEL"]
    assert all(fnmatch.fnmatch(env["CHAT_DB_PATH"], p) for p in cfg.logs)  # every replica's file is read
    assert cfg.runs_db is not None and not any(fnmatch.fnmatch(str(cfg.runs_db), p) for p in cfg.logs)


def test_k8s_replica_logs_are_read_together_and_deduplicated(
    tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two replicas configured exactly as the Deployment configures them (Settings built from that
    environment, logs written the way the server writes them) and the CronJob's trainer.toml
    reading them: both files, an exchange present in both counted once, feedback from either."""
    res = k8s_resources()
    configmaps = {r["metadata"]["name"]: r for r in res.values() if r["kind"] == "ConfigMap"}
    server = _pod_spec(res["Deployment/chat-server"])
    logs = []
    for pod in ("chat-server-7d9f8b6c5d-aaaaa", "chat-server-7d9f8b6c5d-bbbbb"):
        env = container_env(server, configmaps, pod)
        for k in [k for k in os.environ if k.startswith("CHAT_")]:
            monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v.replace("/app/data", str(tmp_path)))
        settings = Settings(_env_file=None)
        assert settings.replica == pod and settings.db_path.name == f"conversations-{pod}.sqlite3"
        logs.append(ConversationLog(settings.db_path, replica=settings.replica))
    a, b = logs

    def exchange(log: ConversationLog, rid: str, answer: str) -> None:
        log.begin({"id": rid, "created_at": time.time() - 60, "model": "house-style", "route": "house-style",
                   "path_kind": "prompt", "adapters": [], "system_prompt": None,
                   "messages": [{"role": "user", "content": f"question {rid}"}], "params": {}, "conversation_id": rid})
        log.finish(rid, {"status": "completed", "response": answer, "finish_reason": "stop"})

    exchange(a, "chatcmpl-1", "from a")
    exchange(b, "chatcmpl-2", "from b")
    exchange(a, "chatcmpl-3", "logged twice")
    exchange(b, "chatcmpl-3", "logged twice")
    b.add_feedback("chatcmpl-1", 1, "corrected on b", None)  # a rating can reach another replica
    for log in logs:
        log.flush()
        log.close()

    toml = configmaps["chat-trainer-config"]["data"]["trainer.toml"].replace("/app/data", str(tmp_path))
    cfg = parse_config(tomllib.loads(toml), root=Path("/"))
    adapter = cfg.adapter("house-style")
    template = ChatTemplate.from_model(BaseModelInfo.load(model_path))
    got = read_log(list(cfg.logs), adapter.source, template)
    assert len(got.files) == 2
    assert sorted(i.answer or "" for i in got.items) == ["corrected on b", "from b", "logged twice"]
    assert got.dropped == {"duplicate request id (another replica)": 1}


# ---------------------------------------------------------------------------------------------
# Kubernetes, the PostgreSQL variant (deploy/k8s-postgresql: a kustomize overlay of deploy/k8s)

K8S_PG_DIR = ROOT / "deploy" / "k8s-postgresql"


def k8s_pg_resources() -> dict[str, dict[str, Any]]:
    """The overlay as kustomize renders it (`kubectl kustomize`, the same code as `kubectl apply -k`)."""
    out = subprocess.run(["kubectl", "kustomize", str(K8S_PG_DIR)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(out.stdout) if d}


@pytest.mark.parametrize("version", ["1.30.0", kubernetes_validate.utils.latest_version()])
def test_k8s_postgresql_overlay_renders_and_passes_the_schema(version: str) -> None:
    res = k8s_pg_resources()
    assert set(res) == set(k8s_resources())  # the same objects, patched
    docs = [*res.values(), *load_yaml_docs(K8S_DIR / "examples" / "postgres-secret.example.yaml")]
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


def test_k8s_postgresql_overlay_spreads_replicas_over_one_shared_log(
    tmp_path: Path, model_path: Path, monkeypatch: pytest.MonkeyPatch, pg_url: str
) -> None:
    """No node affinity, no data volume on the servers, the adapters volume ReadWriteMany and
    read-only for them; two replicas configured as the Deployment configures them write one
    PostgreSQL log, and the CronJob's trainer.toml reads it (with its runs) from the same URL."""
    res = k8s_pg_resources()
    server, trainer = _pod_spec(res["Deployment/chat-server"]), _pod_spec(res["CronJob/chat-trainer"])
    assert "podAffinity" not in server.get("affinity", {}) and "affinity" not in trainer
    assert _mounts(server) == {"/app/adapters": ("chat-adapters", True), "/tmp": (None, False)}
    t_mounts = _mounts(trainer)
    assert t_mounts["/app/adapters"] == ("chat-adapters", False)  # the one writer
    assert t_mounts["/app/data"] == ("chat-data", False)  # its cache only
    assert res["PersistentVolumeClaim/chat-adapters"]["spec"]["accessModes"] == ["ReadWriteMany"]
    secret = load_yaml_docs(K8S_DIR / "examples" / "postgres-secret.example.yaml")[0]
    assert set(secret["stringData"]) == {"CHAT_DB_URL"} <= SETTINGS_VARS
    for pod in (server, trainer):
        [ref] = [e["valueFrom"]["secretKeyRef"] for e in pod["containers"][0]["env"] if e["name"] == "CHAT_DB_URL"]
        assert ref == {"name": secret["metadata"]["name"], "key": "CHAT_DB_URL"}

    configmaps = {r["metadata"]["name"]: r for r in res.values() if r["kind"] == "ConfigMap"}
    logs = []
    for pod in ("chat-server-7d9f8b6c5d-aaaaa", "chat-server-7d9f8b6c5d-bbbbb"):
        env = container_env(server, configmaps, pod)
        assert "CHAT_DB_PATH" not in env and "CHAT_TRAINER_RUNS_DB" not in env
        for k in [k for k in os.environ if k.startswith("CHAT_")]:
            monkeypatch.delenv(k)
        for k, v in {**env, "CHAT_DB_URL": pg_url}.items():  # the Secret's value
            monkeypatch.setenv(k, v)
        settings = Settings(_env_file=None)
        assert settings.log_target == settings.runs_target == pg_url and settings.replica == pod
        logs.append(ConversationLog(settings.log_target, replica=settings.replica))
    for i, log in enumerate(logs):
        for rid in (f"chatcmpl-{i}", "chatcmpl-both"):
            log.begin({"id": rid, "created_at": time.time() - 60, "model": "house-style", "route": "house-style",
                       "path_kind": "prompt", "adapters": [], "messages": [{"role": "user", "content": f"q {rid}"}],
                       "params": {}})
            log.finish(rid, {"status": "completed", "response": f"answer {rid}", "finish_reason": "stop"})
        assert log.flush()
        log.close()

    from trainer.nightly import runs_db

    monkeypatch.setenv("CHAT_DB_URL", pg_url)  # the CronJob's environment
    cfg = parse_config(tomllib.loads(configmaps["chat-trainer-config"]["data"]["trainer.toml"]), root=Path("/"))
    assert cfg.logs == (pg_url,) and runs_db(cfg) == pg_url
    template = ChatTemplate.from_model(BaseModelInfo.load(model_path))
    got = read_log(list(cfg.logs), cfg.adapter("house-style").source, template)
    assert sorted(i.answer or "" for i in got.items) == ["answer chatcmpl-0", "answer chatcmpl-1", "answer chatcmpl-both"]
