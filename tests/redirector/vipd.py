"""A VipHolder in a process of its own, for the VIP tests: the holder answers TCP on VIP:port.

    python -m tests.redirector.vipd --etcd URL --prefix P --id ID --vip IP --port N
                                    [--interface IFACE] [--ttl S]

While it holds the VIP, every connection to VIP:port reads one line ``ID EPOCH``. Events go to
stdout as ``vipd ID acquired|released ...`` lines; SIGTERM stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from redirector.vip import VipHolder
from zstore import etcd
from zstore.config import EtcdConfig, RedirectorConfig
from zstore.keys import Keys
from zstore.records import VipRecord


async def main(a: argparse.Namespace) -> None:
    cfg = RedirectorConfig(vip=a.vip, port=a.port, interface=a.interface, redirector_id=a.id,
                           lease_ttl=a.ttl)
    client = etcd.client(EtcdConfig(endpoints=[a.etcd], prefix=a.prefix, timeout=2.0))
    holder = VipHolder(client, Keys(a.prefix), cfg, a.id)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    server: asyncio.Server | None = None

    async def on_acquire(rec: VipRecord) -> None:
        nonlocal server

        async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(f"{a.id} {rec.epoch}\n".encode())
            await w.drain()
            w.close()
        server = await asyncio.start_server(answer, a.vip, a.port, reuse_address=True)
        print(f"vipd {a.id} acquired epoch {rec.epoch}", flush=True)

    async def on_release() -> None:
        nonlocal server
        if server is not None:
            server.close()
            server = None
        print(f"vipd {a.id} released", flush=True)

    await holder.run(stop, on_acquire, on_release)
    await client.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--etcd", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--vip", required=True)
    p.add_argument("--port", type=int, default=3260)
    p.add_argument("--interface")
    p.add_argument("--ttl", type=int, default=3)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(main(p.parse_args()))
