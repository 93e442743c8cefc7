"""Connection storms: 5,000 sockets connect in 10 s, twice, to one Daphne process.

The load generator of `manage.py chat_loadtest` (chat.loadgen, storm mode, no join) opens
the sockets from two worker processes at an even 500 per second; each socket has its own
user and token, so every connect costs the server a TLS-less WebSocket handshake, a token
check and the user's profile (active, moderator, banned) from the database. Memory is read
from /proc/<pid>/status (VmRSS).
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password
from django.db import connections

from chat import loadgen
from chat.auth import token_issue
from tests.reliability.conftest import metrics_port, pid
from tests.reliability.harness import metrics, rss
from tests.support import ServerProcess

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.processes]

SOCKETS = 5000
SECONDS = 10.0


def _wait_closed(server: ServerProcess, timeout: float = 30) -> float:
    """Seconds until the server reports no open socket and no local room."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        sample = metrics(metrics_port(server))
        if sample.get("chat_sockets_open") == 0 and sample.get("chat_rooms_local") == 0:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"sockets still open {timeout} s after the storm: {sample}")


def _settled_rss(server_pid: int) -> int:
    """RSS once it stops moving (a second without change of more than 256 KiB)."""
    last = rss(server_pid)
    for _ in range(20):
        time.sleep(0.5)
        now = rss(server_pid)
        if abs(now - last) < 256 * 1024:
            return now
        last = now
    return last


@pytest.fixture
def _open_files() -> Iterator[None]:
    """Enough file descriptors for the server (a child inherits this process's limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = SOCKETS + 1000
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is below {need}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.usefixtures("_open_files")
def test_two_connection_storms_all_succeed_and_memory_returns(
    chat_server: Callable[..., Any], make_room: Callable[..., Any]
) -> None:
    """5,000 connects in 10 s: none fails; after they close the server holds no socket, no
    room and about the memory it had after the first storm, and a second storm goes the same."""
    make_room("storm")
    user_model = get_user_model()
    password = make_password("storm-password")
    user_model.objects.bulk_create(
        [user_model(username=f"storm{i}", password=password) for i in range(SOCKETS)]
    )
    ids = dict(
        user_model.objects.filter(username__startswith="storm").values_list("username", "pk")
    )
    tokens = [token_issue(user_id=ids[f"storm{i}"], username=f"storm{i}") for i in range(SOCKETS)]
    # The default heartbeat: the suite's 1 s one would ping 5,000 sockets every second.
    server = chat_server(CHAT_HEARTBEAT_INTERVAL="30", CHAT_HEARTBEAT_TIMEOUT="60")
    server_pid = pid(server)
    connections.close_all()  # the workers start from scratch; hand them no database handle

    def storm() -> dict[str, Any]:
        plan = loadgen.Plan(
            targets=[loadgen.Target("127.0.0.1", server.port, "/ws/chat/")],
            tokens=tokens,
            rooms=["storm"],
            mode="storm",
            connect_rate=SOCKETS / SECONDS,
            # The server accepts about 350 connects a second here, fewer than arrive: the last
            # sockets of a storm wait several seconds for their `hello`.
            connect_timeout=30,
            workers=2,
            join=False,
            warmup_token=tokens[0],
            server_pids=[server_pid],
            progress=False,
        )
        return loadgen.run(plan)

    baseline = _settled_rss(server_pid)
    results, after = [], []
    for _ in range(2):
        result = storm()
        closed_s = _wait_closed(server)
        after.append(_settled_rss(server_pid))
        results.append({**result, "closed_s": closed_s})
    for n, (r, rss_after) in enumerate(zip(results, after, strict=True), 1):
        print(
            f"storm {n}: {r['connected']} connected, {r['failed']} failed "
            f"{r['fail_reasons'] or ''} in {r['connect_seconds']} s; connect ms {r['connect_ms']}; "
            f"server CPU {r['server'].get('cpu_us_per_connect')} us per connect; "
            f"RSS {baseline / 2**20:.0f} MiB before the first storm, "
            f"{r['server']['rss_mb']} MiB with every socket open "
            f"({r['server'].get('rss_per_socket_kb')} KiB per socket), {rss_after / 2**20:.0f} MiB "
            f"{r['closed_s']:.1f} s after they closed"
        )
    for r in results:
        assert r["connected"] == SOCKETS and r["failed"] == 0, r["fail_reasons"]
        assert r["closed_after_connect"] == 0
    assert server.proc is not None and server.proc.poll() is None
    # No leak: the second storm leaves the process where the first one did. RSS does not go
    # back to the baseline: CPython and malloc keep the memory freed by the closed sockets
    # for reuse (malloc_trim gives back under 10 MiB of it), and the second storm reuses it.
    assert after[1] - after[0] < 16 * 2**20
    peaks = [r["server"]["rss_mb"] for r in results]
    assert peaks[1] - peaks[0] < 16
