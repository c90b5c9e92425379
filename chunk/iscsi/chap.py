"""CHAP for iSCSI logins, target side (RFC 7143 §12.1.3, RFC 1994).

Exchange: initiator offers ``CHAP_A``; target picks an algorithm and sends
``CHAP_I`` (one byte id) and ``CHAP_C`` (random challenge); initiator answers
``CHAP_N`` (user) and ``CHAP_R = H(id || secret || challenge)``, and for mutual
CHAP adds its own ``CHAP_I``/``CHAP_C``, which the target answers the same way
with its own secret. Binary values travel as ``0x``-hex or ``0b``-base64.

Defences the RFC asks for: comparisons in constant time, a challenge the
initiator reflects back is refused, the same secret may not serve both
directions, binary values are at most 1024 bytes. Secrets never appear in a
repr or an exception message.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
from collections.abc import Callable, Iterable, Mapping
from hmac import compare_digest

from .constants import ChapAlgorithm
from .errors import AuthenticationError

Pairs = list[tuple[str, str]]

MAX_BINARY = 1024
MIN_CHALLENGE = 16
_HASHES = {ChapAlgorithm.MD5: "md5", ChapAlgorithm.SHA1: "sha1",
           ChapAlgorithm.SHA256: "sha256", ChapAlgorithm.SHA3_256: "sha3_256"}
_HEX = frozenset("0123456789abcdefABCDEF")


def decode_binary(value: str) -> bytes:
    """``0x``/``0X`` hex (odd length: implied leading zero) or ``0b``/``0B`` base64."""
    prefix, body = value[:2], value[2:]
    if prefix in ("0x", "0X") and body and set(body) <= _HEX:
        raw = bytes.fromhex(body if len(body) % 2 == 0 else "0" + body)
    elif prefix in ("0b", "0B") and body:
        try:
            raw = base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise AuthenticationError("malformed base64 value") from None
    else:
        raise AuthenticationError("binary value must be 0x-hex or 0b-base64")
    if not raw or len(raw) > MAX_BINARY:
        raise AuthenticationError(f"binary value of {len(raw)} bytes (1..{MAX_BINARY} allowed)")
    return raw


def encode_hex(raw: bytes) -> str:
    return "0x" + raw.hex()


def chap_response(algorithm: int, identifier: int, secret: bytes, challenge: bytes) -> bytes:
    """RFC 1994: H(identifier || secret || challenge)."""
    return hashlib.new(_HASHES[ChapAlgorithm(algorithm)],
                       bytes((identifier,)) + secret + challenge).digest()


def _identifier(value: str) -> int:
    if value[:2] in ("0x", "0X"):
        n = int(value[2:], 16) if value[2:] and set(value[2:]) <= _HEX else -1
    else:
        n = int(value) if value.isascii() and value.isdigit() else -1
    if not 0 <= n <= 255:
        raise AuthenticationError("CHAP_I must be a number from 0 to 255")
    return n


def select_auth_method(offer: str, allowed: Iterable[str]) -> str:
    """AuthMethod is a list key: the first offered method we allow, else Reject."""
    allowed = set(allowed)
    return next((m for m in offer.split(",") if m in allowed), "Reject")


class ChapCredentials:
    """A CHAP user name and secret. The secret is bytes and stays out of reprs."""

    __slots__ = ("user", "_secret")

    def __init__(self, user: str, secret: str | bytes):
        if not user:
            raise ValueError("CHAP user name is empty")
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        if not raw:
            raise ValueError("CHAP secret is empty")
        self.user = user
        self._secret = raw

    @property
    def secret(self) -> bytes:
        return self._secret

    def __repr__(self) -> str:
        return f"ChapCredentials(user={self.user!r}, secret=<hidden>)"


class ChapTarget:
    """One login's CHAP exchange as the authenticator.

    ``credentials`` is what the initiator must prove; ``mutual`` (optional) is
    what the target proves when the initiator asks for mutual authentication.
    ``algorithms`` is the set we accept; the initiator's order decides.
    """

    def __init__(self, credentials: ChapCredentials, mutual: ChapCredentials | None = None, *,
                 algorithms: Iterable[int] = tuple(ChapAlgorithm),
                 challenge_length: int | None = None,
                 random_bytes: Callable[[int], bytes] = secrets.token_bytes):
        if mutual is not None and compare_digest(mutual.secret, credentials.secret):
            raise ValueError("the same CHAP secret may not authenticate both directions")
        if challenge_length is not None and not MIN_CHALLENGE <= challenge_length <= MAX_BINARY:
            raise ValueError(f"challenge length must be {MIN_CHALLENGE}..{MAX_BINARY}")
        self.credentials = credentials
        self.mutual = mutual
        self.algorithms = frozenset(ChapAlgorithm(a) for a in algorithms)
        self._challenge_length = challenge_length
        self._random = random_bytes
        self.algorithm: ChapAlgorithm | None = None
        self._id = 0
        self._challenge = b""
        self.authenticated = False

    def __repr__(self) -> str:
        return (f"ChapTarget(user={self.credentials.user!r}, algorithm={self.algorithm!r}, "
                f"mutual={self.mutual is not None}, authenticated={self.authenticated})")

    def challenge(self, chap_a: str) -> Pairs:
        """Answer the initiator's CHAP_A list with CHAP_A, CHAP_I and CHAP_C."""
        if self.algorithm is not None:
            raise AuthenticationError("CHAP_A sent twice")
        for item in chap_a.split(","):
            if item.isascii() and item.isdigit() and int(item) in self.algorithms:
                self.algorithm = ChapAlgorithm(int(item))
                break
        else:
            raise AuthenticationError(f"no acceptable CHAP algorithm in {chap_a[:64]!r}")
        size = self._challenge_length or max(MIN_CHALLENGE,
                                             hashlib.new(_HASHES[self.algorithm]).digest_size)
        self._id = self._random(1)[0]
        self._challenge = self._random(size)
        return [("CHAP_A", str(int(self.algorithm))), ("CHAP_I", str(self._id)),
                ("CHAP_C", encode_hex(self._challenge))]

    def verify(self, keys: Mapping[str, str]) -> Pairs:
        """Check CHAP_N/CHAP_R. Returns the target's CHAP_N/CHAP_R when the
        initiator asked for mutual CHAP, else nothing. Raises AuthenticationError."""
        if self.algorithm is None or self.authenticated:
            raise AuthenticationError("CHAP response out of sequence")
        if "CHAP_N" not in keys or "CHAP_R" not in keys:
            raise AuthenticationError("CHAP_N and CHAP_R are required")
        # Fixed-size digests; compare name and response both, then decide, so the
        # timing does not tell which one was wrong.
        name_ok = compare_digest(hashlib.sha256(keys["CHAP_N"].encode()).digest(),
                                 hashlib.sha256(self.credentials.user.encode()).digest())
        expected = chap_response(self.algorithm, self._id, self.credentials.secret,
                                 self._challenge)
        got = decode_binary(keys["CHAP_R"])
        response_ok = len(got) == len(expected) and compare_digest(got, expected)
        if not (name_ok & response_ok):
            raise AuthenticationError("CHAP authentication failed")
        answer = self._mutual(keys)
        self.authenticated = True
        return answer

    def _mutual(self, keys: Mapping[str, str]) -> Pairs:
        if "CHAP_I" not in keys and "CHAP_C" not in keys:
            return []
        if "CHAP_I" not in keys or "CHAP_C" not in keys:
            raise AuthenticationError("mutual CHAP needs both CHAP_I and CHAP_C")
        if self.mutual is None:
            raise AuthenticationError("initiator asked for mutual CHAP; none is configured")
        identifier = _identifier(keys["CHAP_I"])
        challenge = decode_binary(keys["CHAP_C"])
        if compare_digest(challenge, self._challenge):
            raise AuthenticationError("initiator reflected the target's CHAP challenge")
        answer = chap_response(self.algorithm, identifier, self.mutual.secret, challenge)
        return [("CHAP_N", self.mutual.user), ("CHAP_R", encode_hex(answer))]
