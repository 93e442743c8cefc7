"""Daphne on uvloop: `python -m esports_chat.daphne_uvloop <the same arguments as daphne>`.

Daphne runs Twisted on an asyncio event loop that it creates when `daphne.server` is first
imported. Twisted adds a socket as a writer when a frame is written and removes it once the
frame is sent; on the standard library's selector loop each of those is a Python-level
selector update, which is most of Daphne's cost per delivered frame. Setting uvloop's policy
before Daphne creates its loop makes those updates cheap C calls (docs/benchmarks.md has the
measurements). Everything else about Daphne is unchanged.
"""

import asyncio

import uvloop

asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

from daphne.cli import CommandLineInterface  # noqa: E402  (must follow the policy)

if __name__ == "__main__":
    CommandLineInterface.entrypoint()
