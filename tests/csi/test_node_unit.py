"""The Node service without a kernel: argument validation, error codes, and iscsiadm/mountinfo
parsing: ``-m session -P 3`` recorded in the lab VM (open-iscsi 2.1.8, Debian bookworm), the
``-m session`` and discovery lines in the formats seen there.
The lab test tests/lab/test_lab.py::test_csi_node_lifecycle is the real proof."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from csi import csi_pb2 as pb
from csi import csi_pb2_grpc as pbg
from csi.host import Host
from csi.iscsiadm import Iscsiadm, parse_discovery, parse_session_disks, parse_sessions
from csi.mounts import mount_at, parse_mountinfo
from csi.node import Node, initiator_iqn
from csi.server import build_server, listen

SESSION = """tcp: [1] 192.168.77.1:3260,1 iqn.2026-01.io.zstore:1d24d4f9.t0000 (non-flash)
tcp: [3] 192.168.77.1:3261,1 iqn.2026-01.io.zstore:99515c1d.t0000 (non-flash)
"""
# recorded in the lab VM (tests/lab/test_lab.py::test_csi_node_lifecycle, before scan=manual):
# three volumes are LUNs 1-3 of one target, and a login attached all three
SESSION_P3 = """iSCSI Transport Class version 2.0-870
version 2.1.8
Target: iqn.2026-01.io.zstore:53b85932.t0000 (non-flash)
	Current Portal: 192.168.77.1:3261,1
	Persistent Portal: 192.168.77.1:3260,1
		**********
		Interface:
		**********
		Iface Name: default
		Iface Transport: tcp
		Iface Initiatorname: iqn.2026-01.io.zstore.lab:guest
		Iface IPaddress: 192.168.77.2
		Iface HWaddress: default
		Iface Netdev: default
		SID: 1
		iSCSI Connection State: LOGGED IN
		iSCSI Session State: LOGGED_IN
		Internal iscsid Session State: NO CHANGE
		*********
		Timeouts:
		*********
		Recovery Timeout: 120
		Target Reset Timeout: 30
		LUN Reset Timeout: 30
		Abort Timeout: 15
		*****
		CHAP:
		*****
		username: <empty>
		password: ********
		username_in: <empty>
		password_in: ********
		************************
		Negotiated iSCSI params:
		************************
		HeaderDigest: None
		DataDigest: None
		MaxRecvDataSegmentLength: 262144
		MaxXmitDataSegmentLength: 262144
		FirstBurstLength: 65536
		MaxBurstLength: 1048576
		ImmediateData: Yes
		InitialR2T: No
		MaxOutstandingR2T: 1
		************************
		Attached SCSI devices:
		************************
		Host Number: 0	State: running
		scsi0 Channel 00 Id 0 Lun: 1
			Attached scsi disk sda		State: running
		scsi0 Channel 00 Id 0 Lun: 2
			Attached scsi disk sdb		State: running
		scsi0 Channel 00 Id 0 Lun: 3
			Attached scsi disk sdc		State: running
