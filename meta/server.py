"""The meta server daemon: API + leader election + (as leader) chunk liveness.

Stateless apart from etcd: any number can run; one leads. Followers answer
reads themselves and forward writes to the leader, so clients need no idea
who leads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import hashlib
import hmac
import logging
import os
import ssl
import sys
from typing import Any

import aiohttp
from aiohttp import web

from zstore import config as zconfig
from zstore import etcd as zetcd
from zstore import logs
from zstore.cli.client import tls_context
from zstore.daemon import stop_on_signals
from zstore.errors import Unauthenticated, Unavailable, ZError
from zstore.keys import Keys
from zstore.records import RecordError

from . import api, liveness, placement, volumes
from .recovery import MIN_STALL_TIMEOUT, Recovery
from .context import Ctx
from .election import Election

log = logging.getLogger("meta")
FORWARDED = "X-Zstore-Forwarded"
HOP_HEADERS = {"host", "content-length", "transfer-encoding", "connection"}
LONG_CALLS = ("/revert", "/snapshots")
LONG_CALL_TIMEOUT = 90


def error_response(err: ZError) -> web.Response:
    return web.json_response({"error": err.to_dict()}, status=err.status)


# Per request: [True] once a transaction was handed to etcd (``TrackingCtx.txn``); a
# mutable box, so a write made in a task the handler spawned is seen too.
_WRITE_SENT: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar("zstore_meta_write_sent",
                                                                               default=None)


class TrackingCtx(Ctx):
    """The server's Ctx: notes, per API request, that a write may have reached etcd."""

    async def txn(self, compare: list, success: list) -> bool:
        box = _WRITE_SENT.get()
        if box is not None:
            box[0] = True
        return await super().txn(compare, success)


def etcd_maybe_applied(e: BaseException, write_sent: bool) -> bool:
    """Whether a request that failed on etcd with ``e`` may have changed something: yes
    once a write was sent in it, or unless ``e`` surely never reached etcd (no connection,
    no leader); a timeout or a dropped call may come after etcd applied it."""
    return write_sent or not zetcd._never_sent(e)


@web.middleware
async def errors_mw(request: web.Request, handler) -> web.StreamResponse:
    box = [False]
    token = _WRITE_SENT.set(box)
    try:
        return await handler(request)
    except ZError as e:
        return error_response(e)
    except zetcd.UNAVAILABLE_ERRORS as e:
        cfg = request.app["config"].etcd
        maybe = etcd_maybe_applied(e, box[0])
        log.warning("etcd unreachable during %s %s: %s%s", request.method, request.path, type(e).__name__,
                    " (the request may have been applied)" if maybe else "")
        hint = ("check that etcd is running and reachable from the meta servers; "
                + ("the request may have been applied: check the state before retrying it with a new request id"
                   if maybe else "nothing was changed"))
        return error_response(Unavailable(
            f"etcd is unreachable at {zetcd.describe(cfg)} ({type(e).__name__})",
            hint=hint, maybe_applied=maybe))
    except RecordError as e:
        log.error("corrupt record in etcd: %s", e)
        return error_response(ZError(f"a stored record could not be read: {e}"))
    except web.HTTPException:
        raise
    except Exception:  # noqa: BLE001 - answer 500 with no internals, log the trace
        log.exception("internal error on %s %s", request.method, request.path)
        return error_response(ZError("internal error in the meta server; see its log"))
    finally:
        _WRITE_SENT.reset(token)


@web.middleware
async def auth_mw(request: web.Request, handler) -> web.StreamResponse:
    if request.path == api.PREFIX + "/health":
        return await handler(request)
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    expected: bytes = request.app["token_digest"]
    given = hashlib.sha256(token.strip().encode()).digest()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
        request.app["auth_failures"][0] += 1
        log.warning("refused unauthenticated %s %s from %s (%s)", request.method, request.path,
                    request.remote, "no token" if not header else "wrong token")
        return error_response(Unauthenticated(
            "missing or wrong cluster token",
            hint="the CLI reads it from client.token_file in its config (zstore up writes one)"))
    return await handler(request)


