"""The I_T nexus: who sent a command, and through which target port."""

from __future__ import annotations

from typing import NamedTuple


class Nexus(NamedTuple):
    """I_T nexus identity; hashable, used as the key for reservations and unit attentions.

    A NamedTuple rather than a frozen dataclass: it is hashed on every
    command, and a tuple hashes several times faster.

    ``initiator`` is the initiator port name, for iSCSI the initiator name plus
    ISID (``iqn...,i,0x23d000000001``); ``target_port`` likewise
    (``iqn...,t,0x0001``).
    """
    initiator: str
    target_port: str
    relative_port_id: int = 1
