"""zstore: distributed block storage exported over iSCSI.

This package holds what every daemon shares: configuration, the etcd key
layout and typed records, the etcd client, RPC framing, logging, the admin
CLI and the local-cluster launcher.
"""

__version__ = "0.1.0"
