"""The deployment shape, for real: nginx (rendered from docker/nginx/chat.conf.template) in
front of two Daphne processes sharing Redis; and every shipped config checked by its own tool.

nginx, haproxy and promtool come from Debian's packages (nginx, haproxy, prometheus); a test
that needs one that is missing is skipped with the package to install.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from django.conf import settings
from django.test import Client as DjangoClient
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT, Client, ServerProcess, free_port, wait_for_port

DOCKER = ROOT / "docker"
TEMPLATE = DOCKER / "nginx" / "chat.conf.template"
NGINX_CONF = DOCKER / "nginx" / "nginx.conf"
PROMETHEUS = DOCKER / "prometheus"
DASHBOARDS = DOCKER / "grafana" / "dashboards"
PLACEHOLDER = re.compile(r"\$\{(NGINX_[A-Z0-9_]*)\}")


# --- tools -----------------------------------------------------------------------------------


def _tool(name: str, package: str) -> str:
    for candidate in (shutil.which(name), f"/usr/sbin/{name}", f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip(f"{name} is not installed (apt-get install {package})")


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def nginx_binary() -> str:
    return _tool("nginx", "nginx")


# --- nginx from the shipped template ---------------------------------------------------------


def render_template(text: str, values: dict[str, str]) -> str:
    """What envsubst does with the NGINX_ variables; a placeholder left unset is an error."""
    missing = set(PLACEHOLDER.findall(text)) - set(values)
    assert not missing, f"no value for {sorted(missing)}"
    return PLACEHOLDER.sub(lambda match: values[match.group(1)], text)


@dataclass
class Nginx:
    """Debian's nginx in the foreground, with the shipped nginx.conf and chat template
    rendered for local ports in a throwaway prefix."""

    binary: str
    upstream_ports: list[int]
    port: int = field(default_factory=free_port)
    dir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="chat-nginx-")))
    proc: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        # Started as root, nginx runs its workers as nobody: they must reach these files.
        self.dir.chmod(0o755)
        conf = self.dir / "conf"
        (conf / "conf.d").mkdir(parents=True)
        (self.dir / "temp").mkdir()
        self.static = self.dir / "static"
        (self.static / "chat").mkdir(parents=True)
        (self.static / "chat" / "deploy-probe.js").write_text("export const servedBy = 'nginx';\n")
        shutil.copy(NGINX_CONF, conf / "nginx.conf")
        shutil.copy("/etc/nginx/mime.types", conf / "mime.types")
        servers = " ".join(
            f"server 127.0.0.1:{port} max_fails=3 fail_timeout=10s;" for port in self.upstream_ports
        )
        rendered = render_template(
            TEMPLATE.read_text(),
            {
                "NGINX_LISTEN": f"127.0.0.1:{self.port}",
                "NGINX_SERVER_NAME": "_",
                "NGINX_UPSTREAM_SERVERS": servers,
                "NGINX_STATIC_ROOT": f"{self.static}/",
                "NGINX_ACCESS_LOG": str(self.access_log),
            },
        )
        (conf / "conf.d" / "chat.conf").write_text(rendered)
        # Test-only: keep nginx's scratch files in the prefix instead of /var/lib/nginx.
        temp = self.dir / "temp"
        (conf / "conf.d" / "00-test-paths.conf").write_text(
            "".join(
                f"{kind}_temp_path {temp}/{kind};\n"
                for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
            )
        )
        for path in self.dir.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)

    @property
    def access_log(self) -> Path:
        return self.dir / "access.log"

    def command(self, *extra: str, directives: str = "") -> list[str]:
        return [
            self.binary,
            "-e",
            "stderr",
            "-p",
            f"{self.dir}/",
            "-c",
            str(self.dir / "conf" / "nginx.conf"),
            "-g",
            f"{directives}pid {self.dir}/nginx.pid;",
            *extra,
        ]

    def check(self) -> subprocess.CompletedProcess[str]:
        return _run(*self.command("-t"))

    def start(self) -> Nginx:
        log = (self.dir / "nginx.out").open("wb")
        self.proc = subprocess.Popen(
            self.command(directives="daemon off; "), stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        wait_for_port(self.port, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # fast shutdown: open sockets are cut, not waited for
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/chat/"

    def socket_upstreams(self) -> list[str]:
        """The upstream of every finished /ws/ request, in order (written when it closes)."""
        if not self.access_log.exists():
            return []
        lines = self.access_log.read_text().splitlines()
        return [
            line.split("upstream=", 1)[1].split()[0] for line in lines if '"GET /ws/chat/' in line
        ]


# --- the deployment under test ---------------------------------------------------------------


def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


async def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(_get, url)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(port: int) -> Samples:
    """Every sample a process exports; none for a process that has gone away."""
    try:
        status, _, body = _get(f"http://127.0.0.1:{port}/metrics")
    except urllib.error.URLError:
        return {}
    assert status == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


OWN_SERIES = re.compile(r"\b((?:chat|django|process|python)_[a-z0-9_]+)\b")


def _exported_names(port: int) -> set[str]:
    """Names of every family (even one with no samples yet) and every series exported."""
    _, _, body = _get(f"http://127.0.0.1:{port}/metrics")
    names = set()
    for line in body.decode().splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@dataclass
class Deployment:
    nginx: Nginx
    procs: list[ServerProcess]
    metrics_ports: list[int]

    async def scrape(self) -> list[Samples]:
        return [await asyncio.to_thread(_scrape, port) for port in self.metrics_ports]

    async def connects(self) -> list[float]:
        return [value(samples, "chat_connects_total") for samples in await self.scrape()]

    async def connect(
        self, *, cookie: str | None = None, token: str | None = None
    ) -> tuple[Client, int]:
        """A socket through nginx, and the index of the process that accepted it: the one
        whose chat_connects_total went up."""
        headers = {}
        if cookie is not None:
            # A browser: its session cookie, and the page's origin (nginx's address).
            headers = {
                "Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}",
                "Origin": self.nginx.http,
            }
        before = await self.connects()
        client = await Client.connect(self.nginx.ws, token=token, additional_headers=headers)
        after = await self.connects()
        served = [index for index, (b, a) in enumerate(zip(before, after, strict=True)) if a > b]
        assert len(served) == 1, (before, after)
        return client, served[0]

    def upstream(self, index: int) -> str:
        return f"127.0.0.1:{self.procs[index].port}"


@pytest.fixture
def deployment(
    servers: Callable[..., ServerProcess], nginx_binary: str
) -> Iterator[Callable[..., Deployment]]:
    """Two Daphne processes (each with its own metrics port) behind nginx."""
    started: list[Nginx] = []

    def start(**env: str) -> Deployment:
        ports = [free_port(), free_port()]
        with ThreadPoolExecutor(2) as pool:  # both start at once: each takes seconds
            procs = list(
                pool.map(lambda port: servers("daphne", CHAT_METRICS_PORT=str(port), **env), ports)
            )
        nginx = Nginx(nginx_binary, [proc.port for proc in procs])
        started.append(nginx)
        checked = nginx.check()
        assert checked.returncode == 0, checked.stderr
        return Deployment(nginx.start(), procs, ports)

    yield start
    for nginx in started:
        nginx.cleanup()


def session_cookie(user: Any) -> str:
    """A real Django session for `user`, as the login page would have created it."""
    browser = DjangoClient()
    browser.force_login(user)
    return browser.cookies[settings.SESSION_COOKIE_NAME].value


async def on_other_process(
    deployment: Deployment, user: Any, avoid: int
) -> tuple[Client, int, str]:
    """Log `user` in until a session lands on a process other than `avoid`: every new
    session key is a fresh draw on nginx's hash ring."""
    for _ in range(24):
        cookie = session_cookie(user)
        client, index = await deployment.connect(cookie=cookie)
        if index != avoid:
            return client, index, cookie
        await client.close()
    raise AssertionError("24 sessions in a row hashed to one process")


