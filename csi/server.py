"""The zstore CSI plugin process: ``python -m csi.server --endpoint unix:///csi/csi.sock``.

``--mode controller`` runs Identity + Controller (the Deployment next to the
external-provisioner/attacher/resizer/snapshotter sidecars); ``--mode node``
and ``both`` are accepted so the DaemonSet can be wired now, but the Node
service is not written yet, so they serve Identity only (plus Controller for
``both``). Meta endpoints and token come from the ``[client]`` section of
the usual zstore config, the iSCSI portal handed to nodes from ``[redirector]``
(its VIP and port) unless ``--portal`` says otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

import grpc

from csi import csi_pb2_grpc as pbg
from csi.controller import Controller
from csi.identity import Identity
from csi.meta import Meta
from zstore import config as zconfig

log = logging.getLogger("zstore.csi")


def build_server(meta: Meta, portal: str, mode: str = "controller") -> grpc.aio.Server:
    server = grpc.aio.server()
    controller = mode in ("controller", "both")
    pbg.add_IdentityServicer_to_server(Identity(meta, controller=controller), server)
    if controller:
        pbg.add_ControllerServicer_to_server(Controller(meta, portal), server)
    return server


def listen(server: grpc.aio.Server, endpoint: str) -> None:
    """Bind ``unix:///path`` (removing a stale socket left by a previous run) or ``host:port``."""
    if endpoint.startswith("unix://"):
        path = Path(endpoint[len("unix://"):])
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_socket():
            path.unlink()
        endpoint = f"unix:{path}"
    if server.add_insecure_port(endpoint) == 0 and not endpoint.startswith("unix:"):
        raise SystemExit(f"cannot listen on {endpoint}")


async def serve(endpoint: str, meta: Meta, portal: str, mode: str) -> None:
    server = build_server(meta, portal, mode)
    listen(server, endpoint)
    await server.start()
    log.info("zstore CSI plugin (%s) listening on %s, portal %s", mode, endpoint, portal)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=5)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="zstore-csi", description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", "unix:///csi/csi.sock"))
    ap.add_argument("--mode", choices=("controller", "node", "both"), default="controller")
    ap.add_argument("--config", help="zstore config file ([client] and [redirector] are used)")
    ap.add_argument("--portal", help="iSCSI portal HOST:PORT for nodes (default: the VIP from the config)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = zconfig.load(zconfig.find_config_file(args.config))
    portal = args.portal or f"{cfg.redirector.vip}:{cfg.redirector.port}"
    if args.mode != "controller":
        log.warning("the Node service is not implemented yet: serving Identity%s only",
                    " and Controller" if args.mode == "both" else "")
    asyncio.run(serve(args.endpoint, Meta.from_config(cfg), portal, args.mode))


if __name__ == "__main__":
    main()
