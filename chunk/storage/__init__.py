"""The chunk server's storage engine (groundwork, not wired into the daemon yet).

``extent_file``: one extent replica on a local disk, checksummed per 4 KiB block.
``wire``: the framed msgpack protocol replicas speak to each other.
``fencing``: the replica-side ownership-epoch check.
"""