"""
DISCOVERY = """192.168.77.1:3260,1 iqn.2026-01.io.zstore:1d24d4f9.t0000
192.168.77.1:3260,1 iqn.2026-01.io.zstore:99515c1d.t0000
"""
MOUNTINFO = r"""22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 8:0 / /var/lib/kubelet/plugins/staging\040dir rw,relatime shared:20 - ext4 /dev/sda rw
41 22 8:0 / /var/lib/kubelet/pods/p1/volumes/mount rw,relatime shared:20 - ext4 /dev/sda rw
42 22 0:5 /sdb /var/lib/kubelet/pods/p2/dev/blk rw,nosuid - devtmpfs udev rw,size=1000k
"""


def test_parse_sessions():
    s = parse_sessions(SESSION)
    assert [(x.sid, x.portal, x.tpgt, x.target) for x in s] == [
        (1, "192.168.77.1:3260", 1, "iqn.2026-01.io.zstore:1d24d4f9.t0000"),
        (3, "192.168.77.1:3261", 1, "iqn.2026-01.io.zstore:99515c1d.t0000")]
    assert parse_sessions("iscsiadm: No active sessions.\n") == []


def test_parse_session_disks():
    assert parse_session_disks(SESSION_P3) == {1: ["sda", "sdb", "sdc"]}


def test_parse_discovery():
    assert parse_discovery(DISCOVERY) == [("192.168.77.1:3260", "iqn.2026-01.io.zstore:1d24d4f9.t0000"),
                                          ("192.168.77.1:3260", "iqn.2026-01.io.zstore:99515c1d.t0000")]


def test_parse_mountinfo():
    table = parse_mountinfo(MOUNTINFO)
    m = mount_at("/var/lib/kubelet/plugins/staging dir/", table)
    assert m is not None and m.source == "/dev/sda" and m.fstype == "ext4"
    assert mount_at("/var/lib/kubelet/pods/p2/dev/blk", table).root == "/sdb"
    assert mount_at("/nowhere", table) is None


def test_initiator_iqn(tmp_path: Path):
    f = tmp_path / "initiatorname.iscsi"
    f.write_text("## DO NOT EDIT\nInitiatorName=iqn.1993-08.org.debian:01:abc\n")
    assert initiator_iqn(f) == "iqn.1993-08.org.debian:01:abc"


class FakeHost(Host):
    """Answers iscsiadm from canned outputs and records every command."""

    def __init__(self, answers: dict[tuple[str, ...], tuple[int, str]]):
        super().__init__()
        self.answers = answers
        self.calls: list[list[str]] = []

    async def run(self, argv, ok=(0,), input=None, secret=()):
        self.calls.append(list(argv))
        rc, out = self.answers.get(tuple(argv), (0, ""))
        if rc not in ok:
            from csi.host import HostError
            raise HostError(f"{argv}: exit {rc}", rc)
        return rc, out, ""


def fake_sysfs(tmp_path: Path, sid: int, host: str) -> Path:
    """/sys/class/iscsi_session/sessionN/device -> .../hostH/sessionN, and hostH's scan file."""
    sys = tmp_path / "sys"
    dev = sys / "devices" / "platform" / host / f"session{sid}"
    dev.mkdir(parents=True)
    (sys / "class" / "iscsi_session" / f"session{sid}").mkdir(parents=True)
    (sys / "class" / "iscsi_session" / f"session{sid}" / "device").symlink_to(dev)
    (sys / "class" / "scsi_host" / host).mkdir(parents=True)
    (sys / "class" / "scsi_host" / host / "scan").write_text("")
    return sys


async def test_attach_scans_our_lun_on_an_existing_session_instead_of_logging_in(tmp_path: Path):
    host = FakeHost({("iscsiadm", "-m", "session"): (0, SESSION)})
    sys = fake_sysfs(tmp_path, 3, "host2")
    s = await Iscsiadm(host, sys).attach("iqn.2026-01.io.zstore:99515c1d.t0000", "192.168.77.1:3260", "7")
    assert s.sid == 3
    assert (sys / "class" / "scsi_host" / "host2" / "scan").read_text() == "- - 7"
    assert not any("--login" in c or "--rescan" in c for c in host.calls)


async def test_attach_logs_in_with_manual_scan_when_there_is_no_session(tmp_path: Path):
    state = {"n": 0}

    class H(FakeHost):
        async def run(self, argv, ok=(0,), input=None, secret=()):
            if argv[:3] == ["iscsiadm", "-m", "session"] and len(argv) == 3:
                self.calls.append(list(argv))
                state["n"] += 1
                return (21, "", "") if state["n"] == 1 else (0, SESSION, "")
            return await super().run(argv, ok, input, secret)

    target, vip = "iqn.2026-01.io.zstore:1d24d4f9.t0000", "192.168.77.1:3260"
    host = H({("iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", vip, "--discover"): (0, DISCOVERY),
              ("iscsiadm", "-m", "node", "-T", target, "-p", vip, "--login"): (15, "")})  # 15: session exists
    sys = fake_sysfs(tmp_path, 1, "host0")
    s = await Iscsiadm(host, sys).attach(target, vip, 1)
    assert s.sid == 1
    scan = ["iscsiadm", "-m", "node", "-T", target, "-p", vip, "-o", "update", "-n", "node.session.scan", "-v", "manual"]
    assert host.calls.index(scan) < host.calls.index(["iscsiadm", "-m", "node", "-T", target, "-p", vip, "--login"])
    assert (sys / "class" / "scsi_host" / "host0" / "scan").read_text() == "- - 1"


# ---- the service over a unix socket: validation and error codes ----
@pytest.fixture
async def stub(tmp_path: Path):
    node = Node("iqn.2026-01.io.example:node-a", FakeHost({("iscsiadm", "-m", "session"): (21, "")}),
                state_dir=str(tmp_path / "state"), device_timeout=0.5)
    server = build_server(None, "", "node", node)
    sock = tmp_path / "csi.sock"
    listen(server, f"unix://{sock}")
    await server.start()
    async with grpc.aio.insecure_channel(f"unix:{sock}") as ch:
        yield pbg.NodeStub(ch), pbg.IdentityStub(ch), tmp_path
    await server.stop(None)


