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

# Only key/value *shapes* are redacted, never prose: "cannot read token file
# /etc/zstore/secret/token: No such file or directory" must keep its reason.
#   - a quoted key, as in JSON or a Python repr:  "token": "x"   'password': 'x'
#   - KEY=VALUE / KEY = VALUE (log fields, query strings, TOML):  secret=x
#   - an unquoted KEY: VALUE only where a key can start (line start, after
#     "{" or ",", a YAML "- "), as in YAML or a header dump:  password: x
# KEY is any name ending in secret/token/password (access_token, mutual_secret).
# A quoted value is redacted whole, spaces included, and keeps its quotes; an
# unquoted one up to whitespace, '"', ',' or '}' (a stray '&' or ']' is masked too).
_KEY = r"[\w-]*(?:secret|token|password)"
_VALUE = r"""(?P<v>"[^"\n]*"|'[^'\n]*'|[^\s",}]+)"""
_PATTERNS = [
    re.compile(r"(?i)(?P<k>authorization:\s*bearer\s+)(?P<v>\S+)"),
    re.compile(rf"(?i)(?P<k>{_KEY}[\"'][ \t]*[:=][ \t]*){_VALUE}"),
    re.compile(rf"(?i)(?P<k>{_KEY}[ \t]*=[ \t]*){_VALUE}"),
    re.compile(rf"(?im)(?P<k>(?:^|[{{,])[ \t]*(?:-[ \t]+)?{_KEY}[ \t]*:[ \t]*){_VALUE}"),
]


def _mask(m: re.Match[str]) -> str:
    v = m.group("v")
    q = v[0] if len(v) >= 2 and v[0] in "\"'" and v[-1] == v[0] else ""
    return f"{m.group('k')}{q}***{q}"


def redact(secret: str | None) -> None:
    if secret and len(secret) >= 4:
        _secrets.add(secret)


def scrub(text: str) -> str:
    for s in _secrets:
        if s in text:
            text = text.replace(s, "***")
    for p in _PATTERNS:
        text = p.sub(_mask, text)
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
