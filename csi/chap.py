"""CHAP credentials from a NodeStageVolume request's ``secrets``.

The keys are open-iscsi's own setting names, as Kubernetes' in-tree iSCSI
volumes and other iSCSI CSI drivers spell them (a ``kubernetes.io/iscsi-chap``
Secret works unchanged): ``node.session.auth.{username,password}`` for the
session, ``..._in`` for mutual CHAP, and the same under
``discovery.sendtargets.auth.`` for SendTargets discovery
(``node.sendtargets.auth.`` is accepted as another spelling). Other keys are
ignored: a Secret may carry more than we need. The values are never logged;
``secrets_of`` lists them so that error messages can be scrubbed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

SESSION = "node.session.auth"
DISCOVERY = "discovery.sendtargets.auth"
_PREFIXES = {SESSION: SESSION, DISCOVERY: DISCOVERY, "node.sendtargets.auth": DISCOVERY}
_FIELDS = ("username", "password", "username_in", "password_in")


class ChapError(ValueError):
    """Secrets that cannot make a CHAP configuration (INVALID_ARGUMENT; names keys, never values)."""


@dataclass(frozen=True)
class Chap:
    username: str
    password: str
    username_in: str = ""      # mutual CHAP: the target proves itself with these
    password_in: str = ""

    def settings(self, prefix: str) -> list[tuple[str, str]]:
        """iscsiadm ``-n NAME -v VALUE`` pairs for a node (SESSION) or discovery record."""
        out = [(f"{prefix}.authmethod", "CHAP"), (f"{prefix}.username", self.username),
               (f"{prefix}.password", self.password)]
        if self.username_in:
            out += [(f"{prefix}.username_in", self.username_in), (f"{prefix}.password_in", self.password_in)]
        return out

    def secrets(self) -> list[str]:
        return [s for s in (self.password, self.password_in) if s]


def _one(prefix: str, got: dict[str, str]) -> Chap | None:
    if not got:
        return None
    def need(a: str, b: str) -> None:
        if bool(got.get(a)) != bool(got.get(b)):
            have, miss = (a, b) if got.get(a) else (b, a)
            raise ChapError(f"secrets have {prefix}.{have} but not {prefix}.{miss}")
    need("username", "password")
    need("username_in", "password_in")
    if not got.get("username"):
        if got.get("username_in"):
            raise ChapError(f"secrets have mutual CHAP ({prefix}.username_in) without "
                            f"{prefix}.username and {prefix}.password")
        raise ChapError(f"secrets have empty {prefix}.username and {prefix}.password")
    for k in _FIELDS:
        v = got.get(k, "")
        if any(c in v for c in "\n\r\0"):
            raise ChapError(f"secret {prefix}.{k} contains a line break or NUL")
    return Chap(got["username"], got["password"], got.get("username_in", ""), got.get("password_in", ""))


def from_secrets(secrets: Mapping[str, str]) -> tuple[Chap | None, Chap | None]:
    """(session CHAP, discovery CHAP), each None when the secrets do not ask for it."""
    found: dict[str, dict[str, str]] = {SESSION: {}, DISCOVERY: {}}
    for key, value in secrets.items():
        prefix, _, field = key.rpartition(".")
        if prefix in _PREFIXES:
            if field not in _FIELDS and field != "authmethod":
                raise ChapError(f"unknown CHAP secret {key!r} (one of {', '.join(_FIELDS)} under {prefix})")
            if field == "authmethod":
                if value not in ("CHAP", "None", ""):
                    raise ChapError(f"{key} must be CHAP or None")
                continue
            found[_PREFIXES[prefix]][field] = value
    return _one(SESSION, found[SESSION]), _one(DISCOVERY, found[DISCOVERY])


def secrets_of(*chaps: Chap | None) -> list[str]:
    return [s for c in chaps if c is not None for s in c.secrets()]
