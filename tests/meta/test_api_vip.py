"""Cluster status shows the iSCSI VIP: its portal, which redirector holds it, the epoch."""

from __future__ import annotations

import asyncio
import re

import pytest

from tests.cluster import Cluster, wait_for
from zstore import etcd
from zstore.cli import output
from zstore.config import EtcdConfig
from zstore.keys import Keys
from zstore.records import VipRecord


def put_vip(c: Cluster, rec: VipRecord | None) -> None:
    async def go() -> None:
        client = etcd.client(EtcdConfig(endpoints=[c.etcd.endpoint], prefix=c.prefix))
        try:
            if rec is None:
                await client.delete(Keys(c.prefix).vip())
            else:
                await client.put(Keys(c.prefix).vip(), rec.encode())
        finally:
            await client.close()
    asyncio.run(go())


@pytest.mark.slow
def test_cluster_status_shows_the_vip_record(meta_cluster: Cluster):
    c = meta_cluster
    status, body = c.api("GET", "/cluster")
    assert status == 200 and body["vip"] is None
    assert re.search(r"iSCSI VIP\s+not held", c.cli("cluster", "status", check=True).stdout)

    put_vip(c, VipRecord(redirector_id="r1", vip="10.0.0.100", port=3260, epoch=7, interface="eth0",
                         since=1_800_000_000.0))
    _, body = c.api("GET", "/cluster")
    assert body["vip"] == {"portal": "10.0.0.100:3260", "holder": "r1", "epoch": 7,
                           "since": 1_800_000_000.0, "interface": "eth0"}
    assert c.cli_json("cluster", "status")["vip"]["holder"] == "r1"
    text = c.cli("cluster", "status", check=True).stdout
    assert re.search(r"iSCSI VIP\s+10\.0\.0\.100:3260 held by r1 \(epoch 7, since \d{4}-", text)

    put_vip(c, VipRecord(redirector_id="r2", vip="fd00::64", port=3260, epoch=8))
    assert c.api("GET", "/cluster")[1]["vip"]["portal"] == "[fd00::64]:3260"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_cluster_status_follows_a_real_redirector(meta_cluster: Cluster):
    c = meta_cluster
    c.start_redirector()
    vip, port = c.vips[0]
    got = wait_for(lambda: c.api("GET", "/cluster")[1]["vip"], 20, "the VIP in cluster status")
    assert got["portal"] == f"{vip}:{port}" and got["holder"] == "redirector0" and got["epoch"] >= 1
    c.redirectors[0].stop()          # gives the VIP back: the record goes with the revoked lease
    wait_for(lambda: c.api("GET", "/cluster")[1]["vip"] is None, 10, "no VIP holder")


def test_cluster_status_text_renders_the_vip():
    base = {"name": "z", "cluster_id": "id", "leader": None, "metas": []}
    assert re.search(r"iSCSI VIP\s+not held", output.cluster_status({**base, "vip": None}))
    text = output.cluster_status({**base, "vip": {"portal": "127.0.0.2:3260", "holder": "host:3260",
                                                  "epoch": 2, "since": 0}})
    assert re.search(r"iSCSI VIP\s+127\.0\.0\.2:3260 held by host:3260 \(epoch 2, since -\)", text)
