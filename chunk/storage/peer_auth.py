"""Chunk servers prove to each other that they belong to the cluster.

The replication port moves volume data and accepts writes, so only peers may
use it.  Every chunk server knows the cluster's peer secret (etcd
``{p}/cluster/peer-secret``, created once by the first one).  A connection
starts with a mutual HMAC-SHA256 challenge-response, so the secret itself
never crosses the wire and a recorded exchange cannot be replayed (both sides
contribute a fresh nonce)::

    client -> HELLO args {cluster, chunk_id, nonce: nc}
    server <- HELLO OK args {nonce: ns, proof: HMAC(secret, "server" nc ns)}
    client    checks the server's proof (a wrong server is dropped here)
    client -> HELLO args {proof: HMAC(secret, "client" ns nc)}
    server <- HELLO OK  (or DENIED, and the server closes)

Proofs are compared with ``hmac.compare_digest`` (constant time).  Nonces are
exactly ``NONCE_SIZE`` bytes, so the concatenations are unambiguous.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from typing import Any

from zstore.keys import Keys

from .wire import Frame, FrameReader, FrameWriter, Op, Status

__all__ = [
    "NONCE_SIZE", "SECRET_SIZE", "AuthError", "new_nonce", "server_proof", "client_proof",
    "check", "client_handshake", "server_handshake", "load_or_create_secret",
]

NONCE_SIZE = 32
SECRET_SIZE = 32


class AuthError(Exception):
    """The peer did not prove knowledge of the cluster secret (or spoke out of turn)."""


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"".join(parts), hashlib.sha256).digest()


def server_proof(secret: bytes, nonce_c: bytes, nonce_s: bytes) -> bytes:
    return _mac(secret, b"server", nonce_c, nonce_s)


def client_proof(secret: bytes, nonce_s: bytes, nonce_c: bytes) -> bytes:
    return _mac(secret, b"client", nonce_s, nonce_c)


def check(expected: bytes, got: Any) -> bool:
    """Constant-time comparison that also refuses non-bytes input."""
    return isinstance(got, bytes) and hmac.compare_digest(expected, got)


def _shown(value: Any) -> str:
    """A stranger's value for a log line: a string (cut short) as itself, anything else by
    its type name (a repr of a deeply nested one can recurse out, or be huge)."""
    if type(value) is str:
        return repr(value[:80])
    return f"of type {type(value).__name__}"


def _nonce(args: dict | None) -> bytes:
    nonce = (args or {}).get("nonce")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_SIZE:
        raise AuthError(f"HELLO without a {NONCE_SIZE}-byte nonce")
    return nonce


async def client_handshake(reader: FrameReader, writer: FrameWriter, secret: bytes,
                           cluster_id: str, chunk_id: str) -> None:
    """Authenticate a fresh connection from the dialling side; ``AuthError`` if refused.

    The caller bounds it with a timeout and closes the connection on any error.
    """
    nonce_c = new_nonce()
    await writer.send(Frame(Op.HELLO, 1, args={"cluster": cluster_id, "chunk_id": chunk_id,
                                               "nonce": nonce_c}))
    reply = await reader.read()
    if reply is None or reply.op is not Op.HELLO or reply.id != 1:
        raise AuthError("peer closed or answered HELLO out of turn")
    if reply.status is not Status.OK:
        raise AuthError(f"peer refused HELLO: {reply.status and reply.status.name} "
                        f"{(reply.args or {}).get('error', '')}".rstrip())
    nonce_s = _nonce(reply.args)
    if not check(server_proof(secret, nonce_c, nonce_s), (reply.args or {}).get("proof")):
        raise AuthError("peer failed to prove the cluster secret")
    await writer.send(Frame(Op.HELLO, 2, args={"proof": client_proof(secret, nonce_s, nonce_c)}))
    done = await reader.read()
    if done is None or done.op is not Op.HELLO or done.id != 2:
        raise AuthError("peer closed or answered HELLO out of turn")
    if done.status is not Status.OK:
        raise AuthError(f"peer refused our proof: {done.status and done.status.name}")


async def server_handshake(reader: FrameReader, writer: FrameWriter, secret: bytes,
                           cluster_id: str, *, hello_timeout: float | None = None) -> str:
    """Authenticate a fresh connection from the listening side; the peer's chunk id.

    Raises ``AuthError`` (after answering DENIED where the peer is owed an
    answer; also when no HELLO arrives within ``hello_timeout``) or ``FrameError``;
    either way the caller closes the connection.  The caller bounds the whole exchange.
    """
    try:
        hello = await asyncio.wait_for(reader.read(), hello_timeout)
    except asyncio.TimeoutError:
        raise AuthError(f"no HELLO within {hello_timeout:g}s") from None
    if hello is None:
        raise AuthError("peer closed before HELLO")
    if hello.op is not Op.HELLO or hello.status is not None:
        raise AuthError(f"first frame is {hello.op.name}, not HELLO")
    args = hello.args or {}
    peer = args.get("chunk_id")
    if args.get("cluster") != cluster_id or not isinstance(peer, str):
        await writer.send(hello.reply(Status.DENIED, args={"error": "wrong cluster"}))
        raise AuthError(f"HELLO for cluster {_shown(args.get('cluster'))}, not ours")
    try:
        nonce_c = _nonce(args)
    except AuthError:
        await writer.send(hello.reply(Status.DENIED, args={"error": "bad nonce"}))
        raise
    nonce_s = new_nonce()
    await writer.send(hello.reply(Status.OK, args={"nonce": nonce_s,
                                                   "proof": server_proof(secret, nonce_c, nonce_s)}))
    answer = await reader.read()
    if answer is None:
        raise AuthError(f"peer {peer!r:.80} closed before proving the secret")
    if answer.op is not Op.HELLO or answer.status is not None:
        raise AuthError(f"peer {peer!r:.80} sent {answer.op.name} before proving the secret")
    if not check(client_proof(secret, nonce_s, nonce_c), (answer.args or {}).get("proof")):
        await writer.send(answer.reply(Status.DENIED))
        raise AuthError(f"peer {peer!r:.80} failed to prove the cluster secret")
    await writer.send(answer.reply(Status.OK))
    return peer


async def load_or_create_secret(etcd, keys: Keys) -> bytes:
    """The cluster's peer secret; the first caller creates it (put-if-absent txn).

    Racing first chunk servers each propose a secret; the txn lets exactly one
    win and everybody then reads the winner's.
    """
    key = keys.peer_secret()
    t = etcd.transactions
    await etcd.transaction(compare=[t.version(key) == 0],
                           success=[t.put(key, secrets.token_hex(SECRET_SIZE).encode())],
                           failure=[])
    got = await etcd.get(key)
    if got is None:
        raise RuntimeError(f"peer secret {key.decode()} vanished right after creation")
    try:
        secret = bytes.fromhex(got.value.decode())
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"etcd {key.decode()} is not a hex secret") from None
    if len(secret) < 16:
        raise ValueError(f"etcd {key.decode()} holds a {len(secret)}-byte secret; need >= 16")
    return secret
