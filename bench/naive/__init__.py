"""The naive baseline: the Channels tutorial's chat, speaking just enough of protocol v1.

A group of sockets per room, one channel-layer `group_send` per message, and every consumer
encoding its own copy of every message with `json.dumps`, as the Channels tutorial does
(https://channels.readthedocs.io/en/stable/tutorial/part_3.html). It exists only so
docs/benchmarks.md can measure the product's fan-out against it side by side, under the same
load generator; it is never wired into the product.
"""
