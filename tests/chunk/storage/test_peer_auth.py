"""Peer handshake over real loopback sockets, and the cluster secret in a real etcd."""

from __future__ import annotations

import asyncio
import hmac
import hashlib

import pytest

from chunk.storage import peer_auth
from chunk.storage.peer_auth import AuthError, client_handshake, server_handshake
from chunk.storage.wire import Frame, FrameReader, FrameWriter, Op, Status
from zstore.keys import Keys

SECRET = bytes(range(32))


def test_proofs_are_hmac_sha256_bound_to_role_and_both_nonces():
    nc, ns = b"c" * 32, b"s" * 32
    assert peer_auth.server_proof(SECRET, nc, ns) == \
        hmac.new(SECRET, b"server" + nc + ns, hashlib.sha256).digest()
    assert peer_auth.client_proof(SECRET, ns, nc) == \
        hmac.new(SECRET, b"client" + ns + nc, hashlib.sha256).digest()
    assert peer_auth.server_proof(SECRET, nc, ns) != peer_auth.client_proof(SECRET, nc, ns)
    assert peer_auth.check(b"x" * 32, b"x" * 32)
    assert not peer_auth.check(b"x" * 32, b"y" * 32)
    assert not peer_auth.check(b"x" * 32, "x" * 32) and not peer_auth.check(b"x", None)
    assert peer_auth.new_nonce() != peer_auth.new_nonce()


class _Server:
    """A listener running server_handshake on each connection, recording the outcome."""

    def __init__(self, secret: bytes, cluster: str = "c1") -> None:
        self.secret, self.cluster = secret, cluster
        self.outcomes: asyncio.Queue = asyncio.Queue()

    async def __aenter__(self) -> tuple[str, int]:
        self._srv = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return "127.0.0.1", self._srv.sockets[0].getsockname()[1]

    async def __aexit__(self, *exc) -> None:
        self._srv.close()
        await self._srv.wait_closed()

    async def _handle(self, r, w) -> None:
        out = FrameWriter(w)
        try:
            peer = await server_handshake(FrameReader(r), out, self.secret, self.cluster)
            await self.outcomes.put(peer)
        except Exception as e:
            await self.outcomes.put(e)
        await out.close()


async def _dial(addr):
    r, w = await asyncio.open_connection(*addr)
    return FrameReader(r), FrameWriter(w)


async def test_handshake_outcomes():
    server = _Server(SECRET)
    async with server as addr:
        # right secret: both sides agree, the server learns the peer's chunk id
        reader, writer = await _dial(addr)
        await asyncio.wait_for(client_handshake(reader, writer, SECRET, "c1", "chunk-a"), 5)
        assert await asyncio.wait_for(server.outcomes.get(), 5) == "chunk-a"
        await writer.close()

        # wrong secret on the client: the client rejects the server's proof and hangs up
        reader, writer = await _dial(addr)
        with pytest.raises(AuthError, match="prove"):
            await asyncio.wait_for(client_handshake(reader, writer, b"z" * 32, "c1", "x"), 5)
        await writer.close()
        assert isinstance(await asyncio.wait_for(server.outcomes.get(), 5), AuthError)

        # wrong cluster id: DENIED straight away
        reader, writer = await _dial(addr)
        with pytest.raises(AuthError, match="DENIED"):
            await asyncio.wait_for(client_handshake(reader, writer, SECRET, "other", "x"), 5)
        await writer.close()
        assert isinstance(await asyncio.wait_for(server.outcomes.get(), 5), AuthError)


async def test_server_denies_a_client_that_cannot_prove_the_secret():
    """A client that skips checking the server and sends a forged proof gets DENIED."""
    server = _Server(SECRET)
    async with server as addr:
        reader, writer = await _dial(addr)
        await writer.send(Frame(Op.HELLO, 1, args={"cluster": "c1", "chunk_id": "evil",
                                                   "nonce": peer_auth.new_nonce()}))
        first = await asyncio.wait_for(reader.read(), 5)
        assert first.status is Status.OK and len(first.args["nonce"]) == 32
        await writer.send(Frame(Op.HELLO, 2, args={"proof": b"\0" * 32}))
        denied = await asyncio.wait_for(reader.read(), 5)
        assert denied.status is Status.DENIED
        assert await asyncio.wait_for(reader.read(), 5) is None          # and closed
        assert isinstance(await asyncio.wait_for(server.outcomes.get(), 5), AuthError)
        await writer.close()


@pytest.mark.parametrize("first", [
    Frame(Op.PING, 1),
    Frame(Op.WRITE, 1, "v", 0, 1, 1, 0, 4, b"abcd", seq=1),
    Frame(Op.HELLO, 1, args={"cluster": "c1", "chunk_id": "x", "nonce": b"short"}),
])
async def test_anything_but_a_proper_hello_is_refused(first: Frame):
    server = _Server(SECRET)
    async with server as addr:
        reader, writer = await _dial(addr)
        await writer.send(first)
        got = await asyncio.wait_for(reader.read(), 5)
        assert got is None or got.status is Status.DENIED
        assert isinstance(await asyncio.wait_for(server.outcomes.get(), 5), AuthError)
        await writer.close()


async def test_secret_is_created_once_and_shared(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    got = await asyncio.gather(*(peer_auth.load_or_create_secret(etcd_client, keys)
                                 for _ in range(4)))
    assert len(set(got)) == 1 and len(got[0]) == 32
    stored = (await etcd_client.get(keys.peer_secret())).value
    assert bytes.fromhex(stored.decode()) == got[0]
    assert await peer_auth.load_or_create_secret(etcd_client, keys) == got[0]


async def test_a_corrupt_secret_is_a_clear_error(etcd_client, etcd_config):
    keys = Keys(etcd_config.prefix)
    await etcd_client.put(keys.peer_secret(), b"not hex")
    with pytest.raises(ValueError, match="not a hex secret"):
        await peer_auth.load_or_create_secret(etcd_client, keys)
