"""Load-test running chat servers over loopback: fan-out latency, loss and server cost.

    python manage.py chat_loadtest --url ws://127.0.0.1:8000/ws/chat/ \\
        --sockets 2000 --rooms 1 --rate 5 --duration 20 --workers 1 --server-pid 12345

It seeds the rooms `<prefix>-0 .. <prefix>-(R-1)` and users `<prefix>-0 .. <prefix>-(N-1)` in
this process's database (the one the servers use: same DATABASE_URL), issues each user a socket
token, and hands the run to chat.loadgen, whose docstring describes how a run goes and what
is measured. Modes:

- `load` (default): N sockets over R rooms post `--rate` messages/s in total for `--duration`
  seconds (open loop, timestamps in the body); reports loss, deliveries/s and latency.
- `storm`: N connects spread evenly over `--storm-seconds`; reports failures and connect time.
- `idle`: N joined sockets held for `--duration` seconds; reports server RSS per socket.

Given `--server-pid` (repeat for several processes) it reports server CPU microseconds per
delivered message (utime + stime from /proc over the measured window) and server RSS growth
per socket. Only loopback URLs are accepted; counts and times are bounded.
"""

from __future__ import annotations

import ipaddress
import json
from io import StringIO
from typing import Any
from urllib.parse import urlsplit

from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from chat import loadgen
from chat.auth import token_issue
from chat.models import Room

MAX_SOCKETS = 50_000
MAX_SECONDS = 600.0
MAX_RATE = 100_000.0
MAX_MESSAGES = 2_000_000
MAX_WORKERS = 64
PORTS_PER_DESTINATION = 28_000  # the default ip_local_port_range holds 28,232


def loopback_target(url: str) -> loadgen.Target:
    """A ws:// URL on a loopback address, or CommandError. `localhost` means 127.0.0.1."""
    parts = urlsplit(url)
    if parts.scheme != "ws":
        raise CommandError(f"{url}: only ws:// URLs (loopback, no TLS) are supported")
    host = parts.hostname or ""
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise CommandError(
            f"{url}: the host must be a loopback address such as 127.0.0.1"
        ) from None
    if not address.is_loopback:
        raise CommandError(f"{url}: refusing to load-test a non-loopback address ({host})")
    if parts.query or parts.fragment:
        raise CommandError(f"{url}: no query string or fragment (the token is added per socket)")
    try:
        port = parts.port or 80
    except ValueError:
        raise CommandError(f"{url}: bad port") from None
    return loadgen.Target(host=host, port=port, path=parts.path or "/ws/chat/")