def cap(block: bool = False, fs: str = "ext4") -> pb.VolumeCapability:
    c = pb.VolumeCapability(access_mode=pb.VolumeCapability.AccessMode(
        mode=pb.VolumeCapability.AccessMode.SINGLE_NODE_WRITER))
    if block:
        c.block.SetInParent()
    else:
        c.mount.fs_type = fs
    return c


CTX = {"targetIQN": "iqn.2026-01.io.zstore:1d24d4f9.t0000", "lun": "1",
       "wwn": "6001405" + "0" * 25, "portal": "192.168.77.1:3260"}


async def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await call
    return e.value.code()


async def test_info_and_capabilities(stub):
    node, ident, _ = stub
    assert (await node.NodeGetInfo(pb.NodeGetInfoRequest())).node_id == "iqn.2026-01.io.example:node-a"
    caps = {c.rpc.type for c in (await node.NodeGetCapabilities(pb.NodeGetCapabilitiesRequest())).capabilities}
    R = pb.NodeServiceCapability.RPC
    assert caps == {R.STAGE_UNSTAGE_VOLUME, R.EXPAND_VOLUME, R.GET_VOLUME_STATS}
    assert (await ident.Probe(pb.ProbeRequest())).ready.value
    plugin = await ident.GetPluginCapabilities(pb.GetPluginCapabilitiesRequest())
    assert not any(c.HasField("service") for c in plugin.capabilities)


async def test_stage_argument_errors(stub):
    node, _, tmp = stub
    st = str(tmp / "staging")
    INVALID = grpc.StatusCode.INVALID_ARGUMENT
    R = pb.NodeStageVolumeRequest
    assert await code_of(node.NodeStageVolume(R(staging_target_path=st, volume_capability=cap(),
                                                publish_context=CTX))) == INVALID
    assert await code_of(node.NodeStageVolume(R(volume_id="v1", volume_capability=cap(),
                                                publish_context=CTX))) == INVALID
    assert await code_of(node.NodeStageVolume(R(volume_id="v1", staging_target_path="rel",
                                                volume_capability=cap(), publish_context=CTX))) == INVALID
    assert await code_of(node.NodeStageVolume(R(volume_id="v1", staging_target_path=st,
                                                publish_context=CTX))) == INVALID
    assert await code_of(node.NodeStageVolume(R(volume_id="v1", staging_target_path=st,
                                                volume_capability=cap(fs="btrfs"), publish_context=CTX))) == INVALID
    no_mode = pb.VolumeCapability()
    no_mode.mount.SetInParent()
    assert await code_of(node.NodeStageVolume(R(volume_id="v1", staging_target_path=st,
                                                volume_capability=no_mode, publish_context=CTX))) == INVALID
    assert await code_of(node.NodeStageVolume(R(volume_id="v1", staging_target_path=st, volume_capability=cap(),
                                                publish_context={**CTX, "wwn": ""}))) == INVALID
    assert await code_of(node.NodeStageVolume(R(volume_id="v1", staging_target_path=st, volume_capability=cap(),
                                                publish_context={**CTX, "lun": "x"}))) == INVALID


async def test_stage_unavailable_when_the_target_is_not_advertised(stub):
    node, _, tmp = stub
    code = await code_of(node.NodeStageVolume(pb.NodeStageVolumeRequest(
        volume_id="v1", staging_target_path=str(tmp / "st"), volume_capability=cap(), publish_context=CTX)))
    assert code == grpc.StatusCode.UNAVAILABLE


async def test_device_that_never_appears_is_not_found(tmp_path: Path):
    host = FakeHost({("iscsiadm", "-m", "session"): (0, SESSION)})
    node = Node("n", host, state_dir=str(tmp_path), device_timeout=0.3)
    node.iscsi = Iscsiadm(host, fake_sysfs(tmp_path, 1, "host0"))

    class Ctx:
        async def abort(self, code, msg):
            raise RuntimeError(code)

    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(pb.NodeStageVolumeRequest(
            volume_id="v1", staging_target_path=str(tmp_path / "st"), volume_capability=cap(),
            publish_context=CTX), Ctx())
    assert e.value.args[0] == grpc.StatusCode.NOT_FOUND
    # A final error: the CO will not unstage, so the stage undid itself (no disk of the
    # target left: logged out, node record gone, no state file).
    assert ["iscsiadm", "-m", "session", "-r", "1", "--logout"] in host.calls
    assert not list(tmp_path.glob("*.json"))


async def test_unstage_unpublish_are_idempotent_on_nothing(stub):
    node, _, tmp = stub
    await node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(volume_id="v1", staging_target_path=str(tmp / "st")))
    await node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="v1", target_path=str(tmp / "t")))
    assert await code_of(node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="v1"))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert await code_of(node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(staging_target_path="/x"))) == \
        grpc.StatusCode.INVALID_ARGUMENT


