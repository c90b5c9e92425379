"""Setup shared by the node tests on the fake host of test_node_staging_safety."""

from __future__ import annotations

from typing import Any, Callable


def look_at_mkfs(host, look: Callable[[], Any]) -> list:
    """The list returned gets ``look()`` as each mkfs starts on ``host`` (which then runs it as
    before): what the node has on disk while mkfs runs."""
    seen: list = []
    run = host.run

    async def spy(argv, ok=(0,), input=None, secret=()):
        if argv[0].startswith("mkfs"):
            seen.append(look())
        return await run(argv, ok, input, secret)
    host.run = spy
    return seen
