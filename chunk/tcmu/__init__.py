"""TCMU: serve a LIO ``user:`` backstore's command ring from this process.

``ring`` is the byte-level codec of the mailbox and command ring (the kernel's
include/uapi/linux/target_core_user.h), ``uio`` opens and maps the /dev/uioN
the kernel made for the backstore, and ``loop`` runs the commands it finds
through the same ``chunk.scsi.LogicalUnit`` the built-in iSCSI target uses.
"""