async def test_publish_before_stage_is_failed_precondition(stub):
    node, _, tmp = stub
    code = await code_of(node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id="v1", staging_target_path=str(tmp / "st"), target_path=str(tmp / "t"), volume_capability=cap())))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert await code_of(node.NodePublishVolume(pb.NodePublishVolumeRequest(
        volume_id="v1", staging_target_path=str(tmp / "st"), volume_capability=cap()))) == \
        grpc.StatusCode.INVALID_ARGUMENT


async def test_stats_and_expand_errors(stub):
    node, _, tmp = stub
    assert await code_of(node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(
        volume_id="v1", volume_path=str(tmp / "nope")))) == grpc.StatusCode.NOT_FOUND
    assert await code_of(node.NodeGetVolumeStats(pb.NodeGetVolumeStatsRequest(volume_id="v1"))) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert await code_of(node.NodeExpandVolume(pb.NodeExpandVolumeRequest(
        volume_id="v1", volume_path=str(tmp / "t")))) == grpc.StatusCode.NOT_FOUND


def test_node_wire_numbers():
    """Spot checks of the Node messages against the CSI spec's field numbers and enum values."""
    def num(msg, field: str) -> int:
        return msg.DESCRIPTOR.fields_by_name[field].number
    assert [num(pb.NodePublishVolumeRequest, f) for f in
            ("volume_id", "publish_context", "staging_target_path", "target_path", "volume_capability",
             "readonly", "secrets", "volume_context")] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [num(pb.NodeStageVolumeRequest, f) for f in
            ("volume_id", "publish_context", "staging_target_path", "volume_capability", "secrets",
             "volume_context")] == [1, 2, 3, 4, 5, 6]
    assert num(pb.NodeExpandVolumeRequest, "staging_target_path") == 4
    assert num(pb.NodeGetVolumeStatsRequest, "staging_target_path") == 3
    assert num(pb.NodeGetInfoResponse, "accessible_topology") == 3
    assert num(pb.VolumeUsage, "unit") == 4
    R = pb.NodeServiceCapability.RPC
    assert (R.STAGE_UNSTAGE_VOLUME, R.GET_VOLUME_STATS, R.EXPAND_VOLUME, R.VOLUME_MOUNT_GROUP) == (1, 2, 3, 6)
    assert pb.DESCRIPTOR.services_by_name["Node"].full_name == "csi.v1.Node"


# ---- CHAP from the request's secrets ----
TARGET, VIP = "iqn.2026-01.io.zstore:1d24d4f9.t0000", "192.168.77.1:3260"
PW, PW_IN, DPW = "chap-password-1", "mutual-password-2", "discovery-pass-3"
SECRETS = {"node.session.auth.username": "guest", "node.session.auth.password": PW,
           "node.session.auth.username_in": "target", "node.session.auth.password_in": PW_IN}


class LoginHost(FakeHost):
    """No session until a login succeeds (login answers from ``answers`` as usual)."""

    def __init__(self, answers):
        super().__init__(answers)
        self.logged_in = False

    async def run(self, argv, ok=(0,), input=None, secret=()):
        if list(argv) == ["iscsiadm", "-m", "session"]:
            self.calls.append(list(argv))
            return (0, SESSION, "") if self.logged_in else (21, "", "")
        rc, out, err = await super().run(argv, ok, input, secret)
        if "--login" in argv:
            self.logged_in = True
        return rc, out, err


def node_cmd(*rest: str) -> list[str]:
    return ["iscsiadm", "-m", "node", "-T", TARGET, "-p", VIP, *rest]


async def test_chap_is_written_to_the_node_record_before_login(tmp_path: Path):
    from csi.chap import from_secrets
    chap, disc = from_secrets({**SECRETS, "discovery.sendtargets.auth.username": "disc",
                               "discovery.sendtargets.auth.password": DPW})
    db = ["iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", VIP]
    host = LoginHost({(*db, "--discover"): (0, DISCOVERY)})
    await Iscsiadm(host, fake_sysfs(tmp_path, 1, "host0")).attach(TARGET, VIP, 1, chap, disc)
    c = host.calls
    upd = node_cmd("-o", "update", "-n")
    for name, value in [("node.session.scan", "manual"), ("node.session.auth.authmethod", "CHAP"),
                        ("node.session.auth.username", "guest"), ("node.session.auth.password", PW),
                        ("node.session.auth.username_in", "target"), ("node.session.auth.password_in", PW_IN)]:
        assert c.index([*upd, name, "-v", value]) < c.index(node_cmd("--login"))
    for name, value in [("discovery.sendtargets.auth.authmethod", "CHAP"),
                        ("discovery.sendtargets.auth.username", "disc"),
                        ("discovery.sendtargets.auth.password", DPW)]:
        assert c.index([*db, "-o", "new"]) < c.index([*db, "-o", "update", "-n", name, "-v", value]) \
            < c.index([*db, "--discover"])


