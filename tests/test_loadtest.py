"""The load-test command against a real Daphne process: a few sockets, a few seconds, no loss."""

from __future__ import annotations

import json
from collections.abc import Callable
from io import StringIO
from typing import Any

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from chat import loadgen
from tests.support import ServerProcess


@pytest.mark.processes
@pytest.mark.django_db(transaction=True)
def test_loadtest_delivers_every_message(
    servers: Callable[..., ServerProcess],
    make_room: Callable[..., Any],
    make_user: Callable[..., tuple[Any, str]],
) -> None:
    for i in range(2):
        make_room(f"lt-{i}")
    for i in range(6):
        make_user(f"lt-{i}")
    server = servers("daphne")
    assert server.proc is not None
    out = StringIO()
    call_command(
        "chat_loadtest",
        *("--url", server.url, "--sockets", "6", "--rooms", "2", "--workers", "2"),
        *("--rate", "20", "--duration", "2", "--drain", "5", "--warmup", "0.2"),
        *("--prefix", "lt", "--no-seed", "--server-pid", str(server.proc.pid), "--json"),
        stdout=out,
    )
    result = json.loads(out.getvalue())
    assert result["connected"] == 6
    assert result["failed"] == 0
    assert result["sent"] == 40
    assert result["acked"] == 40
    assert result["members_at_start"] == 6
    assert result["expected"] == 40 * 3  # every member of a room of 3, sender included
    assert result["delivered"] == result["expected"]
    assert result["loss"] == 0
    assert result["closed_during"] == 0
    assert result["latency_ms"]["p99"] is not None
    assert result["server"]["pids"] == [server.proc.pid]
    assert result["server"]["cpu_us_per_delivery"] is not None


@pytest.mark.parametrize(
    "url",
    ["ws://10.1.2.3:8000/ws/chat/", "ws://example.com/ws/chat/", "wss://127.0.0.1/ws/chat/"],
)
def test_loadtest_refuses_anything_but_loopback(url: str) -> None:
    with pytest.raises(CommandError):
        call_command("chat_loadtest", "--url", url, stdout=StringIO())


def test_latency_histogram_percentiles() -> None:
    hist = loadgen.Histogram()
    for us in range(1, 100_001):  # 1 us .. 100 ms, uniform
        hist.add(us)
    other = loadgen.Histogram()
    other.add(5_000_000)
    hist.merge(loadgen.Histogram.from_wire(other.to_wire()))
    assert hist.count == 100_001
    assert hist.percentile(50) == pytest.approx(50.0, rel=0.005)
    assert hist.percentile(99) == pytest.approx(99.0, rel=0.005)
    assert hist.percentile(100) == 5000.0
