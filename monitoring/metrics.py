"""Every chat metric, defined once. Prometheus naming; no per-user, per-room or per-message labels.

The fan-out path increments counters once per flush (by the number of sockets written),
never once per socket, so metrics stay off the per-delivery cost.
"""

from __future__ import annotations

import gc
import os
import time

from prometheus_client import Counter, Gauge, Histogram

SOCKETS_OPEN = Gauge("chat_sockets_open", "WebSocket connections open in this process.")
ROOMS_LOCAL = Gauge("chat_rooms_local", "Rooms with at least one member in this process.")

REDIS_UP = Gauge(
    "chat_redis_up", "1 while the hub's probe through Redis comes back, 0 while it does not."
)
DRAINING = Gauge("chat_draining", "1 once this process is draining after SIGTERM.")
MEMORY_PER_SOCKET = Gauge(
    "chat_memory_per_socket_bytes",
    "Resident memory of this process divided by its open sockets (all of it when none).",
)

CONNECTS = Counter("chat_connects_total", "Sockets accepted.")
HANDSHAKES_RELEASED = Counter(
    "chat_handshakes_released_total",
    "Accepted sockets whose handshake request and response the server was made to let go of "
    "(Uvicorn's websockets-sansio protocol keeps them otherwise).",
)
DISCONNECTS = Counter(
    "chat_disconnects_total", "Sockets closed, by WebSocket close code.", ["code"]
)
REJECTED = Counter("chat_handshakes_rejected_total", "Handshakes refused, by reason.", ["reason"])

FRAMES_IN = Counter("chat_frames_in_total", "Client frames received, by type.", ["type"])
FRAMES_OUT = Counter(
    "chat_frames_out_total", "Frames written to sockets by the fan-out, by type.", ["type"]
)
ERRORS_SENT = Counter("chat_errors_sent_total", "Error frames sent, by code.", ["code"])

MESSAGES_POSTED = Counter("chat_messages_posted_total", "Chat messages stored and published.")
DELIVERIES = Counter("chat_deliveries_total", "Room events written to local sockets.")
BATCH_SIZE = Histogram(
    "chat_batch_events",
    "Events per fan-out flush of one room.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200),
)
DELIVERY_LATENCY = Histogram(
    "chat_delivery_latency_seconds",
    "From the server accepting a message to its frame being written, per flush.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
)
DROPPED = Counter(
    "chat_events_dropped_total", "Events not delivered to a socket, by reason.", ["reason"]
)
RATE_LIMITED = Counter(
    "chat_rate_limited_total", "Posts refused by an abuse limit, by error code.", ["code"]
)
MODERATION_ACTIONS = Counter(
    "chat_moderation_actions_total", "Moderation actions taken, by action.", ["action"]
)
LAYER_LAG = Histogram(
    "chat_layer_probe_seconds",
    "Round trip of the hub's probe through the channel layer (Redis pub/sub lag).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
RESYNCS = Counter(
    "chat_resyncs_total", "Times this process asked its sockets to resync after an outage."
)
LAYER_ERRORS = Counter(
    "chat_layer_errors_total", "Channel-layer or Redis calls that failed or timed out.", ["op"]
)


DB_BATCH_SIZE = Histogram(
    "chat_db_batch_size",
    "Requests served by one call on the database thread, by kind (profile, join, history, post).",
    ["kind"],
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500),
)
GC_PAUSE = Histogram(
    "chat_gc_pause_seconds",
    "Time the garbage collector held the event loop, by generation collected.",
    ["generation"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
)


def watch_gc() -> None:
    """Observe every collection's pause in GC_PAUSE (once per process)."""
    if _gc_watch in gc.callbacks:
        return
    gc.callbacks.append(_gc_watch)


_gc_started = 0.0
_GC_GENERATIONS = [GC_PAUSE.labels(str(generation)) for generation in range(3)]


def _gc_watch(phase: str, info: dict[str, int]) -> None:
    global _gc_started
    if phase == "start":
        _gc_started = time.perf_counter()
    elif _gc_started:
        _GC_GENERATIONS[info["generation"]].observe(time.perf_counter() - _gc_started)


def process_rss_bytes() -> int:
    """Resident set size of this process, from /proc (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