def _bounded(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise CommandError(f"{name} must be between {low:g} and {high:g}, got {value:g}")


class Command(BaseCommand):
    help = "Load-test chat servers on this machine: loss, latency, server CPU and memory."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--url",
            action="append",
            dest="urls",
            metavar="URL",
            help="server socket URL, repeat for several servers; socket j uses URL j %% U "
            "(default ws://127.0.0.1:8000/ws/chat/)",
        )
        parser.add_argument("--mode", choices=["load", "storm", "idle"], default="load")
        parser.add_argument("--sockets", type=int, default=100, help="sockets to open (N)")
        parser.add_argument("--rooms", type=int, default=1, help="rooms; socket j joins j %% R")
        parser.add_argument(
            "--rate", type=float, default=5.0, help="messages per second, all rooms together"
        )
        parser.add_argument(
            "--duration",
            type=float,
            default=10.0,
            help="seconds of sending (load) or of holding idle sockets (idle)",
        )
        parser.add_argument(
            "--connect-rate", type=float, default=500.0, help="connects per second (load, idle)"
        )
        parser.add_argument(
            "--storm-seconds", type=float, default=10.0, help="storm: spread N connects over this"
        )
        parser.add_argument("--connect-timeout", type=float, default=10.0)
        parser.add_argument(
            "--drain", type=float, default=10.0, help="max seconds to wait for late deliveries"
        )
        parser.add_argument(
            "--drain-quiet",
            type=float,
            default=3.0,
            help="stop draining early once nothing arrived for this long",
        )
        parser.add_argument(
            "--warmup", type=float, default=1.0, help="seconds between connecting and measuring"
        )
        parser.add_argument(
            "--workers", type=int, default=1, help="generator processes (K); results are merged"
        )
        parser.add_argument("--format", choices=["json", "msgpack"], default="json")
        parser.add_argument("--body-bytes", type=int, default=64, help="message body length")
        parser.add_argument("--prefix", default="load", help="room and user name prefix")
        parser.add_argument(
            "--no-seed",
            action="store_true",
            help="use existing rooms and users named <prefix>-i; create nothing",
        )
        parser.add_argument("--no-join", action="store_true", help="connect without joining")
        parser.add_argument(
            "--server-pid",
            action="append",
            type=int,
            dest="server_pids",
            default=[],
            metavar="PID",
            help="server process to measure (CPU, RSS); repeat for several",
        )
        parser.add_argument("--redis-pid", type=int, help="redis-server process to measure (CPU)")
        parser.add_argument("--json", action="store_true", help="print one JSON object")
        parser.add_argument("--no-progress", action="store_true", help="no progress bars")

    def handle(self, *args: Any, **options: Any) -> None:
        targets = [loopback_target(u) for u in options["urls"] or ["ws://127.0.0.1:8000/ws/chat/"]]
        sockets, room_count, workers = options["sockets"], options["rooms"], options["workers"]
        mode = options["mode"]
        _bounded("--sockets", sockets, 1, MAX_SOCKETS)
        _bounded("--rooms", room_count, 1, sockets)
        _bounded("--workers", workers, 1, min(MAX_WORKERS, sockets))
        _bounded("--duration", options["duration"], 0.1, MAX_SECONDS)
        _bounded("--drain", options["drain"], 0, MAX_SECONDS)
        _bounded("--drain-quiet", options["drain_quiet"], 0.1, MAX_SECONDS)
        _bounded("--warmup", options["warmup"], 0, 60)
        _bounded("--connect-timeout", options["connect_timeout"], 0.1, 120)
        _bounded("--storm-seconds", options["storm_seconds"], 0.1, MAX_SECONDS)
        _bounded("--connect-rate", options["connect_rate"], 1, 100_000)
        _bounded("--body-bytes", options["body_bytes"], 32, 400)
        if mode == "load":
            _bounded("--rate", options["rate"], 0.01, MAX_RATE)
            if options["rate"] * options["duration"] > MAX_MESSAGES:
                raise CommandError(f"--rate x --duration is over {MAX_MESSAGES:,} messages")
            if options["no_join"]:
                raise CommandError("--no-join makes no sense in load mode: nobody would receive")
        if sockets / len(targets) > PORTS_PER_DESTINATION:
            raise CommandError(
                f"{sockets} sockets on {len(targets)} URL(s) would run out of local ports; "
                "add server URLs"
            )
        for pid in options["server_pids"]:
            if loadgen.proc_cpu_us(pid) is None:
                raise CommandError(f"--server-pid {pid}: no such process")

        prefix = options["prefix"]
        rooms, tokens = self._prepare(prefix, room_count, sockets, seed=not options["no_seed"])
        # The worker processes start from scratch; they must not inherit open DB handles.
        connections.close_all()

        connect_rate = options["connect_rate"]
        if mode == "storm":
            connect_rate = sockets / options["storm_seconds"]
        plan = loadgen.Plan(
            targets=targets,
            tokens=tokens,
            rooms=rooms,
            mode=mode,
            rate=options["rate"],
            duration=options["duration"],
            connect_rate=connect_rate,
            connect_timeout=options["connect_timeout"],
            drain=options["drain"],
            drain_quiet=options["drain_quiet"],
            warmup=options["warmup"],
            workers=workers,
            fmt=options["format"],
            body_bytes=options["body_bytes"],
            join=not options["no_join"],
            warmup_token=tokens[0],
            server_pids=options["server_pids"],
            redis_pid=options["redis_pid"],
            progress=not options["no_progress"] and not options["json"],
        )
        try:
            result = loadgen.run(plan)
        except loadgen.RunError as exc:
            raise CommandError(f"load test aborted: {exc}") from None
        if options["json"]:
            self.stdout.write(json.dumps(result, sort_keys=True))
        else:
            self.stdout.write(render(result))

    def _prepare(
        self, prefix: str, room_count: int, sockets: int, *, seed: bool
    ) -> tuple[list[str], list[str]]:
        """Room slugs and one token per socket, seeding them first unless told not to."""
        if seed:
            call_command(
                "seed_chat", rooms=room_count, users=sockets, prefix=prefix, stdout=StringIO()
            )
        rooms = [f"{prefix}-{i}" for i in range(room_count)]
        found = set(Room.objects.filter(slug__in=rooms).values_list("slug", flat=True))
        if len(found) != len(rooms):
            raise CommandError(
                f"{len(rooms) - len(found)} of the rooms {prefix}-0..{prefix}-{room_count - 1} "
                "are missing (run without --no-seed, or seed_chat first)"
            )
        names = [f"{prefix}-{i}" for i in range(sockets)]
        ids = dict(
            get_user_model()
            .objects.filter(username__in=names, is_active=True)
            .values_list("username", "pk")
        )
        if len(ids) != len(names):
            raise CommandError(
                f"{len(names) - len(ids)} of the users {prefix}-0..{prefix}-{sockets - 1} "
                "are missing or inactive (run without --no-seed, or seed_chat first)"
            )
        return rooms, [token_issue(user_id=ids[name], username=name) for name in names]


