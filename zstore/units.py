"""Parsing and printing of byte sizes (``10Gi``, ``500M``, ``4096``).

Binary suffixes (Ki, Mi, Gi, Ti, Pi) are powers of 1024; decimal ones
(K, M, G, T, P) powers of 1000, as in Kubernetes quantities, so a size
copied from a PVC means the same thing here.
"""

from __future__ import annotations

import math
import re

_SUFFIX = {
    "": 1,
    "k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
}
# No real size needs more digits than this (1 PiB is 16); a longer run is refused
# before int() sees it, which would raise a plain ValueError past 4300 digits.
_MAX_DIGITS = 64
# Exactly the suffixes of _SUFFIX (ki, kiB and the like are not sizes: K is 1000, Ki 1024).
_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(" + "|".join(sorted(filter(None, _SUFFIX), key=len, reverse=True))
                 + r"|)[bB]?\s*$")


class SizeError(ValueError):
    """A size string that is not a size."""


def parse_size(text: str | int) -> int:
    """Return the number of bytes ``text`` names; raise SizeError otherwise."""
    if isinstance(text, bool):
        raise SizeError(f"invalid size {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise SizeError(f"invalid size {text}: must not be negative")
        return text
    m = _RE.match(str(text))
    if not m:
        raise SizeError(
            f"invalid size {text!r}: use a number with an optional suffix, "
            "e.g. 10Gi, 500Mi, 1T or 4096")
    number, suffix = m.groups()
    if suffix not in _SUFFIX:           # the pattern takes none other; never a KeyError
        raise SizeError(f"invalid size {text!r:.60}: unknown suffix {suffix!r}")
    if len(number) > _MAX_DIGITS:
        raise SizeError(f"invalid size {text!r:.60}: too many digits")
    try:
        value = (float(number) * _SUFFIX[suffix] if "." in number
                 else int(number) * _SUFFIX[suffix])
    except ValueError:
        raise SizeError(f"invalid size {text!r:.60}: not a number") from None
    if not math.isfinite(value):
        raise SizeError(f"invalid size {text!r:.60}: too large")
    if value != int(value):
        raise SizeError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def format_size(n: int) -> str:
    """Shortest exact binary form of ``n`` (``1Gi``), else one decimal (``1.5Gi``)."""
    for suffix, mult in (("Pi", 2**50), ("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
        if n >= mult:
            if n % mult == 0:
                return f"{n // mult}{suffix}"
            return f"{n / mult:.1f}{suffix}"
    return f"{n}B"
