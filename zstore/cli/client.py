"""A small synchronous client of the meta JSON API that finds a live server itself.

Any meta server answers any call (followers forward writes to the leader), so
the client only needs *one* that is alive and sees a leader. It tries the
configured endpoints in order and moves on when one refuses the connection,
times out, or answers 503 ``unavailable`` (no leader yet, or its etcd is
unreachable). While every endpoint fails that way it keeps retrying the whole
list with a short backoff for up to ``retry_for`` seconds, so a leader failover
(a few seconds) is invisible to scripts. Nothing is remembered between runs.
A retry resends the request as it was, so a call that is not idempotent puts a
request id of its own in the body (``volume revert``: one uuid4 per invocation),
and the meta answers a resend from the first call's outcome. A DELETE is
idempotent except in its answer: when an earlier attempt may have reached the
meta (sent, then no answer or a reset, or a 503 such as a follower's forward
timing out) and the retry answers 404, the earlier attempt most likely deleted
it, so the call succeeds with ``{"already_gone": true, "note": ...}``.

Built on ``http.client`` rather than aiohttp: a CLI call is one or two
requests, and the stdlib starts fast and ignores ``http_proxy`` settings that
would otherwise send cluster-internal traffic to a proxy.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import quote, urlencode, urlsplit

from zstore import errors
from zstore.config import ClientConfig, ConfigError, read_secret_file
from zstore.logs import redact

API_PREFIX = "/api/v1"
ALREADY_GONE = "already gone: an earlier attempt deleted it (its answer was lost)"
DEFAULT_RETRY_FOR = 15.0
UNREACHABLE_HINT = ("is the cluster running? start one with `zstore up`, "
                    "or point --config/ZSTORE_CONFIG at its config")

_STATUS_ERRORS: dict[int, type[errors.ZError]] = {
    400: errors.InvalidArgument, 401: errors.Unauthenticated, 404: errors.NotFound,
    409: errors.Conflict, 503: errors.Unavailable, 507: errors.InsufficientResources,
}


def seg(value: str) -> str:
    """Quote one path segment (names, IQNs); ':' and '@' are legal in a path."""
    return quote(value, safe=":@*")


@dataclass
class Response:
    status: int
    data: Any
    endpoint: str


@dataclass
class _Endpoint:
    url: str          # as configured, for messages
    scheme: str
    host: str
    port: int
    base: str         # path prefix, usually ""


class _Failed(Exception):
    """One endpoint did not serve the request; ``retryable`` says whether waiting may help."""

    def __init__(self, reason: str, retryable: bool, error: errors.ZError | None = None,
                 maybe_applied: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable
        self.error = error
        self.maybe_applied = maybe_applied      # the request may have reached the meta


def tls_context(ca_file: str | None, what: str = "client.ca_file") -> ssl.SSLContext:
    """A client TLS context trusting ``ca_file`` (else the system CAs).

    A missing, unreadable or non-certificate file is a configuration mistake,
    so it becomes a ConfigError naming the setting, the file and the reason
    instead of a traceback from deep inside the first request.
    """
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except ssl.SSLError as e:          # before OSError: SSLError is one
        reason = (e.reason or "").replace("_", " ").lower() or str(e)
        raise ConfigError(f"{what} {ca_file} holds no usable CA certificate ({reason}); "
                          "it must be the cluster CA in PEM form") from None
    except OSError as e:
        raise ConfigError(f"cannot read {what} {ca_file}: {e.strerror or e}") from None


def parse_endpoint(url: str) -> _Endpoint:
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise errors.InvalidArgument(
            f"invalid meta endpoint {url!r}: expected http://HOST:PORT or https://HOST:PORT")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise errors.InvalidArgument(f"invalid meta endpoint {url!r}: bad port") from None
    return _Endpoint(url.strip(), parts.scheme, parts.hostname, port, parts.path.rstrip("/"))


class MetaClient:
    def __init__(self, endpoints: Sequence[str], token: str | None = None,
                 ca_file: str | None = None, timeout: float = 10.0,
                 retry_for: float = DEFAULT_RETRY_FOR, config_source: str | None = None,
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        if not endpoints:
            raise errors.InvalidArgument("no meta endpoints configured",
                                         "set client.endpoints in the config or pass --endpoint URL")
        self.endpoints = [parse_endpoint(e) for e in endpoints]
        self.token = token
        self.ca_file = ca_file
        self.timeout = timeout
        self.retry_for = retry_for
        self.config_source = config_source
        self._sleep = sleep
        self._clock = clock
        self._first = 0                       # index of the endpoint that last worked
        # Built once, up front, so a bad client.ca_file is reported before any request.
        self._ssl: ssl.SSLContext | None = (
            tls_context(ca_file) if any(ep.scheme == "https" for ep in self.endpoints) else None)

    @classmethod
    def from_config(cls, cfg: ClientConfig, env: Mapping[str, str] = os.environ,
                    config_source: str | None = None, **kw: Any) -> "MetaClient":
        """$ZSTORE_TOKEN wins over client.token_file, as environment wins over files in config."""
        token = env.get("ZSTORE_TOKEN", "").strip() or read_secret_file(cfg.token_file, "token")
        redact(token)
        return cls(cfg.endpoints, token=token, ca_file=cfg.ca_file, timeout=cfg.timeout,
                   config_source=config_source, **kw)

    # -- convenience -------------------------------------------------------

    def get(self, path: str, **query: Any) -> Any:
        return self.request("GET", path, query=query).data

    def post(self, path: str, body: Any = None) -> Any:
        return self.request("POST", path, body).data

    def put(self, path: str, body: Any = None) -> Any:
        return self.request("PUT", path, body).data

    def delete(self, path: str, body: Any = None, **query: Any) -> Any:
        return self.request("DELETE", path, body, query=query).data

    def delete_strict(self, path: str, body: Any = None, **query: Any) -> Any:
        """A DELETE whose 404 never means an earlier attempt did it (unexport: 404 is
        the snapshot itself missing, which no earlier attempt caused)."""
        return self.request("DELETE", path, body, query=query, gone_is_done=False).data

    # -- the one request loop ------------------------------------------------

    def request(self, method: str, path: str, body: Any = None,
                query: Mapping[str, Any] | None = None, gone_is_done: bool | None = None) -> Response:
        """Send to the first endpoint that serves it; raise the API's error as a ZError.

        ``gone_is_done`` (default: for DELETE): a 404 after an earlier attempt may have
        reached the meta is the earlier attempt's success, answered as
        ``{"already_gone": true, "note": ALREADY_GONE}`` (status 200)."""
        if gone_is_done is None:
            gone_is_done = method == "DELETE"
        maybe_applied = False
        q = {k: _query_value(v) for k, v in (query or {}).items() if v is not None and v is not False}
        full = API_PREFIX + path + (("?" + urlencode(q)) if q else "")
        payload = None if body is None else json.dumps(body).encode()
        deadline = self._clock() + self.retry_for
        attempt = 0
        while True:
            failures: list[tuple[_Endpoint, _Failed]] = []
            n = len(self.endpoints)
            for k in range(n):
                i = (self._first + k) % n
                ep = self.endpoints[i]
                try:
                    resp = self._once(ep, method, full, payload)
                except _Failed as f:
                    maybe_applied = maybe_applied or f.maybe_applied
                    failures.append((ep, f))
                    continue
                except errors.NotFound:
                    if not (gone_is_done and maybe_applied):
                        raise
                    self._first = i
                    return Response(200, {"already_gone": True, "note": ALREADY_GONE}, ep.url)
                self._first = i
                return resp
            remaining = deadline - self._clock()
            if remaining <= 0 or not any(f.retryable for _, f in failures):
                raise self._give_up(failures)
            self._sleep(min(0.2 * 2 ** attempt, 1.0, remaining))
            attempt += 1

    def _once(self, ep: _Endpoint, method: str, path: str, payload: bytes | None) -> Response:
        headers = {"Accept": "application/json", "User-Agent": "zstore-cli"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        conn = self._connection(ep)
        sent = False           # once sent, a failure may come after the meta acted on it
        try:
            conn.request(method, ep.base + path, body=payload, headers=headers)
            sent = True
            r = conn.getresponse()
            raw = r.read()
            status = r.status
        except ssl.SSLCertVerificationError as e:
            raise _Failed(f"TLS certificate not trusted ({e.verify_message}); "
                          "set client.ca_file to the cluster CA", retryable=False) from None
        except socket.gaierror as e:
            raise _Failed(f"cannot resolve host {ep.host!r} ({e.strerror})", retryable=False) from None
        except (TimeoutError, socket.timeout):
            raise _Failed(f"no answer within {self.timeout:g}s", retryable=True, maybe_applied=sent) from None
        except ConnectionRefusedError:
            raise _Failed("connection refused", retryable=True) from None
        except (OSError, http.client.HTTPException) as e:
            reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
            raise _Failed(reason.lower() if reason[:1].isupper() else reason, retryable=True,
                          maybe_applied=sent) from None
        finally:
            conn.close()
        return self._decode(ep, status, raw)

    def _decode(self, ep: _Endpoint, status: int, raw: bytes) -> Response:
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
            if status < 400:
                raise errors.ZError(f"meta server at {ep.url} sent a response that is not JSON "
                                    f"(HTTP {status})", "is that URL really a zstore meta server?")
        if status < 400:
            return Response(status, data, ep.url)
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            err = errors.from_dict(data["error"], status)
        else:
            cls = _STATUS_ERRORS.get(status, errors.ZError)
            err = cls(f"meta server at {ep.url} answered HTTP {status}")
        if status in (502, 504) or isinstance(err, errors.Unavailable):
            # A follower that timed out forwarding to the leader answers 503: the leader
            # may have acted on it all the same. A 503 that says it was not (no leader,
            # leadership changing, the forward refused) did nothing; one that does not say
            # (an older meta server, a proxy) may have.
            maybe = not (isinstance(err, errors.Unavailable) and err.details.get("maybe_applied") is False)
            raise _Failed(err.message, retryable=True, error=err, maybe_applied=maybe)
        if isinstance(err, errors.Unauthenticated) and not err.hint:
            err.hint = (("the token was refused: check client.token_file or $ZSTORE_TOKEN "
                         "against the cluster's meta.token_file") if self.token else
                        "no token configured: set client.token_file in the config or $ZSTORE_TOKEN")
        raise err

    def _connection(self, ep: _Endpoint) -> http.client.HTTPConnection:
        if ep.scheme == "https":
            if self._ssl is None:
                self._ssl = tls_context(self.ca_file)
            return http.client.HTTPSConnection(ep.host, ep.port, timeout=self.timeout, context=self._ssl)
        return http.client.HTTPConnection(ep.host, ep.port, timeout=self.timeout)

    def _give_up(self, failures: list[tuple[_Endpoint, _Failed]]) -> errors.ZError:
        """One error that says what each endpoint did, preferring a server's own words."""
        answered = [f.error for _, f in failures if f.error is not None]
        if answered:
            err = answered[-1]
            if not err.hint:
                err.hint = ("a new meta leader is elected within meta.lease_ttl seconds; if this "
                            "lasts, check etcd and the meta servers' logs")
            return err
        reasons = {f.reason for _, f in failures}
        urls = ", ".join(ep.url for ep, _ in failures)
        if len(reasons) == 1:
            msg = f"cannot reach any meta server at {urls}: {reasons.pop()}"
        else:
            msg = "cannot reach any meta server: " + "; ".join(f"{ep.url}: {f.reason}" for ep, f in failures)
        hint = UNREACHABLE_HINT
        if self.config_source:
            hint += f" (endpoints came from {self.config_source})"
        return errors.Unavailable(msg, hint)


def _query_value(v: Any) -> str:
    if v is True:
        return "true"
    return str(v)
