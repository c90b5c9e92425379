"""Logging setup for the daemons, with secret redaction.

Secrets (the cluster token, CHAP secrets) are registered with ``redact()``
as soon as they are read; the filter replaces them in every record, so a
careless ``log.debug(request)`` cannot leak them.
"""

from __future__ import annotations

import logging
import re
import sys

_secrets: set[str] = set()
_PATTERNS = [re.compile(r"(?i)(authorization:\s*bearer\s+)\S+"),
             re.compile(r"(?i)(\"?(?:secret|mutual_secret|token|password)\"?\s*[:=]\s*\"?)[^\s\",}]+")]


def redact(secret: str | None) -> None:
    if secret and len(secret) >= 4:
        _secrets.add(secret)


def scrub(text: str) -> str:
    for s in _secrets:
        if s in text:
            text = text.replace(s, "***")
    for p in _PATTERNS:
        text = p.sub(r"\1***", text)
    return text


class RedactingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        clean = scrub(msg)
        if clean != msg or record.exc_info:
            record.msg, record.args = clean, None
        if record.exc_info:
            record.exc_text = scrub(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def setup(component: str, level: str = "INFO", file: str | None = None) -> None:
    handler: logging.Handler = logging.FileHandler(file) if file else logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s %(levelname)s {component}[%(process)d] %(name)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    try:
        root.setLevel(level.upper())
    except ValueError:
        root.setLevel(logging.INFO)
        root.warning("unknown log level %r, using INFO", level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
