"""CHAP target side: fixed vectors, mutual CHAP, and every way a login must fail."""

from __future__ import annotations

import base64
import hashlib

import pytest

from chunk.iscsi import chap
from chunk.iscsi.chap import (ChapCredentials, ChapTarget, chap_response, decode_binary,
                              select_auth_method)
from chunk.iscsi.constants import ChapAlgorithm, LoginStatus
from chunk.iscsi.errors import AuthenticationError

# md5(0x2a || b"twelve-bytes" || 00 01 .. 0f), cross-checked with coreutils md5sum
MD5_VECTOR = "abc5cd425b0c22b8d1fa813558750e83"
# sha256(0x07 || b"another-secret" || 00 01 .. 1f), cross-checked with sha256sum
SHA256_VECTOR = "050f76bf8023230ee7dc77b51b030aba1872424e8ec60746fc1775ca2070a357"

USER = ChapCredentials("alice", "twelve-bytes")
TARGET = ChapCredentials("zstore-target", "another-secret")


def fixed_random(identifier: int):
    """random_bytes stand-in: first call gives the CHAP_I byte, then 00 01 02 ..."""
    calls = []

    def rnd(n: int) -> bytes:
        calls.append(n)
        return bytes([identifier]) if len(calls) == 1 else bytes(range(n))
    return rnd


def test_md5_response_vector():
    assert chap_response(5, 0x2A, b"twelve-bytes", bytes(range(16))).hex() == MD5_VECTOR


def test_md5_login_against_hand_computed_vector():
    t = ChapTarget(USER, random_bytes=fixed_random(0x2A))
    assert t.challenge("5") == [("CHAP_A", "5"), ("CHAP_I", "42"),
                                ("CHAP_C", "0x000102030405060708090a0b0c0d0e0f")]
    assert t.verify({"CHAP_N": "alice", "CHAP_R": "0x" + MD5_VECTOR}) == []
    assert t.authenticated


def test_libiscsi_style_uppercase_hex_and_base64_responses():
    for encoded in ("0X" + MD5_VECTOR.upper(),
                    "0b" + base64.b64encode(bytes.fromhex(MD5_VECTOR)).decode()):
        t = ChapTarget(USER, random_bytes=fixed_random(0x2A))
        t.challenge("5")
        t.verify({"CHAP_N": "alice", "CHAP_R": encoded})
        assert t.authenticated


def test_sha256_challenge_is_digest_sized_and_verifies():
    t = ChapTarget(ChapCredentials("bob", "another-secret"), random_bytes=fixed_random(7))
    answer = dict(t.challenge("7,5"))                        # initiator prefers SHA-256
    assert answer["CHAP_A"] == "7"
    assert decode_binary(answer["CHAP_C"]) == bytes(range(32))
    t.verify({"CHAP_N": "bob", "CHAP_R": "0x" + SHA256_VECTOR})
    assert t.authenticated


def test_algorithm_choice_follows_initiator_order_within_our_set():
    assert ChapTarget(USER).challenge("5,7")[0] == ("CHAP_A", "5")
    assert ChapTarget(USER).challenge("8,7,5")[0] == ("CHAP_A", "8")
    only_md5 = ChapTarget(USER, algorithms=[ChapAlgorithm.MD5])
    assert only_md5.challenge("7,x,5")[0] == ("CHAP_A", "5")
    with pytest.raises(AuthenticationError) as e:
        ChapTarget(USER, algorithms=[ChapAlgorithm.SHA256]).challenge("5,6")
    assert e.value.status == LoginStatus.AUTHENTICATION_FAILURE


def test_challenges_are_random_and_at_least_16_bytes():
    seen = set()
    for _ in range(20):
        c = decode_binary(dict(ChapTarget(USER).challenge("5"))["CHAP_C"])
        assert len(c) >= 16
        seen.add(c)
    assert len(seen) == 20


def _challenged(t: ChapTarget) -> tuple[int, bytes]:
    d = dict(t.challenge(str(int(ChapAlgorithm.MD5))))
    return int(d["CHAP_I"]), decode_binary(d["CHAP_C"])


def _answer(t: ChapTarget, creds=USER) -> dict[str, str]:
    ident, challenge = _challenged(t)
    return {"CHAP_N": creds.user,
            "CHAP_R": "0x" + chap_response(5, ident, creds.secret, challenge).hex()}


def test_mutual_chap_target_proves_itself():
    t = ChapTarget(USER, TARGET)
    keys = _answer(t)
    my_challenge = bytes(range(100, 132))
    keys.update(CHAP_I="17", CHAP_C="0x" + my_challenge.hex().upper())
    reply = dict(t.verify(keys))
    assert reply["CHAP_N"] == "zstore-target"
    expected = hashlib.md5(bytes([17]) + b"another-secret" + my_challenge).hexdigest()
    assert reply["CHAP_R"] == "0x" + expected
    assert t.authenticated


