"""Names the outside world sees: target IQNs, WWNs, and validation of user names.

Target IQNs are stable for the life of the cluster: they derive from the
cluster id and the target's index, never from volume names (volumes move
between nothing; a rename would otherwise break every initiator's node DB).

The WWN is an NAA-6 (IEEE Registered Extended) designator derived from the
volume id. The company id is ``0x5A5354`` ("ZST"), a locally administered CID
(bit 0x02 of the first octet set), which is what a non-registered vendor may
use. The CSI node plugin finds disks by ``/dev/disk/by-id/wwn-0x<wwn>``.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from .errors import InvalidArgument

IQN_DOMAIN = "iqn.2026-01.io.zstore"
MAX_TARGETS = 4096
MAX_LUNS_PER_TARGET = 255          # LUN numbers 1..255; LUN 0 is left unused
COMPANY_ID = 0x5A5354

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# RFC 3720 3.2.6.3: iqn.yyyy-mm.reversed.domain[:anything], or eui.<16 hex>, or naa.<16|32 hex>,
# matched after normalization (lower case), so hex digits and the domain are lower case here.
_IQN_RE = re.compile(
    r"iqn\.[0-9]{4}-[0-9]{2}\.[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:.+)?"
    r"|eui\.[0-9a-f]{16}|naa\.[0-9a-f]{16}([0-9a-f]{16})?", re.ASCII | re.DOTALL)
# RFC 3720 3.2.6.2: the ASCII characters of a (normalized) iSCSI name.
_IQN_ASCII = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.:-")
MAX_ISCSI_NAME_BYTES = 223


class NameError_(InvalidArgument):
    """A user-supplied name that is not acceptable."""


# Names that would be read as something else where a name is accepted: an id (volumes
# and snapshots are also found by their 32-hex id), or an iSCSI name (a CHAP target).
_ID_RE = re.compile(r"[0-9a-fA-F]{32}")
_ISCSI_PREFIXES = ("iqn.", "eui.", "naa.")


def check_name(kind: str, name: str) -> str:
    """A new name: refused if it is not one, or could be taken for an id or an iSCSI name.
    Only new names are checked: records named before these rules stay usable."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise NameError_(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit")
    if _ID_RE.fullmatch(name):
        raise NameError_(
            f"invalid {kind} name {name!r}: 32 hex digits look like an id, and "
            f"{kind}s are also found by id; add a letter that is not hex, e.g. {kind}-{name[:8]}")
    if name[:4].lower() in _ISCSI_PREFIXES:
        raise NameError_(
            f"invalid {kind} name {name!r}: a name starting with {name[:4]!r} reads as an "
            "iSCSI name (where a target is expected); choose another prefix")
    return name


def normalize_iqn(name: str) -> str:
    """The stringprep-style form of an iSCSI name (RFC 3722): case folded and NFKC (folded
    again after NFKC, which can make capitals: U+210C is H). iSCSI names are
    case-insensitive, so names are stored and compared in this form."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold())


def _iqn_char_ok(c: str) -> bool:
    if c < "\x80":
        return c in _IQN_ASCII
    return unicodedata.category(c)[0] in "LNM"      # no spaces, controls, symbols, punctuation


def check_iqn(iqn: str) -> str:
    """An initiator's iSCSI name, normalized to lower case; NameError_ if it is not one."""
    if isinstance(iqn, str):
        name = normalize_iqn(iqn.strip())
        if (len(name.encode("utf-8", "surrogatepass")) <= MAX_ISCSI_NAME_BYTES
                and _IQN_RE.fullmatch(name) and all(_iqn_char_ok(c) for c in name)):
            return name
    raise NameError_(
        f"invalid initiator name {iqn!r:.100}: expected an iSCSI name such as "
        "iqn.2004-10.com.example:host1, eui.<16 hex> or naa.<16 or 32 hex>; "
        "the ASCII characters allowed are letters, digits, '.', ':' and '-'")


def target_iqn(cluster_id: str, index: int) -> str:
    return f"{IQN_DOMAIN}:{cluster_id[:8]}.t{index:04d}"


def volume_wwn(volume_id: str) -> str:
    """32 hex digits: NAA 6, 24-bit company id, 100 bits from the volume id."""
    digest = int.from_bytes(hashlib.sha256(volume_id.encode()).digest()[:13], "big") >> 4
    value = (0x6 << 124) | (COMPANY_ID << 100) | (digest & ((1 << 100) - 1))
    return f"{value:032x}"


def snapshot_wwn(snapshot_id: str) -> str:
    """The WWN of a snapshot's read-only LUN: the volume scheme applied to the snapshot id
    (a uuid like volume ids, so it never equals a volume's WWN)."""
    return volume_wwn(snapshot_id)
