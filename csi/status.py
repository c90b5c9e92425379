"""Mapping meta API errors to the gRPC codes the CSI spec names, in one place.

Handlers raise ``Abort`` for the spec's own error rows and let ``ZError``s
from the meta API through; ``guard`` turns both into a gRPC status so that no
handler repeats the mapping.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Awaitable, Callable, TypeVar

import grpc

from zstore import errors

log = logging.getLogger("zstore.csi")

_BY_ERROR: dict[type[errors.ZError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.Conflict: grpc.StatusCode.ALREADY_EXISTS,
    errors.InsufficientResources: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
}


class Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


def code_of(err: errors.ZError) -> grpc.StatusCode:
    """A conflict the meta marks ``retry`` (contention, a snapshot not ready yet) is ABORTED:
    worth repeating, unlike a name taken with other parameters (ALREADY_EXISTS)."""
    if isinstance(err, errors.Conflict) and err.details.get("retry"):
        return grpc.StatusCode.ABORTED
    return _BY_ERROR.get(type(err), grpc.StatusCode.INTERNAL)


H = TypeVar("H", bound=Callable[..., Awaitable[Any]])


def guard(handler: H) -> H:
    """Wrap a servicer method: Abort and ZError become the matching gRPC status."""
    @functools.wraps(handler)
    async def wrapped(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await handler(self, request, context)
        except Abort as e:
            await context.abort(e.code, e.message)
        except errors.ZError as e:
            msg = e.message + (f" ({e.hint})" if e.hint else "")
            await context.abort(code_of(e), msg)
    return wrapped  # type: ignore[return-value]


def invalid(message: str) -> Abort:
    return Abort(grpc.StatusCode.INVALID_ARGUMENT, message)
