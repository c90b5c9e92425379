"""Host tools run through the configurable prefix: real processes, no stand-ins."""

from __future__ import annotations

import shutil

import pytest

from csi.host import Host, HostError, mask


async def test_every_command_runs_through_the_prefix():
    # what "nsenter -t 1 -a --" does in a pod, an env wrapper does here: the tool runs under it
    host = Host("env -- ZSTORE_CSI_PREFIX_PROBE=through-prefix")
    rc, out, _ = await host.run(["sh", "-c", 'echo "$ZSTORE_CSI_PREFIX_PROBE"'])
    assert (rc, out.strip()) == (0, "through-prefix")
    assert (await Host("").run(["sh", "-c", 'echo "${ZSTORE_CSI_PREFIX_PROBE:-none}"']))[1].strip() == "none"


async def test_prefix_is_split_like_a_shell_and_a_missing_tool_fails_cleanly():
    host = Host("env -- 'A=two words'")
    assert (await host.run(["sh", "-c", 'echo "$A"']))[1].strip() == "two words"
    with pytest.raises(HostError) as e:
        await host.run(["sh", "-c", "echo boom >&2; exit 3"])
    assert e.value.rc == 3 and "boom" in str(e.value) and e.value.code.name == "INTERNAL"
    assert (await host.run(["sh", "-c", "exit 21"], ok=(0, 21)))[0] == 21


async def test_secrets_never_reach_the_error_or_its_stderr():
    pw = "s3cret pass'word"
    with pytest.raises(HostError) as e:
        await Host("env --").run(["sh", "-c", 'echo "bad $1" >&2; exit 1', "sh", pw], secret=[pw])
    assert pw not in str(e.value) and pw not in e.value.stderr and "***" in str(e.value)
    assert mask("a=hunter22 b='x y'", ["hunter22", "x y"]) == "a=*** b=***"


async def test_timeout_kills_the_tool():
    if shutil.which("sleep") is None:
        pytest.skip("no sleep")
    with pytest.raises(HostError, match="timed out"):
        await Host("env --", timeout=0.3).run(["sleep", "5"])


async def test_a_cancelled_call_does_not_leave_its_tool_running(tmp_path):
    """The CO's deadline cancels the call: the tool (a mkfs, say) must end with it, or the
    retry probes a device it is still writing."""
    import asyncio
    import os
    pidfile = tmp_path / "pid"
    task = asyncio.ensure_future(Host("").run(["sh", "-c", f'echo $$ > {pidfile}; exec sleep 30']))
    for _ in range(500):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        await asyncio.sleep(0.01)
    pid = int(pidfile.read_text())
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)                                  # killed and reaped
