"""CHAP secrets of NodeStageVolume: the keys other iSCSI drivers use, and clear errors."""

from __future__ import annotations

import pytest

from csi.chap import Chap, ChapError, from_secrets, secrets_of


def test_session_and_discovery_chap():
    chap, disc = from_secrets({
        "node.session.auth.username": "u", "node.session.auth.password": "p" * 12,
        "node.session.auth.username_in": "t", "node.session.auth.password_in": "q" * 12,
        "discovery.sendtargets.auth.username": "du", "discovery.sendtargets.auth.password": "d" * 12,
        "unrelated": "ignored"})
    assert chap == Chap("u", "p" * 12, "t", "q" * 12)
    assert disc == Chap("du", "d" * 12)
    assert chap.settings("node.session.auth") == [
        ("node.session.auth.authmethod", "CHAP"), ("node.session.auth.username", "u"),
        ("node.session.auth.password", "p" * 12), ("node.session.auth.username_in", "t"),
        ("node.session.auth.password_in", "q" * 12)]
    assert secrets_of(chap, disc, None) == ["p" * 12, "q" * 12, "d" * 12]


def test_no_secrets_no_chap_and_the_other_spelling_of_discovery():
    assert from_secrets({}) == (None, None)
    assert from_secrets({"node.session.auth.authmethod": "CHAP", "token": "x"}) == (None, None)
    assert from_secrets({"node.sendtargets.auth.username": "a", "node.sendtargets.auth.password": "b"}) == \
        (None, Chap("a", "b"))


@pytest.mark.parametrize("secrets, says", [
    ({"node.session.auth.username": "u"}, "node.session.auth.username but not node.session.auth.password"),
    ({"node.session.auth.password": "p"}, "node.session.auth.password but not node.session.auth.username"),
    ({"node.session.auth.username": "u", "node.session.auth.password": "p",
      "node.session.auth.username_in": "t"}, "username_in but not node.session.auth.password_in"),
    ({"node.session.auth.username_in": "t", "node.session.auth.password_in": "q"}, "mutual CHAP"),
    ({"discovery.sendtargets.auth.password": "p"}, "discovery.sendtargets.auth.username"),
    ({"node.session.auth.username": "", "node.session.auth.password": ""}, "empty"),
    ({"node.session.auth.usernam": "u"}, "unknown CHAP secret"),
    ({"node.session.auth.username": "u", "node.session.auth.password": "a\nb"}, "line break"),
    ({"node.session.auth.authmethod": "MD5"}, "CHAP or None"),
])
def test_partial_or_wrong_secrets_are_refused_without_echoing_values(secrets, says):
    with pytest.raises(ChapError) as e:
        from_secrets(secrets)
    assert says in str(e.value)
    for k, v in secrets.items():
        if "password" in k and v:
            assert v not in str(e.value).replace(k, "")