async def test_no_secrets_clear_chap_on_a_reused_record(tmp_path: Path):
    host = LoginHost({("iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", VIP, "--discover"): (0, DISCOVERY)})
    await Iscsiadm(host, fake_sysfs(tmp_path, 1, "host0")).attach(TARGET, VIP, 1)
    assert node_cmd("-o", "update", "-n", "node.session.auth.authmethod", "-v", "None") in host.calls
    assert ["iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", VIP, "-o", "update", "-n",
            "discovery.sendtargets.auth.authmethod", "-v", "None"] in host.calls


async def test_refused_chap_login_deletes_the_node_record(tmp_path: Path):
    from csi.chap import from_secrets
    from csi.iscsiadm import AuthFailed
    host = LoginHost({("iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", VIP, "--discover"): (0, DISCOVERY),
                      tuple(node_cmd("--login")): (24, "")})
    with pytest.raises(AuthFailed):
        await Iscsiadm(host, fake_sysfs(tmp_path, 1, "host0")).attach(TARGET, VIP, 1, from_secrets(SECRETS)[0])
    assert host.calls[-1] == node_cmd("-o", "delete")


async def test_mutual_chap_fatal_login_is_an_auth_failure_one_way_is_not(tmp_path: Path):
    """exit 19 (non-retryable) is what the initiator's rejection of the target's mutual answer
    gives; without mutual CHAP it stays a plain login failure (UNAVAILABLE upstream)."""
    from csi.chap import Chap
    from csi.host import HostError
    from csi.iscsiadm import AuthFailed
    answers = {("iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", VIP, "--discover"): (0, DISCOVERY),
               tuple(node_cmd("--login")): (19, "")}
    with pytest.raises(AuthFailed, match="password_in"):
        await Iscsiadm(LoginHost(answers), fake_sysfs(tmp_path / "a", 1, "host0")).attach(
            TARGET, VIP, 1, Chap("guest", PW, "target", PW_IN))
    with pytest.raises(HostError) as e:
        await Iscsiadm(LoginHost(answers), fake_sysfs(tmp_path / "b", 1, "host0")).attach(
            TARGET, VIP, 1, Chap("guest", PW))
    assert not isinstance(e.value, AuthFailed) and e.value.rc == 19


async def test_stage_with_refused_chap_is_unauthenticated_and_leaves_nothing(tmp_path: Path, caplog):
    import logging
    caplog.set_level(logging.DEBUG)
    host = LoginHost({("iscsiadm", "-m", "discoverydb", "-t", "sendtargets", "-p", VIP, "--discover"): (0, DISCOVERY),
                      tuple(node_cmd("--login")): (24, "")})
    node = Node("n", host, state_dir=str(tmp_path / "state"), device_timeout=0.3)
    server = build_server(None, "", "node", node)
    listen(server, f"unix://{tmp_path / 's'}")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"unix:{tmp_path / 's'}") as ch:
            stub = pbg.NodeStub(ch)
            req = pb.NodeStageVolumeRequest(volume_id="v1", staging_target_path=str(tmp_path / "st"),
                                            volume_capability=cap(), publish_context=CTX, secrets=SECRETS)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.NodeStageVolume(req)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "node-stage secret" in e.value.details() and PW not in e.value.details()
            assert e.value.details().startswith(f"iSCSI login to {TARGET} at {VIP} refused (CHAP")
            partial = pb.NodeStageVolumeRequest()
            partial.CopyFrom(req)
            del partial.secrets["node.session.auth.password"]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.NodeStageVolume(partial)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "node.session.auth.password" in e.value.details()
    finally:
        await server.stop(None)
    assert not list((tmp_path / "state").glob("*")), "a failed stage left its state file"
    assert node_cmd("-o", "delete") in host.calls and not any("--logout" in c for c in host.calls)
    assert not any(PW in r.getMessage() or PW_IN in r.getMessage() for r in caplog.records)
    assert any("NodeStageVolume UNAUTHENTICATED" in r.getMessage() for r in caplog.records)