def _ms(values: dict[str, float | None] | None) -> str:
    if not values:
        return "-"
    return "  ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in values.items())


def render(r: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = [
        f"chat_loadtest {r['mode']}: {r['sockets']} sockets, {r['rooms']} room(s), "
        f"{len(r['urls'])} server URL(s), {r['workers']} worker(s), {r['format']}",
        f"connected        {r['connected']}   failed {r['failed']}"
        + (f"  {r['fail_reasons']}" if r["fail_reasons"] else ""),
        f"connect ms       {_ms(r['connect_ms'])}   (scheduled connect -> hello)",
    ]
    if r.get("join_ms"):
        lines.append(f"join ms          {_ms(r['join_ms'])}   (scheduled connect -> joined)")
    lines.append(f"connect seconds  {r['connect_seconds']}")
    if r["mode"] == "load":
        lines += [
            f"sent             {r['sent']} at {r['rate']:g} msg/s for {r['duration']:g}s"
            f"   acked {r['acked']}  rejected {r['rejected']}  unsent {r['unsent']}",
            f"expected         {r['expected']} deliveries ({r['members_at_start']} members)",
            f"delivered        {r['delivered']}   loss {r['loss']} ({r['loss_pct']}%)"
            + (f"  extra {r['extra']}" if r["extra"] else ""),
            f"deliveries/s     {r['deliveries_per_s']}",
            f"latency ms       {_ms(r['latency_ms'])}   (scheduled send -> received)",
            f"  post ms        {_ms(r['ack_ms'])}   (scheduled send -> ack to the sender)",
            f"  fan-out ms     {_ms(r['fanout_ms'])}   (message ts on the server -> received)",
        ]
        if r["closed_during"]:
            lines.append(f"closed by server {r['closed_during']}  codes {r['close_codes']}")
        if r["errors"] or r["rejected"]:
            lines.append(f"error frames     {r['error_codes']}")
        if "generator_cpu_pct" in r:
            lines.append(
                f"generator        cpu {r['generator_cpu_pct']}% of a core   "
                f"late sends {r['late_sends']}  lag {_ms(r['send_lag_ms'])}"
            )
    elif r["mode"] == "storm":
        lines.append(f"closed after     {r['closed_after_connect']}")
    elif r["mode"] == "idle":
        lines.append(f"open at end      {r['open_at_end']}   closed {r['closed_during']}")
    server = r.get("server") or {}
    if server.get("pids"):
        parts = []
        for key, label, unit in (
            ("cpu_pct", "cpu", "% of a core"),
            ("cpu_us_per_delivery", "", " us/delivery"),
            ("cpu_us_per_delivery_net", "", " us/delivery net of idle"),
            ("idle_cpu_pct_before", "idle cpu before", "%"),
            ("cpu_us_per_message", "", " us/message"),
            ("cpu_us_per_connect", "", " us/connect"),
            ("idle_cpu_pct", "idle cpu", "%"),
            ("rss_per_socket_kb", "rss", " KB/socket"),
            ("rss_mb", "rss", " MB"),
            ("redis_cpu_pct", "redis cpu", "%"),
        ):
            if server.get(key) is not None:
                parts.append(f"{label} {server[key]}{unit}".strip())
        lines.append(f"server           {'   '.join(parts)}   (pids {server['pids']})")
    return "\n".join(lines)
