"""Host.run under a prefix that forks (``nsenter -t 1 -a --`` forks once it enters a PID
namespace): a cancel or timeout must end the tool itself, not only the prefix process."""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path

import pytest

from csi.host import Host, HostError

# forks the tool and waits for it, as nsenter does when it enters a PID namespace
FORKING_PREFIX = shlex.join([sys.executable, "-c",
                             "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"])


def _tool(marker: Path) -> list[str]:
    # a stand-in for a mkfs still writing after the call gave up on it
    return ["sh", "-c", f"sleep 1.5; touch {shlex.quote(str(marker))}"]


async def test_a_cancelled_call_kills_the_tool_behind_a_forking_prefix(tmp_path: Path):
    marker = tmp_path / "M"
    task = asyncio.ensure_future(Host(FORKING_PREFIX).run(_tool(marker)))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    await asyncio.sleep(2.5)
    assert not marker.exists(), "the tool outlived the cancelled call"


async def test_a_timed_out_call_kills_the_tool_behind_a_forking_prefix(tmp_path: Path):
    marker = tmp_path / "M"
    with pytest.raises(HostError, match="timed out"):
        await asyncio.wait_for(Host(FORKING_PREFIX, timeout=0.2).run(_tool(marker)), 5)
    await asyncio.sleep(2.5)
    assert not marker.exists(), "the tool outlived the timed-out call"