# ---- readonly raw block: the disk's own ro flag follows its publishes ----
@pytest.mark.parametrize("pubs, ro_now, want", [
    (["ro"], "0", ["blockdev", "--setro", "/dev/sdb"]),          # the only publish is readonly
    (["ro", "rw"], "0", None),                                   # a writer is still there
    (["ro", "rw"], "1", ["blockdev", "--setrw", "/dev/sdb"]),    # ...so a ro disk is made rw
    ([], "1", ["blockdev", "--setrw", "/dev/sdb"]),              # the last publish went away
    (["ro", "ro"], "1", None),                                   # already right: nothing to run
    ([], "0", None),
])
async def test_raw_disk_ro_flag_follows_the_publishes(tmp_path: Path, pubs, ro_now, want):
    sys = tmp_path / "sys"
    (sys / "block" / "sdb").mkdir(parents=True)
    (sys / "block" / "sdb" / "ro").write_text(ro_now + "\n")
    lines = ["22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw",
             # a filesystem publish of another disk, and a bind of sdb's partition: not ours
             "40 22 8:0 / /var/lib/kubelet/pods/p0/volumes/mount ro,relatime - ext4 /dev/sda rw",
             "41 22 0:5 /sdb1 /var/lib/kubelet/pods/p0/dev/part ro,nosuid - devtmpfs udev rw"]
    for i, opt in enumerate(pubs):
        lines.append(f"{50 + i} 22 0:5 /sdb /var/lib/kubelet/pods/p{i}/dev/blk {opt},nosuid - devtmpfs udev rw")
    (tmp_path / "mountinfo").write_text("\n".join(lines) + "\n")
    host = FakeHost({})
    node = Node("n", host, state_dir=str(tmp_path / "state"), sysfs=sys, mountinfo=tmp_path / "mountinfo")
    await node._sync_ro("sdb")
    assert host.calls == ([want] if want else [])
    await node._sync_ro("sdz")          # a disk that is gone: nothing to do
    assert host.calls == ([want] if want else [])


@pytest.mark.parametrize("block", [False, True])
async def test_a_readonly_publish_cut_short_after_the_bind_is_finished_on_retry(tmp_path: Path, monkeypatch,
                                                                                 block):
    """The bind is there but still rw (the plugin died, or the call was cancelled, before the
    ro remount): the retry remounts it ro instead of answering success for a writable mount."""
    target = tmp_path / "pods" / "p0" / "vol"
    # the volume is staged: its disk (sdb) behind the wwn link, its filesystem at st
    line = (f"60 22 0:5 /sdb {target} rw,nosuid - devtmpfs udev rw" if block
            else f"50 22 8:16 / {tmp_path / 'st'} rw,relatime - ext4 /dev/sdb rw\n"
                 f"60 22 8:16 / {target} rw,relatime - ext4 /dev/sdb rw")
    (tmp_path / "mountinfo").write_text("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n" + line + "\n")
    (tmp_path / "sdb").write_bytes(b"")
    (tmp_path / "by-id").mkdir()
    (tmp_path / "by-id" / f"wwn-0x{CTX['wwn']}").symlink_to(tmp_path / "sdb")
    monkeypatch.setattr("csi.node.by_id", lambda wwn: tmp_path / "by-id" / f"wwn-0x{wwn}")
    host = FakeHost({})
    node = Node("n", host, state_dir=str(tmp_path / "state"), sysfs=tmp_path / "sys",
                mountinfo=tmp_path / "mountinfo")
    node._save("v1", {"target": CTX["targetIQN"], "lun": CTX["lun"], "wwn": CTX["wwn"], "portal": CTX["portal"],
                      "kind": "block" if block else "ext4"})
    req = pb.NodePublishVolumeRequest(volume_id="v1", staging_target_path=str(tmp_path / "st"),
                                      target_path=str(target), volume_capability=cap(block=block),
                                      readonly=True)
    await node.NodePublishVolume(req, None)
    assert host.calls == [["mount", "-o", "remount,bind,ro", str(target)]]
    host.calls.clear()
    req.readonly = False                 # a rw publish already there: nothing to do
    await node.NodePublishVolume(req, None)
    assert host.calls == []


