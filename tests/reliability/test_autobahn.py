"""The Autobahn Testsuite's fuzzing client against the chat endpoint of a real Daphne process.

Opt-in: the testsuite is Python 2 only (it pins Twisted 19.10 and autobahn 0.10.9), so CI
does not install it. To run it, build a Python 2.7 virtualenv with `autobahntestsuite`
(docs/reliability.md, "Autobahn") and point AUTOBAHN_WSTEST at its `wstest`.

The chat endpoint is not an echo server: it sends `hello` first and answers a data message
that is not a chat frame with `error bad_frame`. Cases whose expectation is an echo therefore
fail on the data messages alone; this test checks that nothing else differs, that every
closing behaviour is OK (or informational), and that the process survives the ~250 cases.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.reliability.harness import alive
from tests.support import ServerProcess

WSTEST = os.environ.get("AUTOBAHN_WSTEST", "")

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.processes,
    pytest.mark.skipif(not WSTEST, reason="set AUTOBAHN_WSTEST to a Python 2.7 wstest to run"),
]


@pytest.mark.timeout(900)
def test_autobahn_fuzzingclient_finds_nothing_but_the_missing_echo(
    chat_server: Callable[..., ServerProcess],
    make_user: Callable[..., Any],
    make_room: Callable[..., Any],
) -> None:
    make_room("final")
    _, token = make_user("autobahn")
    # The default heartbeat: wstest answers WebSocket pings, not the chat's `ping` frames,
    # and some cases last longer than the suite's 4 s heartbeat timeout.
    server = chat_server(
        "daphne", REDIS_URL="", CHAT_HEARTBEAT_INTERVAL="30", CHAT_HEARTBEAT_TIMEOUT="60"
    )
    outdir = Path(tempfile.mkdtemp(prefix="chat-autobahn-"))
    spec = outdir / "fuzzingclient.json"
    spec.write_text(
        json.dumps(
            {
                "outdir": str(outdir / "reports"),
                "servers": [{"agent": "chat", "url": f"{server.url}?token={token}"}],
                "cases": ["*"],
                # The performance (9), compression (12, 13) cases: Daphne negotiates no
                # permessage-deflate, and 9.* is a benchmark, not a conformance check.
                "exclude-cases": ["9.*", "12.*", "13.*"],
                "exclude-agent-cases": {},
            }
        )
    )
    subprocess.run(
        [WSTEST, "-m", "fuzzingclient", "-s", str(spec)],
        cwd=outdir,
        check=True,
        timeout=840,
        stdout=subprocess.DEVNULL,
    )
    index = json.loads((outdir / "reports" / "index.json").read_text())["chat"]
    behaviours: dict[str, int] = {}
    unexplained, bad_closes = [], []
    for case, result in index.items():
        behaviours[result["behavior"]] = behaviours.get(result["behavior"], 0) + 1
        if result["behaviorClose"] not in ("OK", "INFORMATIONAL"):
            bad_closes.append(case)
        if result["behavior"] != "FAILED":
            continue
        report = json.loads((outdir / "reports" / result["reportfile"]).read_text())
        received = [event for event in report["received"] if event[0] != "message"]
        if not any(
            [event for event in events if event[0] != "message"] == received
            for events in report["expected"].values()
        ):
            unexplained.append(case)
    print(f"autobahn: {len(index)} cases, {behaviours}")
    assert server.proc is not None and alive(server.proc.pid)
    assert not bad_closes, bad_closes
    assert not unexplained, unexplained
    assert "Traceback" not in server.log()
