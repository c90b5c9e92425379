"""Per-RPC Prometheus metrics for the CSI plugin, in the text exposition format.

A counter by method and gRPC code and a latency histogram by method are all we
need, so they are written out by hand (about fifty lines) rather than pulling in
prometheus-client for the plugin image.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict

from typing import TYPE_CHECKING

if TYPE_CHECKING:      # aiohttp only when metrics are served: it is most of the plugin's start time
    from aiohttp import web

log = logging.getLogger("zstore.csi")

# CSI calls span a local Probe (sub-millisecond) to a CreateVolume through a meta
# failover (tens of seconds): buckets from 1 ms to 60 s.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()   # observe() is cheap; render() may come from another thread
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        self.buckets: dict[str, list[int]] = {}
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def observe(self, method: str, code: str, seconds: float) -> None:
        with self._lock:
            self.calls[(method, code)] += 1
            b = self.buckets.setdefault(method, [0] * len(BUCKETS))
            for i, bound in enumerate(BUCKETS):
                if seconds <= bound:
                    b[i] += 1
            self.sums[method] += seconds
            self.counts[method] += 1

    def render(self) -> str:
        out = ["# HELP zstore_csi_rpc_total CSI RPCs handled, by method and gRPC status code.",
               "# TYPE zstore_csi_rpc_total counter"]
        with self._lock:
            for (method, code), n in sorted(self.calls.items()):
                out.append(f'zstore_csi_rpc_total{{method="{method}",code="{code}"}} {n}')
            out += ["# HELP zstore_csi_rpc_duration_seconds CSI RPC latency, by method.",
                    "# TYPE zstore_csi_rpc_duration_seconds histogram"]
            for method in sorted(self.buckets):
                name = "zstore_csi_rpc_duration_seconds"
                for bound, n in zip(BUCKETS, self.buckets[method]):
                    out.append(f'{name}_bucket{{method="{method}",le="{bound}"}} {n}')
                out.append(f'{name}_bucket{{method="{method}",le="+Inf"}} {self.counts[method]}')
                out.append(f'{name}_sum{{method="{method}"}} {self.sums[method]:.6f}')
                out.append(f'{name}_count{{method="{method}"}} {self.counts[method]}')
        return "\n".join(out) + "\n"


async def serve_metrics(metrics: Metrics, port: int, host: str = "127.0.0.1") -> web.AppRunner:
    """GET /metrics on HOST:PORT (loopback unless asked: the numbers name volumes' RPCs,
    nothing secret, but nobody else needs them by default). Returns the runner to clean up."""
    from aiohttp import web

    async def handle(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})

    app = web.Application()
    app.router.add_get("/metrics", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return runner


__all__ = ["Metrics", "serve_metrics", "BUCKETS"]
