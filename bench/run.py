"""Run the scenarios of docs/benchmarks.md: fresh database, Redis and servers per run.

    .venv/bin/python bench/run.py list
    .venv/bin/python bench/run.py run a-uvicorn b-daphne2 --repeat 2
    .venv/bin/python bench/run.py table            # medians per scenario, as markdown
    .venv/bin/python bench/run.py machine          # the machine description

Each run: export the code at `--ref` (default HEAD, so a half-edited working tree never ends
up in a number), migrate a new SQLite database, start a throwaway redis-server if the scenario
needs one, start the server processes (pinned with taskset as the scenario says), run
`manage.py chat_loadtest --json` against them (pinned too), stop everything and append one
JSON line to var/bench/results.jsonl. `--ref worktree` runs the working tree as it is.
`--profile` also records a py-spy profile of the first server over the measured window
(py-spy is not a project requirement: `pip install py-spy` first).

Only loopback addresses are used. Each run is bounded: the load test has its own limits and
the runner kills it after a generous timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "var" / "bench"
PYTHON = sys.executable
# Scenarios on PostgreSQL create and drop a database of their own through this server.
POSTGRES_URL = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")


@dataclass
class Scenario:
    name: str
    title: str
    args: list[str]  # chat_loadtest arguments besides --url, --server-pid, --json
    server: str = "uvicorn"  # uvicorn | daphne | daphne-uvloop
    processes: int = 1
    redis: bool = False
    app: str = "product"  # product | naive
    database: str = "sqlite"  # sqlite | postgres (a throwaway database on BENCH_POSTGRES_URL)
    env: dict[str, str] = field(default_factory=dict)
    server_cpus: list[str | None] = field(default_factory=lambda: ["0"])
    generator_cpus: str | None = "1"
    timeout: float = 600.0


# Connects and joins are batched on the database thread (chat.batching), so one process takes
# a storm of 5,000 in 10 s (the e-storm scenarios measure it); the load scenarios open their
# sockets at a pace well inside that, so the measured window starts with a settled server.
CONNECT_RATE = 200  # per server process


def _load(sockets: int, rooms: int, rate: float, *, processes: int = 1, duration: int = 20,
          workers: int = 1, warmup: int = 2) -> list[str]:  # fmt: skip
    return [
        *("--sockets", str(sockets), "--rooms", str(rooms), "--rate", f"{rate:g}"),
        *("--duration", str(duration), "--connect-rate", str(CONNECT_RATE * processes)),
        *("--connect-timeout", "30", "--workers", str(workers), "--drain", "15"),
        *("--warmup", str(warmup)),
    ]


def _storm(sockets: int, seconds: int, *extra: str) -> list[str]:
    return [
        *("--mode", "storm", "--sockets", str(sockets), "--storm-seconds", str(seconds)),
        *("--connect-timeout", "30", *extra),
    ]


def _idle(sockets: int, rooms: int) -> list[str]:
    return [
        *("--mode", "idle", "--sockets", str(sockets), "--rooms", str(rooms), "--duration", "10"),
        *("--connect-rate", str(CONNECT_RATE), "--connect-timeout", "30", "--warmup", "3"),
    ]


TWO_CORES: list[str | None] = ["0", "1"]


def _two(name: str, title: str, args: list[str], server: str, **more: Any) -> Scenario:
    """Two server processes, a core each, joined by Redis; the generator floats."""
    return Scenario(
        name,
        title,
        args,
        server=server,
        processes=2,
        redis=True,
        server_cpus=TWO_CORES,
        generator_cpus=None,
        **more,
    )


SCENARIOS: list[Scenario] = []
for _server in ("uvicorn", "daphne", "daphne-uvloop"):
    _name = {"daphne-uvloop": "Daphne on uvloop"}.get(_server, _server.title())
    SCENARIOS += [
        Scenario(
            f"a-{_server}",
            f"2,000 sockets, 1 room, 5 msg/s, 1 {_name}",
            _load(2000, 1, 5),
            server=_server,
        ),
        _two(
            f"b-{_server}2",
            f"2,000 sockets, 1 room, 5 msg/s, 2 {_name} + Redis (1,000 each)",
            _load(2000, 1, 5, processes=2),
            _server,
        ),
        _two(
            f"d-{_server}2",
            f"5,000 sockets in 500 rooms of 10, 500 msg/s, 2 {_name} + Redis",
            _load(5000, 500, 500, processes=2),
            _server,
        ),
        _two(
            f"d-{_server}2-pg",
            f"as d-{_server}2, on PostgreSQL (what several processes share in production)",
            _load(5000, 500, 500, processes=2),
            _server,
            database="postgres",
        ),
        Scenario(
            f"e-storm-{_server}",
            f"storm: 5,000 connects (and joins) in 10 s, 1 {_name}",
            _storm(5000, 10),
            server=_server,
        ),
        Scenario(
            f"f-idle-{_server}",
            f"2,000 idle joined sockets in 10 rooms, 1 {_name}",
            _idle(2000, 10),
            server=_server,
        ),
    ]
SCENARIOS += [
    Scenario(
        "bb-daphne2-core0",
        "as b-daphne2, both servers on core 0, generator on core 1",
        _load(2000, 1, 5, processes=2),
        server="daphne",
        processes=2,
        redis=True,
        server_cpus=["0", "0"],
    ),
    Scenario(
        "c-hype",
        "hype: 2,000 sockets, 1 room, 200 msg/s, batched 50 ms, 1 Uvicorn",
        _load(2000, 1, 200),
        env={"CHAT_BATCH_WINDOW_MS": "50"},
    ),
    Scenario(
        "c-hype-uvicorn2",
        "hype on 2 Uvicorn + Redis",
        _load(2000, 1, 200, processes=2),
        processes=2,
        redis=True,
        env={"CHAT_BATCH_WINDOW_MS": "50"},
        server_cpus=TWO_CORES,
        generator_cpus=None,
    ),
    Scenario(
        "cc-hype-20",
        "hype at what the post path sustains: 2,000 sockets, 1 room, 20 msg/s, batched, 1 Uvicorn",
        _load(2000, 1, 20),
        env={"CHAT_BATCH_WINDOW_MS": "50"},
    ),
    Scenario(
        "dd-uvicorn2-50",
        "5,000 sockets in 500 rooms of 10, 50 msg/s, 2 Uvicorn + Redis",
        _load(5000, 500, 50, processes=2),
        processes=2,
        redis=True,
        server_cpus=TWO_CORES,
        generator_cpus=None,
    ),
    Scenario(
        "ee-storm-uvicorn-nojoin",
        "storm: 5,000 connects (no join) in 10 s, 1 Uvicorn",
        _storm(5000, 10, "--no-join"),
    ),
    Scenario(
        "ee-storm-uvicorn-40s",
        "storm: 5,000 connects (and joins) in 40 s, 1 Uvicorn",
        _storm(5000, 40),
    ),
]

# (g): room size 10 -> 5,000 at a fixed 2,000 deliveries/s, one Uvicorn. The 6 s warmup
# measures the idle CPU of all those sockets, so the net cost per delivery can be told apart.
for _size, _rooms in ((10, 100), (100, 10), (1000, 1), (5000, 1)):
    SCENARIOS.append(
        Scenario(
            f"g-size-{_size}",
            f"room size {_size}: {_rooms} room(s), 2,000 deliveries/s, 1 Uvicorn",
            _load(_size * _rooms, _rooms, 2000 / _size, warmup=6),
        )
    )

# (h): the naive baseline and the product side by side, same load, one Daphne (and Uvicorn).
for _app in ("naive", "product"):
    SCENARIOS += [
        Scenario(
            f"h-{_app}-uvicorn",
            f"{_app}: 500 sockets, 1 room, 5 msg/s, 1 Uvicorn, in-memory layer",
            _load(500, 1, 5),
            app=_app,
        ),
        Scenario(
            f"h-{_app}-redis",
            f"{_app}: 500 sockets, 1 room, 5 msg/s, 1 Daphne + Redis",
            _load(500, 1, 5),
            server="daphne",
            redis=True,
            app=_app,
        ),
        Scenario(
            f"h-{_app}-memory",
            f"{_app}: 500 sockets, 1 room, 5 msg/s, 1 Daphne, in-memory layer",
            _load(500, 1, 5),
            server="daphne",
            app=_app,
        ),
    ]
# (hh): the same pair at the load the fan-out issue measured the tutorial shape with (1,000
# sockets in one room at 10 msg/s), where the baseline no longer keeps up.
for _app in ("naive", "product"):
    SCENARIOS += [
        Scenario(
            f"hh-{_app}-{_server}",
            f"{_app}: 1,000 sockets, 1 room, 10 msg/s, 1 {_server.title()}, in-memory layer",
            _load(1000, 1, 10),
            server=_server,
            app=_app,
        )
        for _server in ("daphne", "uvicorn")
    ]
BY_NAME = {s.name: s for s in SCENARIOS}


# --- processes -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def pinned(cpus: str | None, command: list[str]) -> list[str]:
    return ["taskset", "-c", cpus, *command] if cpus is not None else command


def server_command(scenario: Scenario, port: int) -> list[str]:
    app = "esports_chat.asgi:application"
    if scenario.app == "naive":
        app = "bench.naive.asgi:application"
    if scenario.server == "uvicorn":
        return [
            *(PYTHON, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)),
            *("--ws", "websockets-sansio", "--ws-max-size", "65536", "--backlog", "4096"),
            *("--log-level", "warning", "--no-access-log"),
        ]
    module = "esports_chat.daphne_uvloop" if scenario.server == "daphne-uvloop" else "daphne"
    return [
        *(PYTHON, "-m", module, "-e", f"tcp:port={port}:interface=127.0.0.1:backlog=4096"),
        *("--websocket-max-message-size", "65536", "-v", "0", app),
    ]


class Stack:
    """Database, Redis and servers of one run, all stopped by `close`."""

    def __init__(self, scenario: Scenario, src: Path, workdir: Path) -> None:
        self.scenario = scenario
        self.src = src
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.servers: list[tuple[subprocess.Popen[bytes], int]] = []
        self.redis: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "esports_chat.settings",
            "DATABASE_URL": f"sqlite:///{workdir / 'db.sqlite3'}",
            "DJANGO_SECRET_KEY": f"bench-{uuid.uuid4().hex}",
            "DJANGO_DEBUG": "false",
            "DJANGO_LOG_LEVEL": "WARNING",
            "CHAT_LAYER_PREFIX": f"bench{uuid.uuid4().hex[:8]}",
            "PYTHONPATH": str(src),
        }
        self.env.pop("REDIS_URL", None)
        self.pg_name: str | None = None
        if scenario.database == "postgres":
            self.pg_name = f"chat_bench_{uuid.uuid4().hex[:12]}"
            base = POSTGRES_URL.rsplit("/", 1)[0]
            self.env["DATABASE_URL"] = f"{base}/{self.pg_name}"

    def _postgres(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(statement)

    def start(self) -> None:
        if self.pg_name is not None:
            self._postgres(f"CREATE DATABASE {self.pg_name}")
        subprocess.run(
            [PYTHON, "manage.py", "migrate", "--no-input", "-v", "0"],
            cwd=self.src,
            env=self.env,
            check=True,
            timeout=120,
        )
        if self.scenario.redis:
            port = free_port()
            self.redis = self._spawn(
                [
                    *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no", "--dir", str(self.workdir)),
                ],
                "redis.log",
            )
            wait_for_port(port, self.redis)
            self.env["REDIS_URL"] = f"redis://127.0.0.1:{port}/0"
        server_env = {**self.env, **self.scenario.env}
        if self.scenario.app == "naive":
            server_env["DJANGO_SETTINGS_MODULE"] = "bench.naive.settings"
        for index in range(self.scenario.processes):
            port = free_port()
            cpus = self.scenario.server_cpus[index % len(self.scenario.server_cpus)]
            proc = self._spawn(
                pinned(cpus, server_command(self.scenario, port)), f"server{index}.log", server_env
            )
            self.servers.append((proc, port))
        for proc, port in self.servers:
            wait_for_port(port, proc)

    def _spawn(
        self, command: list[str], log: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with (self.workdir / log).open("wb") as out:
            proc = subprocess.Popen(
                command, cwd=self.src, env=env or self.env, stdout=out, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        return proc

    def server_pids(self) -> list[int]:
        # taskset execs the server, so the pid is the server's own.
        return [proc.pid for proc, _ in self.servers]

    def urls(self) -> list[str]:
        return [f"ws://127.0.0.1:{port}/ws/chat/" for _, port in self.servers]

    def alive(self) -> list[bool]:
        return [proc.poll() is None for proc, _ in self.servers]

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if self.pg_name is not None:
            with contextlib.suppress(Exception):
                self._postgres(f"DROP DATABASE IF EXISTS {self.pg_name} WITH (FORCE)")


@contextlib.contextmanager
def source(ref: str) -> Iterator[tuple[Path, str]]:
    """The code to run: `git archive` of ref in a temporary directory, or the working tree."""
    if ref == "worktree":
        commit = _git("rev-parse", "HEAD") + ("-dirty" if _git("status", "--porcelain") else "")
        yield ROOT, commit
        return
    commit = _git("rev-parse", ref)
    with tempfile.TemporaryDirectory(prefix="chat-bench-src-") as tmp:
        archive = subprocess.run(
            ["git", "archive", commit], cwd=ROOT, check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        yield Path(tmp), commit


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


_HZ = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (all cores)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _HZ


def proc_cpu_seconds(pid: int) -> float:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return 0.0
    fields = raw[raw.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _HZ


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_for_quiet(max_wait: float, threshold: float) -> float:
    """Wait until other processes use less than `threshold` cores; returns what they used."""
    deadline = time.monotonic() + max_wait
    while True:
        before, started = machine_busy_seconds(), time.monotonic()
        time.sleep(3)
        busy = (machine_busy_seconds() - before) / (time.monotonic() - started)
        if busy < threshold or time.monotonic() > deadline:
            return round(busy, 2)
        print(f"  machine busy ({busy:.2f} cores used by others); waiting", flush=True)
        time.sleep(10)


def run_one(
    scenario: Scenario, src: Path, commit: str, profile: bool, quiet: tuple[float, float]
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"chat-bench-{scenario.name}-"))
    stack = Stack(scenario, src, workdir)
    record: dict[str, Any] = {
        "scenario": scenario.name,
        "title": scenario.title,
        "commit": commit,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "server": scenario.server,
        "processes": scenario.processes,
        "app": scenario.app,
        "redis": scenario.redis,
        "server_cpus": scenario.server_cpus[: scenario.processes],
        "generator_cpus": scenario.generator_cpus,
        "server_env": scenario.env,
        "args": scenario.args,
    }
    spy: subprocess.Popen[bytes] | None = None
    record["busy_before_cores"] = wait_for_quiet(*quiet)
    try:
        stack.start()
        command = [
            *(PYTHON, "manage.py", "chat_loadtest", "--json", "--no-progress"),
            *(f"--url={url}" for url in stack.urls()),
            *(f"--server-pid={pid}" for pid in stack.server_pids()),
            *scenario.args,
        ]
        if stack.redis is not None:
            command.append(f"--redis-pid={stack.redis.pid}")
        command = pinned(scenario.generator_cpus, command)
        record["command"] = command
        servers = [*stack.server_pids(), *([stack.redis.pid] if stack.redis else [])]
        mark = (
            machine_busy_seconds(),
            sum(proc_cpu_seconds(pid) for pid in servers),
            children_cpu_seconds(),
        )
        started = time.monotonic()
        gen = subprocess.Popen(
            command, cwd=src, env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        if profile:
            spy = _profile(scenario, stack, workdir)
        try:
            out, err = gen.communicate(timeout=scenario.timeout)
        except subprocess.TimeoutExpired:
            gen.kill()
            out, err = gen.communicate()
            record["error"] = f"load test killed after {scenario.timeout:.0f}s"
        finally:
            if gen.poll() is None:
                gen.kill()
                gen.wait(5)
        wall = time.monotonic() - started
        record["wall_seconds"] = round(wall, 1)
        # CPU the rest of the machine used meanwhile (other people's work on a shared box):
        # everything, minus our servers and Redis, minus the load test and its workers.
        ours = sum(proc_cpu_seconds(pid) for pid in servers) - mark[1]
        ours += children_cpu_seconds() - mark[2]
        record["others_cores"] = round((machine_busy_seconds() - mark[0] - ours) / wall, 2)
        record["servers_alive"] = stack.alive()
        if gen.returncode == 0 and out.strip():
            record["result"] = json.loads(out)
        else:
            record.setdefault("error", err.decode(errors="replace")[-2000:])
    except Exception as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if spy is not None:
            with contextlib.suppress(Exception):
                spy.wait(30)
        stack.close()
        logs = {p.name: p.read_text(errors="replace")[-1500:] for p in workdir.glob("*.log")}
        record["logs"] = {k: v for k, v in logs.items() if v.strip()}
        if profile:
            record["profile"] = str(OUT / f"{scenario.name}-{record['started']}.txt")
            with contextlib.suppress(OSError):
                shutil.copy(workdir / "profile.txt", record["profile"])
        shutil.rmtree(workdir, ignore_errors=True)
    return record


def _option(args: list[str], name: str, default: float) -> float:
    return float(args[args.index(name) + 1]) if name in args else default


def _profile(scenario: Scenario, stack: Stack, workdir: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(PYTHON).with_name("py-spy"))
    if not Path(spy).exists():
        print("py-spy not found: pip install py-spy", file=sys.stderr)
        return None
    sockets = _option(scenario.args, "--sockets", 100)
    connect = sockets / _option(scenario.args, "--connect-rate", 500)
    delay = connect + _option(scenario.args, "--warmup", 1) + 5
    length = max(3.0, _option(scenario.args, "--duration", 10) - 4)
    command = [
        spy, "record", "--pid", str(stack.server_pids()[0]), "--rate", "200", "--format", "raw",
        "--duration", str(int(length)), "--nonblocking", "--output", str(workdir / "profile.txt"),
    ]  # fmt: skip
    return subprocess.Popen(
        ["sh", "-c", f'sleep {delay:.1f} && exec "$@"', "py-spy", *command],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# --- reporting -------------------------------------------------------------------------------

METRICS = [
    ("connected", "connected", lambda r: r.get("connected")),
    ("failed", "failed", lambda r: r.get("failed")),
    ("loss", "loss", lambda r: r.get("loss")),
    ("loss %", "loss_pct", lambda r: r.get("loss_pct")),
    ("deliveries/s", "deliveries_per_s", lambda r: r.get("deliveries_per_s")),
    ("p50 ms", "p50", lambda r: (r.get("latency_ms") or {}).get("p50")),
    ("p95 ms", "p95", lambda r: (r.get("latency_ms") or {}).get("p95")),
    ("p99 ms", "p99", lambda r: (r.get("latency_ms") or {}).get("p99")),
    ("max ms", "max", lambda r: (r.get("latency_ms") or {}).get("max")),
    ("post p50 ms", "a50", lambda r: (r.get("ack_ms") or {}).get("p50")),
    ("post p99 ms", "a99", lambda r: (r.get("ack_ms") or {}).get("p99")),
    ("fan-out p50 ms", "f50", lambda r: (r.get("fanout_ms") or {}).get("p50")),
    ("fan-out p99 ms", "f99", lambda r: (r.get("fanout_ms") or {}).get("p99")),
    ("connect p50 ms", "c50", lambda r: (r.get("connect_ms") or {}).get("p50")),
    ("connect p99 ms", "c99", lambda r: (r.get("connect_ms") or {}).get("p99")),
    ("join p99 ms", "j99", lambda r: (r.get("join_ms") or {}).get("p99")),
    ("server cpu %", "cpu", lambda r: r["server"].get("cpu_pct")),
    ("us/delivery", "usd", lambda r: r["server"].get("cpu_us_per_delivery")),
    ("us/delivery net", "usdn", lambda r: r["server"].get("cpu_us_per_delivery_net")),
    ("us/message", "usm", lambda r: r["server"].get("cpu_us_per_message")),
    ("us/connect", "usc", lambda r: r["server"].get("cpu_us_per_connect")),
    ("KB/socket", "kb", lambda r: r["server"].get("rss_per_socket_kb")),
    ("idle cpu %", "idle", lambda r: r["server"].get("idle_cpu_pct")),
    ("generator cpu %", "gen", lambda r: r.get("generator_cpu_pct")),
    ("generator lag p99 ms", "lag", lambda r: (r.get("send_lag_ms") or {}).get("p99")),
    ("redis cpu %", "redis", lambda r: r["server"].get("redis_cpu_pct")),
]


def load_results(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def medians(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per scenario (the latest commit that ran it): the median of every metric."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        if "result" in record:
            by_name.setdefault(record["scenario"], []).append(record)
    table: dict[str, dict[str, Any]] = {}
    for name, runs in by_name.items():
        commit = runs[-1]["commit"]
        runs = [r for r in runs if r["commit"] == commit]
        row: dict[str, Any] = {"runs": len(runs), "commit": commit[:10], "title": runs[-1]["title"]}
        others = [r["others_cores"] for r in runs if r.get("others_cores") is not None]
        row["others"] = max(others) if others else None
        for _, key, get in METRICS:
            values = [v for v in (get(r["result"]) for r in runs) if v is not None]
            row[key] = statistics.median(values) if values else None
        table[name] = row
    return table


def print_table(path: Path, names: list[str]) -> None:
    table = medians(load_results(path))
    keys = [m for m in METRICS if any(row.get(m[1]) is not None for row in table.values())]
    print("| scenario | runs | " + " | ".join(label for label, _, _ in keys) + " | others |")
    print("| --- | --- | " + " | ".join("---" for _ in keys) + " | --- |")
    for name in names or sorted(table):
        row = table.get(name)
        if row is None:
            continue
        cells = ["-" if row[k] is None else f"{row[k]:g}" for _, k, _ in keys]
        others = "-" if row["others"] is None else f"{row['others']:g}"
        print(f"| {name} | {row['runs']} | " + " | ".join(cells) + f" | {others} |")


def print_fit(path: Path, prefix: str) -> None:
    """Split the server CPU of the runs named `prefix*` into a cost per message and a cost per
    delivery (least squares over cpu = a * messages + b * deliveries), and show each run's CPU
    per delivery next to the per-delivery part alone.

    A room-size curve at a fixed delivery rate varies the messages per delivery 500-fold: a
    room of 10 posts 50 times as often per delivery as a room of 500. Whatever a post costs
    (validation, limits, the insert) is paid per message; the fan-out is what has to stay flat.
    """
    runs = []
    for record in load_results(path):
        result = record.get("result") or {}
        server = result.get("server") or {}
        # Gross CPU: the idle baseline measured before a run is unreliable right after
        # thousands of connects (the collector and the allocator are still settling).
        per_delivery = server.get("cpu_us_per_delivery")
        if not record["scenario"].startswith(prefix) or not per_delivery:
            continue
        delivered, messages = result["delivered"], result["acked"]
        runs.append((record["scenario"], messages, delivered, per_delivery * delivered))
    if len(runs) < 2:
        print(f"need two or more runs of {prefix}*, found {len(runs)}")
        return
    # Normal equations of the two-parameter fit, no intercept.
    mm = sum(m * m for _, m, _, _ in runs)
    md = sum(m * d for _, m, d, _ in runs)
    dd = sum(d * d for _, _, d, _ in runs)
    mc = sum(m * c for _, m, _, c in runs)
    dc = sum(d * c for _, _, d, c in runs)
    det = mm * dd - md * md
    a, b = (mc * dd - dc * md) / det, (dc * mm - mc * md) / det
    print(f"per message: {a:,.0f} us   per delivery: {b:,.1f} us\n")
    print("| run | messages | deliveries | us/delivery (all) | us/delivery (fan-out part) |")
    print("| --- | --- | --- | --- | --- |")
    for name, m, d, cpu in sorted(runs, key=lambda r: r[2] / max(r[1], 1)):
        fanout = (cpu - a * m) / d
        print(f"| {name} | {m} | {d} | {cpu / d:,.1f} | {fanout:,.1f} |")


def machine() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from importlib import metadata

    packages = {}
    for name in (
        "Django", "channels", "channels-redis", "daphne", "uvicorn", "Twisted", "autobahn",
        "websockets", "uvloop", "orjson", "msgpack", "redis", "hiredis",
    ):  # fmt: skip
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    redis_version = subprocess.run(
        ["redis-server", "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(int(mem) / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "packages": packages,
        "redis": redis_version,
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "somaxconn": Path("/proc/sys/net/core/somaxconn").read_text().strip(),
        "port_range": Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list")
    run = sub.add_parser("run")
    run.add_argument("scenarios", nargs="+", help="scenario names, or prefixes such as 'g-'")
    run.add_argument("--repeat", type=int, default=2)
    run.add_argument("--ref", default="HEAD", help="git ref to run, or 'worktree'")
    run.add_argument("--profile", action="store_true", help="py-spy the first server")
    run.add_argument("--results", type=Path, default=OUT / "results.jsonl")
    run.add_argument(
        "--quiet-below",
        type=float,
        default=0.3,
        help="start a run only once other processes use fewer cores than this",
    )
    run.add_argument("--max-wait", type=float, default=60, help="seconds to wait for that")
    table = sub.add_parser("table")
    table.add_argument("scenarios", nargs="*")
    table.add_argument("--results", type=Path, default=OUT / "results.jsonl")
    fit = sub.add_parser("fit", help="split CPU into per-message and per-delivery parts")
    fit.add_argument("prefix", nargs="?", default="g-size-")
    fit.add_argument("--results", type=Path, default=OUT / "results.jsonl")
    sub.add_parser("machine")
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C, so every server, Redis and load test started gets stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    if args.cmd == "list":
        for s in SCENARIOS:
            print(f"{s.name:24} {s.title}")
    elif args.cmd == "machine":
        print(json.dumps(machine(), indent=2))
    elif args.cmd == "table":
        print_table(args.results, args.scenarios)
    elif args.cmd == "fit":
        print_fit(args.results, args.prefix)
    else:
        chosen = [s for s in SCENARIOS if any(s.name.startswith(n) for n in args.scenarios)]
        if not chosen:
            parser.error(f"no scenario matches {args.scenarios}; see `list`")
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with source(args.ref) as (src, commit):
            for _ in range(args.repeat):
                for scenario in chosen:
                    quiet = (args.max_wait, args.quiet_below)
                    record = run_one(scenario, src, commit, args.profile, quiet)
                    with args.results.open("a") as f:
                        f.write(json.dumps(record) + "\n")
                    _print_record(record)
        print_table(args.results, [s.name for s in chosen])


def _print_record(record: dict[str, Any]) -> None:
    result = record.get("result")
    if result is None:
        print(f"{record['scenario']}: ERROR {record.get('error', '')[-600:]}", flush=True)
        return
    parts = []
    for label, _, get in METRICS:
        with contextlib.suppress(KeyError, TypeError):
            value = get(result)
            if value is not None:
                parts.append(f"{label}={value}")
    others = record.get("others_cores")
    print(
        f"{record['scenario']} ({record['wall_seconds']}s, others {others} cores): "
        + ", ".join(parts),
        flush=True,
    )


if __name__ == "__main__":
    main()
