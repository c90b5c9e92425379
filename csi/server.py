"""The zstore CSI plugin process: ``python -m csi.server --endpoint unix:///csi/csi.sock``.

``--mode controller`` runs Identity + Controller (the Deployment next to the
external-provisioner/attacher/resizer/snapshotter sidecars); ``--mode node``
runs Identity + Node (the DaemonSet; no meta API needed), ``both`` all three.
Meta endpoints and token come from the ``[client]`` section of the usual
zstore config, the iSCSI portal handed to nodes from ``[redirector]`` (its VIP
and port) unless ``--portal`` says otherwise. Every RPC is logged once with its
gRPC code and duration (``csi.rpclog``); ``--metrics-port`` serves per-RPC
Prometheus counters and latency histograms (``csi.metrics``).
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
from csi.host import Host
from csi.metrics import Metrics, serve_metrics
from csi.node import Node, initiator_iqn
from csi.rpclog import RpcLogInterceptor
from zstore import config as zconfig
from zstore.logs import RedactingFilter

log = logging.getLogger("zstore.csi")


def build_server(meta: Meta | None, portal: str, mode: str = "controller",
                 node: Node | None = None, metrics: Metrics | None = None) -> grpc.aio.Server:
    server = grpc.aio.server(interceptors=[RpcLogInterceptor(metrics)])
    controller = mode in ("controller", "both")
    pbg.add_IdentityServicer_to_server(Identity(controller=controller), server)
    if controller:
        assert meta is not None
        pbg.add_ControllerServicer_to_server(Controller(meta, portal), server)
    if mode in ("node", "both"):
        assert node is not None, "node mode needs a Node"
        pbg.add_NodeServicer_to_server(node, server)
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


async def serve(endpoint: str, meta: Meta | None, portal: str, mode: str, node: Node | None = None,
                metrics_port: int | None = None, metrics_address: str = "127.0.0.1") -> None:
    metrics = Metrics() if metrics_port is not None else None
    server = build_server(meta, portal, mode, node, metrics)
    listen(server, endpoint)
    await server.start()
    runner = await serve_metrics(metrics, metrics_port, metrics_address) if metrics else None
    log.info("zstore CSI plugin (%s) listening on %s, portal %s", mode, endpoint, portal)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(grace=5)
    if runner is not None:
        await runner.cleanup()


def arg_parser() -> argparse.ArgumentParser:
    """Apart from main() so tests can check the flags the Kubernetes manifests pass."""
    ap = argparse.ArgumentParser(prog="zstore-csi", description=__doc__.splitlines()[0])
    ap.add_argument("--endpoint", default=os.environ.get("CSI_ENDPOINT", "unix:///csi/csi.sock"))
    ap.add_argument("--mode", choices=("controller", "node", "both"), default="controller")
    ap.add_argument("--config", help="zstore config file ([client] and [redirector] are used)")
    ap.add_argument("--portal", help="iSCSI portal HOST:PORT for nodes (default: the VIP from the config)")
    ap.add_argument("--node-id", help="node mode: the node id (default: the IQN in /etc/iscsi/initiatorname.iscsi)")
    ap.add_argument("--host-cmd-prefix", default="",
                    help='node mode: prefix for host tools, e.g. "nsenter -t 1 -a --" in a container')
    ap.add_argument("--state-dir", default="/var/lib/zstore-csi",
                    help="node mode: where the attach facts of staged volumes are kept")
    ap.add_argument("--device-timeout", type=float, default=60.0,
                    help="node mode: seconds to wait for a volume's disk to appear")
    ap.add_argument("--metrics-port", type=int, metavar="PORT",
                    help="serve Prometheus metrics on http://ADDRESS:PORT/metrics (default: off)")
    ap.add_argument("--metrics-address", default="127.0.0.1", metavar="ADDRESS",
                    help="address for --metrics-port (default 127.0.0.1; 0.0.0.0 in a pod)")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = arg_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:   # the token never reaches a log line
        handler.addFilter(RedactingFilter())
    node = None
    if args.mode in ("node", "both"):
        node = Node(args.node_id or initiator_iqn(), Host(args.host_cmd_prefix), args.state_dir,
                    args.device_timeout)
    meta, portal = None, args.portal or ""
    if args.mode != "node" or args.config:
        cfg = zconfig.load(zconfig.find_config_file(args.config))
        portal = args.portal or f"{cfg.redirector.vip}:{cfg.redirector.port}"
        if args.mode != "node":    # a node plugin never talks to the meta API, even with --config
            meta = Meta.from_config(cfg)
    asyncio.run(serve(args.endpoint, meta, portal, args.mode, node, args.metrics_port, args.metrics_address))


if __name__ == "__main__":
    main()
