"""Names that read as something else are refused: an id (32 hex digits; volumes are
also found by id) or an iSCSI name (iqn./eui./naa., read as a target). And the CLI says
which volume a delete deleted, by the name and id the meta answers, never the words typed."""

from __future__ import annotations

import pytest

from tests.zstore.test_cli_unit import FakeMeta, fake, run  # noqa: F401 - fixture
from zstore import naming
from zstore.errors import InvalidArgument

HEX = "0123456789abcdef" * 2


@pytest.mark.parametrize("name", [HEX, HEX.upper(), "0123456789ABCdef" * 2, "f" * 32])
def test_32_hex_digits_are_refused_as_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        naming.check_name("volume", name)
    assert "look like an id" in e.value.message and name in e.value.message


@pytest.mark.parametrize("name", ["iqn.x", "IQN.v1", "eui.0123", "naa.6001",
                                  "Naa.v", "iqn.2004-10.com.example"])
def test_iscsi_name_prefixes_are_refused_as_names(name: str) -> None:
    with pytest.raises(InvalidArgument) as e:
        naming.check_name("volume", name)
    assert "iSCSI name" in e.value.message and repr(name) in e.value.message


@pytest.mark.parametrize("name", ["f" * 31, "f" * 33, HEX[:31] + "g", "iqn", "iqn-x", "euix.1", "v1",
                                  "naa", "my.iqn.v"])
def test_near_misses_are_still_names(name: str) -> None:
    assert naming.check_name("volume", name) == name


def test_volume_delete_prints_the_deleted_volumes_name_and_id(fake: FakeMeta, capsys) -> None:
    """`zstore volume delete ID` deleted volume 'vola': say so, not 'deleted volume ID'."""
    vid = "9f0c" * 8
    fake.route("DELETE", f"/volumes/{vid}", 200, {"deleted": vid, "name": "vola"})
    code, out, err = run(["--endpoint", fake.url, "volume", "delete", vid], capsys)
    assert (code, err) == (0, "")
    assert out == f"deleted volume vola (id {vid})\n"
