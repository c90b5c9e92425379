"""key=value text of Login/Text PDUs (RFC 7143 §6.1), with hard limits.

Every pair is ``key=value`` followed by one NUL, UTF-8 encoded. A text may be
split across PDUs at any byte (C bit), so ``TextAssembler`` joins raw bytes
before decoding. Limits exist because the text comes from an unauthenticated
peer: keys are at most 63 bytes, simple values 255 bytes (per list element),
CHAP challenge/response values at most 1024 binary bytes, and a whole text is
bounded (``DEFAULT_MAX_TEXT``) so a peer cannot make us buffer without end.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import TextError

MAX_KEY_LEN = 63
MAX_VALUE_LEN = 255
MAX_LIST_LEN = 4096
# CHAP_C/CHAP_R: up to 1024 binary bytes (RFC 7143 §12.1.3) as "0x" + 2048 hex digits.
MAX_LARGE_VALUE_LEN = 2 + 2 * 1024
LARGE_VALUE_KEYS = frozenset({"CHAP_C", "CHAP_R"})
DEFAULT_MAX_TEXT = 64 * 1024      # RFC 7143 asks for at least 8192 per negotiation

_KEY = re.compile(r"[A-Za-z0-9.\-+@_]+")

Pairs = list[tuple[str, str]]


def _check(key: str, value: bytes) -> None:
    if not 0 < len(key) <= MAX_KEY_LEN or not _KEY.fullmatch(key):
        raise TextError(f"invalid key name {key[:MAX_KEY_LEN]!r}")
    n = len(value)
    if n <= MAX_VALUE_LEN:
        return
    if key in LARGE_VALUE_KEYS:
        if n <= MAX_LARGE_VALUE_LEN:
            return
    elif n <= MAX_LIST_LEN and b"," in value and all(
            len(v) <= MAX_VALUE_LEN for v in value.split(b",")):
        return
    raise TextError(f"value of {key} is {n} bytes, over the limit")


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """Pairs -> NUL-terminated UTF-8 text, enforcing the same limits as decoding."""
    out = bytearray()
    for key, value in pairs:
        v = value.encode()
        if b"\0" in v:
            raise TextError(f"value of {key} contains NUL")
        _check(key, v)
        out += key.encode() + b"=" + v + b"\0"
    return bytes(out)


def decode_text(data: bytes, max_total: int = DEFAULT_MAX_TEXT) -> Pairs:
    """Text -> ordered (key, value) pairs; duplicates are kept for the caller to judge."""
    if len(data) > max_total:
        raise TextError(f"text of {len(data)} bytes exceeds {max_total}")
    if not data:
        return []
    if data[-1] != 0:
        raise TextError("text does not end with NUL")
    pairs: Pairs = []
    for item in bytes(data).split(b"\0"):
        if not item:
            continue                  # trailing NUL, or a sloppy initiator's empty string
        key, eq, value = item.partition(b"=")
        if not eq:
            raise TextError(f"no '=' in {item[:MAX_KEY_LEN]!r}")
        try:
            k = key.decode("ascii")
            v = value.decode("utf-8")
        except UnicodeDecodeError:
            raise TextError(f"text for key {key[:MAX_KEY_LEN]!r} is not valid UTF-8") from None
        _check(k, value)
        pairs.append((k, v))
    return pairs


def split_text(data: bytes, max_segment: int) -> list[bytes]:
    """Cut encoded text into data segments of at most ``max_segment`` bytes.

    Every segment but the last goes out with the C bit set.
    """
    if not data:
        return [b""]
    return [data[i:i + max_segment] for i in range(0, len(data), max_segment)]


class TextAssembler:
    """Joins a text continued over several PDUs (C bit) and bounds its size."""

    __slots__ = ("_buf", "max_total")

    def __init__(self, max_total: int = DEFAULT_MAX_TEXT):
        self._buf = bytearray()
        self.max_total = max_total

    @property
    def pending(self) -> bool:
        return bool(self._buf)

    def feed(self, data: bytes, cont: bool) -> Pairs | None:
        """Add one PDU's data segment. Returns the pairs once ``cont`` is False."""
        if len(self._buf) + len(data) > self.max_total:
            self._buf.clear()
            raise TextError(f"continued text exceeds {self.max_total} bytes")
        if cont:
            self._buf += data
            return None
        if self._buf:
            data, self._buf = bytes(self._buf + data), bytearray()
        return decode_text(data, self.max_total)