async def until(check: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"still false after {timeout}s")
        await asyncio.sleep(0.1)


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture
def _setup_orm_in_async_tests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")


@pytest.mark.processes
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("_setup_orm_in_async_tests")
async def test_players_behind_nginx_chat_across_processes_and_stay_on_theirs(
    deployment: Callable[..., Deployment], make_user: Any, make_room: Any
) -> None:
    """Through nginx: pages, health and static files answer, /metrics stays private, two
    players on different processes hear each other, a player's session keeps its process
    across reconnects (token clients keep theirs by address), and each process's /metrics
    counts exactly the sockets and posts nginx sent it."""
    make_room("final")
    (alice, _), (bob, bob_token) = make_user("alice"), make_user("bob")
    d = deployment()

    status, _, body = await fetch(f"{d.nginx.http}/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, _, body = await fetch(f"{d.nginx.http}/readyz")
    assert status == 200, body
    status, _, _ = await fetch(f"{d.nginx.http}/metrics")
    assert status == 404
    status, headers, body = await fetch(f"{d.nginx.http}/static/chat/deploy-probe.js")
    assert status == 200 and b"servedBy = 'nginx'" in body  # only nginx's static root has it
    assert "javascript" in headers["Content-Type"]  # module scripts need a JS MIME type
    status, _, _ = await fetch(f"{d.nginx.http}/")
    assert status == 200

    alice_cookie = session_cookie(alice)
    a, a_at = await d.connect(cookie=alice_cookie)
    assert a.hello is not None and a.hello["user"] == "alice"
    b, b_at, _ = await on_other_process(d, bob, avoid=a_at)
    assert b.hello is not None and b.hello["user"] == "bob"

    await a.join("final")
    await b.join("final")
    await a.post("final", "gg from alice", client_id="a1")
    assert [m["body"] for m in await b.messages(1)] == ["gg from alice"]
    await b.post("final", "wp from bob", client_id="b1")
    assert [m["body"] for m in await a.messages(2)] == ["gg from alice", "wp from bob"]

    for _ in range(3):  # sticky by session cookie
        again, at = await d.connect(cookie=alice_cookie)
        assert at == a_at
        await again.close()
    by_address = set()
    for _ in range(3):  # no cookie: sticky by client address
        bot, at = await d.connect(token=bob_token)
        by_address.add(at)
        await bot.close()
    assert len(by_address) == 1

    samples = await d.scrape()
    assert value(samples[a_at], "chat_sockets_open") == 1
    assert value(samples[b_at], "chat_sockets_open") == 1
    assert value(samples[a_at], "chat_messages_posted_total") == 1
    assert value(samples[b_at], "chat_messages_posted_total") == 1
    frames_in = sum(v for (name, _), v in samples[a_at].items() if name == "chat_frames_in_total")
    assert frames_in >= 2  # alice's join and her message
    for at in (a_at, b_at):  # each process wrote both messages to its one member
        assert value(samples[at], "chat_deliveries_total") >= 2
        assert value(samples[at], "chat_delivery_latency_seconds_count") >= 1
        assert value(samples[at], "chat_memory_per_socket_bytes") > 0

    async def probed() -> bool:  # the pub/sub lag probe runs once a second per process
        return all(value(s, "chat_layer_probe_seconds_count") >= 1 for s in await d.scrape())

    await until(probed)
    # Every series the dashboard and the alerts query is one these processes export.
    exported = await asyncio.to_thread(_exported_names, d.metrics_ports[0])
    queried = {
        name
        for expr in _exprs(_dashboard()) + [rule["expr"] for rule in _alert_rules()]
        for name in OWN_SERIES.findall(expr)
    }
    assert queried - exported == set()

    await a.close()
    await b.close()
    connects = [value(s, "chat_connects_total") for s in samples]

    async def all_closed() -> bool:
        now = await d.scrape()
        return all(
            value(s, "chat_sockets_open") == 0
            and value(s, "chat_disconnects_total", code="1000") == connects[i]
            for i, s in enumerate(now)
        )

    await until(all_closed)
    # nginx's own record agrees with the processes' counters, socket for socket.
    await until(lambda: len(d.nginx.socket_upstreams()) == sum(connects))
    upstreams = d.nginx.socket_upstreams()
    for index in range(2):
        assert upstreams.count(d.upstream(index)) == connects[index]


@pytest.mark.processes
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("_setup_orm_in_async_tests")
async def test_rolling_restart_behind_nginx_moves_players_without_losing_messages(
    deployment: Callable[..., Deployment], make_user: Any, make_room: Any
) -> None:
    """SIGTERM to one process: its player is told to reconnect (4012), reconnects through
    nginx with the same session, lands on the process still running, and catches up on
    what was said meanwhile with `since`."""
    make_room("final")
    (alice, _), (bob, _) = make_user("alice"), make_user("bob")
    d = deployment(CHAT_DRAIN_SPREAD="0.2", CHAT_DRAIN_RETRY_MAX_MS="200")
    alice_cookie = session_cookie(alice)
    a, a_at = await d.connect(cookie=alice_cookie)
    b, b_at, _ = await on_other_process(d, bob, avoid=a_at)
    await a.join("final")
    await b.join("final")
    await a.post("final", "before the restart", client_id="a1")
    (seen,) = await a.messages(1)

    stopping = d.procs[a_at].proc
    assert stopping is not None
    stopping.send_signal(signal.SIGTERM)
    hint = await a.expect("reconnect")
    with pytest.raises(Exception):  # noqa: B017 - the close ends the stream
        await a.recv()
    assert a.ws.close_code == 4012
    await b.post("final", "while alice was away", client_id="b1")
    await b.messages(2)

    deadline = time.monotonic() + 15
    await asyncio.sleep(hint["retry_ms"] / 1000)
    while True:  # what the page does: retry with backoff until a hello arrives
        try:
            back, at = await d.connect(cookie=alice_cookie)
            break
        except Exception:  # the draining process refused (4013) or is still going away
            assert time.monotonic() < deadline, "no process took the reconnect"
            await asyncio.sleep(0.25)
    assert at == b_at
    joined = await back.join("final", since=seen["id"])
    assert [m["body"] for m in joined["history"]] == ["while alice was away"]
    await asyncio.to_thread(stopping.wait, 15)
    await back.close()
    await b.close()


# --- what the settings read and the metrics module defines ----------------------------------

ENV_READERS = {"_env_str", "_env_bool", "_env_int", "_env_float", "_env_list", "os.environ.get"}
UNKNOWN = object()  # a default computed at run time (a path under the project)


def _literal(node: ast.expr) -> object:
    """A default written as a literal or constant arithmetic (24 * 3600), else UNKNOWN."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if all(isinstance(n, ast.Constant | ast.BinOp | ast.operator) for n in ast.walk(node)):
        return eval(compile(ast.Expression(node), "<default>", "eval"), {"__builtins__": {}})
    return UNKNOWN


def settings_environment() -> dict[str, object]:
    """Every environment variable esports_chat/settings.py reads, with its default."""
    tree = ast.parse((ROOT / "esports_chat" / "settings.py").read_text())
    found: list[tuple[int, str, object]] = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        name = node.args[0]
        if not (isinstance(name, ast.Constant) and isinstance(name.value, str)):
            continue
        if ast.unparse(node.func) in ENV_READERS:
            default = _literal(node.args[1]) if len(node.args) > 1 else ""
            found.append((node.lineno, name.value, default))
    return {name: default for _, name, default in sorted(found, key=lambda item: item[0])}


def env_value(default: object) -> str:
    """A default as it is written in an environment file."""
    if isinstance(default, bool):
        return "true" if default else "false"
    if isinstance(default, list):
        return ",".join(default)
    return str(default)


def defined_metrics() -> dict[str, tuple[str, list[str]]]:
    """name -> (type, labels) of every metric monitoring/metrics.py defines."""
    tree = ast.parse((ROOT / "monitoring" / "metrics.py").read_text())
    found: dict[str, tuple[str, list[str]]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            kind = node.func.id
            if kind in {"Counter", "Gauge", "Histogram", "Summary"}:
                name = ast.literal_eval(node.args[0])
                labels = ast.literal_eval(node.args[2]) if len(node.args) > 2 else []
                if kind == "Counter" and not name.endswith("_total"):
                    name += "_total"
                found[name] = (kind.lower(), list(labels))
    return found


def env_example() -> tuple[dict[str, str], dict[str, str]]:
    """(settings, compose-only) variables of .env.example, commented out or not."""
    settings_part, _, compose_part = (
        (ROOT / ".env.example").read_text().partition("docker compose only")
    )

    def variables(text: str) -> dict[str, str]:
        pattern = re.compile(r"^#? ?([A-Z][A-Z0-9_]*)=(.*)$", re.MULTILINE)
        return {match[1]: match[2] for match in pattern.finditer(text)}

    return variables(settings_part), variables(compose_part)


# --- shipped configuration, checked by its own tools -----------------------------------------


def test_nginx_accepts_the_shipped_config(nginx_binary: str) -> None:
    """`nginx -t` on docker/nginx/nginx.conf with the chat template rendered for local ports."""
    # Only the braced form: what envsubst in the nginx image and render_template both fill.
    assert not re.search(r"\$NGINX_", TEMPLATE.read_text())
    nginx = Nginx(nginx_binary, [free_port(), free_port(), free_port()])
    try:
        checked = nginx.check()
        assert checked.returncode == 0, checked.stderr
        assert "test is successful" in checked.stderr
    finally:
        nginx.cleanup()


def test_haproxy_accepts_the_example_config() -> None:
    checked = _run(_tool("haproxy", "haproxy"), "-c", "-f", str(DOCKER / "haproxy" / "haproxy.cfg"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_prometheus_config_rules_and_rule_tests_pass_promtool() -> None:
    promtool = _tool("promtool", "prometheus")
    for command in (
        ("check", "config", str(PROMETHEUS / "prometheus.yml")),
        ("check", "rules", str(PROMETHEUS / "alerts.yml")),
        ("test", "rules", str(PROMETHEUS / "alerts.test.yml")),
    ):
        checked = _run(promtool, *command)
        assert checked.returncode == 0, (
            f"promtool {' '.join(command)}:\n{checked.stdout}{checked.stderr}"
        )


def _dashboard() -> dict[str, Any]:
    (path,) = DASHBOARDS.glob("*.json")
    return json.loads(path.read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    panels = []
    for panel in dashboard["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in _panels(dashboard) for t in p.get("targets", []) if "expr" in t]


def _for_promtool(expr: str) -> str:
    """A Grafana query as plain PromQL: its variables replaced by what they stand for."""
    return (
        expr.replace("$__rate_interval", "5m")
        .replace("$__interval", "1m")
        .replace("$__range", "1h")
        .replace('=~"$instance"', '=~".*"')
    )


def test_dashboard_is_a_provisionable_grafana_dashboard_with_valid_queries(
    tmp_path: Path,
) -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        assert {"type", "title", "gridPos"} <= set(panel), panel.get("title")
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"] and target["refId"], panel["title"]
    provider = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/chat.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/etc/grafana/dashboards"
    sources = yaml.safe_load(
        (DOCKER / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    assert sources["datasources"][0]["type"] == "prometheus"

    promtool = shutil.which("promtool") or shutil.which("/usr/bin/promtool")
    if promtool is None:
        return  # the JSON shape is checked; PromQL syntax needs the prometheus package
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query{i}", "expr": _for_promtool(expr)}
                    for i, expr in enumerate(_exprs(dashboard))
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = _run(promtool, "check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_compose_runs_three_processes_each_scraped_and_behind_nginx() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"nginx", "postgres", "redis", "migrate", "prometheus", "grafana"} <= set(services)
    web = {
        name: service
        for name, service in services.items()
        if "CHAT_METRICS_PORT" in service.get("environment", {})
    }
    assert len(web) >= 3
    ports = {name: service["environment"]["CHAT_METRICS_PORT"] for name, service in web.items()}
    assert len(set(ports.values())) == len(ports), "each process has its own metrics port"

    scrape = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())["scrape_configs"]
    (chat_job,) = [job for job in scrape if job["job_name"] == "chat"]
    targets = {target for group in chat_job["static_configs"] for target in group["targets"]}
    assert targets == {f"{name}:{port}" for name, port in ports.items()}

    nginx_env = services["nginx"]["environment"]
    assert set(PLACEHOLDER.findall(TEMPLATE.read_text())) <= set(nginx_env)
    upstreams = re.findall(r"server (\S+)", nginx_env["NGINX_UPSTREAM_SERVERS"])
    assert upstreams == [f"{name}:8000" for name in web]
    assert nginx_env["NGINX_ENVSUBST_FILTER"] == "^NGINX_"
    rendered = render_template(TEMPLATE.read_text(), nginx_env)
    assert "${" not in rendered and "server web3:8000 resolve" in rendered

    drain = float(env_value(settings_environment()["CHAT_DRAIN_SPREAD"]))
    for name, service in web.items():
        env = service["environment"]
        assert env["DJANGO_DEBUG"] == "false", name
        assert env["DJANGO_SECRET_KEY"].startswith("${DJANGO_SECRET_KEY:?"), name
        assert env["CHAT_METRICS_ADDR"] == "0.0.0.0", name
        assert env["REDIS_URL"] and env["DATABASE_URL"].startswith("postgres://"), name
        assert int(service["stop_grace_period"].rstrip("s")) > 3 * drain, name
        assert service["sysctls"]["net.core.somaxconn"] >= 4096, name
        assert service["ulimits"]["nofile"]["soft"] >= 65536, name

    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile
    assert re.search(r"^USER (?!root)", dockerfile, re.MULTILINE), "runs as a non-root user"
    assert "collectstatic" in dockerfile and "backlog=4096" in dockerfile


def test_systemd_unit_gives_each_instance_its_ports_and_outlasts_the_drain(tmp_path: Path) -> None:
    unit = (DOCKER / "systemd" / "esports-chat@.service").read_text()
    assert "tcp:port=80%i:interface=127.0.0.1:backlog=4096" in unit
    assert "Environment=CHAT_METRICS_PORT=91%i" in unit
    assert re.search(r"^KillSignal=SIGTERM$", unit, re.MULTILINE)
    assert int(re.findall(r"^LimitNOFILE=(\d+)$", unit, re.MULTILINE)[0]) >= 65536
    timeout = int(re.findall(r"^TimeoutStopSec=(\d+)$", unit, re.MULTILINE)[0])
    assert timeout > 3 * float(env_value(settings_environment()["CHAT_DRAIN_SPREAD"]))
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    # systemd's own parser, with an executable that exists here in place of the venv's daphne.
    copy = tmp_path / "esports-chat@.service"
    copy.write_text(unit.replace("/opt/esports-chat/.venv/bin/python", "/bin/true"))
    checked = _run(analyze, "verify", str(tmp_path / "esports-chat@01.service"))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_env_example_lists_every_setting_with_its_default() -> None:
    expected = settings_environment()
    listed, compose_only = env_example()
    assert set(listed) == set(expected), set(listed) ^ set(expected)
    for name, default in expected.items():
        if default is UNKNOWN or name == "DJANGO_SECRET_KEY":
            continue
        assert listed[name] == env_value(default), name
    assert not set(compose_only) & set(expected)


def test_operations_doc_covers_every_setting_metric_and_alert() -> None:
    doc = (ROOT / "docs" / "operations.md").read_text()
    for name, default in settings_environment().items():
        row = re.search(rf"^\| `{name}` \| (.*?) \|", doc, re.MULTILINE)
        assert row, f"{name} has no row in the settings table"
        if default is not UNKNOWN and name != "DJANGO_SECRET_KEY":
            shown = env_value(default)
            assert row[1] == (f"`{shown}`" if shown else "(empty)"), name
    for name, (kind, labels) in defined_metrics().items():
        row = re.search(rf"^\| `{name}` \| (\w+) \| (.*?) \|", doc, re.MULTILINE)
        assert row, f"{name} has no row in the metrics table"
        assert row[1] == kind, name
        assert set(re.findall(r"`(\w+)`", row[2])) == set(labels), name
    for rule in _alert_rules():
        anchor = rule["annotations"]["runbook"].split("#", 1)[1]
        assert re.search(rf"^#+ {rule['alert']}$", doc, re.MULTILINE | re.IGNORECASE), anchor