async def test_only_a_provably_blank_device_counts_as_blank(tmp_path: Path):
    """NodeStage formats what probe_device calls blank. Real blkid on real files: a filesystem
    is named; a partition table without a filesystem on the whole disk (blkid exits 0 with
    no TYPE) is refused; zeros are blank; a device that does not read is not blank."""
    import subprocess
    from csi.node import probe_device
    from csi.status import Abort
    host = Host("")
    fs = tmp_path / "fs.img"
    fs.write_bytes(bytes(8 << 20))
    subprocess.run(["mkfs.ext4", "-F", "-q", str(fs)], check=True)
    assert await probe_device(host, str(fs)) == "ext4"
    pt = bytearray(8 << 20)                              # an MBR: one Linux partition at 1 MiB
    pt[446:462] = bytes([0, 0, 0, 0, 0x83, 0, 0, 0]) + (2048).to_bytes(4, "little") + (4096).to_bytes(4, "little")
    pt[510:512] = b"\x55\xaa"
    (tmp_path / "pt.img").write_bytes(bytes(pt))
    with pytest.raises(Abort) as e:
        await probe_device(host, str(tmp_path / "pt.img"))
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "partition table" in e.value.message
    (tmp_path / "zero.img").write_bytes(bytes(8 << 20))
    assert await probe_device(host, str(tmp_path / "zero.img")) == ""
    with pytest.raises(Abort) as e:
        await probe_device(host, str(tmp_path / "gone"))
    assert e.value.code == grpc.StatusCode.UNAVAILABLE


class AbortCtx:
    """The servicer context as guard uses it: abort raises (code, message)."""

    async def abort(self, code, msg):
        raise RuntimeError(code, msg)


def _staged_node(tmp_path: Path, monkeypatch, answers: dict, mountinfo: str = "") -> tuple[Node, FakeHost, str]:
    """A node whose volume's disk is a file behind a by-id link in tmp_path."""
    import csi.node as node_mod
    dev = tmp_path / "sdq"
    dev.write_bytes(bytes(1 << 20))
    link = tmp_path / "by-id" / f"wwn-0x{CTX['wwn']}"
    link.parent.mkdir()
    link.symlink_to(dev)
    monkeypatch.setattr(node_mod, "by_id", lambda wwn: tmp_path / "by-id" / f"wwn-0x{wwn}")
    (tmp_path / "mountinfo").write_text("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n" + mountinfo)
    host = FakeHost({("iscsiadm", "-m", "session"): (0, SESSION), **answers})
    node = Node("n", host, state_dir=str(tmp_path / "state"), device_timeout=0.3,
                mountinfo=tmp_path / "mountinfo", sysfs=tmp_path / "sys")
    node.iscsi = Iscsiadm(host, fake_sysfs(tmp_path, 1, "host0"))
    return node, host, str(dev)


async def test_a_stage_whose_mount_fails_logs_out_and_leaves_nothing(tmp_path: Path, monkeypatch):
    """mkfs done, mount refused (bad mount_flags, say): INTERNAL is final, so no NodeUnstage
    would come; the session, the disk and the state must not stay behind."""
    st = tmp_path / "st"
    node, host, dev = _staged_node(tmp_path, monkeypatch, {})
    host.answers[("blkid", "-p", "-o", "export", dev)] = (0, "DEVNAME=x\nTYPE=ext4\n")
    host.answers[("mount", "-t", "ext4", "-o", "bogus", dev, str(st))] = (32, "")
    req = pb.NodeStageVolumeRequest(volume_id="v1", staging_target_path=str(st), volume_capability=cap(),
                                    publish_context=CTX)
    req.volume_capability.mount.mount_flags.append("bogus")
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(req, AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.INTERNAL
    assert ["blockdev", "--flushbufs", dev] in host.calls
    assert ["iscsiadm", "-m", "session", "-r", "1", "--logout"] in host.calls
    assert not list((tmp_path / "state").glob("*"))


async def test_unstage_refuses_while_a_publish_still_uses_the_disk(tmp_path: Path, monkeypatch):
    """NodeUnstage before NodeUnpublish (a kubelet restart's cleanup order): the bind at the
    publish path keeps the filesystem alive after the staging path is unmounted, and deleting
    the disk under it loses its dirty data. FAILED_PRECONDITION until it is unpublished."""
    pub = tmp_path / "pods" / "p0" / "vol"
    node, host, dev = _staged_node(tmp_path, monkeypatch, {},
                                   mountinfo=f"61 22 8:16 / {pub} rw,relatime - ext4 {tmp_path / 'sdq'} rw\n")
    node._save("v1", {**{k: CTX[k] for k in ("wwn", "portal", "lun")}, "target": CTX["targetIQN"],
                      "kind": "ext4"})
    with pytest.raises(RuntimeError) as e:
        await node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
            volume_id="v1", staging_target_path=str(tmp_path / "st")), AbortCtx())
    assert e.value.args == (grpc.StatusCode.FAILED_PRECONDITION, f"{tmp_path / 'sdq'} is still mounted at {pub}: unpublish it first")
    assert not any("--logout" in c for c in host.calls) and ["blockdev", "--flushbufs", dev] not in host.calls
    (tmp_path / "mountinfo").write_text("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n")
    await node.NodeUnstageVolume(pb.NodeUnstageVolumeRequest(
        volume_id="v1", staging_target_path=str(tmp_path / "st")), AbortCtx())
    assert ["iscsiadm", "-m", "session", "-r", "1", "--logout"] in host.calls



