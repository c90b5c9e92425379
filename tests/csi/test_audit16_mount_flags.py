"""Audit 16: mount_flags reach ``mount -o`` one option each. They are joined into the one
argument after ``-o`` (no shell, so nothing is run), but libmount parses that string: an entry
with a comma is several options, and some options are mount(8)'s own operations, not the
filesystem's: ``-o bind`` turns the staging mount of an ext4 filesystem into a bind mount of the
device node (``mount --fake -v -t ext4 -o bind,noatime IMG DIR`` says "IMG bound on DIR"),
``move``/``remount`` act on other mounts, ``loop``/``offset=`` set up a loop device, and
``X-mount.*`` creates, chowns or chmods paths. A flag starting with '-' is no mount option at
all. Such flags are INVALID_ARGUMENT before anything is attached; an SELinux ``context="..."``
keeps the commas inside its quotes."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from tests.csi.test_node_stage import mount_calls, stage_req
from tests.csi.test_node_staging_safety import _node
from tests.csi.test_node_unit import AbortCtx


@pytest.mark.parametrize("flag", ["bind", "rbind", "move", "remount", "loop", "loop=/dev/loop7", "offset=4096",
                                  "X-mount.mkdir", "x-mount.owner=0", "noatime,bind", "-w", "--bind", "",
                                  "noatime\nbind", 'context="a,b",bind'])
async def test_audit16_a_mount_flag_that_is_no_single_filesystem_option_is_invalid_argument(
        tmp_path: Path, monkeypatch, flag):
    """Before: NodeStage answered OK and ran ``mount -t ext4 -o <flag> DEV STAGING``."""
    node, host, dev = _node(tmp_path, monkeypatch)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (0, "TYPE=ext4\n")
    with pytest.raises(RuntimeError) as e:
        await node.NodeStageVolume(stage_req(tmp_path / "st", flags=("noatime", flag)), AbortCtx())
    assert e.value.args[0] == grpc.StatusCode.INVALID_ARGUMENT
    assert host.calls == [] and node._load("v1") is None


async def test_audit16_filesystem_options_are_passed_through(tmp_path: Path, monkeypatch):
    node, host, dev = _node(tmp_path, monkeypatch)
    host.answers[("blkid", "-p", "-o", "export", dev)] = (0, "TYPE=ext4\n")
    ctx = 'context="system_u:object_r:container_file_t:s0:c1,c2"'
    st = tmp_path / "st"
    await node.NodeStageVolume(stage_req(st, flags=("noatime", "data=ordered", "discard", ctx)), AbortCtx())
    assert mount_calls(host) == [["mount", "-t", "ext4", "-o", f"noatime,data=ordered,discard,{ctx}", dev, str(st)]]
