"""The open-file limit of a daemon that holds many sockets or files."""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (the unit's LimitNOFILE=); returns the
    soft limit now in effect.

    The usual soft default, 1024, is below what a chunk server's open extents or a
    redirector's connections need, and running out makes every accept, open and
    subprocess fail at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise the open-file limit from %d: %s", soft, e)
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