@web.middleware
async def leader_mw(request: web.Request, handler) -> web.StreamResponse:
    """Writes go to the leader: run them here if we lead, else forward them."""
    election: Election = request.app["election"]
    if request.method in ("GET", "HEAD") or election.is_leader:
        return await handler(request)
    if request.headers.get(FORWARDED):
        raise Unavailable("leadership is changing", hint="retry in a few seconds", maybe_applied=False)
    leader = await election.current()
    if leader is None:
        raise Unavailable("no meta leader is elected right now", hint="retry in a few seconds", maybe_applied=False)
    if leader.meta_id == election.meta_id:
        raise Unavailable("this meta server is re-establishing leadership", hint="retry in a few seconds", maybe_applied=False)
    body = await request.read()
    # Snapshot and revert wait for a chunk server (up to 10 s / 60 s): give them longer.
    timeout = aiohttp.ClientTimeout(total=LONG_CALL_TIMEOUT if request.path.endswith(LONG_CALLS) else 30)
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
    headers[FORWARDED] = election.meta_id
    url = leader.url.rstrip("/") + request.rel_url.path_qs
    request.app["forwarded"][0] += 1
    try:
        async with request.app["http"].request(request.method, url, data=body, headers=headers,
                                               timeout=timeout) as r:
            payload = await r.read()
            return web.Response(body=payload, status=r.status, content_type=r.content_type)
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        # Refused or unresolved, the request never reached the leader; any later failure
        # (timeout, reset) may come after the leader acted on it: the client tells them
        # apart (a retried DELETE answered 404 is then the first attempt's success).
        raise Unavailable(f"the meta leader {leader.meta_id} at {leader.url} is unreachable ({type(e).__name__})",
                          hint="retry; a new leader is elected within the lease TTL",
                          maybe_applied=not isinstance(e, aiohttp.ClientConnectorError)) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="zstore-meta", description="zstore meta server")
    p.add_argument("--config", help="TOML config file (default: $ZSTORE_CONFIG)")
    p.add_argument("--listen", help="HOST:PORT to serve the API on")
    p.add_argument("--advertise-url", help="URL peers and clients use to reach this server")
    p.add_argument("--meta-id", help="stable name of this meta server")
    p.add_argument("--token-file", help="file holding the cluster token")
    p.add_argument("--tls-cert-file")
    p.add_argument("--tls-key-file")
    p.add_argument("--lease-ttl", type=int)
    p.add_argument("--etcd-endpoints", help="comma-separated host:port list")
    p.add_argument("--prefix", help="etcd key prefix")
    p.add_argument("--log-level")
    p.add_argument("--log-file")
    return p.parse_args(argv)


def load_config(args: argparse.Namespace) -> zconfig.Config:
    path = args.config or os.environ.get("ZSTORE_CONFIG") or None
    return zconfig.load(path, overrides={
        "meta.listen": args.listen, "meta.advertise_url": args.advertise_url, "meta.meta_id": args.meta_id,
        "meta.token_file": args.token_file, "meta.tls_cert_file": args.tls_cert_file,
        "meta.tls_key_file": args.tls_key_file, "meta.lease_ttl": args.lease_ttl,
        "etcd.endpoints": args.etcd_endpoints, "etcd.prefix": args.prefix,
        "log.level": args.log_level, "log.file": args.log_file})


