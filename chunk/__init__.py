"""Chunk server: local disks, extents, replication, snapshots and the iSCSI target."""
