"""What every zstore daemon does the same way at its edges."""

from __future__ import annotations

import asyncio
import logging
import os
import signal


def stop_on_signals(log: logging.Logger) -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so each daemon shuts down cleanly
    (revoking its etcd lease, closing sessions) instead of dying mid-write.

    A second signal while that shutdown runs ends the process at once (exit status
    128 + the signal's number, as if killed by it): an operator or a supervisor who asks
    again must not need SIGKILL, and the log says why the stop was not clean."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            log.info("got %s; stopping", sig.name)
            stop.set()
            return
        log.error("got %s again while stopping; exiting now, without a clean stop", sig.name)
        _flush_logs(log)
        os._exit(128 + sig.value)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


def _flush_logs(log: logging.Logger) -> None:
    """What was logged reaches its file before ``os._exit`` (which flushes nothing)."""
    seen: set[int] = set()
    logger: logging.Logger | None = log
    while logger is not None:
        for h in logger.handlers:
            if id(h) not in seen:
                seen.add(id(h))
                try:
                    h.flush()
                except Exception:  # noqa: BLE001 - exiting anyway
                    pass
        logger = logger.parent if logger.propagate else None
