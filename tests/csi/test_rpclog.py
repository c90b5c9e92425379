"""RPC logging and metrics: the interceptor on a real grpc.aio server over a unix socket,
with a stand-in meta (no cluster needed: the calls here never reach the meta API)."""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc as pbg
from csi.metrics import Metrics, serve_metrics
from csi.rpclog import redacted
from csi.server import build_server, listen
from tests.cluster import free_port
from zstore.logs import redact


class FakeMeta:
    async def ready(self) -> bool:
        return False


@pytest.fixture
async def served(tmp_path: Path):
    metrics = Metrics()
    server = build_server(FakeMeta(), "127.0.0.2:3260", "controller", metrics=metrics)  # type: ignore[arg-type]
    sock = tmp_path / "csi.sock"
    listen(server, f"unix://{sock}")
    await server.start()
    async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
        yield pbg.IdentityStub(ch), pbg.ControllerStub(ch), metrics
    await server.stop(None)


def rpc_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "zstore.csi.rpc"]


async def test_each_rpc_logged_once_with_code_and_secrets_redacted(served, caplog):
    ident, ctl, metrics = served
    caplog.set_level(logging.DEBUG, logger="zstore.csi.rpc")
    redact("registered-token-value")
    assert (await ident.GetPluginInfo(pb.GetPluginInfoRequest())).name == "csi.zstore.io"
    req = pb.CreateVolumeRequest(name="", secrets={"password": "hunter2-secret"},
                                 parameters={"note": "registered-token-value"})
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await ctl.CreateVolume(req)
    assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    lines = rpc_lines(caplog)
    assert len(lines) == 2, lines
    assert lines[0].startswith("GetPluginInfo OK in ") and " ms request={}" in lines[0]
    create = lines[1]
    assert create.startswith("CreateVolume INVALID_ARGUMENT (") and " ms request=" in create
    assert "hunter2" not in create and "registered-token-value" not in create
    assert '"secrets":{"password":"***"}' in create

    text = metrics.render()
    assert 'zstore_csi_rpc_total{method="GetPluginInfo",code="OK"} 1' in text
    assert 'zstore_csi_rpc_total{method="CreateVolume",code="INVALID_ARGUMENT"} 1' in text
    assert 'zstore_csi_rpc_duration_seconds_count{method="CreateVolume"} 1' in text
    assert 'zstore_csi_rpc_duration_seconds_bucket{method="CreateVolume",le="+Inf"} 1' in text


async def test_quiet_rpcs_stay_out_of_info(served, caplog):
    ident, _, _ = served
    caplog.set_level(logging.INFO, logger="zstore.csi.rpc")
    assert (await ident.Probe(pb.ProbeRequest())).ready.value is True
    assert rpc_lines(caplog) == []


def test_redacted_nested_secrets():
    req = pb.NodeStageVolumeRequest(volume_id="v1", secrets={"chap": "s3cret!"},
                                    volume_context={"token": "abcdefgh"})
    text = redacted(req)
    assert "s3cret" not in text and "abcdefgh" not in text and '"volume_id":"v1"' in text


def test_histogram_buckets_are_cumulative():
    m = Metrics()
    m.observe("X", "OK", 0.003)
    m.observe("X", "OK", 2.0)
    text = m.render()
    assert 'le="0.001"} 0' in text and 'le="0.005"} 1' in text and 'le="5.0"} 2' in text
    assert 'zstore_csi_rpc_duration_seconds_sum{method="X"} 2.003000' in text


async def test_metrics_endpoint_on_loopback():
    m = Metrics()
    m.observe("Probe", "OK", 0.0001)
    port = free_port()
    runner = await serve_metrics(m, port)
    try:
        def get():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.headers["Content-Type"], r.read().decode()
        ctype, body = await asyncio.to_thread(get)
        assert ctype.startswith("text/plain; version=0.0.4")
        assert 'zstore_csi_rpc_total{method="Probe",code="OK"} 1' in body
    finally:
        await runner.cleanup()
