"""Test hooks for syncs that run in worker threads (FLUSH, FUA writes, SETGEN): hold or fail
an extent's fdatasync there, and see which thread closes its fds."""

from __future__ import annotations

import errno
import os
import threading


def replica_fds(store, vid: str, idx: int) -> set[int]:
    """The fds of an open replica: what a failed flush's retirement closes."""
    rep = store._replicas[(vid, idx)]                        # noqa: SLF001
    return {rep.ext._data, rep.ext._crc, rep.seq_fd}        # noqa: SLF001


def hold_syncs(monkeypatch, fds: set[int], *, fail: bool = False, times: int = 1):
    """os.fdatasync of ``fds``: each call's thread is recorded in ``threads``; the first
    ``times`` calls made off the calling (event loop's) thread set ``reached`` and wait for
    ``proceed``, then raise EIO if ``fail``. A call on the loop never waits (that would hang
    the test). Returns (reached, proceed, threads)."""
    loop_thread = threading.get_ident()
    reached, proceed, threads = threading.Event(), threading.Event(), []
    real = os.fdatasync

    def fdatasync(fd):
        if fd in fds:
            threads.append(threading.get_ident())
            reached.set()
            if threading.get_ident() != loop_thread and len(threads) <= times:
                assert proceed.wait(10)
                if fail:
                    raise OSError(errno.EIO, "Input/output error")
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return reached, proceed, threads


def closes_of(monkeypatch, fds: set[int]) -> dict[int, int]:
    """fd -> the thread that first closed it, for ``fds`` (filled in as they close)."""
    closed: dict[int, int] = {}
    real = os.close

    def close(fd):
        if fd in fds and fd not in closed:
            closed[fd] = threading.get_ident()
        return real(fd)
    monkeypatch.setattr(os, "close", close)
    return closed
