"""CSI snapshots at scale: CreateSnapshot looks its name up, ListSnapshots pages with the meta.

CreateSnapshot fetched every snapshot of the cluster (each one an etcd read of its volume on
the meta) to find one name, so a snapshot schedule on hundreds of PVCs made each create
cost O(all snapshots); ListSnapshots fetched the whole list and paged by offset. The
controller is driven over its gRPC socket, its meta client talking HTTP to real meta
handlers on real etcd.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc as pbg
from csi.meta import Meta
from csi.server import build_server, listen
from meta import volops, volumes
from meta.context import Ctx
from tests.cluster import async_wait_for, cluster
from tests.meta.helpers import make_ctx, register_chunk
from tests.meta.test_snapshot_listing import meta_in_process, snapshots_of
from zstore.cli.client import MetaClient
from zstore.keys import Keys

pytestmark = pytest.mark.filterwarnings("ignore:It is recommended to use web.AppKey")

PORTAL = "127.0.0.2:3260"


@contextlib.asynccontextmanager
async def controller(meta_base: str, token: str, tmp_path: Path):
    server = build_server(Meta(MetaClient([meta_base], token=token, timeout=30.0)), PORTAL, "controller")
    sock = tmp_path / "csi.sock"
    listen(server, f"unix://{sock}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
            yield pbg.ControllerStub(ch)
    finally:
        await server.stop(None)


async def expect(code: grpc.StatusCode, call) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as ei:
        await call
    assert ei.value.code() == code, ei.value.details()
    return ei.value.details()


def snap_req(vid: str, name: str) -> pb.CreateSnapshotRequest:
    return pb.CreateSnapshotRequest(source_volume_id=vid, name=name)


async def test_create_snapshot_reads_do_not_grow_with_other_snapshots(etcd_client, etcd_config, tmp_path):
    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "c0")
    a, _ = await volumes.create_volume(ctx, "a", "1Gi", 1)
    b, _ = await volumes.create_volume(ctx, "b", "1Gi", 1)
    await snapshots_of(ctx, "b", 3, prefix="b")
    async with meta_in_process(etcd_config) as meta:
        async with controller(meta.url.removesuffix("/api/v1"), "t", tmp_path) as ctl:
            async def reads(name: str) -> tuple[str, int]:
                before = meta.kv.ranges
                s = (await ctl.CreateSnapshot(snap_req(a.volume_id, name))).snapshot
                assert s.source_volume_id == a.volume_id and s.ready_to_use
                return s.snapshot_id, meta.kv.ranges - before

            _, few = await reads("first")
            await snapshots_of(ctx, "b", 60, prefix="more")          # a schedule on another PVC
            sid, many = await reads("second")
            again, retried = await reads("second")                   # idempotent: the same one
            assert again == sid
            assert many == few and retried <= few, (few, many, retried)
            await expect(grpc.StatusCode.ALREADY_EXISTS, ctl.CreateSnapshot(snap_req(a.volume_id, "b000")))


@pytest.mark.slow
async def test_list_snapshots_pages_and_create_keeps_names_global(tmp_path, etcd_server, etcd_client):
    with cluster(tmp_path, etcd_server, metas=1) as c:
        ctx = Ctx(etcd=etcd_client, keys=Keys(c.prefix))
        await register_chunk(ctx, "c0")
        await async_wait_for(lambda: c.api("GET", "/meta/leader")[0] == 200, 20, "a leader")
        v, _ = await volumes.create_volume(ctx, "v", "1Gi", 1)
        w, _ = await volumes.create_volume(ctx, "w", "1Gi", 1)
        of_v = await snapshots_of(ctx, "v", 7, prefix="v")
        of_w = await snapshots_of(ctx, "w", 2, prefix="w")
        async with controller(f"http://127.0.0.1:{c.meta_ports[0]}", c.token, tmp_path) as ctl:
            async def pages(**kw) -> tuple[list[str], str]:
                """Every snapshot over the pages, and the first page's token."""
                ids, token, first = [], "", None
                while True:
                    r = await ctl.ListSnapshots(pb.ListSnapshotsRequest(max_entries=3, starting_token=token, **kw))
                    assert len(r.entries) <= 3
                    ids += [e.snapshot.snapshot_id for e in r.entries]
                    first = r.next_token if first is None else first
                    token = r.next_token
                    if not token:
                        return ids, first

            ids, all_token = await pages()
            assert sorted(ids) == sorted(of_v + of_w) and len(ids) == len(set(ids)) == 9
            ids, v_token = await pages(source_volume_id=v.volume_id)
            assert sorted(ids) == sorted(of_v) and len(ids) == 7
            assert all_token and v_token

            # A token we did not hand out, or one of another listing: ABORTED (CSI spec).
            for bad in (pb.ListSnapshotsRequest(starting_token="x"),
                        pb.ListSnapshotsRequest(starting_token=v_token),
                        pb.ListSnapshotsRequest(source_volume_id=v.volume_id, starting_token=all_token),
                        pb.ListSnapshotsRequest(source_volume_id=w.volume_id, starting_token=v_token),
                        pb.ListSnapshotsRequest(snapshot_id=of_v[0], starting_token="x")):
                await expect(grpc.StatusCode.ABORTED, ctl.ListSnapshots(bad))
            for nothing in (pb.ListSnapshotsRequest(source_volume_id=uuid.uuid4().hex),
                            pb.ListSnapshotsRequest(source_volume_id="no-such-volume"),
                            pb.ListSnapshotsRequest(snapshot_id=of_v[0], source_volume_id=w.volume_id),
                            pb.ListSnapshotsRequest(snapshot_id=uuid.uuid4().hex)):
                assert list((await ctl.ListSnapshots(nothing)).entries) == []
            one = await ctl.ListSnapshots(pb.ListSnapshotsRequest(snapshot_id=of_v[0]))
            assert [e.snapshot.snapshot_id for e in one.entries] == [of_v[0]]
            # the meta resolves "volume@name" too; as a CSI snapshot id it names no snapshot
            by_name = pb.ListSnapshotsRequest(snapshot_id=f"{v.volume_id}@v000")
            assert list((await ctl.ListSnapshots(by_name)).entries) == []

            # Same name, same source: the snapshot; another source: ALREADY_EXISTS.
            s = (await ctl.CreateSnapshot(snap_req(v.volume_id, "csi-1"))).snapshot
            assert (await ctl.CreateSnapshot(snap_req(v.volume_id, "csi-1"))).snapshot.snapshot_id == s.snapshot_id
            await expect(grpc.StatusCode.ALREADY_EXISTS, ctl.CreateSnapshot(snap_req(w.volume_id, "csi-1")))
            # A CLI snapshot (per-volume name, no cross-volume key) holds no CSI name: the
            # first CSI create of it elsewhere takes it, and from then on the CLI one of
            # that name is refused to CSI rather than answered as a second "cli-1".
            cli_made, _ = await volops.create_snapshot(ctx, "w", "cli-1")
            taken = (await ctl.CreateSnapshot(snap_req(v.volume_id, "cli-1"))).snapshot
            assert taken.snapshot_id != cli_made.snapshot_id
            await expect(grpc.StatusCode.ALREADY_EXISTS, ctl.CreateSnapshot(snap_req(w.volume_id, "cli-1")))
            await asyncio.to_thread(c.api, "DELETE", f"/snapshots/{taken.snapshot_id}")
            again = (await ctl.CreateSnapshot(snap_req(w.volume_id, "cli-1"))).snapshot
            assert again.snapshot_id == cli_made.snapshot_id


async def test_a_create_snapshot_retried_after_its_source_was_deleted_answers_the_snapshot(
        etcd_client, etcd_config, tmp_path):
    """CSI: a snapshot of that name "successfully cut and ready to use" MUST be answered OK.
    A retry after a lost answer, its source volume deleted meanwhile, created again on the
    (gone) volume and answered NOT_FOUND: the snapshotter marked the content failed."""
    ctx = make_ctx(etcd_client, etcd_config)
    await register_chunk(ctx, "c0")
    a, _ = await volumes.create_volume(ctx, "a", "1Gi", 1)
    async with meta_in_process(etcd_config) as meta:
        async with controller(meta.url.removesuffix("/api/v1"), "t", tmp_path) as ctl:
            first = (await ctl.CreateSnapshot(snap_req(a.volume_id, "kept"))).snapshot
            await volumes.delete_volume(ctx, "a")          # its snapshot stays (a tombstone)
            again = (await ctl.CreateSnapshot(snap_req(a.volume_id, "kept"))).snapshot
            assert again.snapshot_id == first.snapshot_id and again.ready_to_use
