"""The etcd client every daemon uses: aetcd, plus mutual TLS and clear errors.

aetcd only ever opens ``grpc.aio.insecure_channel``. ``Client`` overrides
``connect``, the one place the channel is made, and can open a secure channel
with a CA and a client certificate instead; everything else (KV, txn, lease,
watch) is aetcd's own code path.

Several endpoints: the client talks to one member at a time, over a channel of
its own (a hostname is resolved by gRPC, to all its addresses, and verified as
the TLS server name), and moves to the next endpoint when the current one fails
(``Client._failed``): at once on UNAVAILABLE (refused, unresolvable, dropped
connection, or "no leader"), after two timeouts in a row otherwise. A call that
surely never reached etcd (no connection, no leader) is retried at once on the
next endpoint; others fail to the caller as before, and its next call goes to
the next endpoint. Every call carries etcd's require-leader metadata
(``hasleader``), so a member cut off from quorum answers "no leader" at once
(watches on it are ended by etcd) instead of hanging or serving stale data.

Watches share one gRPC Watch stream (aetcd's), except those a caller puts on a stream of
its own by name (``Client.watch_on``): etcd answers a progress request per stream.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable, NamedTuple

import aetcd
import aetcd.utils
import aetcd.watcher
import grpc
from aetcd import exceptions as aetcd_exc
from aetcd import rpc

from .config import EtcdConfig

log = logging.getLogger(__name__)


class EtcdUnavailable(RuntimeError):
    """etcd could not be reached (or did not answer in time)."""


UNAVAILABLE_ERRORS = (aetcd_exc.ConnectionFailedError, aetcd_exc.ConnectionTimeoutError,
                      asyncio.TimeoutError, EtcdUnavailable)


def _targets(endpoints: list[str]) -> list[str]:
    """One gRPC target per endpoint, in order (``http(s)://`` and a trailing ``/`` dropped):
    ``host:port``, ``1.2.3.4:port`` or ``[v6]:port``; gRPC resolves a hostname itself."""
    targets = [e.split("://", 1)[-1].rstrip("/") for e in endpoints]
    if not targets or not all(targets):
        raise ValueError(f"no usable etcd endpoint in {endpoints!r}")
    return targets



# etcd's require-leader metadata: a member without a leader refuses the call ("no leader",
# UNAVAILABLE) and ends its watch streams, rather than waiting or answering stale reads.
REQUIRE_LEADER = (("hasleader", "true"),)
# UNAVAILABLE answers given before the request was handed to etcd at all: retried at once
# on the next endpoint. (Any other failure may have been applied: the caller decides.)
_NOT_SENT = ("failed to connect", "dns resolution failed", "name resolution",
             "empty address list", "no leader", "connections to all backends failing")
TIMEOUTS_BEFORE_FAILOVER = 2


def _never_sent(e: BaseException) -> bool:
    cause = e if isinstance(e, rpc.AioRpcError) else e.__cause__
    if not isinstance(cause, rpc.AioRpcError) or cause.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    details = (cause.details() or "").lower()
    return any(m in details for m in _NOT_SENT)


def _failing_over(f):
    """Wrap one of aetcd's calls: note each failure (``Client._failed``) and retry it on
    the next endpoint while it surely never reached etcd, once per endpoint at most."""
    @functools.wraps(f)
    async def call(self, *a, **kw):
        tries = len(self._targets)
        while True:
            await self.connect()
            gen = self._gen
            try:
                result = await f(self, *a, **kw)
            except aetcd_exc.ClientError as e:
                tries -= 1
                if not self._failed(gen, e) or tries <= 0:
                    raise
                continue
            self._timeouts = 0
            return result
    return call


class Progress(NamedTuple):
    """A progress marker in a watch's stream (a watch created with ``progress_notify``):
    etcd was at ``revision`` when it sent it, after the events before it in the stream."""
    revision: int


class _Watcher(aetcd.watcher.Watcher):
    """aetcd's Watcher, with each created watch matched to its own create request, and
    progress replies passed on.

    aetcd gives a "created" answer to whichever create is pending then. A create that
    timed out (etcd restarting) and was answered late so handed its watch, on another
    prefix, to the next create, which then followed the wrong keys and never its own,
    while looking open (a catalog section that silently stopped following etcd). Here
    each create asks for its own watch id (etcd >= 3.4 honours it), and a "created"
    answer with any other id is cancelled.

    aetcd drops a reply without events; here a progress reply (to the watch it names, or
    with id -1, etcd's answer to ``request_progress``, to every watch of the stream)
    reaches each watch created with ``progress_notify`` as a ``Progress``, in stream
    order. Other watches still see events only.
    """

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._next_id = 0
        self._pending_id: int | None = None
        self._pending_progress = False

    def _build_watch_create_request(self, *a, **kw):
        req = super()._build_watch_create_request(*a, **kw)
        self._next_id += 1                      # under self._lock (add_callback holds it)
        self._pending_id = self._next_id
        self._pending_progress = req.create_request.progress_notify
        req.create_request.watch_id = self._next_id
        return req

    async def _handle_response(self, response):
        if response.created:
            async with self._lock:
                cb = self._new_callback
                if cb is None or response.watch_id != self._pending_id:
                    await self._enqueue_watch_cancel(watch_id=response.watch_id)
                    return
                self._pending_id = None
                if response.compact_revision != 0:
                    cb.error = aetcd_exc.RevisionCompactedError(response.compact_revision)
                    self._new_callback_ready.notify_all()
                    return
                self._callbacks[response.watch_id] = cb
                cb.watch_id = response.watch_id
                cb.progress = self._pending_progress
                self._new_callback_ready.notify_all()
            return                              # (etcd sends a creation's events separately)
        if not response.events and not response.canceled and not response.compact_revision:
            await self._progress(response.watch_id, response.header.revision)
            return
        await super()._handle_response(response)

    async def _progress(self, watch_id: int, revision: int) -> None:
        async with self._lock:
            takers = [cb for i, cb in self._callbacks.items()
                      if (watch_id == -1 or i == watch_id) and getattr(cb, "progress", False)]
        for cb in takers:
            await self._process_callback(cb, Progress(revision))

    def request_progress(self) -> None:
        """Ask etcd, on this stream, for its revision: each progress-taking watch gets it as a
        ``Progress`` once etcd answers, which a stalled stream never does (no stream yet: no
        watch to tell). Raises EtcdUnavailable if the stream has not taken what it was sent:
        aetcd's request queue is small and shared, and a watch cancel waits for room in it
        holding the watcher's lock, so probes piling up there on a stalled stream would hang
        every watch of the client. At most one request is queued, and only into an empty queue."""
        if self._request_handler is None:
            return
        if not self._request_queue.empty():
            raise EtcdUnavailable("the watch stream has not taken its last requests")
        self._request_queue.put_nowait(rpc.WatchRequest(progress_request=rpc.WatchProgressRequest()))

    async def retire(self, why: str) -> None:
        """End every watch on this watcher with an error (callers watch again, on the
        client's current channel) and its stream."""
        await self._terminate_stream(EtcdUnavailable(why))


class Client(aetcd.Client):
    """aetcd client whose channel we build: plain or mutually authenticated TLS, to one of
    several endpoints at a time, failing over to the next (see the module docstring).

    Only ``connect`` differs from aetcd's: it opens our channel and then sets up the same
    stubs and watcher aetcd would; the calls themselves are aetcd's, wrapped by
    ``_failing_over``.
    """

    def __init__(self, target: str | list[str], *,
                 credentials: grpc.ChannelCredentials | None = None, **kw):
        targets = [target] if isinstance(target, str) else list(target)
        super().__init__(host=targets[0], port=0, **kw)
        self._targets = targets
        self._current = 0                      # index in _targets of the channel's endpoint
        self._gen = 0                          # +1 per channel opened
        self._timeouts = 0                     # timeouts in a row on the current channel
        self._credentials = credentials
        self._retiring: dict[asyncio.Task, Any] = {}   # closing old channels: task -> channel
        self._streams: dict[str, _Watcher] = {}     # named watch streams on the channel

    @property
    def _target(self) -> str:
        return self._targets[self._current]

    def _open(self) -> None:
        opts = list(self._options.items())
        if self._credentials is not None:
            self.channel = rpc.secure_channel(self._target, self._credentials, options=opts)
        else:
            self.channel = rpc.insecure_channel(self._target, options=opts)
        self._gen += 1
        self._timeouts = 0
        self.metadata = REQUIRE_LEADER
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self._watcher = _Watcher(rpc.WatchStub(self.channel),
                                 timeout=self._timeout, metadata=self.metadata)
        self._streams = {}

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        self._is_connecting = True
        try:
            self._open()
            self._connected.set()
        finally:
            self._is_connecting = False

    def _failed(self, gen: int, e: BaseException) -> bool:
        """A call on channel ``gen`` failed with ``e``: move to the next endpoint when it is
        unavailable (or timed out twice in a row). True: retry the call now (it never
        reached etcd, and there is another endpoint to try)."""
        if len(self._targets) < 2 or not self._connected.is_set():
            return False
        if isinstance(e, aetcd_exc.ConnectionTimeoutError):
            if gen == self._gen:
                self._timeouts += 1
                if self._timeouts >= TIMEOUTS_BEFORE_FAILOVER:
                    self._failover(f"{self._timeouts} timeouts in a row")
            return False
        if not isinstance(e, aetcd_exc.ConnectionFailedError):
            return False
        if gen == self._gen:                   # (else another call moved on already)
            self._failover(_describe_error(e))
        return _never_sent(e)

    def _failover(self, why: str) -> None:
        """Open a channel to the next endpoint now; the old one's watches end with an error
        and its calls still running get the timeout to finish."""
        old_target, old_channel = self._target, self.channel
        old_watchers = [self._watcher, *self._streams.values()]
        self._current = (self._current + 1) % len(self._targets)
        log.warning("etcd at %s failed (%s); using %s", old_target, why, self._target)
        self._open()
        task = asyncio.ensure_future(self._retire(old_channel, old_watchers, old_target))
        self._retiring[task] = old_channel
        task.add_done_callback(lambda t: self._retiring.pop(t, None))

    async def _retire(self, channel: Any, watchers: list[Any], target: str) -> None:
        for watcher in watchers:
            try:
                if watcher is not None:
                    await watcher.retire(f"etcd at {target} failed; watch again")
            except Exception:  # noqa: BLE001 - best effort: the channel goes anyway
                log.debug("retiring a watcher on %s failed", target, exc_info=True)
        if channel is not None:
            await channel.close(grace=self._timeout or 5.0)

    def _stream(self, name: str | None) -> _Watcher:
        """The watcher (one gRPC Watch stream) ``name`` on the current channel, opened on
        first use; None: aetcd's own, which every other watch of this client shares."""
        if name is None:
            return self._watcher
        watcher = self._streams.get(name)
        if watcher is None:
            watcher = self._streams[name] = _Watcher(rpc.WatchStub(self.channel),
                                                     timeout=self._timeout, metadata=self.metadata)
        return watcher

    async def request_progress(self, stream: str | None = None) -> None:
        """Ask etcd for its revision on a watch stream (``_Watcher.request_progress``): the
        shared one, or the one named ``stream`` (``watch_on``)."""
        await self.connect()
        self._stream(stream).request_progress()

    @_failing_over
    async def watch_on(self, stream: str, key: bytes, **kw: Any) -> Any:
        """aetcd's ``watch``, on the watch stream named ``stream`` instead of the shared one.

        etcd answers a progress request on a stream only for that stream's watches, and
        etcd >= 3.5.8 waits until every one of them is synced: a caller that proves its
        watches current by progress requests (chunk/catalog.py) is then not held back by a
        watch elsewhere on the client catching up (a volume's extents listed and watched)."""
        watcher = self._stream(stream)
        events: asyncio.Queue = asyncio.Queue()

        async def response_callback(response: Any) -> None:
            await events.put(response)

        try:
            cb = await watcher.add_callback(key, response_callback, **kw)
        except rpc.AioRpcError as e:
            aetcd_exc._handle_exception(e)
        canceled = asyncio.Event()

        async def cancel() -> None:
            canceled.set()
            await events.put(None)
            await watcher.cancel(cb.watch_id)

        async def iterator():
            while not canceled.is_set():
                event = await events.get()
                if event is None:
                    canceled.set()
                if isinstance(event, Exception):
                    canceled.set()
                    if isinstance(event, rpc.AioRpcError):
                        aetcd_exc._handle_exception(event)
                    raise event
                if not canceled.is_set():
                    yield event

        return aetcd.rtypes.Watch(iterator, cancel, cb.watch_id)

    async def revision(self, key: bytes) -> int:
        """etcd's current revision, by a linearizable read of the one ``key`` (count only):
        its cost does not grow with the data (a key the caller may read, under auth)."""
        resp = await self._range(rpc.RangeRequest(key=key, count_only=True))
        return resp.header.revision

    async def counts(self, ranges: list[tuple[bytes, int]]) -> list[int]:
        """How many keys each ``(prefix, revision)`` held at that revision (0: now), by one
        linearizable Txn of count-only ranges: etcd answers the numbers alone, so the reply
        does not grow with the keys (etcd still walks its in-memory index to count them)."""
        ops = [rpc.RequestOp(request_range=rpc.RangeRequest(
                   key=p, range_end=prefix_end(p), revision=rev, count_only=True))
               for p, rev in ranges]
        resp = await self._txn(rpc.TxnRequest(success=ops))
        return [r.response_range.count for r in resp.responses]

    @_failing_over
    async def _txn(self, req: Any) -> Any:
        try:
            return await self.kvstub.Txn(req, timeout=self._timeout, metadata=self.metadata)
        except rpc.AioRpcError as e:
            aetcd_exc._handle_exception(e)

    async def close(self) -> None:
        streams, self._streams = list(self._streams.values()), {}
        for watcher in streams:
            await watcher.shutdown()
        await super().close()
        retiring, self._retiring = dict(self._retiring), {}
        for task in retiring:
            task.cancel()
        await asyncio.gather(*retiring, return_exceptions=True)
        for channel in retiring.values():
            if channel is not None:
                await channel.close()

    async def range(self, start: bytes, end: bytes, limit: int = 0,
                    keys_only: bool = False) -> tuple[list[tuple[bytes, bytes]], bool]:
        """Sorted ``[(key, value)]`` in [start, end) with etcd's own ``limit``; and "more".

        aetcd's range calls have no limit, which paginated listings need.
        """
        req = rpc.RangeRequest(key=start, range_end=end, limit=limit, keys_only=keys_only,
                               sort_order=rpc.RangeRequest.ASCEND, sort_target=rpc.RangeRequest.KEY)
        resp = await self._range(req)
        return [(kv.key, kv.value) for kv in resp.kvs], resp.more

    @_failing_over
    async def _range(self, req: Any) -> Any:
        try:
            return await self.kvstub.Range(req, timeout=self._timeout, metadata=self.metadata)
        except rpc.AioRpcError as e:
            aetcd_exc._handle_exception(e)


# aetcd's calls that go to etcd themselves (``watch_prefix``, ``replace``, leases' methods
# call these): each fails over.
for _name in ("get", "get_prefix", "get_range", "get_all", "put", "delete", "delete_prefix",
              "delete_range", "transaction", "lease", "revoke_lease", "refresh_lease",
              "get_lease_info", "status", "members", "compact", "watch"):
    setattr(Client, _name, _failing_over(getattr(aetcd.Client, _name)))
del _name


def _describe_error(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def client(cfg: EtcdConfig) -> aetcd.Client:
    """A not-yet-connected client for ``cfg`` (TLS when a CA file is set)."""
    target = _targets(cfg.endpoints)
    timeout = cfg.timeout
    options = {"grpc.keepalive_time_ms": 10_000, "grpc.keepalive_timeout_ms": 5_000,
               "grpc.initial_reconnect_backoff_ms": 200, "grpc.max_reconnect_backoff_ms": 2_000}
    if cfg.ca_file:
        if bool(cfg.cert_file) != bool(cfg.key_file):
            from .config import ConfigError
            raise ConfigError("etcd.cert_file and etcd.key_file must be given together")
        read = lambda p: Path(p).read_bytes() if p else None  # noqa: E731
        creds = grpc.ssl_channel_credentials(root_certificates=read(cfg.ca_file),
                                             private_key=read(cfg.key_file),
                                             certificate_chain=read(cfg.cert_file))
        return Client(target, credentials=creds, timeout=timeout, options=options)
    return Client(target, timeout=timeout, options=options)


def prefix_end(prefix: bytes) -> bytes:
    return aetcd.utils.prefix_range_end(prefix)


# Keys per Range call of ``get_prefix_paged``. gRPC's client refuses replies over 4 MiB by
# default (``grpc.max_receive_message_length``): one unlimited Range over ~13k extent records
# is more than that, so listings that grow with the data are read in pages of this many keys.
PAGE_SIZE = 1000
COMPACTED_RETRIES = 3


async def get_prefix_paged(etcd: aetcd.Client, prefix: bytes, page: int | None = None,
                           keys_only: bool = False) -> tuple[list[Any], int]:
    """Every key under ``prefix`` in key order, read ``page`` keys per Range call: (kvs, revision).

    All pages are read at the one revision the first page was served at (the header's,
    passed to the following reads), so the listing is a consistent snapshot, as one Range
    would be. Each kv is etcd's own (``key``, ``value``, ``mod_revision``, ...). A snapshot
    compacted away between pages is read again from the start at a newer revision.
    """
    page = PAGE_SIZE if page is None else page
    if page < 1:
        raise ValueError(f"page size must be >= 1, not {page}")
    await etcd.connect()
    end = prefix_end(prefix)
    for attempt in range(COMPACTED_RETRIES):
        kvs: list[Any] = []
        start, revision = prefix, 0
        try:
            while True:
                req = rpc.RangeRequest(key=start, range_end=end, limit=page, revision=revision,
                                       keys_only=keys_only, sort_order=rpc.RangeRequest.ASCEND,
                                       sort_target=rpc.RangeRequest.KEY)
                if isinstance(etcd, Client):
                    resp = await etcd._range(req)       # fails over, as etcd's other calls
                else:
                    try:
                        resp = await etcd.kvstub.Range(req, timeout=etcd._timeout, metadata=etcd.metadata)
                    except rpc.AioRpcError as e:
                        aetcd_exc._handle_exception(e)
                if revision == 0:
                    revision = resp.header.revision
                kvs.extend(resp.kvs)
                if not resp.more or not resp.kvs:
                    return kvs, revision
                start = resp.kvs[-1].key + b"\x00"
        except aetcd_exc.ClientError as e:
            if "compacted" not in str(e) or attempt == COMPACTED_RETRIES - 1:
                raise
            log.info("listing %s: revision %d compacted between pages; listing again",
                     prefix.decode(errors="replace"), revision)
    raise AssertionError("unreachable")


def describe(cfg: EtcdConfig) -> str:
    return ",".join(cfg.endpoints)


async def cancel_watch(watch, timeout: float | None = None) -> None:
    """Cancel ``watch``, best effort: on a broken channel there is nothing left to cancel."""
    try:
        await asyncio.wait_for(watch.cancel(), timeout)
    except Exception:  # noqa: BLE001 - best effort on a broken channel
        pass


async def create_watch(etcd: aetcd.Client, prefix: bytes, stream: str | None = None, **kw):
    """``etcd.watch_prefix(prefix, **kw)`` (on the watch stream ``stream``: ``Client.watch_on``),
    honouring a cancel that came while it was created.

    aetcd waits for the "created" answer in ``asyncio.wait_for``, which on Python 3.11 returns
    the result instead of raising CancelledError when the answer is already in as the cancel
    comes: the cancel is lost, and a caller that stops its watch only by cancelling the task
    waits for a watch nobody ends (a ReservationStore.close() hung that way). The task still
    counts the cancel (``cancelling()``): the new watch is cancelled and the cancel raised."""
    if stream is not None and isinstance(etcd, Client):
        watch = await etcd.watch_on(stream, prefix, range_end=prefix_end(prefix), **kw)
    else:
        watch = await etcd.watch_prefix(prefix, **kw)
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        await cancel_watch(watch)
        raise asyncio.CancelledError
    return watch


async def watch_prefix(etcd: aetcd.Client, prefix: bytes,
                       on_snapshot: Callable[[list[tuple[bytes, bytes]]], Awaitable[None]],
                       on_event: Callable[[aetcd.rtypes.Event], Awaitable[None]],
                       stop: asyncio.Event, retry_delay: float = 1.0,
                       with_revision: bool = False,
                       on_status: Callable[[bool], None] | None = None,
                       relist: asyncio.Event | None = None,
                       on_progress: Callable[[int], Awaitable[None]] | None = None,
                       stream: str | None = None) -> None:
    """Mirror a prefix: a full listing, then events from the next revision on.

    ``with_revision``: ``on_snapshot`` also gets the listing's revision (every value
    in it is as of that revision), for callers that must not step back past a change.

    On any watch failure (etcd restart, compaction, network) it lists again and
    re-watches, so the caller's view converges instead of silently freezing.

    ``on_status(True)`` is called once a listing is delivered and its watch is open,
    ``on_status(False)`` as soon as the listing or the watch fails (and again each retry
    that fails): callers that must not serve an old mirror for long (chunk/catalog.py)
    follow it. A watch on a hung etcd fails only when gRPC's keepalive gives up, so such
    callers also confirm liveness themselves; setting ``relist`` makes it drop its watch
    and list afresh (cleared as each listing starts: set during one, it lists again).
    The watch is never interrupted while being created: aetcd matches a created watch to
    the one create request in flight, so a create abandoned half-way hands its watch to
    the next caller's.

    ``on_progress(revision)``: the watch takes progress markers (``Progress``, answers to
    ``Client.request_progress`` and etcd's periodic ones), each in order with the events:
    callers that must know their watch still delivers learn it from these.

    ``stream``: watch on that named watch stream of the client (``Client.watch_on``), not
    the one its other watches share.
    """
    def status(ok: bool) -> None:
        if on_status is not None:
            try:
                on_status(ok)
            except Exception:  # noqa: BLE001 - a status listener must not break the watch
                log.exception("watch status listener failed")

    while not stop.is_set():
        relisting = False
        if relist is not None:
            relist.clear()
        try:
            # paged: one Range reply is capped at 4 MiB by gRPC (a volume of ~13k extents)
            listing, rev = await get_prefix_paged(etcd, prefix)
            kvs = [(kv.key, kv.value) for kv in listing]
            await (on_snapshot(kvs, rev) if with_revision else on_snapshot(kvs))
            watch = await create_watch(etcd, prefix, stream, start_revision=rev + 1,
                                       progress_notify=on_progress is not None)
            status(True)

            async def consume() -> None:
                async for event in watch:
                    if isinstance(event, Progress):
                        await on_progress(event.revision)
                    else:
                        await on_event(event)

            consumer = asyncio.ensure_future(consume())
            stopper = asyncio.ensure_future(stop.wait())
            waits = {consumer, stopper}
            relister = asyncio.ensure_future(relist.wait()) if relist is not None else None
            if relister is not None:
                waits.add(relister)
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if consumer in done:
                    status(False)
                    consumer.result()       # raises what broke the watch; relist below
                elif relister is not None and relister in done and not stop.is_set():
                    status(False)
                    relisting = True
            finally:
                for t in waits:
                    t.cancel()
                await asyncio.gather(*waits, return_exceptions=True)
                await cancel_watch(watch)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - keep mirroring through etcd outages
            status(False)
            log.warning("watch on %s failed (%s); relisting in %.1fs", prefix.decode(), e, retry_delay)
        if not stop.is_set() and not relisting:
            try:
                await asyncio.wait_for(stop.wait(), retry_delay)
            except asyncio.TimeoutError:
                pass