def split_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise zconfig.ConfigError(f"invalid address {value!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


async def serve(cfg: zconfig.Config, stop: asyncio.Event) -> None:
    token = zconfig.read_secret_file(cfg.meta.token_file, "token")
    if not token:
        raise zconfig.ConfigError("meta.token_file is required: every API call must carry the cluster token")
    logs.redact(token)
    host, port = split_hostport(cfg.meta.listen)
    if cfg.meta.recovery_grace < 0 or cfg.meta.recovery_concurrency < 1:
        raise zconfig.ConfigError("meta.recovery_grace must be >= 0 and meta.recovery_concurrency >= 1")
    stall = cfg.meta.recovery_stall_timeout
    if not (stall == 0 or MIN_STALL_TIMEOUT <= stall < float("inf")):      # NaN fails both
        raise zconfig.ConfigError(f"meta.recovery_stall_timeout must be 0 (never) or at least "
                                  f"{MIN_STALL_TIMEOUT:.0f} seconds, not {stall}")
    placement.configure(cfg.meta)          # meta.allow_shared_failure_domain
    ssl_ctx = None
    if cfg.meta.tls_cert_file or cfg.meta.tls_key_file:
        if not (cfg.meta.tls_cert_file and cfg.meta.tls_key_file):
            raise zconfig.ConfigError("meta.tls_cert_file and meta.tls_key_file must be given together")
        ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_ctx.load_cert_chain(cfg.meta.tls_cert_file, cfg.meta.tls_key_file)
        except ssl.SSLError as e:      # before OSError: SSLError is one
            raise zconfig.ConfigError(
                f"meta.tls_cert_file {cfg.meta.tls_cert_file} / meta.tls_key_file {cfg.meta.tls_key_file}: "
                f"not a usable PEM certificate and matching key ({(e.reason or str(e)).replace('_', ' ').lower()})"
            ) from None
        except OSError as e:
            raise zconfig.ConfigError(f"cannot read meta.tls_cert_file {cfg.meta.tls_cert_file} or "
                                      f"meta.tls_key_file {cfg.meta.tls_key_file}: {e.strerror or e}") from None
    # For forwarding to the leader; a bad client.ca_file is a config error, found before etcd.
    client_ssl = tls_context(cfg.client.ca_file) if cfg.client.ca_file else None
    url = cfg.meta.advertise_url or f"{'https' if ssl_ctx else 'http'}://{host}:{port}"
    meta_id = cfg.meta.meta_id or f"meta-{hashlib.sha256(url.encode()).hexdigest()[:8]}"

    etcd = zetcd.client(cfg.etcd)
    keys = Keys(cfg.etcd.prefix)
    leader_tasks: dict[str, Any] = {}

    def on_change(leading: bool) -> None:
        for name in ("liveness", "recovery", "gc"):
            task = leader_tasks.pop(name, None)
            if task:
                task.cancel()
        if leading:
            leader_stop = asyncio.Event()
            leader_tasks["liveness"] = asyncio.ensure_future(liveness.follow(ctx, leader_stop))
            rec = Recovery(ctx, grace=cfg.meta.recovery_grace, concurrency=cfg.meta.recovery_concurrency,
                           stall_timeout=cfg.meta.recovery_stall_timeout)
            leader_tasks["recovery"] = asyncio.ensure_future(rec.run(leader_stop))
            leader_tasks["gc"] = asyncio.ensure_future(volumes.collect_garbage_every(ctx, leader_stop))

    election = Election(etcd, keys, meta_id, url, cfg.meta.lease_ttl, on_change)
    ctx = TrackingCtx(etcd=etcd, keys=keys, fence=election.fence)

    app = web.Application(middlewares=[errors_mw, auth_mw, leader_mw], client_max_size=1 << 20)
    app["ctx"], app["election"], app["config"] = ctx, election, cfg
    app["token_digest"] = hashlib.sha256(token.encode()).digest()
    app["auth_failures"], app["forwarded"] = [0], [0]
    app["http"] = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30),
                                        connector=aiohttp.TCPConnector(ssl=client_ssl))
    app.add_routes(api.routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_ctx)
    await site.start()
    log.info("meta server %s serving %s (etcd %s, prefix %s)", meta_id, url, zetcd.describe(cfg.etcd), keys.prefix)
    el_task = asyncio.ensure_future(election.run(stop))
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await el_task
        for t in leader_tasks.values():
            t.cancel()
        await runner.cleanup()
        await app["http"].close()
        try:
            await asyncio.wait_for(etcd.close(), 3)
        except Exception:  # noqa: BLE001
            pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args)
    except zconfig.ConfigError as e:
        print(f"zstore-meta: error: {e}", file=sys.stderr)
        return 2
    logs.setup("meta", cfg.log.level, cfg.log.file)

    async def run() -> None:
        await serve(cfg, stop_on_signals(log))

    try:
        asyncio.run(run())
    except zconfig.ConfigError as e:
        log.error("%s", e)
        print(f"zstore-meta: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        log.error("cannot start: %s", e)
        print(f"zstore-meta: error: cannot start: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
