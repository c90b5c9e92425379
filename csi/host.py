"""Running host tools (iscsiadm, mount, mkfs, ...) through a configurable prefix.

In a Kubernetes DaemonSet the plugin runs in a container, but iscsid and the
kernel's iSCSI netlink are not namespaced: there is one iscsid per host, so
the tools must run in the host's namespaces (``nsenter -t 1 -a --``, field
notes §2 item 9). Outside a container the prefix is empty.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import signal
from typing import Sequence

import grpc

from csi.status import Abort

log = logging.getLogger("zstore.csi.host")


class HostError(Abort):
    """A host tool failed: INTERNAL unless the caller maps it to something better."""

    def __init__(self, message: str, rc: int | None = None, stderr: str = ""):
        super().__init__(grpc.StatusCode.INTERNAL, message)
        self.rc = rc
        self.stderr = stderr


class Host:
    def __init__(self, prefix: str = "", timeout: float = 120.0):
        self.prefix = shlex.split(prefix)
        self.timeout = timeout

    async def run(self, argv: Sequence[str], ok: Sequence[int] = (0,),
                  input: bytes | None = None, secret: Sequence[str] = ()) -> tuple[int, str, str]:
        """Run ``prefix + argv``; return (rc, stdout, stderr), HostError if rc is not in ``ok``.

        Strings in ``secret`` (CHAP passwords passed as iscsiadm values) are masked in the
        messages and log lines about the command."""
        cmd = [*self.prefix, *argv]
        # its own process group: the prefix may fork the tool (nsenter does, entering a PID
        # namespace), and killing the prefix alone leaves the tool running
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE if input is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, start_new_session=True)
        try:
            out, err = await asyncio.wait_for(proc.communicate(input), self.timeout)
        except asyncio.TimeoutError:
            await _kill(proc)
            raise HostError(mask(f"{shlex.join(cmd)}: timed out after {self.timeout}s", secret))
        except BaseException:
            # Cancelled (the CO's deadline passed) or failed: the command must not outlive the
            # call. A mkfs left running while the retry probes the device finds no filesystem
            # yet and formats it again, or mounts one still being written.
            await _kill(proc)
            raise
        rc = proc.returncode or 0
        o, e = out.decode(errors="replace"), err.decode(errors="replace")
        log.debug("%s -> %d", mask(shlex.join(cmd), secret), rc)
        if rc not in ok:
            raise HostError(mask(f"{shlex.join(cmd)}: exit {rc}: {e.strip() or o.strip()}", secret), rc,
                            mask(e, secret))
        return rc, o, e


async def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the command's whole process group (the prefix and what it forked), then reap
    the prefix. The group is the prefix's pid (start_new_session); it is signalled only while
    the prefix is unreaped, so the id cannot belong to anyone else yet."""
    if proc.returncode is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError:
            proc.kill()
        # shielded: a second cancel must not leave the prefix unreaped
        await asyncio.shield(proc.wait())


def mask(text: str, secrets: Sequence[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(shlex.quote(s), "***").replace(s, "***")
    return text