def test_mutual_chap_refuses_a_reflected_challenge():
    t = ChapTarget(USER, TARGET)
    ident, challenge = _challenged(t)
    keys = {"CHAP_N": "alice",
            "CHAP_R": "0x" + chap_response(5, ident, USER.secret, challenge).hex(),
            "CHAP_I": str(ident), "CHAP_C": "0x" + challenge.hex()}
    with pytest.raises(AuthenticationError, match="reflected"):
        t.verify(keys)
    assert not t.authenticated


def test_mutual_requested_but_not_configured():
    t = ChapTarget(USER)
    keys = _answer(t)
    keys.update(CHAP_I="1", CHAP_C="0x" + "ab" * 16)
    with pytest.raises(AuthenticationError):
        t.verify(keys)
    assert not t.authenticated


@pytest.mark.parametrize("extra", [{"CHAP_I": "1"}, {"CHAP_C": "0x" + "ab" * 16},
                                   {"CHAP_I": "256", "CHAP_C": "0xabab"},
                                   {"CHAP_I": "one", "CHAP_C": "0xabab"},
                                   {"CHAP_I": "1", "CHAP_C": "0x" + "ab" * 1025}])
def test_malformed_mutual_requests(extra):
    t = ChapTarget(USER, TARGET)
    keys = _answer(t)
    keys.update(extra)
    with pytest.raises(AuthenticationError):
        t.verify(keys)


def test_same_secret_both_directions_is_refused():
    with pytest.raises(ValueError):
        ChapTarget(USER, ChapCredentials("target", "twelve-bytes"))


@pytest.mark.parametrize("change", [{"CHAP_N": "mallory"},
                                    {"CHAP_R": "0x" + "00" * 16},
                                    {"CHAP_R": "0x" + "00" * 17}])
def test_wrong_name_or_response_fails(change):
    t = ChapTarget(USER)
    keys = _answer(t)
    keys.update(change)
    with pytest.raises(AuthenticationError):
        t.verify(keys)
    assert not t.authenticated


def test_response_computed_with_another_secret_fails():
    t = ChapTarget(USER)
    with pytest.raises(AuthenticationError):
        t.verify(_answer(t, ChapCredentials("alice", "wrong-secret")))


@pytest.mark.parametrize("bad", ["", "0x", "0xZZ", "abcdef", "0x12 34", "0b", "0b!!!!",
                                 "0bAAA", "1234", "0x" + "00" * 1025])
def test_bad_binary_encodings_are_refused(bad):
    with pytest.raises(AuthenticationError):
        decode_binary(bad)


def test_binary_decoding():
    assert decode_binary("0xABcd") == b"\xab\xcd"
    assert decode_binary("0xabc") == b"\x0a\xbc"            # odd: implied leading zero
    assert decode_binary("0BAAE=") == b"\x00\x01"


def test_missing_keys_and_out_of_sequence():
    t = ChapTarget(USER)
    with pytest.raises(AuthenticationError):
        t.verify({"CHAP_N": "alice", "CHAP_R": "0x00"})      # before any challenge
    t.challenge("5")
    with pytest.raises(AuthenticationError):
        t.challenge("5")                                     # CHAP_A twice
    with pytest.raises(AuthenticationError):
        t.verify({"CHAP_N": "alice"})


def test_both_comparisons_use_constant_time_compare(monkeypatch):
    calls = []

    def spy(a, b):
        calls.append((len(a), len(b)))
        return False
    monkeypatch.setattr(chap, "compare_digest", spy)
    t = ChapTarget(USER)
    keys = _answer(t)
    with pytest.raises(AuthenticationError):
        t.verify(keys)
    assert calls == [(32, 32), (16, 16)]                     # name (hashed), then response


def test_secrets_never_in_repr_or_errors():
    secret = "s3cr3t-value-xyz"
    creds = ChapCredentials("alice", secret)
    t = ChapTarget(creds, ChapCredentials("tgt", "other-secret-abc"))
    ident, challenge = _challenged(t)
    good = chap_response(5, ident, creds.secret, challenge).hex()
    assert secret not in repr(creds) and secret not in repr(t)
    assert "other-secret-abc" not in repr(t)
    with pytest.raises(AuthenticationError) as e:
        t.verify({"CHAP_N": "alice", "CHAP_R": "0x" + good[:-2] + "00"})
    text = str(e.value) + repr(e.value)
    assert secret not in text and good not in text and challenge.hex() not in text


def test_credentials_validation():
    with pytest.raises(ValueError):
        ChapCredentials("", "x" * 12)
    with pytest.raises(ValueError):
        ChapCredentials("alice", "")
    assert ChapCredentials("alice", b"\x00\xff" * 8).secret == b"\x00\xff" * 8


def test_select_auth_method():
    assert select_auth_method("CHAP,None", ["CHAP"]) == "CHAP"
    assert select_auth_method("None,CHAP", ["None"]) == "None"
    assert select_auth_method("None", ["CHAP"]) == "Reject"
    assert select_auth_method("SRP,KRB5", ["CHAP", "None"]) == "Reject"
