"""A volume name never stands for another volume's id: new names of 32 hex digits (or
iqn./eui./naa.) are refused, a name given before that which equals another volume's id is
ambiguous (refused, not resolved to either), and a delete answers the name and id it deleted."""

from __future__ import annotations

import pytest

from meta import volumes
from tests.cluster import Cluster
from tests.meta.helpers import make_ctx, register_chunk
from zstore import naming
from zstore.errors import Conflict, InvalidArgument, NotFound


@pytest.fixture
async def ctx(etcd_client, etcd_config):
    c = make_ctx(etcd_client, etcd_config)
    for i, zone in enumerate("abc"):
        await register_chunk(c, f"c{i}", labels={"zone": zone})
    return c


async def test_an_id_or_iscsi_name_is_refused_as_a_new_volume_name(ctx):
    vola, _ = await volumes.create_volume(ctx, "vola", "1Gi", 1)
    for bad in (vola.volume_id, vola.volume_id.upper(), "iqn.v", "eui.v", "naa.v"):
        with pytest.raises(InvalidArgument):
            await volumes.create_volume(ctx, bad, "1Gi", 1)
    # nothing was created: the id still means vola
    assert (await volumes.find_volume(ctx, vola.volume_id))[0].name == "vola"


async def test_an_old_name_equal_to_another_volumes_id_is_ambiguous(ctx, monkeypatch):
    vola, _ = await volumes.create_volume(ctx, "vola", "1Gi", 1)
    with monkeypatch.context() as m:      # a record from before such names were refused
        m.setattr(naming, "check_name", lambda kind, name: name)
        old, _ = await volumes.create_volume(ctx, vola.volume_id, "1Gi", 1)
        legacy, _ = await volumes.create_volume(ctx, "ab" * 16, "1Gi", 1)
    with pytest.raises(Conflict) as e:
        await volumes.delete_volume(ctx, vola.volume_id)
    assert "ambiguous" in e.value.message and old.volume_id in e.value.message and "vola" in e.value.message
    # both are still there, and each is reachable one unambiguous way
    assert (await volumes.find_volume(ctx, old.volume_id))[0].volume_id == old.volume_id
    assert (await volumes.find_volume(ctx, "vola"))[0].volume_id == vola.volume_id
    # an old 32-hex name that is nobody's id keeps working by name
    assert (await volumes.find_volume(ctx, "ab" * 16))[0].volume_id == legacy.volume_id
    gone = await volumes.delete_volume_record(ctx, old.volume_id)
    assert (gone.volume_id, gone.name) == (old.volume_id, vola.volume_id)
    assert (await volumes.delete_volume_record(ctx, "vola")).name == "vola"
    with pytest.raises(NotFound):
        await volumes.find_volume(ctx, vola.volume_id)


def test_such_names_are_400_over_http(meta_cluster: Cluster):
    c = meta_cluster
    status, body = c.api("POST", "/volumes", {"name": "a1b2c3d4" * 4, "size": "1Gi", "replicas": 1})
    assert status == 400 and "look like an id" in body["error"]["message"]
    status, body = c.api("POST", "/volumes", {"name": "iqn.v1", "size": "1Gi", "replicas": 1})
    assert status == 400 and "iSCSI name" in body["error"]["message"]
