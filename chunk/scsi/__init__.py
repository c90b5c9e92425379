"""SCSI command layer (SPC-4 / SBC-3), shared by every transport.

The iSCSI target and the (planned) TCMU frontend both feed CDBs into
``LogicalUnit.execute``; nothing here knows about PDUs or rings.
"""

from .inquiry import LunIdentity
from .luns import lun_not_supported, report_luns, report_luns_command
from .nexus import Nexus
from .reservations import ReservationState
from .sense import ScsiResult
from .unit import LogicalUnit

__all__ = ["LogicalUnit", "LunIdentity", "Nexus", "ReservationState", "ScsiResult",
           "lun_not_supported", "report_luns", "report_luns_command"]
