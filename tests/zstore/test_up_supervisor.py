"""The ``zstore up`` supervisor's own logic: signals, readiness, the pid lock."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import selectors
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.cluster import PY, ROOT, free_port, free_port_range, wait_for
from tests.zstore.test_up import _alive, _env

SLEEPER = [sys.executable, "-c", "import time; time.sleep(120)"]


class BrokenStream(io.TextIOBase):
    """stdout/stderr after the terminal hung up (EIO) or the reading end of the pipe is gone."""

    def __init__(self, err: int = errno.EIO) -> None:
        self.err = err

    def write(self, s: str) -> int:
        raise OSError(self.err, os.strerror(self.err))

    def flush(self) -> None:
        raise OSError(self.err, os.strerror(self.err))

    def fileno(self) -> int:
        raise io.UnsupportedOperation("fileno")


def _broken_output(monkeypatch, err: int = errno.EIO) -> None:
    monkeypatch.setattr(sys, "stdout", BrokenStream(err))
    monkeypatch.setattr(sys, "stderr", BrokenStream(err))


async def _real_child(up, tmp_path: Path, name: str, kind: str):
    """A Child around a real sleeping process in its own session (so killpg reaches only it)."""
    proc = await asyncio.create_subprocess_exec(*SLEEPER, stdin=asyncio.subprocess.DEVNULL,
                                                start_new_session=True)
    return up.Child(name, kind, SLEEPER, tmp_path / f"{name}.log", proc=proc)


async def _reap(children) -> None:
    for c in children:
        if c.proc.returncode is None:
            c.proc.kill()
        await c.proc.wait()


# -- 1. signals and shutdown with a broken stdout/stderr ------------------------------

async def test_signal_sets_stop_even_when_printing_fails(tmp_path: Path, monkeypatch):
    """A hung-up terminal (EIO) or a dead `| tee` (EPIPE) must not keep the cluster running."""
    from zstore import up
    sup = up.Supervisor(up.Layout(tmp_path), "etcd")
    child = await _real_child(up, tmp_path, "chunk0", "chunk")
    sup.children.append(child)
    try:
        _broken_output(monkeypatch)
        sup.on_signal(signal.SIGTERM)
        assert sup.stop.is_set()
        _broken_output(monkeypatch, errno.EPIPE)
        sup.on_signal(signal.SIGINT)                   # the second one kills everything at once
        assert await asyncio.wait_for(child.proc.wait(), 10) == -signal.SIGKILL
    finally:
        await _reap([child])


async def test_shutdown_completes_when_printing_fails(tmp_path: Path, monkeypatch):
    from zstore import up
    sup = up.Supervisor(up.Layout(tmp_path), "etcd")
    sup.children += [await _real_child(up, tmp_path, "chunk0", "chunk"),
                     await _real_child(up, tmp_path, "etcd", "etcd")]
    try:
        _broken_output(monkeypatch, errno.EPIPE)
        await asyncio.wait_for(sup.shutdown(), 30)
        assert [c.proc.returncode for c in sup.children] == [-signal.SIGTERM, -signal.SIGTERM]
    finally:
        await _reap(sup.children)


def _read_until(proc: subprocess.Popen, text: bytes, timeout: float) -> bytes:
    out = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while text not in out:
            left = deadline - time.monotonic()
            assert left > 0, f"no {text!r} within {timeout}s:\n{out.decode(errors='replace')}"
            if sel.select(min(left, 1.0)):
                chunk = os.read(proc.stdout.fileno(), 65536)
                assert chunk, f"zstore up closed its output:\n{out.decode(errors='replace')}"
                out += chunk
    return out


@pytest.mark.slow
def test_sigterm_stops_the_cluster_after_its_output_pipe_closed(tmp_path: Path):
    """`zstore up | tee log`, tee killed: SIGTERM (as `zstore down` sends) still stops everything."""
    state = tmp_path / "state"
    base = free_port_range(40)
    proc = subprocess.Popen(
        [PY, "-m", "zstore.up", "--state-dir", str(state), "--base-port", str(base), "--chunks", "1",
         "--vip-port", str(free_port("127.0.0.2"))],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, env=_env(),
        start_new_session=True)
    pids: list[int] = []
    try:
        _read_until(proc, b"Ctrl-C or `zstore down` stops the cluster.", 90)
        pids = [c["pid"] for c in json.loads((state / "up.json").read_text())["children"]]
        proc.stdout.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert not [p for p in pids if _alive(p)]
        assert not (state / "up.pid").exists()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        for pid in pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        wait_for(lambda: not [p for p in pids if _alive(p)], 20, "every child gone")


# -- 2. a live record left by a previous run ------------------------------------------

async def test_chunks_live_ignores_a_previous_runs_live_record(tmp_path: Path, etcd_server, etcd_config,
                                                               etcd_client, monkeypatch):
    """etcd keeps leases across its restart: chunks/<id>/live of the killed run still exists."""
    from zstore import up
    from zstore.keys import Keys
    from zstore.records import ChunkLive
    monkeypatch.setattr(up, "PREFIX", etcd_config.prefix)
    lay = up.Layout(tmp_path, base_port=int(etcd_server.endpoint.rsplit(":", 1)[1]), chunks=1)
    assert lay.etcd_endpoint == etcd_server.endpoint
    cid = f"c-{uuid.uuid4().hex}"
    lay.chunk_dir(0).mkdir()
    (lay.chunk_dir(0) / "chunk-id").write_text(cid + "\n")
    sup = up.Supervisor(lay, "etcd")
    new_pid, old_pid = 4_000_001, 4_000_002          # never signalled: no process is touched
    sup.children.append(up.Child("chunk0", "chunk", [], tmp_path / "chunk0.log",
                                 proc=SimpleNamespace(pid=new_pid, returncode=None)))
    key = Keys(etcd_config.prefix).chunk_live(cid)
    lease = await etcd_client.lease(60)
    try:
        await etcd_client.put(key, ChunkLive(chunk_id=cid, pid=old_pid, started=1.0, lease_ttl=5).encode(),
                              lease=lease)
        assert await sup._chunks_live() is False
        await etcd_client.put(key, ChunkLive(chunk_id=cid, pid=new_pid, started=2.0, lease_ttl=5).encode(),
                              lease=lease)
        assert await sup._chunks_live() is True
    finally:
        await lease.revoke()
        if sup._etcd is not None:
            await sup._etcd.close()


# -- 3. a child that died while starting ----------------------------------------------

async def test_no_banner_when_a_child_died_while_starting(tmp_path: Path, monkeypatch):
    from zstore import up
    lay = up.Layout(tmp_path, chunks=2)
    lay.logs.mkdir()
    sup = up.Supervisor(lay, "etcd")
    said: list[str] = []

    def say(text: str, err: bool = False) -> None:
        said.append(text)
        if "zstore is up" in text:        # the old code then waits for a signal: give it one
            sup.stop.set()

    async def start_all() -> None:
        # chunk0 dies after its own stage was waited for, while a later stage starts.
        dead = await sup.spawn("chunk0", "chunk", [sys.executable, "-c", "raise SystemExit(3)"])
        await sup.spawn("chunk1", "chunk", SLEEPER)
        await dead.proc.wait()

    monkeypatch.setattr(up, "say", say)
    monkeypatch.setattr(sup, "start_all", start_all)
    try:
        rc = await asyncio.wait_for(sup.run(), 60)
        assert rc == 1
        assert not [t for t in said if "zstore is up" in t]
        assert [t for t in said if "error" in t and "chunk0 exited with code 3" in t], said
        assert all(c.exited for c in sup.children)
    finally:
        await _reap([c for c in sup.children if c.proc is not None])


# -- 4. the pid lock --------------------------------------------------------------------

def test_pidlock_not_taken_on_an_unlinked_pid_file(tmp_path: Path, monkeypatch):
    """A stops while B starts: B opened up.pid, A unlinked it and unlocked, B's flock succeeds
    on the unlinked file. B must retry on the new file, or nothing finds it running."""
    from zstore import up
    path = tmp_path / "up.pid"
    a, b = up.PidLock(path), up.PidLock(path)
    a.acquire()
    real_flock = up.fcntl.flock
    first: list[int] = []

    def flock(fd: int, op: int):
        if not first:
            first.append(fd)
            a.release()                   # between B's open and B's flock
        return real_flock(fd, op)

    monkeypatch.setattr(up.fcntl, "flock", flock)
    try:
        b.acquire()
        assert first
        assert up.running_supervisor(tmp_path) == os.getpid()
        with pytest.raises(up.UpError, match=f"already running from {tmp_path} \\(pid {os.getpid()}\\)"):
            up.PidLock(path).acquire()
    finally:
        a.release()
        b.release()
    assert up.running_supervisor(tmp_path) is None
