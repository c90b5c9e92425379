"""One log line per CSI RPC (method, gRPC code, duration, redacted request) and its metrics.

A grpc.aio server interceptor, so every servicer (Identity, Controller, and the
Node service when it lands) gets it without touching a handler. Requests are
logged with their ``secrets`` maps blanked (CSI passes credentials there) and
then through ``zstore.logs.scrub``, which catches registered secrets and
``token=``-style text anywhere else.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Awaitable, Callable

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message

from csi.metrics import Metrics
from zstore.logs import scrub

log = logging.getLogger("zstore.csi.rpc")

# Called every few seconds by kubelet and the livenessprobe sidecar: a successful one
# is logged at DEBUG only, so the INFO log stays about volumes.
QUIET = {"Probe", "GetPluginInfo", "GetPluginCapabilities", "NodeGetCapabilities"}
REDACTED = "***"


def _blank_secrets(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ({sk: REDACTED for sk in v} if (k == "secrets" or k.endswith("_secrets"))
                    and isinstance(v, dict) else _blank_secrets(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_blank_secrets(v) for v in value]
    return value


def redacted(request: Any) -> str:
    """The request as compact JSON, safe to log."""
    if not isinstance(request, Message):
        return scrub(repr(request))
    data = MessageToDict(request, preserving_proto_field_name=True)
    return scrub(json.dumps(_blank_secrets(data), separators=(",", ":"), sort_keys=True))


def _code_name(code: Any) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "OK" if code in (None, 0) else str(code)


class RpcLogInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, metrics: Metrics | None = None) -> None:
        self.metrics = metrics

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        # CSI is unary-unary throughout; anything else (or an unknown method) passes untouched.
        if handler is None or handler.unary_unary is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        inner = handler.unary_unary

        async def logged(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.monotonic()
            code, failure = "OK", None
            try:
                response = await inner(request, context)
                code = _code_name(context.code())
                return response
            except grpc.aio.AbortError:
                code = _code_name(context.code())
                raise
            except BaseException as e:                     # grpc turns it into UNKNOWN
                code, failure = "UNKNOWN", e
                raise
            finally:
                elapsed = time.monotonic() - start
                if self.metrics is not None:
                    self.metrics.observe(method, code, elapsed)
                self._log(method, code, elapsed, request, context, failure)

        return grpc.unary_unary_rpc_method_handler(
            logged, request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)

    @staticmethod
    def _log(method: str, code: str, elapsed: float, request: Any,
             context: grpc.aio.ServicerContext, failure: BaseException | None) -> None:
        level = logging.DEBUG if code == "OK" and method in QUIET else logging.INFO
        if failure is not None:
            level = logging.ERROR
        if not log.isEnabledFor(level):
            return
        details = context.details() if code != "OK" else None
        if isinstance(details, bytes):
            details = details.decode(errors="replace")
        why = f" ({scrub(str(details))})" if details else (f" ({type(failure).__name__}: "
                                                             f"{scrub(str(failure))})" if failure else "")
        log.log(level, "%s %s%s in %.1f ms request=%s", method, code, why, elapsed * 1000,
                redacted(request))