class _Aborted(Exception):
    pass


class _Context:
    """What ``guard`` needs of a servicer context when a handler is called directly."""

    async def abort(self, code, message):
        raise _Aborted(code, message)


class _UmountWaits(FakeHost):
    """``umount`` waits for ``release``, then takes the mount out of the mountinfo file."""

    def __init__(self, mountinfo: Path):
        super().__init__({})
        self.mountinfo, self.release, self.umounting = mountinfo, asyncio.Event(), asyncio.Event()

    async def run(self, argv, ok=(0,), input=None, secret=()):
        if argv[0] == "umount":
            self.umounting.set()
            await self.release.wait()
            lines = self.mountinfo.read_text().splitlines()
            self.mountinfo.write_text("".join(f"{x}\n" for x in lines if f" {argv[1]} " not in x))
        return await super().run(argv, ok, input, secret)


async def test_a_call_on_a_volume_with_one_in_flight_is_aborted_at_once(tmp_path: Path, monkeypatch):
    """A second call on the same volume waited behind the first for as long as that took (a
    hung login, a slow umount): the spec's answer is ABORTED at once, and the CO retries.
    Other volumes are not held up."""
    target = tmp_path / "pods" / "p0" / "vol"
    target.mkdir(parents=True)
    mi = tmp_path / "mountinfo"
    mi.write_text("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
                  f"60 22 8:16 / {target} rw,relatime - ext4 /dev/sdb rw\n")
    monkeypatch.setattr("csi.node.mount_at", lambda path, table=None: mount_at(path, table or _table(mi)))
    host = _UmountWaits(mi)
    node = Node("n", host, state_dir=str(tmp_path / "state"), sysfs=tmp_path / "sys", mountinfo=mi)
    ctx = _Context()
    first = asyncio.create_task(node.NodeUnpublishVolume(
        pb.NodeUnpublishVolumeRequest(volume_id="v1", target_path=str(target)), ctx))
    await asyncio.wait_for(host.umounting.wait(), 5)
    with pytest.raises(_Aborted) as e:
        await asyncio.wait_for(node.NodeUnpublishVolume(
            pb.NodeUnpublishVolumeRequest(volume_id="v1", target_path=str(target)), ctx), 5)
    assert e.value.args[0] == grpc.StatusCode.ABORTED and "v1" in e.value.args[1]
    other = tmp_path / "pods" / "p1" / "vol"
    await node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="v2", target_path=str(other)), ctx)
    host.release.set()
    await asyncio.wait_for(first, 5)
    assert not target.exists()
    await node.NodeUnpublishVolume(pb.NodeUnpublishVolumeRequest(volume_id="v1", target_path=str(target)), ctx)


def _table(mi: Path):
    from csi.mounts import mounts
    return mounts(mi)


@pytest.mark.parametrize("line, block, readonly", [
    ("rw,relatime - ext4 /dev/sdb rw", True, False),      # a filesystem there, raw block asked
    ("rw,nosuid - devtmpfs udev rw", False, False),       # a raw disk there, a filesystem asked
    ("ro,relatime - ext4 /dev/sdb rw", False, False),     # readonly there, read-write asked
    ("ro,nosuid - devtmpfs udev rw", True, False),
])
async def test_a_publish_incompatible_with_the_one_there_is_already_exists(tmp_path: Path, line, block, readonly):
    """Publish answered success for whatever was mounted at the target path: a read-write
    request over a readonly publish, or block over filesystem. The spec's answer is
    ALREADY_EXISTS, and nothing is run."""
    target = tmp_path / "pods" / "p0" / "vol"
    root = "/sdb" if "devtmpfs" in line else "/"
    (tmp_path / "mountinfo").write_text("22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
                                        f"60 22 8:16 {root} {target} {line}\n")
    host = FakeHost({})
    node = Node("n", host, state_dir=str(tmp_path / "state"), sysfs=tmp_path / "sys",
                mountinfo=tmp_path / "mountinfo")
    req = pb.NodePublishVolumeRequest(volume_id="v1", staging_target_path=str(tmp_path / "st"),
                                      target_path=str(target), volume_capability=cap(block=block),
                                      readonly=readonly)
    with pytest.raises(_Aborted) as e:
        await node.NodePublishVolume(req, _Context())
    assert e.value.args[0] == grpc.StatusCode.ALREADY_EXISTS
    assert host.calls == []
