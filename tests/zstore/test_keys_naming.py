import pytest

from zstore import naming
from zstore.errors import InvalidArgument
from zstore.keys import Keys


def test_prefix_normalised_and_required():
    assert Keys("zs/").volume("x") == b"/zs/volumes/id/x"
    with pytest.raises(ValueError):
        Keys("/")


def test_user_strings_cannot_escape_their_segment():
    k = Keys("/p")
    assert k.acl("vid", "iqn.a:b/../../x").count(b"/") == k.acl("vid", "iqn.a:b").count(b"/")
    assert k.chap("*", "iqn.x") == b"/p/chap/*/iqn.x"


def test_lun_keys_sort_numerically_and_parse_back():
    k = Keys("/p")
    keys = [k.lun(t, lun) for t in (2, 10) for lun in (3, 20)]
    assert sorted(keys) == keys
    assert Keys.lun_key_parts(k.lun(10, 20)) == (10, 20)
    assert Keys.chunk_key_parts(k.chunk_live("abc"), k.chunks()) == ("abc", "live")


def test_wwn_is_naa6_stable_and_distinct():
    w = naming.volume_wwn("9f0c" * 8)
    assert len(w) == 32 and w[0] == "6" and w[1:7] == "5a5354"
    assert w == naming.volume_wwn("9f0c" * 8) != naming.volume_wwn("0" * 32)


def test_target_iqn_is_stable():
    assert naming.target_iqn("0123456789abcdef", 7) == "iqn.2026-01.io.zstore:01234567.t0007"


@pytest.mark.parametrize("iqn", ["iqn.2004-10.com.example:host1", "iqn.1994-05.com.redhat:a1b2c3",
                                 "eui.0123456789abcdef", "naa.60014051234567890123456789012345",
                                 "naa.6001405123456789", "iqn.2004-10.com.example:01:a.b-c:d",
                                 "iqn.2004-10.com.example", "iqn.2004-10.com.example:nœud-α"])
def test_valid_iqns(iqn):
    assert naming.check_iqn(iqn) == iqn


@pytest.mark.parametrize("given,stored", [
    ("iqn.2004-10.com.Example:Host1", "iqn.2004-10.com.example:host1"),
    ("IQN.2004-10.COM.EXAMPLE:HOST1", "iqn.2004-10.com.example:host1"),
    ("eui.0123456789ABCDEF", "eui.0123456789abcdef"),
    ("NAA.60014051234567890123456789ABCDEF", "naa.60014051234567890123456789abcdef"),
    (" iqn.2004-10.com.example:host1\n", "iqn.2004-10.com.example:host1"),
    ("iqn.2004-10.com.example:\u210c", "iqn.2004-10.com.example:h"),      # NFKC then folded
])
def test_iqns_are_normalized_to_lower_case(given, stored):
    """RFC 3720 3.2.6.2: iSCSI names are case-insensitive and kept in lower case."""
    assert naming.check_iqn(given) == stored


@pytest.mark.parametrize("iqn", [
    "", "host1", "iqn.04-10.com:x", "iqn.2004-10.com.example:a b", "eui.123",
    "iqn.2004-10.com.example:a/b", "iqn.2004-10.com.example:a\x00b", "iqn.2004-10.com.example:a_b",
    "iqn.2004-10.com.example:*", "iqn.2004-10.com.example:a%2fb", "iqn.2004-10.com.example:a\tb",
    "iqn.2004-10.com.example:a\x7f", "iqn.2004-10.com.example:a\u00a0b", "iqn.2004-10.com.example:a\u200bb",
    "iqn.2004-10.com.example:a@b", "iqn.2004-10.com.example:", "iqn.\u0662\u0660\u0660\u0664-10.com.x:a",
    "iqn.2004-10.com_x.example:a", "eui.0123456789abcdeg", "naa.60014051234567890",
    "iqn.2004-10.com.example:" + "a" * 200, None, 123,
])
def test_invalid_iqns(iqn):
    with pytest.raises(InvalidArgument):
        naming.check_iqn(iqn)


def test_the_byte_limit_counts_utf8_bytes():
    base = "iqn.2004-10.com.example:"
    assert naming.check_iqn(base + "a" * (223 - len(base))) == base + "a" * (223 - len(base))
    with pytest.raises(InvalidArgument):
        naming.check_iqn(base + "\u00e9" * (223 - len(base)))          # 2 bytes each in UTF-8
