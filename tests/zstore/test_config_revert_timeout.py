"""``chunk.revert_timeout``: how long a chunk server waits for a peer's REVERT.

It was a constant (``REVERT_TIMEOUT``) no config could change: an operator with disks slow
enough that a whole extent's revert takes longer had no way to keep the peer from being
taken for dead mid-revert. Real config file, real chunk-server engine over the test etcd.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from chunk import disks as zdisks
from chunk.server import ChunkServer, validate
from zstore.config import ConfigError, load
from zstore.keys import Keys

pytestmark = pytest.mark.timeout(60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp_path: Path, chunk: str):
    f = tmp_path / "z.toml"
    f.write_text(f'[chunk]\ndata_dir = "data"\naddress = "127.0.0.1"\n{chunk}\n')
    return load(f, env={})


async def test_the_configured_revert_timeout_reaches_the_replica_client(tmp_path, etcd_client, etcd_config):
    cfg = _config(tmp_path, f"data_port = {_free_port()}\nrevert_timeout = 42.5")
    data = Path(cfg.chunk.data_dir)
    data.mkdir()
    disks = zdisks.prepare_all(validate(cfg), data, "c" * 32)
    engine = ChunkServer(cfg, "c" * 32, disks).storage_engine(etcd_client, Keys(etcd_config.prefix))
    try:
        await asyncio.wait_for(engine.start(asyncio.Event()), 30)
        assert engine.client.revert_timeout == 42.5
        assert engine.client.timeout == cfg.chunk.replica_timeout == 5.0
    finally:
        await engine.stop()


def test_the_default_revert_timeout_is_ten_minutes(tmp_path):
    assert _config(tmp_path, "").chunk.revert_timeout == 600.0


@pytest.mark.parametrize("chunk,msg", [
    ("revert_timeout = 'long'", "chunk.revert_timeout: 'long' is not a valid float"),
    ("revert_timeout = 0", r"chunk.revert_timeout: 0.0 must be between chunk.replica_timeout \(5.0\)"),
    ("replica_timeout = 30\nrevert_timeout = 10", r"chunk.revert_timeout: 10.0 must be between"),
    ("revert_timeout = 1e6", "and 86400 seconds"),
    ("revert_timeout = nan", "chunk.revert_timeout: nan must be between"),
])
def test_a_bad_revert_timeout_is_a_config_error_naming_the_key(tmp_path, chunk, msg):
    with pytest.raises(ConfigError, match=msg):
        validate(_config(tmp_path, chunk))
