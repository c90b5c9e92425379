"""Host.run under a prefix that forks (``nsenter -t 1 -a --`` forks once it enters a PID
namespace): a cancel or timeout must end the tool itself, not only the prefix process."""

from __future__ import annotations

import asyncio
import shlex
import sys
from pathlib import Path

import pytest

from csi.host import Host, HostError
from tests.cluster import async_wait_for

# forks the tool and waits for it, as nsenter does when it enters a PID namespace
FORKING_PREFIX = shlex.join([sys.executable, "-c",
                             "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"])
TOOL_RUNS = 5.0         # the tool's own run time: far longer than the call lets it live


def _tool(tmp: Path) -> list[str]:
    """A stand-in for a mkfs still writing after the call gave up on it: it first writes its
    pid to ``started``, then runs TOOL_RUNS seconds and only then touches ``M``."""
    started, marker = shlex.quote(str(tmp / "started")), shlex.quote(str(tmp / "M"))
    return ["sh", "-c", f"echo $$ > {started}.tmp && mv {started}.tmp {started}; "
                        f"sleep {TOOL_RUNS}; touch {marker}"]


def _started_pid(tmp: Path) -> int | None:
    f = tmp / "started"
    return int(f.read_text()) if f.exists() else None


def _gone(pid: int) -> bool:
    """The process has ended: no such pid, or a zombie nobody reaped yet (it was re-parented
    when the prefix died; a zombie runs nothing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def _assert_the_tool_was_killed(tmp: Path, pid: int, what: str) -> None:
    # The positive proof: the tool (the only writer of M) ends well before its TOOL_RUNS
    # seconds are up. Had only the prefix been killed, the tool would still be running now.
    await async_wait_for(lambda: _gone(pid), TOOL_RUNS - 1, f"the tool to be killed with the {what}",
                         interval=0.02)
    # M is written by the tool alone and the tool has ended: M cannot appear later, so
    # checking now proves the absence (no wait needed). Were the tool left to run out its
    # time instead, _gone would only turn true after it touched M, and this fails.
    assert not (tmp / "M").exists(), f"the tool outlived the {what}"


async def test_a_cancelled_call_kills_the_tool_behind_a_forking_prefix(tmp_path: Path):
    task = asyncio.ensure_future(Host(FORKING_PREFIX).run(_tool(tmp_path)))
    try:
        # the tool itself runs (behind the prefix) before the call is cancelled
        pid = await async_wait_for(lambda: _started_pid(tmp_path), 10, "the tool to start",
                                   interval=0.02)
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await _assert_the_tool_was_killed(tmp_path, pid, "cancelled call")


async def test_a_timed_out_call_kills_the_tool_behind_a_forking_prefix(tmp_path: Path):
    # 2 s: room for the prefix's interpreter to start and fork the tool, well short of TOOL_RUNS
    task = asyncio.ensure_future(Host(FORKING_PREFIX, timeout=2.0).run(_tool(tmp_path)))
    try:
        # the tool started before the timeout fired (else the kill would prove nothing)
        pid = await async_wait_for(lambda: _started_pid(tmp_path), 10, "the tool to start",
                                   interval=0.02)
        with pytest.raises(HostError, match="timed out"):
            await asyncio.wait_for(task, 5)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    await _assert_the_tool_was_killed(tmp_path, pid, "timed-out call")
