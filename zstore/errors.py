"""Errors shared by the meta API, its clients and the CLI.

Each error has a stable machine code, an HTTP status, a message that says what
went wrong, and a hint that says what to do. The API sends
``{"error": {"code", "message", "hint"}}``; the CLI maps codes to exit codes.
"""

from __future__ import annotations

from typing import Any


class ZError(Exception):
    code = "internal"
    status = 500
    exit_code = 1

    def __init__(self, message: str, hint: str | None = None, **details: Any):
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.hint:
            d["hint"] = self.hint
        if self.details:
            d["details"] = self.details
        return d


class InvalidArgument(ZError):
    code, status, exit_code = "invalid_argument", 400, 2


class Unauthenticated(ZError):
    code, status, exit_code = "unauthenticated", 401, 6


class NotFound(ZError):
    code, status, exit_code = "not_found", 404, 3


class Conflict(ZError):
    code, status, exit_code = "conflict", 409, 4


class InsufficientResources(ZError):
    """The cluster cannot satisfy the request (replicas, capacity, LUN slots)."""
    code, status, exit_code = "insufficient_resources", 507, 4


class Unavailable(ZError):
    """etcd, the leader or the meta server could not be reached."""
    code, status, exit_code = "unavailable", 503, 5


_BY_CODE = {c.code: c for c in (ZError, InvalidArgument, Unauthenticated, NotFound, Conflict,
                                InsufficientResources, Unavailable)}


def from_dict(d: dict[str, Any], status: int = 500) -> ZError:
    cls = _BY_CODE.get(d.get("code", ""), ZError)
    err = cls(str(d.get("message", f"HTTP {status}")), d.get("hint"), **(d.get("details") or {}))
    return err
