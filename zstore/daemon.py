"""What every zstore daemon does the same way at its edges."""

from __future__ import annotations

import asyncio
import logging
import signal


def stop_on_signals(log: logging.Logger) -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so each daemon shuts down cleanly
    (revoking its etcd lease, closing sessions) instead of dying mid-write."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        log.info("got %s; stopping", sig.name)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop
