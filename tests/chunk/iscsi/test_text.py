"""key=value text: encoding, limits, continuation across PDUs."""

from __future__ import annotations

import pytest

from chunk.iscsi.errors import TextError
from chunk.iscsi.text import (DEFAULT_MAX_TEXT, TextAssembler, decode_text, encode_text,
                              split_text)


def test_round_trip_keeps_order_duplicates_and_utf8():
    pairs = [("InitiatorName", "iqn.2024-01.test:a"), ("InitiatorAlias", "nœud-α"),
             ("HeaderDigest", "CRC32C,None"), ("X-com.example.k", ""),
             ("InitiatorName", "again")]
    wire = encode_text(pairs)
    assert wire == ("InitiatorName=iqn.2024-01.test:a\0InitiatorAlias=nœud-α\0"
                    "HeaderDigest=CRC32C,None\0X-com.example.k=\0InitiatorName=again\0").encode()
    assert decode_text(wire) == pairs


def test_value_may_contain_equals_sign():
    assert decode_text(b"CHAP_R=0bAAAA==\0") == [("CHAP_R", "0bAAAA==")]


def test_empty_strings_between_pairs_are_tolerated():
    assert decode_text(b"A=1\0\0B=2\0\0\0") == [("A", "1"), ("B", "2")]


@pytest.mark.parametrize("bad", [
    b"A=1",                            # unterminated
    b"NoEquals\0",
    b"=value\0",                       # empty key
    b"Bad Key=1\0",                    # space not allowed in key names
    b"K" * 64 + b"=1\0",               # key over 63 bytes
    b"A=" + b"v" * 256 + b"\0",        # simple value over 255 bytes
    b"A=\xff\xfe\0",                   # not UTF-8
    b"A=" + b"a," * 200 + b"b" * 256 + b"\0",   # a list element over 255 bytes
])
def test_malformed_text_is_a_text_error(bad):
    with pytest.raises(TextError) as e:
        decode_text(bad)
    assert not e.value.fatal


def test_key_of_63_bytes_and_value_of_255_are_fine():
    k, v = "K" * 63, "v" * 255
    assert decode_text(encode_text([(k, v)])) == [(k, v)]


def test_large_values_only_for_chap_challenge_and_response():
    big = "0x" + "ab" * 1024                 # 1024 binary bytes: the RFC 7143 maximum
    assert decode_text(encode_text([("CHAP_C", big)])) == [("CHAP_C", big)]
    with pytest.raises(TextError):
        encode_text([("CHAP_C", big + "ab")])
    with pytest.raises(TextError):
        encode_text([("TargetAlias", big)])


def test_long_lists_are_allowed_with_short_elements():
    value = ",".join(["CRC32C"] * 100)
    assert decode_text(encode_text([("HeaderDigest", value)])) == [("HeaderDigest", value)]


def test_encode_refuses_nul_in_value():
    with pytest.raises(TextError):
        encode_text([("A", "x\0y")])


def test_total_size_bound():
    with pytest.raises(TextError):
        decode_text(b"A=1\0" * (DEFAULT_MAX_TEXT // 4 + 1))


def test_continuation_split_mid_pair():
    pairs = [("InitiatorName", "iqn.2024-01.test:" + "x" * 200), ("SessionType", "Normal"),
             ("MaxRecvDataSegmentLength", "8192")]
    wire = encode_text(pairs)
    segments = split_text(wire, 64)
    assert len(segments) == -(-len(wire) // 64) and all(len(s) <= 64 for s in segments)
    asm = TextAssembler()
    for seg in segments[:-1]:
        assert asm.feed(seg, cont=True) is None
        assert asm.pending
    assert asm.feed(segments[-1], cont=False) == pairs
    assert not asm.pending
    assert asm.feed(b"A=1\0", cont=False) == [("A", "1")]   # reusable afterwards


def test_continuation_is_bounded():
    asm = TextAssembler(max_total=1000)
    asm.feed(b"A=" + b"x" * 200, cont=True)
    with pytest.raises(TextError):
        for _ in range(10):
            asm.feed(b"x" * 200, cont=True)
    assert not asm.pending                     # the buffer was dropped


def test_split_empty_text_is_one_empty_segment():
    assert split_text(b"", 8192) == [b""]
