"""A chunk server that cannot start its frontend cleans up and exits; one still starting
stops when asked. (The shutdown half of ``ChunkServer.run``'s lifecycle is in
test_server_shutdown.py.)"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from chunk.storage.host_crash import STATE_FILE
from tests.cluster import cluster, free_port, wait_for

pytestmark = pytest.mark.timeout(120)


def _state(data_dir) -> dict:
    path = data_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


@pytest.mark.slow
def test_a_portal_port_in_use_ends_the_server_with_an_error_after_a_clean_stop(tmp_path, etcd_server):
    """``target.start()`` ran before the try whose finally stops everything: a portal port in
    use raised out of ``run`` with the storage engine never stopped (no clean stop recorded:
    a reboot then counts as a host crash and every replica here is resynced)."""
    with cluster(tmp_path, etcd_server, metas=0) as c:
        port = free_port()
        c.portals.append(port)
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", port))
            busy.listen()
            c.chunks.append(None)                       # start_chunk(index=0) reuses portals[0]
            p = c.start_chunk(index=0)
            wait_for(lambda: not p.alive(), 30, "the chunk server to give up")
        assert p.popen.returncode == 1, p.log()[-3000:]
        assert "already in use" in p.log() or "Address in use" in p.log(), p.log()[-3000:]
        assert _state(c.workdir / "chunk0").get("clean") is True, p.log()[-3000:]


async def test_the_lio_frontend_waiting_for_the_catalog_stops_when_asked(tmp_path, monkeypatch):
    """LioFrontend.start waits for the catalog's first listing, which never comes with etcd
    unreachable; it polled without looking at stop, before the try of ``run``: SIGTERM did
    nothing, and the server ran until SIGKILL."""
    from chunk import disks as zdisks
    from chunk import lio
    from chunk.server import ChunkServer
    from zstore.config import Config

    class FakeLioConfig:
        def __init__(self, host, port, owned) -> None:
            self.enable_tpgs = True

        def set_enabled(self, enabled: bool) -> None:
            self.enable_tpgs = enabled

        def sessions(self):
            return []
    monkeypatch.setattr(lio, "LioConfig", FakeLioConfig)
    cfg = Config()
    data = tmp_path / "data"
    data.mkdir()
    cfg.chunk.data_dir = str(data)
    cfg.chunk.frontend = "lio"
    cfg.chunk.portal = f"127.0.0.1:{free_port()}"
    cfg.chunk.data_port = free_port()
    cfg.chunk.lease_ttl = 2
    cfg.etcd.endpoints = [f"127.0.0.1:{free_port()}"]               # nothing listens there
    cfg.etcd.timeout = 1.0
    server = ChunkServer(cfg, "c" * 32, zdisks.prepare_all([zdisks.DiskSpec(data / "disk0")], data))
    server.probed(zdisks.probe_all(server.disks))
    stop = asyncio.Event()
    run = asyncio.ensure_future(server.run(stop))
    try:
        await asyncio.sleep(1.0)                  # starting: waiting for etcd (not a proof)
        assert not run.done(), run.exception() if run.done() else None
        stop.set()
        done, _ = await asyncio.wait({run}, timeout=10)
        assert run in done, "run() did not return within 10 s of stop"
        run.result()
        assert _state(data).get("clean") is True
    finally:
        if not run.done():
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)


def _live_and_info(c, chunk_id: str) -> tuple[bool, bool]:
    """Whether chunk ``chunk_id``'s live and info keys exist in etcd."""
    from zstore import etcd as zetcd
    from zstore.config import EtcdConfig
    from zstore.keys import Keys

    async def get():
        keys = Keys(c.prefix)
        etcd = zetcd.client(EtcdConfig(endpoints=[c.etcd.endpoint], prefix=c.prefix))
        try:
            return (await etcd.get(keys.chunk_live(chunk_id)) is not None,
                    await etcd.get(keys.chunk_info(chunk_id)) is not None)
        finally:
            await etcd.close()
    return asyncio.run(get())


@pytest.mark.slow
def test_no_live_key_while_the_storage_engine_cannot_start(tmp_path, etcd_server):
    """The live key (redirectors send initiators here, the meta shows the server up) waited
    only for the catalog: with the replication port in use the engine retried for ever while
    the server was live, and every I/O sent here waited for ``engine.started`` for ever."""
    with cluster(tmp_path, etcd_server, metas=0) as c:
        data_port = c._data_port(0)                         # noqa: SLF001
        busy = socket.socket()
        try:
            busy.bind(("127.0.0.1", data_port))
            busy.listen()
            p = c.start_chunk()
            wait_for(lambda: "storage engine cannot start yet" in p.log() or not p.alive(), 30,
                     "the engine to fail to start")
            chunk_id = (c.workdir / "chunk0" / "chunk-id").read_text().strip()
            wait_for(lambda: _live_and_info(c, chunk_id)[1], 30, "the info key (registering)")
            deadline = time.monotonic() + 2 * c.lease_ttl
            while time.monotonic() < deadline:
                assert p.alive(), p.log()[-3000:]
                assert not _live_and_info(c, chunk_id)[0], "live while its engine is not started"
                time.sleep(0.2)
        finally:
            busy.close()
        # The port is free again: the engine starts, and then the server goes live.
        wait_for(lambda: _live_and_info(c, chunk_id)[0], 30, "the live key once the engine started")
        p.stop()
        assert p.popen.returncode == 0, p.log()[-3000:]
